"""Soft-label recovery of Wang, Liang, He (ICLR 2024) on untrained networks: ALGORITHMS.md T5, T6, T8, T9, T13.

For every setting (network x dataset x label kind) the victims' last-layer
gradients are computed once (``jaxleak.victims.gradients``), then recovered by
``jaxleak.recovery.soft_label`` with the robust and the paper search, in
float32 and float64. Per setting and mode we report the paper's success
criterion (loss < 1e-9 and |s - s*| < 0.01, s = c * lam), ``max|y_hat - y| < 1e-3``,
argmax agreement, |eps_hat - eps| or |mu_hat - min(mu, 1 - mu)|, how often the
paper mode needed the swarm, and victims per second of the recovery alone
(gradients precomputed, compilation excluded). T13: the iDLG rule applied to
the soft labels (argmax agreement).

Usage::

    python experiments/label_recovery.py --quick
    python experiments/label_recovery.py --settings lenet_cifar10_smoothing --out results/label_recovery

Results are appended per setting to ``OUT/results.json`` (settings already
there are skipped: resume), with ``OUT/results.md`` and ``OUT/landscape.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxleak import data, labels, models, recovery, victims

REPO = pathlib.Path(__file__).resolve().parents[1]
SEED = 2023


@dataclasses.dataclass(frozen=True)
class Setting:
    """One row of the experiment: network, init, dataset, label kind and sample sizes."""

    model: str
    init: str
    dataset: str
    kind: str
    per_class: int  # smoothing: victims per class; mixup: draws per class pair
    max_victims: int | None = None  # cap (random subset) for large pair sets / slow nets
    chunk: int = 64  # victims per gradient chunk


SETTINGS: dict[str, Setting] = {
    # T6 / T8: CIFAR-10 (paper: 10 x 100 smoothing, 45 x 20 mixup; LeNet demo 100 / 135).
    "resnet18_cifar10_smoothing": Setting("resnet18", "torch_resnet", "cifar10", "smoothing", 100),
    "resnet18_cifar10_mixup": Setting("resnet18", "torch_resnet", "cifar10", "mixup", 20),
    "lenet_cifar10_smoothing": Setting("lenet", "uniform", "cifar10", "smoothing", 100),
    "lenet_cifar10_mixup": Setting("lenet", "uniform", "cifar10", "mixup", 20),
    # T9: CIFAR-100, Flowers-17 (64x64 here, 224 in the paper), ImageNet (120 images).
    "lenet_cifar100_smoothing": Setting("lenet", "uniform", "cifar100", "smoothing", 10),
    "lenet_cifar100_mixup": Setting("lenet", "uniform", "cifar100", "mixup", 1, max_victims=1000),
    "resnet18_cifar100_smoothing": Setting("resnet18", "torch_resnet", "cifar100", "smoothing", 10),
    "resnet18_cifar100_mixup": Setting("resnet18", "torch_resnet", "cifar100", "mixup", 1, max_victims=1000),
    "fcn4_flowers17_smoothing": Setting("fcn4", "torch", "flowers17", "smoothing", 20, chunk=8),
    "fcn4_flowers17_mixup": Setting("fcn4", "torch", "flowers17", "mixup", 2, chunk=8),
    "alexnet_flowers17_smoothing": Setting("alexnet", "uniform", "flowers17", "smoothing", 60, chunk=16),
    "alexnet_flowers17_mixup": Setting("alexnet", "uniform", "flowers17", "mixup", 7, chunk=16),
    "resnet18_flowers17_smoothing": Setting("resnet18", "torch_resnet", "flowers17", "smoothing", 60, chunk=32),
    "resnet18_flowers17_mixup": Setting("resnet18", "torch_resnet", "flowers17", "mixup", 7, chunk=32),
    "resnet50_imagenet_smoothing": Setting("resnet50", "uniform", "imagenet2012", "smoothing", 1, max_victims=60, chunk=4),
    "resnet50_imagenet_mixup": Setting("resnet50", "uniform", "imagenet2012", "mixup", 1, max_victims=60, chunk=4),
}


# --------------------------------------------------------------------------
# Victims
# --------------------------------------------------------------------------


def _model(s: Setting, num_classes: int):
    if s.model == "lenet":
        return models.LeNet(num_classes, head_bias=False)  # paper 2's bias-free copy
    return models.get_model(s.model, num_classes)


def _victims(s: Setting, quick: bool):
    """Images (normalised, float32 NHWC) and label distributions of the setting's victims."""
    ds = data.load(s.dataset, source="npz")
    K = len(ds.class_names)
    rng = np.random.default_rng(SEED)
    y_int = np.asarray(ds.labels)
    x_all = lambda idx: np.asarray(data.normalize(data.to_float(jnp.asarray(ds.images[idx]))))
    if s.kind == "smoothing":
        if s.dataset == "imagenet2012":
            idx = np.arange(len(y_int))
        else:
            idx = data.sample_per_class(y_int, 2 if quick else s.per_class, SEED)
        if s.max_victims and len(idx) > s.max_victims:
            idx = np.sort(rng.choice(idx, s.max_victims, replace=False))
        if quick:
            idx = idx[rng.permutation(len(idx))[:20]]
        eps = rng.uniform(0, 0.5, size=len(idx))
        ys = np.asarray(labels.smooth(jnp.asarray(y_int[idx]), K, jnp.asarray(eps, jnp.float32)))
        return x_all(idx), ys, dict(eps=eps, cls=y_int[idx]), K
    if s.dataset == "imagenet2012":  # 120 images of 120 classes: random pairs of distinct classes
        n = s.max_victims or 60
        a = rng.integers(0, len(y_int), 4 * n)
        b = rng.integers(0, len(y_int), 4 * n)
        keep = np.flatnonzero(y_int[a] != y_int[b])[:n]
        a, b = a[keep], b[keep]
    else:
        a, b = data.mixup_pairs(y_int, K, s.per_class, SEED)
    if s.max_victims and len(a) > s.max_victims:
        sel = np.sort(rng.choice(len(a), s.max_victims, replace=False))
        a, b = a[sel], b[sel]
    if quick:
        sel = rng.permutation(len(a))[:20]
        a, b = a[sel], b[sel]
    mu = rng.uniform(0, 1, size=len(a))
    x, y = labels.mixup(jnp.asarray(x_all(a)), jnp.asarray(x_all(b)), labels.one_hot(jnp.asarray(y_int[a]), K),
                        labels.one_hot(jnp.asarray(y_int[b]), K), jnp.asarray(mu, jnp.float32))
    return np.asarray(x), np.asarray(y), dict(mu=mu, cls=y_int[a], cls_b=y_int[b]), K


