"""Benchmark: the iDLG protocol in jaxleak against an independent PyTorch reference, side by side.

For each V in ``--victims`` the same V victims (fresh LeNet-Zhu, U(-0.5, 0.5),
one CIFAR-100 image each) are attacked with iDLG (stop at 1e-6 every 10
steps): first by jaxleak under each of ``--configs`` (compile time measured
apart), then by ``experiments/torch_reference.py`` on the first
``--torch-victims`` of them, back to back, so the ratio is taken under the
same machine load. Reports seconds, victims/s and *successful* victims/s
(final MSE < 1e-3). jaxleak's rows also give the work done: FLOP/s and bytes/s,
from XLA's cost analysis of one objective evaluation plus the L-BFGS history's
four passes per inner iteration (``EvalCost``), and on an H100 or H200 their
fractions of the float32 and TF32 peaks and of the memory bandwidth (the attack
moves about 2.5 FLOP per byte: on a GPU it is bound by bandwidth); ``useful_*``
counts the evaluations the victims asked for, ``executed_*`` (vmap) every
victim running as long as the slowest of its chunk.

By default the reference starts each victim's dummy image where jaxleak's run
started (``--torch-start jaxleak``), so both solve the same problem from the
same point and the ratios report, victim by victim, who recovered it
(``paired``); ``--torch-start own`` keeps the reference's ``torch.randn``.
Both runs are float32 and chaotic: from one start they can still part ways.

The reference runs as one process with torch's default threads
(``--torch-workers 1``) and/or dealt over W single-threaded processes
(``--torch-workers 2``): jaxleak's CPU loop runs one victim per core, and
PyTorch on these tiny tensors gains little from intra-op threads (measured at
V = 8, 300 steps: 2 single-threaded workers 6.7 ms per evaluation in aggregate
vs 14.6 ms for one process with 2 threads), so the fair ratio is against the
faster of the two.

Configs: ``paper`` is the reference's own protocol (PyTorch L-BFGS semantics,
lr 1, 300 outer steps): the ratio to the reference then measures the engine
alone. ``optax`` is jaxleak's best default (optax L-BFGS with zoom line search,
up to 3,000 steps): same attack, same victims, same stop rule, a better
optimiser. ``retries`` is ``paper`` plus giving up a run still at loss >= 1 after
step 80 and retrying it from a fresh start, twice at most (``attacks.PAPER_RETRIES``);
``retries_stall`` adds stopping a run near the match (loss < 1e-5) that stopped improving
(``attacks.PAPER_RETRIES_STALL``). The successful victims/s ratio of those two compares
jaxleak's best defaults with the reference's protocol; ``paper``'s compares the engines.

    OMP_WAIT_POLICY=PASSIVE python experiments/bench_attack.py --victims 1 8 --torch-victims 2 --out bench.json
    OMP_WAIT_POLICY=PASSIVE python experiments/bench_attack.py --victims 8 --torch-victims 4 --torch-workers 1 2
    python experiments/bench_attack.py --victims 8 --configs paper optax --torch-victims 2
    python experiments/bench_attack.py --victims 8 --strategies loop vmap --torch-victims 0   # driver default
    python experiments/bench_attack.py --victims 16 --strategies processes loop --torch-victims 0  # pinned workers
    python experiments/bench_attack.py --victims 64 --strategies vmap vmap-plain --torch-victims 0  # AttackConfig.victim_axis
    python experiments/bench_attack.py --victims 64 --strategies vmap --torch-victims 0 --breakdown  # objective vs L-BFGS
    python experiments/bench_attack.py --victims 8 --convs xla slices s2d --torch-victims 2   # LeNet's conv="auto"
    OMP_WAIT_POLICY=PASSIVE python experiments/bench_attack.py --victims 16 --strategies processes --heads dense blocked --torch-victims 8 --torch-workers 2  # LeNet's head="auto"
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import pathlib
import sys
import time
from typing import NamedTuple, Optional

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


from _xla import cpu_devices_flag, default_data_dir, machine  # noqa: E402  (sets XLA_FLAGS before jax is imported)

cpu_devices_flag()

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxleak import attacks, lbfgs, metrics, models, processes, recovery, victims
from jaxleak.cli import ScriptOutput, add_output_flags

# The iDLG attack's optimiser by name: the reference's protocol, or jaxleak's best defaults.
from idlg_reproduction import CONFIGS  # noqa: E402

SUCCESS_MSE = 1e-3


def make_victims(data: pathlib.Path, n: int, seed: int):
    z = np.load(data / "cifar100_subset.npz")
    images, labels = z["images"], z["labels"]
    rng = np.random.default_rng(seed)
    idx = rng.integers(len(images), size=n)
    x = jnp.asarray(images[idx], jnp.float32) / 255.0
    y_int = labels[idx]
    model = models.LeNet(100)
    params = victims.init_victims(model, jax.random.PRNGKey(seed), n, (32, 32, 3), init="uniform")
    grads = victims.gradients(model.apply, params, x, jax.nn.one_hot(y_int, 100), per_victim_params=True)
    return model, params, grads, x, y_int


#: Dense peak FLOP/s by device kind (vendor data sheets): float32 on CUDA cores, and TF32 tensor cores.
PEAK_TFLOPS = {"H100": {"float32": 66.9, "tf32": 494.7}, "H200": {"float32": 66.9, "tf32": 494.7}}
#: Peak memory bandwidth (TB/s) by device kind, the first key found in it (vendor data sheets).
PEAK_TB_PER_S = {"H100 PCIe": 2.0, "H100 NVL": 3.9, "H100": 3.35, "H200": 4.8}


class EvalCost(NamedTuple):
    """One objective evaluation's cost for one victim: ``flops`` and memory traffic ``bytes`` (XLA's cost analysis
    of the compiled value-and-gradient), and ``history_bytes``, the L-BFGS history read per inner iteration (four
    passes over ``S`` and ``Y``, ``history_size x n`` each: the direction's ``S g``, ``Y g`` and products back)."""

    flops: float
    bytes: float
    history_bytes: float


def cost_per_evaluation(model, params, grads, x, y_int, config: attacks.AttackConfig) -> EvalCost:
    """:class:`EvalCost` of victim 0's matching objective (iDLG: label fixed). The attack is bound by memory
    traffic rather than arithmetic on a GPU (about 2.5 FLOP per byte), so rows report both fractions of peak."""
    take = lambda t: jax.tree_util.tree_map(lambda a: a[0], t)
    label = jax.nn.one_hot(int(y_int[0]), 100)
    objective = attacks._objective(model.apply, take(params), take(grads), config, label)
    z = {"x": jnp.zeros_like(x[0])}
    cost = jax.jit(jax.value_and_grad(objective)).lower(z).compile().cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    history = (4.0 * config.lbfgs.history_size * x[0].size * x.dtype.itemsize
               if config.optimizer == "torch_lbfgs" else 0.0)
    return EvalCost(float(cost.get("flops", float("nan"))), float(cost.get("bytes accessed", float("nan"))), history)


def _peak(table: dict, kind: Optional[str] = None):
    """``table``'s entry for the first of its keys found in ``kind`` (default: the first device's kind), or None."""
    kind = jax.devices()[0].device_kind if kind is None else kind
    return next((v for k, v in table.items() if k in kind), None)


def peak_tflops(kind: Optional[str] = None) -> dict:
    return _peak(PEAK_TFLOPS, kind) or {}


def bench_jax(model, params, grads, x, strategy: str, config: attacks.AttackConfig, seed: int,
              cost: Optional[EvalCost] = None, slots: Optional[int] = None) -> dict:
    n = x.shape[0]
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), n)
    take = lambda t, i: jax.tree_util.tree_map(lambda a: a[i], t)
    devices = jax.local_devices()
    if strategy in ("vmap", "vmap-chunks", "stream"):  # as attacks.attack_victims maps victims (AttackConfig.victim_axis)
        config = dataclasses.replace(config, victim_axis=attacks.VICTIM_AXIS)
    if strategy in ("vmap-chunks", "stream"):
        return _bench_slots(model, params, grads, x, keys, strategy, config, slots or n, cost)
    one = lambda k, p, g: attacks.idlg(k, model.apply, p, g, (32, 32, 3), config=config)
    if strategy in ("processes", "processes-cold"):  # one pinned single-device worker per core (attack_victims' "processes")
        run = lambda k, p, g, pool: attacks.attack_victims("idlg", k, model.apply, p, g, (32, 32, 3), config=config,
                                                           strategy="processes", pool=pool)
        with processes.WorkerPool(processes.pool_size(n)) as pool:  # the pool attack_victims would start
            compile_s = float("nan")
            if strategy == "processes":
                # As the reference's workers are started and past their imports before its clock starts, the
                # pool is started and has compiled the attack before this clock: a warm-up on the first victims,
                # one per worker (run again below), timed apart as compile_s (startup, compile and that victim).
                first = lambda t: jax.tree_util.tree_map(lambda a: a[:pool.workers], t)
                t = time.time()
                run(keys[:pool.workers], first(params), first(grads), pool)
                compile_s = time.time() - t
            t = time.time()  # processes-cold: startup and each worker's compilation inside the timed run
            res = run(keys, params, grads, pool)
            seconds = time.time() - t
        return _finish_jax(n, seconds, x, res["reconstruction"], res["evals"], res["snapshots"][:, 0], cost, strategy,
                           compile_s=compile_s, devices=pool.workers, device_kind=devices[0].device_kind)
    t = time.time()
    # As attack_victims runs "vmap": sharded over every local GPU/TPU (victims.default_devices), one CPU device.
    sharded = victims.default_devices("vmap")
    sharded = sharded if n % len(sharded) == 0 else sharded[:1]
    if strategy == "vmap":
        compiled = victims._compiled(one, (0, 0, 0), config.victim_axis, sharded).lower(keys, params, grads).compile()
    elif strategy == "vmap-plain":  # plain vmap: every while_loop predicate batched (the carries selected)
        compiled = jax.jit(jax.vmap(one)).lower(keys, params, grads).compile()
    else:  # one executable per device; victims are dealt round-robin (as victims.map_victims' "loop")
        first = (keys[0], take(params, 0), take(grads, 0))
        compiled = [jax.jit(one).lower(*jax.device_put(first, d)).compile() for d in devices]
    compile_s = time.time() - t
    t = time.time()
    if strategy.startswith("vmap"):
        res = jax.block_until_ready(compiled(keys, params, grads))
        rec, evals, starts = res.x, res.evals, res.snapshots[:, 0]
    else:
        outs = [compiled[i % len(devices)](*jax.device_put((keys[i], take(params, i), take(grads, i)), devices[i % len(devices)]))
                for i in range(n)]
        outs = jax.block_until_ready(outs)
        gather = lambda field: jnp.stack([jax.device_put(field(o), devices[0]) for o in outs])
        rec, evals, starts = gather(lambda o: o.x), gather(lambda o: o.evals), gather(lambda o: o.snapshots[0])
    seconds = time.time() - t
    return _finish_jax(n, seconds, x, rec, evals, starts, cost, strategy, compile_s=compile_s,
                       devices={"loop": len(devices), "vmap": len(sharded)}.get(strategy, 1), device_kind=devices[0].device_kind)


