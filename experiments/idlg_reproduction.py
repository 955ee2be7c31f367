"""Reproduces iDLG's Table 1 (label accuracy) and Figure 1 (fidelity curves), Zhao, Mopuri, Bilen 2020.

Protocol (ALGORITHMS.md §2.7): per victim a fresh LeNet-Zhu with U(-0.5, 0.5)
weights and one real image (pixels in [0, 1], no normalisation); the shared
gradient of CE with the hard label; then DLG and iDLG on the same network and
image with independent N(0, 1) initialisations, both with PyTorch L-BFGS
semantics (lr 1, 300 outer steps, stop when the matching loss < 1e-6, tested
every 10 steps).

    python experiments/idlg_reproduction.py --dataset cifar100 --victims 1000 --out results/idlg/cifar100

Results are appended per victim to ``OUT/victims.jsonl``; a rerun skips the
victims already there (resume), and ``--time-budget`` stops starting new
chunks after that many seconds. ``OUT/meta.json`` keeps the protocol (a resume under
another one is refused), the seconds spent and, per invocation that ran victims, what
it ran with (``runs``: code version, jax, backend, strategy, convolution, head), since
a folder resumed under newer code mixes implementations that round differently. Every run rewrites ``OUT/results.json``,
``OUT/fidelity.png`` (against the paper's Figure 1), ``OUT/examples.png`` and
``OUT/figure2.png`` (one run's iterations, every 10 steps).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import pathlib
import subprocess
import sys
import time


from _xla import cpu_devices_flag, default_data_dir  # noqa: E402  (sets XLA_FLAGS before jax is imported)

cpu_devices_flag()

import jax
import jax.numpy as jnp
import numpy as np

from jaxleak import attacks, metrics, models, processes, victims
from jaxleak.cli import ScriptOutput, add_output_flags

DATA = {
    "mnist": ("mnist_test.npz", 10),
    "cifar100": ("cifar100_subset.npz", 100),
    "lfw": ("lfw32_subset.npz", 5749),
}

#: iDLG Table 1 [iDLG-README] and Figure 1 [Fig1-px] (ALGORITHMS.md §2.8), in percent.
PAPER = {
    "mnist": {"dlg": (89.9, [76.1, 76.1, 76.0, 76.0, 76.0]), "idlg": (100.0, [88.9, 88.9, 88.4, 88.2, 87.1])},
    "cifar100": {"dlg": (83.3, [66.1, 66.0, 65.2, 64.5, 57.2]), "idlg": (100.0, [83.6, 83.2, 82.5, 80.9, 70.4])},
    "lfw": {"dlg": (79.1, [52.2, 51.8, 51.4, 51.3, 47.4]), "idlg": (100.0, [91.5, 91.1, 91.0, 90.9, 83.1])},
}

CONFIGS = {"paper": attacks.PAPER, "optax": attacks.OPTAX_LBFGS, "retries": attacks.PAPER_RETRIES,
           "retries_stall": attacks.PAPER_RETRIES_STALL}


def load_images(data_dir: pathlib.Path, dataset: str) -> tuple[np.ndarray, np.ndarray, int]:
    name, classes = DATA[dataset]
    z = np.load(data_dir / name)
    return z["images"], z["labels"], classes


def victim_image_index(seed: int, i: int, n: int) -> int:
    """Victim i's image: its own draw (the first entry of a fresh permutation), stable under resume."""
    return int(np.random.default_rng([seed, i]).integers(n))