def _head_gradients(model, variables, xs, ys, chunk: int):
    """Last-layer kernel gradients ``(V, d, K)`` and true features ``(V, d)``, chunk by chunk."""
    feat = jax.jit(jax.vmap(lambda x: victims.feature(model.apply, variables, x)))
    grads, feats = [], []
    for i in range(0, len(xs), chunk):
        g = victims.gradients(model.apply, variables, jnp.asarray(xs[i:i + chunk]), jnp.asarray(ys[i:i + chunk]),
                              chunk_size=chunk)
        grads.append(np.asarray(models.last_layer(g)[0]))
        feats.append(np.asarray(feat(jnp.asarray(xs[i:i + chunk]))))
    return np.concatenate(grads), np.concatenate(feats)


# --------------------------------------------------------------------------
# Recovery and scoring
# --------------------------------------------------------------------------


def _timed(fn, *args):
    out = fn(*args)
    jax.block_until_ready(out)  # compile + first run
    t0 = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    return out, time.perf_counter() - t0


def _score(res, G, W, H, Y, meta, kind, coef):
    """Success criteria for one mode (numpy, float64)."""
    y_hat = np.asarray(res.label, np.float64)
    lam = np.asarray(res.lam, np.float64)
    row = np.asarray(res.row)
    z = H.astype(np.float64) @ W.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    delta = p - Y
    lam_true = 1.0 / delta[np.arange(len(row)), row]
    paper_ok = (np.asarray(res.loss) < 1e-9) & (np.abs(coef * lam - coef * lam_true) < 0.01)
    err = np.abs(y_hat - Y).max(1)
    out = {
        "n": int(len(Y)),
        "acc_paper_criterion": float(paper_ok.mean()),
        "acc_maxabs_1e-3": float((err < 1e-3).mean()),
        "acc_maxabs_1e-4": float((err < 1e-4).mean()),
        "argmax_agreement": float((y_hat.argmax(1) == Y.argmax(1)).mean()),
        "ok_rate": float(np.asarray(res.ok).mean()),
        "ok_but_wrong_1e-3": int(((err >= 1e-3) & np.asarray(res.ok)).sum()),
        "median_maxabs_err": float(np.median(err)),
        "reasons": {recovery.REASONS[i].split(":")[0].split(" (")[0]: int(c)
                    for i, c in enumerate(np.bincount(np.asarray(res.reason), minlength=len(recovery.REASONS))) if c},
    }
    if kind == "smoothing":
        e = np.abs(np.asarray(res.epsilon, np.float64) - meta["eps"])
        out.update(eps_abs_err_median=float(np.median(e)), eps_abs_err_max=float(e.max()))
    else:
        m = np.abs(np.asarray(res.mu, np.float64) - np.minimum(meta["mu"], 1 - meta["mu"]))
        out.update(mu_abs_err_median=float(np.median(m)), mu_abs_err_max=float(m.max()))
    return out