def _bench_slots(model, params, grads, x, keys, strategy, config, slots, cost) -> dict:
    """``slots`` victims at a time on one device: ``vmap-chunks`` runs chunks of ``slots`` (each as long as its
    slowest victim), ``stream`` streams all victims through ``slots`` slots, refilled as victims finish (both
    as ``attack_victims``' ``"vmap"`` and ``"stream"`` strategies; compiled before the clock)."""
    n, shape, device = x.shape[0], tuple(x.shape[1:]), tuple(jax.local_devices()[:1])
    t = time.time()
    if strategy == "stream":
        program = attacks._stream_compiled(attacks.idlg, model.apply, shape, config, (0, 0), slots, device)
        compiled = program.lower(keys, params, grads).compile()
        compile_s = time.time() - t
        t = time.time()
        res = jax.block_until_ready(compiled(keys, params, grads))
    else:
        one = lambda k, p, g: attacks.idlg(k, model.apply, p, g, shape, config=config)
        first = jax.tree_util.tree_map(lambda v: v[np.minimum(np.arange(slots), n - 1)], (keys, params, grads))
        compiled = victims._compiled(one, (0, 0, 0), config.victim_axis, device).lower(*first).compile()
        compile_s = time.time() - t
        t = time.time()  # as map_victims runs "vmap" chunks
        res = jax.block_until_ready(victims._run_chunks(compiled, (keys, params, grads), (0, 0, 0), n, slots, device,
                                                         False, "attack"))
    seconds = time.time() - t
    return _finish_jax(n, seconds, x, res.x, res.evals, res.snapshots[:, 0], cost, strategy, compile_s=compile_s,
                       devices=1, device_kind=device[0].device_kind, slots=slots,
                       outer_steps_mean=float(np.mean(res.steps)), outer_steps_max=int(np.max(res.steps)))