def run_chunk(model, template, idx, images, labels, classes, seed, config, strategy, pool=None, slots=None):
    x = jnp.asarray(images[[victim_image_index(seed, i, len(images)) for i in idx]], jnp.float32) / 255.0
    y_int = np.asarray(labels[[victim_image_index(seed, i, len(images)) for i in idx]])
    y = jax.nn.one_hot(y_int, classes)
    key = jax.random.PRNGKey(seed)
    net_keys = jnp.stack([jax.random.fold_in(jax.random.fold_in(key, 0), i) for i in idx])
    params = jax.jit(jax.vmap(lambda k: {"params": models.init_uniform(template["params"], k)}))(net_keys)
    grads = victims.gradients(model.apply, params, x, y, per_victim_params=True)
    out = {}
    for m, method in enumerate(("dlg", "idlg")):
        t = time.time()
        # One key per victim (not per chunk) so results do not depend on the chunking.
        keys = jnp.stack([jax.random.fold_in(jax.random.fold_in(key, m + 1), i) for i in idx])
        res_all = attacks.attack_victims(method, keys, model.apply, params, grads, x.shape[1:], config=config,
                                         x_true=x, strategy=strategy, pool=pool, slots=slots)
        res_all["seconds_per_victim"] = (time.time() - t) / len(idx)
        out[method] = res_all
    return x, y_int, out


def summarise(rows: list[dict], dataset: str, seconds: float) -> dict:
    result = {"dataset": dataset, "victims": len(rows), "seconds": seconds, "methods": {}}
    for method in ("dlg", "idlg"):
        mse = np.array([r[method]["mse"] for r in rows], dtype=np.float64)
        acc = metrics.label_accuracy(np.array([r[method]["label"] for r in rows]), np.array([r["label"] for r in rows]))
        result["methods"][method] = {
            "label_accuracy": acc,
            "fidelity": metrics.fidelity_curve(mse),
            "mse": mse.tolist(),
            "diverged": int(np.sum(~np.isfinite(mse) | (mse > 1.0))),
            "gave_up": int(sum(r[method].get("gave_up", False) for r in rows)),
            "stalled": int(sum(r[method].get("stalled", False) for r in rows)),
            "mean_evals": float(np.mean([r[method]["evals"] for r in rows])) if rows else float("nan"),
            "mean_steps": float(np.mean([r[method]["steps"] for r in rows])) if rows else float("nan"),
            "seconds_per_victim": float(np.mean([r[method]["seconds"] for r in rows])) if rows else float("nan"),
            "paper": {"label_accuracy": PAPER[dataset][method][0] / 100,
                      "fidelity": dict(zip(map(str, metrics.FIDELITY_THRESHOLDS), np.array(PAPER[dataset][method][1]) / 100))},
        }
    return result