def run_setting(name: str, s: Setting, quick: bool, modes) -> dict:
    t_start = time.perf_counter()
    xs, ys, meta, K = _victims(s, quick)
    model = _model(s, K)
    key = jax.random.PRNGKey(SEED)
    template = jax.jit(model.init)(key, jnp.zeros((1, *xs.shape[1:]), jnp.float32))
    variables = models.get_init(s.init)(template, key)
    t0 = time.perf_counter()
    G, H = _head_gradients(model, variables, xs, ys, s.chunk)
    t_grad = time.perf_counter() - t0
    W = np.asarray(models.last_layer(variables)[0])
    finite = np.isfinite(G).all((1, 2)) & np.isfinite(H).all(1)
    record = {"setting": dataclasses.asdict(s), "num_classes": K, "victims": int(len(ys)),
              "finite_gradients": int(finite.sum()), "gradient_seconds": round(t_grad, 2), "modes": {}}
    coef = 4.0 if s.kind == "smoothing" else 2.0
    for dtype_name in ("float32", "float64"):
        with jax.enable_x64(dtype_name == "float64"):
            dt = jnp.float32 if dtype_name == "float32" else jnp.float64
            Gd, Wd = jnp.asarray(G, dt), jnp.asarray(W, dt)
            for mode in modes:
                fn = lambda G_, W_: recovery.soft_label(G_, W_, kind=s.kind, search=mode, errors="flag")
                t0 = time.perf_counter()
                res, dt_run = _timed(fn, Gd, Wd)
                t_total = time.perf_counter() - t0
                sc = _score(res, G, W, H, ys, meta, s.kind, coef)
                sc.update(victims_per_second=round(len(ys) / dt_run, 1), recovery_seconds=round(dt_run, 4),
                          compile_plus_two_runs_seconds=round(t_total, 2))
                if mode == "paper":
                    sc["swarm_rate"] = float(np.asarray(res.swarm).mean())
                record["modes"][f"{mode}_{dtype_name}"] = sc
    # T13: iDLG rule on soft labels.
    Gj = jnp.asarray(G)
    true_top = ys.argmax(1)
    for method in ("rowsum", "inner"):
        lab = np.asarray(recovery.idlg_label(Gj, method=method, errors="flag"))
        entry = {"argmax_agreement": float((lab == true_top).mean())}
        if s.kind == "mixup":
            entry["either_class"] = float(((lab == meta["cls"]) | (lab == meta["cls_b"])).mean())
        record[f"idlg_{method}"] = entry
    record["total_seconds"] = round(time.perf_counter() - t_start, 1)
    if name.startswith(("resnet18_cifar10_smoothing", "lenet_cifar10_smoothing")):
        _save_landscape_data(name, G[0], W, H[0], ys[0], s.kind)
    return record


_LANDSCAPE: dict = {}


def _save_landscape_data(name, g, W, h, y, kind):
    _LANDSCAPE[name] = (g, W, h, y, kind)