BREAKDOWN_STRATEGIES = ("vmap", "vmap-plain", "loop")


def breakdown(model, params, grads, x, strategy: str, config: attacks.AttackConfig, seed: int,
              warmup: int = 5, repeats: int = 5) -> dict:
    """Where an L-BFGS step's time goes under ``strategy``, timed apart from the attack's outer loop.

    iDLG's objective (the label read off the gradient) and ``config``'s PyTorch-semantics L-BFGS from
    N(0, 1) starts, mapped as the attack maps them: ``vmap`` (all V victims, the named victim axis),
    ``vmap-plain`` (all V, a plain vmap) or ``loop`` (victim 0 alone, unbatched), on one device:

    * ``objective_ms``: one value and gradient of the matching objective (all victims at once), timed
      as a loop of ``max_iter`` evaluations, each from the last one's iterate, inside one program (a
      call of its own would add the dispatch that the step does not pay per evaluation);
    * ``step_ms``: one outer step (the objective at the iterate, then ``lbfgs.update``, whose inner
      loop calls it), from the state reached after ``warmup`` outer steps, so the history is
      near full (20 iterations a step, 100 pairs at most; ``history_pairs``: the fewest any victim
      holds); the median of ``repeats`` runs from that same state, as is ``objective_ms``;
    * ``step_iterations`` / ``step_evals``: the most inner iterations / evaluations any victim made
      in that step. The inner loop runs until its last victim stops; under a plain vmap its
      ``lax.cond`` becomes a select, so the objective runs ``1 + step_iterations`` times
      (``objective_calls``), evaluations or not; on the victim axis it runs at the iterations
      where some victim evaluates, and unbatched where the victim does: ``step_evals`` times;
    * ``lbfgs_ms_per_iteration``: the rest of the step per inner iteration (direction, history,
      Gram updates, loop control): ``(step_ms - objective_calls * objective_ms) / step_iterations``;
    * ``objective_share``: ``objective_calls * objective_ms / step_ms``.
    """
    if config.optimizer != "torch_lbfgs":
        raise ValueError(f"the breakdown times the PyTorch-semantics L-BFGS, not {config.optimizer!r}")
    if strategy not in BREAKDOWN_STRATEGIES:
        raise ValueError(f"the breakdown maps victims as one of {BREAKDOWN_STRATEGIES}, not {strategy!r}")
    kernel_grad = models.last_layer(grads)[0]
    labels = jax.nn.one_hot(recovery.idlg_label(kernel_grad, method="rowsum"), kernel_grad.shape[-1])
    starts = jax.random.normal(jax.random.PRNGKey(seed + 2), (x.shape[0], x[0].size), x.dtype)
    axis = attacks.VICTIM_AXIS if strategy == "vmap" else None
    shape = x.shape[1:]
    chain = config.lbfgs.max_iter

    def precise(fn):  # as attacks._optimise traces the loops: under config.precision
        def wrapped(*a):
            with attacks._precision(config):
                return fn(*a)
        return wrapped

    def value_and_grad(p, g, label):
        objective = attacks._objective(model.apply, p, g, config, label)
        return jax.value_and_grad(lambda f: objective({"x": f.reshape(shape)}))

    @precise
    def objective(p, g, label, flat):  # `chain` evaluations in a loop, as the step makes them (no dispatch between)
        vg = value_and_grad(p, g, label)

        def body(_, c):
            loss, grad = vg(c[0])
            return c[0] - 1e-9 * grad, c[1] + loss  # each depends on the last: nothing hoisted out of the loop

        return lax.fori_loop(0, chain, body, (flat, jnp.zeros((), flat.dtype)))

    @precise
    def step(p, g, label, state):
        vg = value_and_grad(p, g, label)
        loss, grad = vg(state.x)
        return lbfgs.update(state, vg, config.lbfgs, loss, grad, axis_name=axis)[0]

    init = lambda flat: lbfgs.init(flat, config.lbfgs)
    if strategy == "loop":
        take = lambda t: jax.tree_util.tree_map(lambda a: a[0], t)
        args = (take(params), take(grads), labels[0])
        objective, step, flat = jax.jit(objective), jax.jit(step), starts[0]
        state = jax.jit(init)(flat)
    else:
        args = (params, grads, labels)
        objective = jax.jit(jax.vmap(objective, axis_name=axis))
        step = jax.jit(jax.vmap(step, axis_name=axis))
        flat = starts
        state = jax.jit(jax.vmap(init))(flat)
    for _ in range(warmup):  # the first call compiles
        state = jax.block_until_ready(step(*args, state))

    def median_ms(fn, *a):
        jax.block_until_ready(fn(*a))  # compiled, and warm
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            out = jax.block_until_ready(fn(*a))
            times.append(time.perf_counter() - t)
        return 1000 * float(np.median(times)), out

    objective_ms = median_ms(objective, *args, state.x)[0] / chain
    step_ms, after = median_ms(step, *args, state)
    iterations = int(np.max(after.n_iter - state.n_iter))
    evals = int(np.max(after.func_evals - state.func_evals))
    calls = 1 + iterations if strategy == "vmap-plain" else evals
    return {"strategy": strategy, "victims": 1 if strategy == "loop" else int(x.shape[0]), "warmup_steps": warmup,
            "history_pairs": int(np.min(state.count)), "objective_ms": objective_ms, "step_ms": step_ms,
            "step_iterations": iterations, "step_evals": evals, "objective_calls": calls,
            "lbfgs_ms_per_iteration": (step_ms - calls * objective_ms) / max(iterations, 1),
            "objective_share": calls * objective_ms / step_ms}


