"""Compares two ``idlg_reproduction.py`` runs on the victims both have finished.

Two runs of the same protocol (say the dense and the blocked head, or two code versions) differ in
which victims they recover; their headline tables are only comparable on a common set of victims.
This reads each run's ``victims.jsonl``, keeps the victims present in both, and prints per method the
label accuracy, the fidelity curve (iDLG Figure 1), the median final MSE, the mean evaluations and the
evaluations per victim recovered (below a threshold) of each run, and how many victims fall below that
threshold in one run only::

    python experiments/compare_runs.py results/idlg_lfw_blocked docs/results/idlg_lfw_cpu

``--json`` prints the same as one JSON object.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from idlg_reproduction import summarise  # noqa: E402

METHODS = ("dlg", "idlg")


def read_victims(run: pathlib.Path) -> dict[int, dict]:
    """``{victim index: record}`` from ``run/victims.jsonl`` (or ``run`` itself when it is the file)."""
    path = run / "victims.jsonl" if run.is_dir() else run
    if not path.exists():
        raise FileNotFoundError(f"compare_runs: no victims.jsonl at {path}")
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["victim"]: r for r in rows}


def compare(a: dict[int, dict], b: dict[int, dict], dataset: str, threshold: float = 1e-4,
            victims: range | None = None) -> dict:
    """Both runs' summaries on their common victims (those in ``victims`` only, if given), and per method the
    victims below ``threshold`` in one only.

    Victims present in both must have the same true label (the same protocol); otherwise the runs attacked
    different images and the comparison would be meaningless.
    """
    common = sorted(v for v in a.keys() & b.keys() if victims is None or v in victims)
    clash = [v for v in common if a[v]["label"] != b[v]["label"]]
    if clash:
        raise ValueError(f"compare_runs: the runs disagree on the true label of victims {clash[:5]}: "
                         "they did not attack the same images (another dataset or seed)")
    rows_a, rows_b = [a[v] for v in common], [b[v] for v in common]
    out = {"victims": len(common), "threshold": threshold,
           "a": summarise(rows_a, dataset, 0.0)["methods"], "b": summarise(rows_b, dataset, 0.0)["methods"],
           "only": {}}
    for method in METHODS:
        ok = {}
        for run in ("a", "b"):
            m = out[run][method]
            mse = np.asarray(m.pop("mse"), dtype=np.float64)
            ok[run] = mse < threshold
            m["median_mse"] = float(np.median(mse)) if len(mse) else None
            # Every try's evaluations, failed ones included, per victim the run recovered (None: none recovered).
            m["evals_per_recovered"] = (float(m["mean_evals"] * len(mse) / ok[run].sum())
                                        if ok[run].any() else None)
            del m["paper"], m["seconds_per_victim"]
        out["only"][method] = {"a": int(np.sum(ok["a"] & ~ok["b"])), "b": int(np.sum(ok["b"] & ~ok["a"]))}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", type=pathlib.Path, help="first run folder (or its victims.jsonl)")
    p.add_argument("b", type=pathlib.Path, help="second run folder (or its victims.jsonl)")
    p.add_argument("--dataset", default="lfw", choices=("mnist", "cifar100", "lfw"),
                   help="the protocol's dataset (only names the paper's row; default lfw)")
    p.add_argument("--threshold", type=float, default=1e-4, help="MSE below which a victim counts as recovered")
    p.add_argument("--victims", type=int, nargs=2, default=None, metavar=("FIRST", "END"),
                   help="compare victims FIRST..END-1 only (say, those not used to choose a give_up rule)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    try:
        res = compare(read_victims(args.a), read_victims(args.b), args.dataset, args.threshold,
                      None if args.victims is None else range(*args.victims))
    except (FileNotFoundError, ValueError) as e:
        print(e, file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"{res['victims']} common victims; A = {args.a}, B = {args.b}")
    for method in METHODS:
        for run in ("a", "b"):
            m = res[run][method]
            print(f"{method:5s} {run.upper()}: label {100 * m['label_accuracy']:.1f} %, fidelity "
                  + " / ".join(f"{100 * v:.1f}" for v in m["fidelity"].values())
                  + f", median MSE {m['median_mse']:.2g}, mean evals {m['mean_evals']:,.0f}, evals per victim below "
                  + f"{args.threshold:g} {m['evals_per_recovered'] or float('nan'):,.0f}, diverged {m['diverged']}, gave up {m['gave_up']}, stalled {m['stalled']}")
        only = res["only"][method]
        print(f"{method:5s} below {args.threshold:g} in A only: {only['a']}, in B only: {only['b']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