def landscape_png(path: pathlib.Path, name: str) -> None:
    """Loss of lam like the paper's Figure 1: variance loss of y_hat(lam) on a symmetric log-ish grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g, W, h, y, kind = _LANDSCAPE[name]
    with jax.enable_x64(True):
        G, Wd = jnp.asarray(g, jnp.float64), jnp.asarray(W, jnp.float64)
        lams = np.concatenate([-np.logspace(2, -0.3, 2000), np.logspace(-0.3, 2, 2000)])
        loss = jax.vmap(lambda l: recovery.variance_loss(recovery.pseudo_label(G, Wd, l)[0], kind))(jnp.asarray(lams))
        res = recovery.soft_label(G, Wd, kind=kind)
        z = h @ W
        p = np.exp(z - z.max())
        p /= p.sum()
        r = int(res.row)
        lam_true = 1.0 / (p[r] - y[r])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.semilogy(lams, np.maximum(np.asarray(loss), 1e-32), lw=1)
    ax.axvline(lam_true, color="k", ls="--", lw=0.8, label=f"true lam = {lam_true:.4f}")
    ax.axvline(float(res.lam), color="r", ls=":", lw=1.2, label=f"robust search = {float(res.lam):.4f}")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("lam_r")
    ax.set_ylabel("1000 Var (variance loss)")
    ax.set_title(f"{name}: loss landscape of lam (victim 0)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(results: dict) -> str:
    lines = ["| setting | victims | mode | paper criterion | max abs < 1e-3 | argmax | ok | ok but wrong | eps/mu err (median) | swarm | victims/s | iDLG rowsum / inner argmax |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, rec in results.items():
        idlg = f"{rec['idlg_rowsum']['argmax_agreement']:.3f} / {rec['idlg_inner']['argmax_agreement']:.3f}"
        for mode, sc in rec["modes"].items():
            err = sc.get("eps_abs_err_median", sc.get("mu_abs_err_median"))
            swarm = f"{sc['swarm_rate']:.3f}" if "swarm_rate" in sc else ""
            lines.append(f"| {name} | {rec['victims']} | {mode} | {sc['acc_paper_criterion']:.3f} | {sc['acc_maxabs_1e-3']:.3f} | "
                         f"{sc['argmax_agreement']:.3f} | {sc['ok_rate']:.3f} | {sc['ok_but_wrong_1e-3']} | {err:.2e} | {swarm} | {sc['victims_per_second']:.0f} | {idlg} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--settings", default="all", help=f"comma-separated names or 'all': {', '.join(SETTINGS)}")
    ap.add_argument("--out", default=str(REPO / "results" / "label_recovery"), help="output folder; settings already there are skipped")
    ap.add_argument("--quick", action="store_true", help="20 victims per setting (smoke test)")
    ap.add_argument("--modes", default="robust,paper", help="comma-separated searches of soft_label: robust, paper")
    ap.add_argument("--force", action="store_true", help="recompute settings already in results.json")
    from jaxleak.cli import ScriptOutput, add_output_flags

    add_output_flags(ap)
    args = ap.parse_args(argv)
    o = ScriptOutput(args)
    names = list(SETTINGS) if args.settings == "all" else args.settings.split(",")
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        ap.error(f"unknown settings {unknown}; choose from {list(SETTINGS)}")
    modes = tuple(args.modes.split(","))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for name in o.progress(names, desc="label recovery", unit="setting"):
        if name in results and not args.force:
            o.log(f"skip {name} (already in {path})")
            continue
        o.log(f"== {name}")
        rec = run_setting(name, SETTINGS[name], args.quick, modes)
        rec["quick"] = args.quick
        results[name] = rec
        path.write_text(json.dumps(results, indent=1))
        (out / "results.md").write_text(markdown(results))
        o.report(f"{name}: {rec['victims']} victims")
        for mode, sc in rec["modes"].items():
            o.report(f"  {mode:16s} paper {sc['acc_paper_criterion']:.3f} maxabs {sc['acc_maxabs_1e-3']:.3f} "
                     f"argmax {sc['argmax_agreement']:.3f} ok {sc['ok_rate']:.3f} {sc['victims_per_second']:.0f} victims/s")
        o.report(f"  iDLG rowsum {rec['idlg_rowsum']} inner {rec['idlg_inner']}; grads {rec['gradient_seconds']}s, total {rec['total_seconds']}s")
        if name in _LANDSCAPE:
            landscape_png(out / f"landscape_{name}.png", name)
    o.report(f"results: {path}, {out / 'results.md'}" + "".join(f", {f}" for f in sorted(out.glob("landscape_*.png"))))
    o.summary({"experiment": "softlabel", "out": str(out), "quick": args.quick,
               "settings": {n: results[n] for n in names if n in results}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