def _finish_jax(n, seconds, x, rec, evals, starts, cost, strategy, **info) -> dict:
    mse = np.asarray(metrics.mse(jnp.asarray(rec), x))
    extra = {}
    if cost:
        evals = np.asarray(evals)
        # Useful work: the evaluations each victim asked for (one per inner iteration). Under vmap every victim
        # runs as many loop iterations as the slowest one (finished ones are masked), so executed work is larger.
        runs = {"useful": float(evals.sum())}
        if strategy.startswith("vmap"):
            runs["executed"] = float(n * evals.max())
        moved = cost.bytes + cost.history_bytes
        extra = {"gflops_per_eval": cost.flops / 1e9, "objective_mb_per_eval": cost.bytes / 1e6,
                 "history_mb_per_iteration": cost.history_bytes / 1e6}
        for name, count in runs.items():
            extra[f"{name}_tflops_per_s"] = cost.flops * count / seconds / 1e12
            extra[f"{name}_tb_per_s"] = moved * count / seconds / 1e12
        kind = info.get("device_kind")
        for k, v in peak_tflops(kind).items():
            for name in runs:
                extra[f"{name}_fraction_of_{k}_peak"] = extra[f"{name}_tflops_per_s"] / v
        bandwidth = _peak(PEAK_TB_PER_S, kind)
        for name in runs if bandwidth else ():
            extra[f"{name}_fraction_of_bandwidth_peak"] = extra[f"{name}_tb_per_s"] / bandwidth
    # starts: each victim's x' before step 0 (the first snapshot), for the reference's paired mode; not written out.
    return _summary("jaxleak", n, seconds, mse, np.asarray(evals), starts=np.asarray(starts), strategy=strategy, **info,
                    matmul_precision=str(jax.config.jax_default_matmul_precision), **extra)


