"""Soft-label recovery on synthetic last layers: how often the robust search is right, flags, or is silently wrong.

Each cell draws ``--victims`` random last layers (``tests/test_recovery.problem``: Gaussian kernel scaled by
``--scales`` / sqrt(d), non-negative feature, a smoothing or mixup label with the coefficient uniform in
``--coef``), computes the one-example gradient exactly in float64 and recovers the label with
``jaxleak.recovery.soft_label`` (robust search, no bias gradient) in float64 and float32. A larger scale gives
more confident logits, up to a saturated softmax like an untrained AlexNet's. Per cell and precision it counts:

- ``correct``: max|y_hat - y| < 1e-3;
- ``ok_correct``: ``ok`` and correct (what a caller can use);
- ``silent``: ``ok`` but not correct (wrongly accepted: the failure that matters).

Used for the "Analytic recovery" figures of docs/benchmarks.md (2026-12-07):

    python experiments/soft_label_synthetic.py --kinds mixup smoothing --classes 3 10 100 --scales 3 10 30 100

No GPU or data needed; about a minute for both kinds on the 2-core CPU (warm compilation cache).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxleak import recovery
from jaxleak.cli import ScriptOutput, add_output_flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from test_recovery import problem  # noqa: E402  (the tests' generator, so both draw the same victims)


def run_cell(kind: str, K: int, scale: float, bias: bool, victims: int, coef: tuple, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    coefs = rng.uniform(*coef, victims)
    key = "eps" if kind == "smoothing" else "mu"
    G, W, b, _, y, _ = (np.stack(x) for x in zip(*[problem(rng, K, kind, bias=bias, scale=scale, **{key: c})
                                                    for c in coefs]))
    row = {"kind": kind, "classes": K, "scale": scale, "bias": bias, "victims": victims}
    for dtype in ("float64", "float32"):
        with jax.enable_x64(dtype == "float64"):
            out = recovery.soft_label(jnp.asarray(G, dtype), jnp.asarray(W, dtype), kind=kind,
                                      bias=jnp.asarray(b, dtype) if bias else None, errors="flag")
            correct = np.abs(np.asarray(out.label, np.float64) - y).max(1) < 1e-3
            ok = np.asarray(out.ok)
            row[dtype] = {"correct": int(correct.sum()), "ok_correct": int((ok & correct).sum()),
                          "silent": int((ok & ~correct).sum())}
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", nargs="+", default=["mixup", "smoothing"], choices=["mixup", "smoothing"])
    p.add_argument("--classes", nargs="+", type=int, default=[3, 10, 100], help="K per cell")
    p.add_argument("--scales", nargs="+", type=float, default=[3.0, 10.0, 30.0, 100.0], help="logit scales per cell")
    p.add_argument("--victims", type=int, default=1000, help="victims per cell")
    p.add_argument("--seed", type=int, default=21)
    p.add_argument("--out", default="results/soft_label_synthetic.json", help="JSON file of the rows")
    add_output_flags(p)
    args = p.parse_args(argv)
    o = ScriptOutput(args)
    cells = [(k, K, s, bias) for k in args.kinds for s in args.scales for K in args.classes for bias in (False, True)]
    rows = []
    for kind, K, scale, bias in o.progress(cells, desc="cells", unit="cell"):
        coef = (0.001, 0.5) if kind == "smoothing" else (0.001, 0.999)
        rows.append(run_cell(kind, K, scale, bias, args.victims, coef, args.seed))
        r = rows[-1]
        o.log(f"{kind} K={K} scale={scale} bias={bias}: " + " | ".join(
            f"{d}: correct {r[d]['correct']}, ok and correct {r[d]['ok_correct']}, silent {r[d]['silent']}"
            for d in ("float64", "float32")))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "seed": args.seed}, indent=1))
    lines = ["| kind | K | scale | bias | float64 correct / ok and correct / silent | float32 |", "|---|---|---|---|---|---|"]
    for r in rows:
        cell = lambda d: f"{r[d]['correct']} / {r[d]['ok_correct']} / {r[d]['silent']}"
        lines.append(f"| {r['kind']} | {r['classes']} | {r['scale']:g} | {r['bias']} | {cell('float64')} | {cell('float32')} |")
    o.report("\n".join(lines))
    o.summary({"out": str(out), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
