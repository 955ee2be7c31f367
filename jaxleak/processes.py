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

The one-victim function and the shared arguments are pickled once per worker, the victims'
slices once per victim: ``fn`` must be picklable (a module-level function, or a
``functools.partial`` of one over picklable arguments such as a flax module's ``apply``).
Programs that call this from a script need the usual ``if __name__ == "__main__":`` guard
of ``multiprocessing``'s ``spawn`` start method.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import re
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


# --------------------------------------------------------------------------
# Worker side. Module-level state is per worker process: its compiled function and
# shared arguments, set once by the pool's initializer.
# --------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(cores, fn, args, in_axes) -> None:
    core = cores.get(timeout=120)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})  # before the backend starts: its thread pool has one thread
    flags = _FORCE_DEVICES.sub("", os.environ.get("XLA_FLAGS", "")).strip()
    os.environ["XLA_FLAGS"] = flags  # one device per worker (read when the backend starts, not at import)
    _WORKER.update(fn=jax.jit(fn), args=args, in_axes=in_axes)


def _collect(pending, outs, bar, when):
    done, pending = cf.wait(pending, return_when=when)
    for future in done:
        i, out = future.result()  # re-raises a worker's exception here
        outs[i] = out
        if bar is not None:
            bar.update()
    return pending


def _run_victim(item) -> tuple[int, PyTree]:
    i, mapped = item
    it = iter(mapped)
    call = [next(it) if ax == 0 else a for a, ax in zip(_WORKER["args"], _WORKER["in_axes"])]
    out = jax.block_until_ready(_WORKER["fn"](*call))
    return i, jax.tree_util.tree_map(np.asarray, out)


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------


def map_in_processes(
    fn: Callable,
    args: tuple,
    in_axes: Sequence[Optional[int]],
    n: int,
    *,
    workers: Optional[int] = None,
    progress: bool = False,
    desc: str = "victims",
) -> PyTree:
    """``fn`` over the ``n`` victims of the ``in_axes`` 0 arguments, one victim per task.

    The ``"processes"`` strategy of ``jaxleak.victims.map_victims``, which checks ``args``,
    ``in_axes`` and ``n`` first; call that. ``fn`` must be picklable (see the module
    docstring); arguments with ``in_axes`` ``None`` are sent once per worker.
    ``workers``: worker processes, each pinned to one core of :func:`available_cores`;
    ``None``: one per available core; more than the available cores is an error.

    Returns ``fn``'s outputs as numpy arrays stacked over victims, in victim order: the
    same values as a loop of ``jax.jit(fn)`` on one device (same program, same inputs).
    """
    cores = available_cores()
    workers = len(cores) if workers is None else int(workers)
    if not 1 <= workers <= len(cores):
        raise ValueError(f"workers must be between 1 and the {len(cores)} available cores, got {workers}")
    workers = min(workers, n)

    to_host = lambda t: jax.tree_util.tree_map(np.asarray, t)
    shared = tuple(None if ax == 0 else to_host(a) for a, ax in zip(args, in_axes))
    mapped = [to_host(a) for a, ax in zip(args, in_axes) if ax == 0]
    items = ((i, [jax.tree_util.tree_map(lambda v: v[i], a) for a in mapped]) for i in range(n))

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    for core in cores[:workers]:
        queue.put(core)
    outs: list = [None] * n
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=desc, unit="victim")
    # concurrent.futures rather than multiprocessing.Pool: a worker that dies (killed for memory,
    # say) raises BrokenProcessPool here instead of leaving its victim's task waiting forever.
    # At most 2 victims per worker are in flight, so a large victim set is never pickled all at once.
    with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                initargs=(queue, fn, shared, in_axes)) as pool:
        pending = set()
        for item in items:
            pending.add(pool.submit(_run_victim, item))
            if len(pending) >= 2 * workers:
                pending = _collect(pending, outs, bar, cf.FIRST_COMPLETED)
        _collect(pending, outs, bar, cf.ALL_COMPLETED)
    if bar is not None:
        bar.close()
    return jax.tree_util.tree_map(lambda *xs: np.stack(xs), *outs)


__all__ = ["available_cores", "map_in_processes"]