def bench_torch(params, x, y_int, n: int, seed: int, steps: int = 300, workers: int = 1, starts=None) -> dict:
    """The PyTorch reference on the first ``n`` victims: in this process with torch's default
    threads (``workers`` 1), or dealt over ``workers`` single-threaded processes (one victim each
    at a time), as one would run a Python reference on a multi-core machine. ``starts`` ``(>= n, H, W, C)``:
    start victim i's dummy there (paired with jaxleak's runs), else at the reference's own ``torch.randn``."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    import torch
    import torch_reference

    tasks = [(jax.tree_util.tree_map(lambda a: np.array(a[i]), params["params"]), np.array(x[i]), int(y_int[i]),
              "idlg", seed + i, steps) + (() if starts is None else (np.array(starts[i]),)) for i in range(n)]
    if workers == 1:
        t = time.time()
        runs = [torch_reference.attack_victim(task) for task in tasks]
        seconds, threads = time.time() - t, torch.get_num_threads()
    else:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers, initializer=torch_reference.single_threaded_worker, initargs=(ctx.Barrier(workers),)) as pool:
            # One barrier task per worker: none returns before all W workers have started (imports done).
            pool.map(torch_reference.wait_for_all_workers, range(workers), chunksize=1)
            t = time.time()
            runs = pool.map(torch_reference.attack_victim, tasks, chunksize=1)
            seconds, threads = time.time() - t, 1
    return _summary("torch", n, seconds, np.array([r["mse"] for r in runs]), np.array([r["evals"] for r in runs]),
                    torch_threads=threads, torch_workers=workers, start="jaxleak" if starts is not None else "own")


def recovered(mse) -> np.ndarray:
    """Per victim: final MSE finite and below SUCCESS_MSE (what "successful" means in every figure here)."""
    mse = np.asarray(mse)
    return np.isfinite(mse) & (mse < SUCCESS_MSE)


def paired_outcomes(jax_mse, torch_mse) -> dict:
    """Counts of victims recovered by both, by one only, by neither, on the reference's victims."""
    ok_j = recovered(jax_mse)[: len(torch_mse)]
    ok_t = recovered(torch_mse)
    return {"both": int(np.sum(ok_j & ok_t)), "jaxleak_only": int(np.sum(ok_j & ~ok_t)),
            "torch_only": int(np.sum(~ok_j & ok_t)), "neither": int(np.sum(~ok_j & ~ok_t))}