def plot(out: pathlib.Path, summary: dict, examples: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thr = [str(t) for t in metrics.FIDELITY_THRESHOLDS]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method, color in (("dlg", "tab:blue"), ("idlg", "tab:red")):
        m = summary["methods"][method]
        ax.plot(thr, [100 * m["fidelity"][t] for t in thr], "o-", color=color, label=f"{method.upper()} jaxleak (n={summary['victims']})")
        ax.plot(thr, [100 * m["paper"]["fidelity"][t] for t in thr], "s--", color=color, alpha=0.5, label=f"{method.upper()} paper")
    ax.set_xlabel("MSE threshold"), ax.set_ylabel("% good fidelity"), ax.set_ylim(0, 100)
    ax.set_title(f"iDLG Figure 1, {summary['dataset']}"), ax.legend(fontsize=7)
    fig.tight_layout(), fig.savefig(out / "fidelity.png", dpi=120), plt.close(fig)

    show = lambda a: np.clip(a.squeeze(-1) if a.shape[-1] == 1 else a, 0, 1)
    cmap = "gray" if examples["x"].shape[-1] == 1 else None
    n = min(8, len(examples["x"]))
    if n:
        fig, axes = plt.subplots(3, n, figsize=(1.3 * n, 4.2), squeeze=False)
        for j in range(n):
            for r, (name, img) in enumerate((("truth", examples["x"][j]), ("DLG", examples["dlg"][j]), ("iDLG", examples["idlg"][j]))):
                axes[r, j].imshow(show(img), cmap=cmap), axes[r, j].axis("off")
                if j == 0:
                    axes[r, j].set_title(name, fontsize=8, loc="left")
        fig.tight_layout(), fig.savefig(out / "examples.png", dpi=120), plt.close(fig)
    if "snapshots_dlg" in examples:
        cols = list(range(0, examples["snapshots_dlg"].shape[0], 2))
        fig, axes = plt.subplots(2, len(cols), figsize=(0.9 * len(cols), 2.2), squeeze=False)
        for r, method in enumerate(("dlg", "idlg")):
            for c, s in enumerate(cols):
                axes[r, c].imshow(show(examples[f"snapshots_{method}"][s]), cmap=cmap), axes[r, c].axis("off")
                axes[r, c].set_title(f"{method.upper()} {10 * s}" if c == 0 else str(10 * s), fontsize=6)
        fig.tight_layout(), fig.savefig(out / "figure2.png", dpi=120), plt.close(fig)


def protocol(dataset: str, seed: int, config: attacks.AttackConfig, name: str, head: str = "dense") -> dict:
    """What a victim's result depends on: resuming a folder mixes results only if this is equal.

    ``head`` (resolved: ``"dense"`` or ``"blocked"``) is recorded only when it is ``"blocked"``: folders
    written before the option existed used the dense head, and resume with ``--head dense``.
    """
    record = {"dataset": dataset, "seed": seed, "config": dataclasses.asdict(config) | {"name": name}}
    if head != "dense":
        record["head"] = head
    return json.loads(json.dumps(record, default=str))


def check_resume(saved: dict | None, current: dict, rows: list, out: pathlib.Path) -> dict:
    """Refuses to resume ``out`` under a different protocol (dataset, seed, attack config).

    A folder written before the protocol was recorded (``saved`` is None) is taken as it is,
    as the README's copy of ``docs/results/`` is; its ``results.json`` records its config.
    """
    if saved is not None and "config" in saved:
        # A config field added since the folder was written did not exist then: the run behaved as its default.
        defaults = json.loads(json.dumps(dataclasses.asdict(attacks.AttackConfig()), default=str))
        saved = saved | {"config": {k: v for k, v in defaults.items() if k in current["config"]} | saved["config"]}
    if saved is not None and rows and saved != current:
        diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if "config" in diff:
            diff.remove("config")
            diff += [f"config.{k}" for k in sorted(set(saved["config"]) | set(current["config"]))
                     if saved["config"].get(k) != current["config"].get(k)]
        raise SystemExit(f"cannot resume {str(out)!r}: its {len(rows)} victims were run with a different {', '.join(diff)}; "
                         "use the same flags or another --out")
    return current


def code_version(path: pathlib.Path = pathlib.Path(__file__)) -> str | None:
    """The checkout's commit (``git describe --always --dirty``), or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "-C", str(path.resolve().parent), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def run_record(done: int, strategy: str, conv: str, head: str) -> dict:
    """What one invocation ran with, for ``meta.json``'s ``runs``: a resumed folder can mix code versions.

    The convolution and L-BFGS implementations compute the same function but round differently,
    so a run resumed under other code follows other trajectories from its first new victim on.
    """
    return {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "code": code_version(), "jax": jax.__version__,
            "backend": jax.default_backend(), "strategy": strategy, "conv": conv, "head": head, "victims_before": done}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(DATA), required=True, help="iDLG Table 1 dataset")
    p.add_argument("--victims", type=int, default=1000, help="victims (the paper: 1000)")
    p.add_argument("--out", type=pathlib.Path, required=True, help="output folder; an existing one is resumed")
    p.add_argument("--data", type=pathlib.Path, default=None,
                   help="folder of the .npz subsets (default $JAXLEAK_DATA, else ../shared/data beside the checkout)")
    p.add_argument("--seed", type=int, default=0, help="seed of the images, networks and starts")
    p.add_argument("--cpu-devices", type=int, default=2, help="virtual CPU devices (cores) for the victim loop")
    p.add_argument("--config", choices=sorted(CONFIGS), default="paper",
                   help="paper: PyTorch-semantics L-BFGS, 300 steps; optax: optax L-BFGS with zoom line search, 3000 steps; "
                        "retries: paper plus giving up hopeless runs and retrying them (attacks.PAPER_RETRIES); "
                        "retries_stall: retries plus stopping runs near the match that stopped improving "
                        "(attacks.PAPER_RETRIES_STALL)")
    p.add_argument("--head", choices=models.HEADS, default="auto",
                   help="LeNet's head: blocked (the logits summed in blocks for float32 accuracy, models.BlockedDense), "
                        "dense (nn.Dense: the CPU records in docs/results were made with it) or auto (blocked on CPU)")
    p.add_argument("--steps", type=int, default=None, help="outer L-BFGS steps (default: the config's, 300 as in the paper)")
    p.add_argument("--give-up", type=float, nargs=2, default=None, metavar=("STEP", "LOSS"),
                   help="AttackConfig.give_up=(STEP, LOSS): abandon DLG/iDLG runs whose loss is still at or above LOSS at "
                        "a check from outer step STEP on (not the paper's protocol; experiments/give_up_study.py picks one)")
    p.add_argument("--retries", type=int, default=None,
                   help="start a run the give-up rule abandons again from a fresh start, up to this many times "
                        "(AttackConfig.retries; needs --give-up or --config retries)")
    p.add_argument("--stall", type=float, nargs=2, default=None, metavar=("LOSS", "RATIO"),
                   help="AttackConfig.stall=(LOSS, RATIO): stop DLG/iDLG runs whose loss is below LOSS at a check and not "
                        "below RATIO times the previous check's (not the paper's protocol; experiments/give_up_study.py "
                        "scores candidates)")
    p.add_argument("--chunk", type=int, default=None, help="victims per chunk (default: 4 for the CPU loop, 16 with processes, "
                        "256 on GPU); a chunk is the unit of resume")
    p.add_argument("--strategy", choices=("auto", "loop", "processes", "vmap", "stream"), default="auto",
                   help="how victims are mapped (auto: the backend's default; processes: one pinned single-device "
                        "worker per CPU core, started once for the run; ~1.4x the CPU loop's throughput or more; "
                        "stream: --slots victims of a chunk at a time under vmap, refilled as they finish)")
    p.add_argument("--slots", type=int, default=None,
                   help="with --strategy stream: victims attacked at once per device (fewer than --chunk)")
    p.add_argument("--time-budget", type=float, default=float("inf"), help="stop starting chunks after this many seconds")
    add_output_flags(p)
    args = p.parse_args(argv)
    o = ScriptOutput(args)
    data_dir = args.data or default_data_dir()
    if not (data_dir / DATA[args.dataset][0]).is_file():
        p.error(f"{DATA[args.dataset][0]} not found in {data_dir}: pass --data or set JAXLEAK_DATA")

    backend = jax.default_backend()
    strategy = attacks.DEFAULT_STRATEGY.get(backend, "vmap") if args.strategy == "auto" else args.strategy
    # A chunk waits for its slowest victim (2,000 to 6,000 evaluations): with 16 the workers
    # of the processes strategy seldom stand idle at a chunk's end.
    chunk = args.chunk or (256 if backend != "cpu" else 16 if strategy == "processes" else 4)
    if args.slots is not None and strategy != "stream":
        p.error(f"--slots goes with --strategy stream, not {strategy}")
    head = models.head_layer(args.head)
    config = CONFIGS[args.config]
    overrides = {} if args.steps is None else {"steps": args.steps}
    overrides |= {} if args.give_up is None else {"give_up": (int(args.give_up[0]), args.give_up[1])}
    overrides |= {} if args.retries is None else {"retries": args.retries}
    overrides |= {} if args.stall is None else {"stall": tuple(args.stall)}
    try:
        config = dataclasses.replace(config, **overrides)
    except ValueError as e:
        p.error(f"--steps/--give-up/--retries/--stall: {e}")
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "victims.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    done = {r["victim"] for r in rows}
    meta_path = args.out / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"seconds": 0.0}
    meta["protocol"] = check_resume(meta.get("protocol"), protocol(args.dataset, args.seed, config, args.config, head), rows, args.out)
    run = run_record(len(rows), strategy, models.conv_layer("auto"), head)  # in meta["runs"] once it writes a victim
    if rows:  # a folder from before the protocol was recorded records it now, even if no chunk runs
        meta_path.write_text(json.dumps(meta))
    ex_path = args.out / "examples.npz"
    examples = dict(np.load(ex_path)) if ex_path.exists() else {"x": np.zeros((0,)), "dlg": np.zeros((0,)), "idlg": np.zeros((0,))}

    images, labels, classes = load_images(data_dir, args.dataset)
    model = models.LeNet(classes, head=head)
    template = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, *images.shape[1:]), jnp.float32))
    todo = [i for i in range(args.victims) if i not in done]
    start = time.time()
    bar = o.progress(total=len(todo), desc=f"idlg {args.dataset}", unit="victim")
    # One worker pool for the whole run: its workers start and load each compiled attack once.
    with processes.WorkerPool() if strategy == "processes" else contextlib.nullcontext() as pool:
        for c in range(0, len(todo), chunk):
            if time.time() - start > args.time_budget:
                break
            idx = todo[c:c + chunk]
            t = time.time()
            x, y_int, res = run_chunk(model, template, idx, images, labels, classes, args.seed, config, strategy, pool,
                                      args.slots)
            with log.open("a") as f:
                for j, i in enumerate(idx):
                    row = {"victim": i, "label": int(y_int[j])}
                    for method in ("dlg", "idlg"):
                        r = res[method]
                        row[method] = {"label": int(r["label_index"][j]), "mse": float(r["mse"][j]), "loss": float(r["loss"][j]),
                                       "steps": int(r["steps"][j]), "evals": int(r["evals"][j]),
                                       "seconds": float(r["seconds_per_victim"])}
                        if config.give_up is not None:
                            row[method]["gave_up"] = bool(r["gave_up"][j])
                        if config.stall is not None:
                            row[method]["stalled"] = bool(r["stalled"][j])
                    f.write(json.dumps(row) + "\n")
                    rows.append(row)
            if len(examples["x"]) < 8:
                take = slice(0, 8 - len(examples["x"]))
                for name, arr in (("x", np.asarray(x)), ("dlg", res["dlg"]["reconstruction"]), ("idlg", res["idlg"]["reconstruction"])):
                    examples[name] = np.concatenate([examples[name].reshape((-1, *arr.shape[1:])), arr[take]])
                if "snapshots_dlg" not in examples:
                    examples["snapshots_dlg"] = res["dlg"]["snapshots"][0]
                    examples["snapshots_idlg"] = res["idlg"]["snapshots"][0]
                np.savez(ex_path, **examples)
            meta["seconds"] += time.time() - t
            if c == 0:
                meta.setdefault("runs", []).append(run)
            meta_path.write_text(json.dumps(meta))
            bar.update(len(idx))
            bar.set_postfix_str(f"chunk {time.time() - t:.1f}s")
    bar.close()

    rows.sort(key=lambda r: r["victim"])
    summary = summarise(rows, args.dataset, meta["seconds"])
    summary.update(config=dataclasses.asdict(config) | {"name": args.config}, head=head, backend=backend, strategy=strategy,
                   seed=args.seed, requested_victims=args.victims, complete=len(rows) >= args.victims, runs=meta.get("runs", []))
    (args.out / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    plot(args.out, summary, examples)
    for method in ("dlg", "idlg"):
        m = summary["methods"][method]
        o.report(f"{args.dataset} {method}: n={summary['victims']} label acc {100 * m['label_accuracy']:.1f}% (paper "
                 f"{100 * m['paper']['label_accuracy']:.1f}%), fidelity "
                 + " ".join(f"{t}:{100 * v:.1f}" for t, v in m["fidelity"].items())
                 + " | paper " + " ".join(f"{100 * v:.1f}" for v in m["paper"]["fidelity"].values())
                 + f" | evals {m['mean_evals']:.0f}, {m['seconds_per_victim']:.1f}s/victim")
    o.report(f"results: {args.out / 'results.json'}; figures: "
             + ", ".join(str(args.out / f) for f in ("fidelity.png", "examples.png", "figure2.png") if (args.out / f).exists()))
    brief = {k: v for k, v in summary.items() if k != "methods"}
    brief["methods"] = {m: {k: v for k, v in d.items() if k != "mse"} for m, d in summary["methods"].items()}
    o.summary({"experiment": "idlg", "out": str(args.out), "summary": brief})
    return 0


if __name__ == "__main__":
    sys.exit(main())
