"""strategy="processes" of map_victims / attack_victims: victims over pinned single-device worker processes."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxleak import attacks, processes, victims

SHAPE = (8, 8, 1)  # the `tiny` fixture's (conftest.py)


def _where_am_i(x, scale):
    """Runs in a worker: its affinity mask and device count, and a computation on its inputs."""
    del x
    return jnp.asarray(sorted(os.sched_getaffinity(0)) + [-1] * 8)[:8], jnp.asarray(len(jax.devices())), scale * 2.0


def test_processes_equal_the_loop_bit_for_bit(tiny):
    cfg = dataclasses.replace(attacks.PAPER, steps=3)
    kw = dict(config=cfg, x_true=tiny["x"])
    run = lambda s, **extra: attacks.attack_victims("idlg", jax.random.PRNGKey(6), tiny["model"].apply, tiny["params"],
                                                     tiny["grads"], SHAPE, strategy=s, **kw, **extra)
    a, b = run("loop"), run("processes", workers=min(2, len(processes.available_cores())))
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert b["label_index"].tolist() == [3, 7] and (b["evals"] > 1).all()


def test_workers_are_pinned_to_one_core_with_one_device():
    n = min(2, len(processes.available_cores()))
    cores, devices, doubled = victims.map_victims(
        _where_am_i, (np.zeros((4, 1)), np.float32(1.5)), (0, None), strategy="processes", workers=n)
    masks = [tuple(c for c in row if c >= 0) for row in cores.tolist()]
    assert all(len(m) == 1 for m in masks)  # each worker runs on one core ...
    assert {m[0] for m in masks} <= set(processes.available_cores()[:n])
    assert devices.tolist() == [1] * 4  # ... with one XLA device
    np.testing.assert_array_equal(doubled, np.full(4, 3.0, np.float32))  # shared argument sent to every worker


def test_bad_arguments_are_refused_before_any_process_starts():
    x = np.zeros((3, 2))
    run = lambda args, axes, **kw: victims.map_victims(_where_am_i, args, axes, strategy="processes", **kw)
    with pytest.raises(ValueError, match="available cores"):
        run((x, 1.0), (0, None), workers=len(processes.available_cores()) + 1)
    with pytest.raises(ValueError, match="in_axes has 1 entries"):
        run((x, 1.0), (0,))
    with pytest.raises(ValueError, match="in_axes entries must be 0 or None"):
        run((x, 1.0), (1, None))
    with pytest.raises(ValueError, match="victim axes disagree"):
        run((x, np.zeros((4,))), (0, 0))
    with pytest.raises(ValueError, match="at least one argument"):
        run((x, 1.0), (None, None))


def _refuse(x):
    raise ValueError(f"worker saw a victim of shape {x.shape}")


def test_a_workers_error_reaches_the_caller():
    with pytest.raises(ValueError, match=r"worker saw a victim of shape \(2,\)"):
        victims.map_victims(_refuse, (np.zeros((2, 2)),), (0,), strategy="processes", workers=1)


_TRACES = [0]  # per process: how often a worker traced _traced


def _traced(x):
    """Bakes in, at trace time, its process id and how many traces that process has made."""
    _TRACES[0] += 1
    return jnp.asarray([os.getpid(), _TRACES[0]]) + 0 * x.astype(jnp.int32)


def test_a_worker_pool_is_kept_across_calls_with_its_compiled_functions(tiny):
    n = min(2, len(processes.available_cores()))
    x = np.zeros((4, 2), np.int32)
    with processes.WorkerPool(n) as pool:
        first = victims.map_victims(_traced, (x,), (0,), strategy="processes", pool=pool)
        again = victims.map_victims(_traced, (x,), (0,), strategy="processes", pool=pool)
        # the same worker processes, and none traced the function again (it kept its jit)
        assert set(again[:, 0].tolist()) <= set(first[:, 0].tolist())
        assert first[:, 1].max() == again[:, 1].max() == 1
        # another function in the same pool, and an attack: the same result as without a pool
        _, devices, _ = victims.map_victims(_where_am_i, (np.zeros((2, 1)), np.float32(1.0)), (0, None),
                                            strategy="processes", pool=pool)
        assert devices.tolist() == [1, 1]
        cfg = dataclasses.replace(attacks.PAPER, steps=2)
        run = lambda **kw: attacks.attack_victims("idlg", jax.random.PRNGKey(3), tiny["model"].apply, tiny["params"],
                                                   tiny["grads"], SHAPE, config=cfg, strategy="processes", **kw)
        np.testing.assert_array_equal(run(pool=pool)["reconstruction"], run(workers=1)["reconstruction"])
        with pytest.raises(ValueError, match="worker saw a victim"):  # an error leaves the pool usable
            victims.map_victims(_refuse, (np.zeros((2, 2)),), (0,), strategy="processes", pool=pool)
        assert victims.map_victims(_traced, (x,), (0,), strategy="processes", pool=pool).shape == (4, 2)
        with pytest.raises(ValueError, match="not both"):
            victims.map_victims(_traced, (x,), (0,), strategy="processes", pool=pool, workers=1)
        with pytest.raises(ValueError, match="pool= is a WorkerPool for strategy='processes'"):
            victims.map_victims(_traced, (x,), (0,), strategy="loop", pool=pool)
    with pytest.raises(ValueError, match="closed"):
        pool.map(_traced, (x,), (0,), 4)
    with pytest.raises(ValueError, match="available cores"):
        processes.WorkerPool(len(processes.available_cores()) + 1)


def _my_pid(x):
    """Runs in a worker: its pid, read when the worker traces this function."""
    return jnp.asarray(os.getpid()) + 0 * x.sum().astype(jnp.int32)


_ORPHAN_SCRIPT = """
import os, signal, sys
import numpy as np
from jaxleak import processes, victims
sys.path.insert(0, {tests!r})
from test_processes import _my_pid
if __name__ == "__main__":
    pool = processes.WorkerPool({workers})
    pids = victims.map_victims(_my_pid, (np.zeros((4, 1), np.int32),), (0,), strategy="processes", pool=pool)
    print(" ".join(str(p) for p in sorted(set(pids.tolist()))), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # dies without closing the pool
"""


def _alive(pid: int) -> bool:
    try:
        status = open(f"/proc/{pid}/status").read()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status  # a zombie has exited


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads worker states from /proc (Linux)")
def test_workers_exit_when_their_driver_is_killed(tmp_path):
    import subprocess
    import sys
    import time

    workers = min(2, len(processes.available_cores()))
    script = _ORPHAN_SCRIPT.format(tests=os.path.dirname(__file__), workers=workers)
    out, err = tmp_path / "out", tmp_path / "err"
    with open(out, "w") as o, open(err, "w") as e:  # files, not pipes: orphans would hold a pipe open
        code = subprocess.Popen([sys.executable, "-c", script], stdout=o, stderr=e).wait(timeout=300)
    assert code == -9, err.read_text()[-2000:]
    pids = [int(p) for p in out.read_text().split()]
    assert 1 <= len(pids) <= workers
    deadline = time.monotonic() + 20
    while any(map(_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [p for p in pids if _alive(p)]
    for p in left:
        os.kill(p, 9)
    assert not left, f"workers {left} outlived their killed driver"


def test_pool_size_is_one_worker_per_core_and_at_most_one_per_victim():
    cores = len(processes.available_cores())
    assert processes.pool_size(1) == 1 and processes.pool_size(10 * cores) == cores
    assert processes.pool_size(10 * cores, workers=1) == 1 and processes.pool_size(1, workers=cores) == 1
    with pytest.raises(ValueError, match="workers must be between 1 and"):
        processes.pool_size(4, workers=cores + 1)
