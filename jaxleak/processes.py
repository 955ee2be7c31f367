"""Victims over worker processes, one per CPU core, each pinned to its core with one XLA device.

On a CPU, XLA splits even tiny loop fusions over every core of its thread pool, and the
devices of ``--xla_force_host_platform_device_count`` share that pool. For gradient matching
on LeNet (CIFAR-100, 2-core machine, 2026-12-04) a 2-device process ran at 0.81-0.85 ms per
evaluation in aggregate, while two single-device processes pinned to one core each ran at
0.95 ms each, 0.48 ms in aggregate. This module is that second arrangement, the
``"processes"`` strategy of ``jaxleak.victims.map_victims`` (and so of
``jaxleak.attacks.attack_victims``): :func:`map_in_processes` starts one ``spawn`` worker
per core, pins it (``os.sched_setaffinity``) before its JAX backend starts, and deals
victims to the workers one at a time (the slow ones do not hold up the rest). 16 iDLG
victims, 300 steps: 29.7 s against 40.7 s for the 2-device loop, startup included.

Starting the workers and loading the compiled attack costs ~2.7 s per call on the 2-core
CPU (iDLG, warm compilation cache). A :class:`WorkerPool` keeps the workers, and each
worker keeps the jitted functions it was sent, across calls: pass it as ``pool=`` to
``map_victims`` / ``attack_victims`` when mapping many chunks or many small victim sets.

The one-victim function and the shared arguments are pickled once per call and loaded
once per worker (then cached there under the pickle's hash), the victims' slices once per
victim: ``fn`` must be picklable (a module-level function, or a ``functools.partial`` of
one over picklable arguments such as a flax module's ``apply``). Programs that call this
from a script need the usual ``if __name__ == "__main__":`` guard of
``multiprocessing``'s ``spawn`` start method.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import hashlib
import multiprocessing
import os
import pathlib
import pickle
import re
import shutil
import tempfile
import threading
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

PyTree = Any

_FORCE_DEVICES = re.compile(r"--xla_force_host_platform_device_count=\d+")


def available_cores() -> list[int]:
    """The CPU cores this process may run on (its affinity mask), in order."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux: no affinity mask, every core
        return list(range(os.cpu_count() or 1))


def _worker_count(workers: Optional[int], cores: list[int]) -> int:
    """``workers`` checked against the available ``cores`` (``None``: one per core)."""
    workers = len(cores) if workers is None else int(workers)
    if not 1 <= workers <= len(cores):
        raise ValueError(f"workers must be between 1 and the {len(cores)} available cores, got {workers}")
    return workers


def pool_size(n: int, workers: Optional[int] = None) -> int:
    """Workers for ``n`` victims: ``workers`` (``None``: one per available core), at most one per victim."""
    return min(_worker_count(workers, available_cores()), n)


# --------------------------------------------------------------------------
# Worker side. Module-level state is per worker process: the jitted functions and shared
# arguments it was sent, by the hash of their pickle (a few, most recent last).
# --------------------------------------------------------------------------

_CACHED = 4
_WORKER: collections.OrderedDict = collections.OrderedDict()


def _exit_with_parent(parent: int, every: float = 1.0) -> None:
    """Ends this worker when its parent ``parent`` is gone (a watchdog thread's loop).

    A driver killed without cleanup (SIGTERM, SIGKILL, out of memory) cannot stop its
    workers, and a worker in the middle of a long victim would run on, then wait forever
    for the next one, holding its core. Once the parent dies the worker is re-parented, so
    ``os.getppid()`` changes: then exit at once, without cleanup (nothing of it is kept).
    """
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(3)


def _init_worker(cores, parent: int) -> None:
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True, name="jaxleak-parent-watch").start()
    core = cores.get(timeout=120)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})  # before the backend starts: its thread pool has one thread
    flags = _FORCE_DEVICES.sub("", os.environ.get("XLA_FLAGS", "")).strip()
    os.environ["XLA_FLAGS"] = flags  # one device per worker (read when the backend starts, not at import)


def _job(key: str, path: str):
    if key in _WORKER:
        _WORKER.move_to_end(key)
    else:
        fn, args, in_axes = pickle.loads(pathlib.Path(path).read_bytes())
        _WORKER[key] = (jax.jit(fn), args, in_axes)  # one jit object per job: its traces are reused
        while len(_WORKER) > _CACHED:
            _WORKER.popitem(last=False)
    return _WORKER[key]


def _run_victim(key: str, path: str, i: int, mapped) -> tuple[int, PyTree]:
    fn, args, in_axes = _job(key, path)
    it = iter(mapped)
    call = [next(it) if ax == 0 else a for a, ax in zip(args, in_axes)]
    out = jax.block_until_ready(fn(*call))
    return i, jax.tree_util.tree_map(np.asarray, out)


