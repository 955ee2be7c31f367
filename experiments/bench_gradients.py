"""Benchmark: per-example shared gradients for many victims, vmap vs a loop of a jitted single victim.

For V victims (one example each) and either one shared model or one model per
victim, times the first call (compile + run) and the steady state (median of
repeats) of ``jaxleak.gradients`` with ``strategy="vmap"`` and ``"loop"``.
Both strategies run in the same invocation, alternating, so their ratio is
measured under the same machine load. Writes JSON and a markdown table.
With ``--cpu-devices N`` (N host devices) it adds ``"vmap-sharded"``: each chunk
sharded over the N devices (``jaxleak.gradients(..., devices=jax.local_devices())``),
where ``"vmap"`` keeps one CPU device (``jaxleak.victims.default_devices``); ``"loop"``
then deals victims to the N devices round-robin.

    python experiments/bench_gradients.py --victims 1 64 1024 --out results/bench_gradients
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

from _xla import cpu_devices_flag  # (sets XLA_FLAGS before jax is imported)

cpu_devices_flag(default=1)

import jax
import jax.numpy as jnp

import jaxleak as jl
from jaxleak.cli import ScriptOutput, add_output_flags


def _block(tree):
    return jax.tree_util.tree_map(lambda x: x.block_until_ready(), tree)


def _time(fn, repeats):
    t0 = time.perf_counter()
    _block(fn())
    first = time.perf_counter() - t0
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _block(fn())
        runs.append(time.perf_counter() - t0)
    return first, statistics.median(runs)


def run(victims, model_name, shape, classes, repeats, loop_max, log=print):
    model = jl.models.get_model(model_name, classes)
    # "vmap-sharded" only where "vmap" would keep one of several devices (the CPU with --cpu-devices N).
    sharded = len(jl.victims.default_devices("vmap")) < jax.local_device_count()
    strategies = ("vmap", "loop") + (("vmap-sharded",) if sharded else ())
    rows = []
    for v in victims:
        key = jax.random.PRNGKey(v)
        xs = jax.random.uniform(key, (v, *shape))
        ys = jl.one_hot(jnp.arange(v) % classes, classes)
        shared = jl.models.init_uniform(model.init(key, xs[:1]), key)
        stacked = jl.init_victims(model, key, v, shape, init="uniform")
        for per_victim, params in ((False, shared), (True, stacked)):
            for strategy in strategies:
                if strategy == "loop" and v > loop_max:
                    continue
                devices = jax.local_devices() if strategy == "vmap-sharded" else None
                fn = lambda: jl.gradients(model.apply, params, xs, ys, per_victim_params=per_victim,
                                          strategy=strategy.split("-")[0], devices=devices)
                first, steady = _time(fn, repeats)
                rows.append(
                    dict(victims=v, params="per-victim" if per_victim else "shared", strategy=strategy,
                         first_call_s=first, compile_s=max(0.0, first - steady), steady_s=steady,
                         victims_per_s=v / steady, ms_per_victim=1e3 * steady / v)
                )
                log(json.dumps(rows[-1]))
    return rows


def _plot(path, rows, meta):
    """Steady-state victims/s against the number of victims, one line per (params, strategy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for params in ("shared", "per-victim"):
        for strategy, style in (("vmap", "o-"), ("loop", "s--"), ("vmap-sharded", "^:")):
            pts = [(r["victims"], r["victims_per_s"]) for r in rows if r["params"] == params and r["strategy"] == strategy]
            if pts:
                ax.plot(*zip(*pts), style, label=f"{params} model, {strategy}")
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("victims V"), ax.set_ylabel("victims / s (steady state)")
    ax.set_title(f"per-example gradients, {meta['model']} {meta['backend']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout(), fig.savefig(path, dpi=100), plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--victims", type=int, nargs="+", default=[1, 64, 1024], help="numbers of victims to time")
    ap.add_argument("--model", default="lenet", help="network name (jaxleak.models.get_model)")
    ap.add_argument("--shape", type=int, nargs=3, default=[32, 32, 3], help="image H W C")
    ap.add_argument("--classes", type=int, default=100, help="number of classes K")
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions after compilation (best kept)")
    ap.add_argument("--loop-max", type=int, default=1024, help="skip the loop strategy above this many victims")
    ap.add_argument("--cpu-devices", type=int, default=1, help="host devices on the CPU (read before jax starts)")
    ap.add_argument("--out", default="results/bench_gradients", help="output folder (results.json, results.md, results.png)")
    add_output_flags(ap)
    args = ap.parse_args(argv)
    o = ScriptOutput(args)
    rows = run(o.progress(args.victims, desc="bench gradients", unit="V"), args.model, tuple(args.shape), args.classes,
               args.repeats, args.loop_max, log=o.log)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(backend=jax.default_backend(), device=str(jax.devices()[0]), devices=jax.local_device_count(), jax=jax.__version__,
                model=args.model, shape=args.shape, classes=args.classes)
    (out / "results.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    lines = ["| victims | params | strategy | compile s | steady s | victims/s | ms/victim |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['victims']} | {r['params']} | {r['strategy']} | {r['compile_s']:.2f} | {r['steady_s']:.4f} | "
            f"{r['victims_per_s']:.0f} | {r['ms_per_victim']:.3f} |"
        )
    (out / "results.md").write_text(f"{meta}\n\n" + "\n".join(lines) + "\n")
    _plot(out / "results.png", rows, meta)
    o.report("\n".join(lines))
    o.report(f"results: {out / 'results.json'}, {out / 'results.md'}; figure: {out / 'results.png'}")
    o.summary({"bench": "gradients", "out": str(out), "meta": meta, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