def _summary(name, n, seconds, mse, evals, **extra) -> dict:
    ok = int(np.sum(recovered(mse)))
    return {"impl": name, "victims": n, "seconds": seconds, "victims_per_s": n / seconds,
            "successful": ok, "successful_per_s": ok / seconds, "mean_evals": float(np.mean(evals)),
            "ms_per_eval": 1000 * seconds / float(np.sum(evals)), "mse": mse.tolist(), **extra}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--victims", type=int, nargs="+", default=[1, 8, 64], help="numbers of victims V to time (default 1 8 64)")
    p.add_argument("--torch-victims", type=int, default=2, help="victims the PyTorch reference attacks per V (0: none)")
    p.add_argument("--strategies", nargs="+", default=["auto"],
                   choices=("auto", "loop", "processes", "processes-cold", "vmap", "vmap-plain", "vmap-chunks", "stream"),
                   help="how victims are mapped: vmap (named victim axis, as attack_victims), vmap-plain (a plain vmap, "
                        "AttackConfig.victim_axis unset), vmap-chunks (vmap over chunks of --slots victims), stream (all "
                        "victims through --slots slots refilled as victims finish, attack_victims' \"stream\"), "
                        "a loop of a jitted one-victim attack, processes (one pinned "
                        "single-device worker process per core, started and compiled before the clock, as the "
                        "reference's workers are started; compile_s is that warm-up), processes-cold (the same with "
                        "startup and compilation inside the timed run), or the backend's default")
    p.add_argument("--convs", nargs="+", default=["auto"], choices=models.CONVS,
                   help="LeNet's convolution (models.LeNet conv=): auto (the backend's default), xla, patches, slices, s2d")
    p.add_argument("--heads", nargs="+", default=["auto"], choices=models.HEADS,
                   help="LeNet's head (models.LeNet head=): auto (the backend's default), dense, blocked")
    p.add_argument("--configs", nargs="+", default=["paper"], choices=sorted(CONFIGS),
                   help="jaxleak's optimiser: paper (PyTorch L-BFGS semantics, the reference's), optax (optax L-BFGS with "
                        "line search), retries (paper plus giving up hopeless runs and retrying them) and/or retries_stall "
                        "(retries plus stopping runs near the match that stopped improving)")
    p.add_argument("--give-up", type=float, nargs=2, default=None, metavar=("STEP", "LOSS"),
                   help="also run each config with AttackConfig.give_up=(STEP, LOSS) (named CONFIG+give_up): victims whose "
                        "loss is still at or above LOSS at a check from outer step STEP on are abandoned; same victims and "
                        "starts (the reference runs its own protocol, without it)")
    p.add_argument("--retries", type=int, default=0,
                   help="with --give-up: start an abandoned victim again from a fresh start, up to this many times")
    p.add_argument("--stall", type=float, nargs=2, default=None, metavar=("LOSS", "RATIO"),
                   help="also run each config (and each +give_up one) with AttackConfig.stall=(LOSS, RATIO) (named "
                        "CONFIG+stall): victims near the match that stopped improving stop")
    p.add_argument("--steps", type=int, default=None,
                   help="outer steps per victim for jaxleak and the reference (default: each config's own, paper 300, optax 3000; "
                        "the reference always runs the paper's 300 unless this is given)")
    p.add_argument("--seed", type=int, default=0, help="seed of the images, networks and starts")
    p.add_argument("--torch-workers", type=int, nargs="+", default=[1],
                   help="ways to run the reference: 1 is one process with torch's default threads; W > 1 deals the "
                        "victims over W single-threaded processes (default 1)")
    p.add_argument("--torch-start", choices=("jaxleak", "own"), default="jaxleak",
                   help="where the reference starts each victim's dummy image: jaxleak's x' before step 0 (paired: the "
                        "same problem and start for both, default; the first config's, or the first without retries) or its own "
                        "torch.randn")
    p.add_argument("--cpu-devices", type=int, default=2, help="virtual CPU devices (cores) for the victim loop")
    p.add_argument("--data", type=pathlib.Path, default=None,
                   help="folder of cifar100_subset.npz (default $JAXLEAK_DATA, else ../shared/data beside the checkout)")
    p.add_argument("--slots", type=int, default=None,
                   help="batch width of the vmap-chunks and stream strategies (default: all victims at once)")
    p.add_argument("--breakdown", action="store_true",
                   help="also time, for each vmap, vmap-plain or loop row of a PyTorch-semantics config, one value and gradient "
                        "of the objective and one outer L-BFGS step apart from the attack (breakdown(): where a step's time goes)")
    p.add_argument("--out", type=pathlib.Path, default=None, help="write all rows (with per-victim MSE) to this JSON file")
    add_output_flags(p)
    args = p.parse_args(argv)
    o = ScriptOutput(args)
    if min(args.torch_workers) < 1:
        p.error(f"--torch-workers must be >= 1, got {args.torch_workers}")
    data_dir = args.data or default_data_dir()
    if not (data_dir / "cifar100_subset.npz").is_file():
        p.error(f"cifar100_subset.npz not found in {data_dir}: pass --data or set JAXLEAK_DATA")

    if args.retries and args.give_up is None:
        p.error("--retries needs --give-up (it retries the victims the rule abandons)")
    try:
        configs = {name: CONFIGS[name] if args.steps is None else dataclasses.replace(CONFIGS[name], steps=args.steps)
                   for name in args.configs}
        if args.give_up is not None:
            rule = (int(args.give_up[0]), args.give_up[1])
            configs.update({f"{name}+give_up": dataclasses.replace(c, give_up=rule, retries=args.retries)
                            for name, c in list(configs.items())})
        if args.stall is not None:
            configs.update({f"{name}+stall": dataclasses.replace(c, stall=tuple(args.stall)) for name, c in list(configs.items())})
    except ValueError as e:
        p.error(f"--steps/--give-up/--stall: {e}")
    torch_steps = attacks.PAPER.steps if args.steps is None else args.steps
    backend = jax.default_backend()
    rows, ratios = [], []
    for v in o.progress(args.victims, desc="bench attack", unit="V"):
        _, params, grads, x, y_int = make_victims(data_dir, v, args.seed)
        starts, from_retries = None, False
        for (name, config), conv, head in itertools.product(configs.items(), args.convs, args.heads):
            model = models.LeNet(100, conv=conv, head=head)  # the same parameters whatever the convolution and head
            cost = cost_per_evaluation(model, params, grads, x, y_int, config)
            for strategy in args.strategies:
                s = attacks.DEFAULT_STRATEGY.get(backend, "vmap") if strategy == "auto" else strategy
                parts = None
                if args.breakdown and s in BREAKDOWN_STRATEGIES and config.optimizer == "torch_lbfgs":
                    # Before the attack, and reported at once: a run stopped during a long attack keeps it in its log.
                    parts = breakdown(model, params, grads, x, s, config, args.seed)
                    o.report(json.dumps({"V": v, "config": name, "conv": conv, "head": head, "breakdown": parts}))
                rows.append({"V": v, "backend": backend, "config": name, "conv": conv, "head": head, "steps": config.steps,
                             **bench_jax(model, params, grads, x, s, config, args.seed, cost, args.slots),
                             **({} if parts is None else {"breakdown": parts})})
                # A retried victim's x' before step 0 is its last try's start: the reference takes a first try's.
                run_starts = rows[-1].pop("starts")
                if starts is None or not config.retries and from_retries:
                    starts, from_retries = run_starts, bool(config.retries)
                o.report(json.dumps({k: val for k, val in rows[-1].items() if k != "mse"}))
        for workers in args.torch_workers if args.torch_victims else ():
            tr = {"V": v, "backend": "cpu", "config": "paper", "steps": torch_steps,
                  **bench_torch(params, x, y_int, min(v, args.torch_victims), args.seed, torch_steps, workers,
                                starts if args.torch_start == "jaxleak" else None)}
            rows.append(tr)
            o.report(json.dumps({k: val for k, val in tr.items() if k != "mse"}))
            for jx in [r for r in rows if r["V"] == v and r["impl"] == "jaxleak"]:
                ratio = (jx["successful_per_s"] / tr["successful_per_s"] if tr["successful_per_s"]
                         else float("inf") if jx["successful_per_s"] else float("nan"))
                ratios.append({"V": v, "config": jx["config"], "conv": jx["conv"], "head": jx["head"], "strategy": jx["strategy"],
                               "torch_workers": workers,
                               "per_evaluation_speedup": tr["ms_per_eval"] / jx["ms_per_eval"], "successful_per_s_ratio": ratio,
                               "paired": paired_outcomes(jx["mse"], tr["mse"]) if tr["start"] == "jaxleak" else None})
                o.report(f"V={v} {jx['config']}/{jx['conv']}/{jx['head']}/{jx['strategy']}: jaxleak {jx['victims_per_s']:.3f} victims/s "
                         f"({jx['successful_per_s']:.3f} successful/s, {jx['successful']}/{v}, {jx['mean_evals']:.0f} evals, "
                         f"compile {jx['compile_s']:.1f}s) vs torch x{workers} {tr['victims_per_s']:.4f} victims/s "
                         f"({tr['successful_per_s']:.4f} successful/s, {tr['successful']}/{tr['victims']}, {tr['mean_evals']:.0f} evals); "
                         f"per-evaluation speed-up {tr['ms_per_eval'] / jx['ms_per_eval']:.1f}x, successful/s ratio {ratio:.1f}x"
                         + (f"; same starts, recovered by {ratios[-1]['paired']}" if ratios[-1]["paired"] else ""))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))
        o.report(f"results: {args.out}")
    o.summary({"bench": "attack", "out": None if args.out is None else str(args.out), "steps": args.steps,
               "configs": args.configs, "machine": machine(),
               "rows": [{k: val for k, val in r.items() if k != "mse"} for r in rows], "ratios": ratios})
    return 0


if __name__ == "__main__":
    sys.exit(main())