def _collect(pending, outs, bar, when):
    done, pending = cf.wait(pending, return_when=when)
    for future in done:
        i, out = future.result()  # re-raises a worker's exception here
        outs[i] = out
        if bar is not None:
            bar.update()
    return pending


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


class WorkerPool:
    """Worker processes, one per CPU core, each pinned to its core with one XLA device.

    Kept across calls of :meth:`map` (and of ``map_victims`` / ``attack_victims`` given
    ``pool=``), so the workers start once and each jitted one-victim function is traced
    and compiled (or loaded from JAX's compilation cache) once per worker::

        with jaxleak.processes.WorkerPool() as pool:
            for chunk in chunks:
                jaxleak.attack_victims("idlg", ..., strategy="processes", pool=pool)

    ``workers``: how many (``None``: one per core of :func:`available_cores`; more than
    those is an error). Workers start on first use. Use it as a context manager, or call
    :meth:`close`; a worker that dies breaks the pool (``BrokenProcessPool``). Workers
    exit by themselves within a second of this process dying without closing the pool.
    """

    def __init__(self, workers: Optional[int] = None):
        cores = available_cores()
        self.workers = workers = _worker_count(workers, cores)
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        for core in cores[:workers]:
            queue.put(core)
        # concurrent.futures rather than multiprocessing.Pool: a worker that dies (killed for
        # memory, say) raises BrokenProcessPool instead of leaving its victim's task waiting.
        self._executor = cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                                initargs=(queue, os.getpid()))
        self._dir = pathlib.Path(tempfile.mkdtemp(prefix="jaxleak-pool-"))

    def map(self, fn: Callable, args: tuple, in_axes: Sequence[Optional[int]], n: int, *,
            progress: bool = False, desc: str = "victims") -> PyTree:
        """``fn`` over ``n`` victims in this pool's workers: see :func:`map_in_processes`."""
        if self._dir is None:
            raise ValueError("this WorkerPool is closed")
        to_host = lambda t: jax.tree_util.tree_map(np.asarray, t)
        shared = tuple(None if ax == 0 else to_host(a) for a, ax in zip(args, in_axes))
        payload = pickle.dumps((fn, shared, tuple(in_axes)))
        key = hashlib.sha256(payload).hexdigest()
        path = self._dir / f"{key}.pkl"
        path.write_bytes(payload)  # read by each worker that has not cached this job
        mapped = [to_host(a) for a, ax in zip(args, in_axes) if ax == 0]
        outs: list = [None] * n
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, desc=desc, unit="victim")
        # At most 2 victims per worker in flight: a large victim set is never pickled all at once.
        pending = set()
        try:
            for i in range(n):
                item = [jax.tree_util.tree_map(lambda v: v[i], a) for a in mapped]
                pending.add(self._executor.submit(_run_victim, key, str(path), i, item))
                if len(pending) >= 2 * self.workers:
                    pending = _collect(pending, outs, bar, cf.FIRST_COMPLETED)
            _collect(pending, outs, bar, cf.ALL_COMPLETED)
        except BaseException:
            for future in pending:  # a kept pool should not go on with a failed call's victims
                future.cancel()
            raise
        finally:
            path.unlink(missing_ok=True)  # a worker that needs it again (a cache miss) gets it again
            if bar is not None:
                bar.close()
        return jax.tree_util.tree_map(lambda *xs: np.stack(xs), *outs)

    def close(self) -> None:
        """Stops the workers (after their running victims) and removes the pool's files."""
        if self._dir is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def map_in_processes(
    fn: Callable,
    args: tuple,
    in_axes: Sequence[Optional[int]],
    n: int,
    *,
    workers: Optional[int] = None,
    pool: Optional[WorkerPool] = None,
    progress: bool = False,
    desc: str = "victims",
) -> PyTree:
    """``fn`` over the ``n`` victims of the ``in_axes`` 0 arguments, one victim per task.

    The ``"processes"`` strategy of ``jaxleak.victims.map_victims``, which checks ``args``,
    ``in_axes`` and ``n`` first; call that. ``fn`` must be picklable (see the module
    docstring); arguments with ``in_axes`` ``None`` are sent once per worker.
    ``pool``: a :class:`WorkerPool` to run in (kept after the call); without one a pool
    of ``workers`` processes (``None``: one per available core, at most ``n``) is started
    for this call and closed after it.

    Returns ``fn``'s outputs as numpy arrays stacked over victims, in victim order: the
    same values as a loop of ``jax.jit(fn)`` on one device (same program, same inputs).
    """
    if pool is not None:
        if workers is not None:
            raise ValueError("pass workers= or pool=, not both: a WorkerPool has its own workers")
        return pool.map(fn, args, in_axes, n, progress=progress, desc=desc)
    with WorkerPool(pool_size(n, workers)) as own:
        return own.map(fn, args, in_axes, n, progress=progress, desc=desc)


__all__ = ["WorkerPool", "available_cores", "map_in_processes", "pool_size"]
