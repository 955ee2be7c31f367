"""Soft-label recovery on *trained* victims (T7, T12, T13 of ALGORITHMS.md §8).

Loads the checkpoints of ``experiments/train_victims.py`` and measures, on the
held-out images of each training set (CIFAR-10: the 400-image test split, 40 per class):

* T7  — mixup on the trained LeNet: the 45 class pairs x ``per_pair`` (paper: 20)
  draws, mu ~ U(0, 1), both ``soft_label`` search modes (robust; paper L-BFGS
  + particle swarm, c = 2), success by every criterion of §4.8.
* smoothing on the trained ResNet18 (CIFAR stem): 10 classes x ``per_class``
  (paper: 100) with replacement, eps ~ U(0, 0.5), c = 4.
* T12 — the lambda landscape ``L(lam)`` (c = 1) on the trained ResNet18: how often
  it has a spurious local minimum (and where), plotted for one sample.
* (extra) mixup on the mixup-trained ResNet18, same protocol as T7.
* Flowers-17 (paper 2's AlexNet and CIFAR ResNet18, trained with smoothing and with
  mixup on the 64x64 set, §5.3): the same two protocols on the 340 held-out
  images (20 per class): 136 class pairs x ``per_pair`` mixup draws, 17 classes x
  ``per_class`` smoothing draws.
* T13 — the iDLG rule (argmin of the head-gradient column sums) with soft labels,
  trained vs untrained networks: how often it misses the dominant class.

Only the last layer matters for these read-outs, so the head gradient is formed
as ``outer(h, softmax(z) - y)`` from one forward pass (checked against the full
``jaxleak.victims.gradient`` on a few victims).

    python experiments/trained_recovery.py --out results/trained_recovery [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxleak import data, labels, models, recovery, report, train
from jaxleak import victims as _victims

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import train_victims  # noqa: E402  (the sibling script that wrote the checkpoints)

REPO = pathlib.Path(__file__).resolve().parents[1]
CKPT = REPO / "results" / "checkpoints"
SEED = 2023
COEF = {"smoothing": 4.0, "mixup": 2.0}
#: (training set, network, training regime, soft-label kind attacked): paper 2's trained victims (§5.3).
CASES = [("cifar10", "lenet", "mixup", "mixup"), ("cifar10", "resnet18", "smoothing", "smoothing"),
         ("cifar10", "resnet18", "mixup", "mixup"),
         ("flowers17", "alexnet", "smoothing", "smoothing"), ("flowers17", "alexnet", "mixup", "mixup"),
         ("flowers17", "resnet18", "smoothing", "smoothing"), ("flowers17", "resnet18", "mixup", "mixup")]


def load_victim(model_name: str, regime: str, ckpt_dir=CKPT, dataset: str = "cifar10"):
    """``(model, variables, recipe)`` of a checkpoint written by ``train_victims.py`` (its model builder and file name)."""
    variables, recipe = train.load_checkpoint(train_victims.checkpoint_path(ckpt_dir, model_name, regime, dataset))
    return train_victims.build_model(model_name, recipe["num_classes"]), variables, recipe


def head_gradients(model, variables, x: np.ndarray, y: np.ndarray, batch: int = 100):
    """``(G (V, d, K), h (V, d), p (V, K))`` with ``G = outer(h, p - y)``: the head-kernel gradient of each victim."""
    fwd = jax.jit(lambda v, xb: model.apply(v, xb, return_feature=True))
    hs, ps = [], []
    for s in range(0, len(x), batch):
        z, h = fwd(variables, jnp.asarray(x[s:s + batch]))
        hs.append(np.asarray(h))
        ps.append(np.asarray(jax.nn.softmax(z)))
    h, p = np.concatenate(hs), np.concatenate(ps)
    return h[:, :, None] * (p - y)[:, None, :], h, p


def _check_head_gradient(model, variables, x, y, G):
    for i in range(2):
        g = _victims.gradient(model.apply, variables, jnp.asarray(x[i]), jnp.asarray(y[i]))
        np.testing.assert_allclose(models.last_layer(g)[0], G[i], rtol=1e-4, atol=1e-6)


def score(sl, y, p, kind: str) -> dict:
    """§4.8 criteria: the code's ``|s_hat - s*| < 0.01`` (s = c * lam, s* from the true delta_r), label max-abs < 1e-3, argmax."""
    V = len(y)
    r = np.asarray(sl.row)
    delta_r = (p - y)[np.arange(V), r]
    lam_true = 1.0 / delta_r
    c = COEF[kind]
    paper_ok = np.asarray(sl.ok) & (np.abs(c * np.asarray(sl.lam) - c * lam_true) < 0.01)
    lab_err = np.abs(np.asarray(sl.label) - y).max(1)
    out = {"n": V, "ok": float(np.mean(sl.ok)), "paper_criterion": float(np.mean(paper_ok)),
           "label_maxabs_lt_1e-3": float(np.mean(lab_err < 1e-3)),
           "argmax": float(np.mean(np.asarray(sl.label).argmax(1) == y.argmax(1))),
           "median_label_err": float(np.median(lab_err)), "lam_true_positive": float(np.mean(lam_true > 0)),
           "swarm_used": int(np.sum(np.asarray(sl.swarm))),
           "failure_reasons": {recovery.REASONS[int(k)]: int(v) for k, v in
                               zip(*np.unique(np.asarray(sl.reason)[~np.asarray(sl.ok)], return_counts=True))},
           "failed_true_lam": [float(v) for v in lam_true[~np.asarray(sl.ok)][:20]]}
    if kind == "mixup":
        mu_true = np.sort(y, 1)[:, -2]
        out["median_abs_mu_err"] = float(np.nanmedian(np.abs(np.asarray(sl.mu) - mu_true)))
    else:
        eps_true = y.min(1) * y.shape[1]
        out["median_abs_eps_err"] = float(np.nanmedian(np.abs(np.asarray(sl.epsilon) - eps_true)))
    return out


def landscape_loss(G, W, lams, kind: str = "smoothing"):
    """``L(lam)`` of §4.5 (1000 x population variance of the K-1 / K-2 smallest entries of y_hat) on a grid."""
    drop = 1 if kind == "smoothing" else 2

    def one(lam):
        y, _, _ = recovery.pseudo_label(G, W, lam)
        return 1000.0 * jnp.var(jnp.sort(y)[:-drop])

    return np.asarray(jax.jit(jax.vmap(one))(jnp.asarray(lams)))


def spurious_minima(lams, L, lam_true, tol=0.05, window=50, depth=1e-3):
    """Interior grid local minima of ``L`` more than ``tol`` (relative) away from ``lam_true``.

    A minimum counts only if it is at least ``depth`` (relative) below the highest
    value within ``window`` grid points on *both* sides (no rounding ripples).
    """
    out = []
    for j in np.flatnonzero((L[1:-1] < L[:-2]) & (L[1:-1] < L[2:])) + 1:
        left, right = L[max(0, j - window):j].max(), L[j + 1:j + 1 + window].max()
        if L[j] < (1 - depth) * min(left, right) and abs(lams[j] - lam_true) > tol * abs(lam_true):
            out.append(float(lams[j]))
    return out


def _test_split(recipe, ds):
    x = np.asarray(data.normalize(data.to_float(ds.images)))
    te = np.asarray(recipe["split"]["test_indices"])
    return x[te], np.asarray(ds.labels)[te]


def mixup_victims(x, cls, per_pair, rng_seed=SEED, num_classes=10):
    a, b = data.mixup_pairs(cls, num_classes, per_pair, rng_seed)
    mu = np.random.default_rng(rng_seed).uniform(0, 1, len(a)).astype(np.float32)
    onehot = np.eye(num_classes, dtype=np.float32)
    xm, ym = labels.mixup(x[a], x[b], onehot[cls[a]], onehot[cls[b]], mu)
    return np.asarray(xm), np.asarray(ym)


def smoothing_victims(x, cls, per_class, rng_seed=SEED, num_classes=10):
    idx = data.sample_per_class(cls, per_class, rng_seed)
    eps = np.random.default_rng(rng_seed).uniform(0, 0.5, len(idx)).astype(np.float32)
    return x[idx], np.asarray(labels.smooth(jnp.asarray(cls[idx]), num_classes, jnp.asarray(eps)))


def recover(G, W, kind, searches, log):
    res = {}
    for search in searches:
        t = time.time()
        cfg = recovery.PaperSearch(coefficient=COEF[kind]) if search == "paper" else None
        res[search] = (recovery.soft_label(jnp.asarray(G), W, kind=kind, search=search, config=cfg, errors="flag"),
                       time.time() - t)
        log(f"  {kind}/{search}: {time.time() - t:.1f}s")
    return res


def idlg_rate(G, y) -> dict:
    """iDLG's class (argmin column sum): rate equal to the dominant class, and rate among the top two (mixup)."""
    pred = np.asarray(recovery.idlg_label(jnp.asarray(G), method="rowsum", errors="flag"))
    top2 = np.argsort(y, 1)[:, -2:]
    return {"dominant": float(np.mean(pred == y.argmax(1))), "top_two": float(np.mean((top2 == pred[:, None]).any(1)))}


def untrained_like(model, variables, model_name, seed=0):
    """The same architecture untrained with paper 2's inits (LeNet, AlexNet U(-0.5, 0.5); ResNet torchvision), BN stats 0/1."""
    init = models.init_torch_resnet if model_name == "resnet18" else models.init_uniform
    fresh = {**variables, "params": init(variables["params"], jax.random.PRNGKey(seed))}
    if "batch_stats" in variables:
        fresh["batch_stats"] = jax.tree_util.tree_map_with_path(
            lambda path, a: jnp.zeros_like(a) if path[-1].key == "mean" else jnp.ones_like(a), variables["batch_stats"])
    return fresh


def run(out="results/trained_recovery", quick=False, *, per_pair=20, per_class=100, searches=("robust", "paper"),
        ckpt_dir=CKPT, npz_dir=None, log=print) -> dict:
    t0 = time.time()
    out = report.ensure_writable(out)
    if quick:
        per_pair, per_class = 2, 5
    results = {"config": {"per_pair": per_pair, "per_class": per_class, "searches": list(searches), "seed": SEED,
                          "images": "held-out split of each training set (cifar10_subset 40/class, flowers17_64 20/class)",
                          "coefficients": COEF}}
    previous = _previous(out, results["config"])
    loaded = {}
    for dataset, model_name, regime, kind in CASES:
        name = f"{model_name}_{regime}" + ("" if dataset == "cifar10" else f"_{dataset}")
        try:
            model, variables, recipe = load_victim(model_name, regime, ckpt_dir, dataset)
        except FileNotFoundError as e:
            log(f"skipping {model_name}/{regime}/{dataset}: {e}")
            continue
        checkpoint = {k: recipe.get(k) for k in ("test_accuracy", "epochs_done", "optimizer", "label_regime", "input_shape")}
        if previous.get(name, {}).get("checkpoint") == checkpoint:
            results[name] = previous[name]
            log(f"{name}: already in {out / 'results.json'} for this checkpoint, kept")
            continue
        size = tuple(recipe.get("input_shape", ())[:2]) or None  # the victim is attacked at its training size
        if (dataset, size) not in loaded:
            loaded[dataset, size] = data.load(dataset, npz_dir=npz_dir, source="npz", size=size)
        x, cls = _test_split(recipe, loaded[dataset, size])
        k = recipe["num_classes"]
        xv, yv = (mixup_victims(x, cls, per_pair, num_classes=k) if kind == "mixup"
                  else smoothing_victims(x, cls, per_class, num_classes=k))
        G, h, p = head_gradients(model, variables, xv, yv)
        _check_head_gradient(model, variables, xv, yv, G)
        W, _ = models.last_layer(variables)
        log(f"{model_name} on {dataset} ({regime}-trained, test acc {recipe['test_accuracy']:.3f}): {len(yv)} {kind} victims")
        entry = {"dataset": dataset, "model": model_name, "kind": kind, "image_size": list(x.shape[1:3]),
                 "checkpoint": checkpoint, "victims": len(yv)}
        for search, (sl, secs) in recover(G, W, kind, searches, log).items():
            entry[search] = {**score(jax.device_get(sl), yv, p, kind), "seconds": secs}
            log(f"  {search}: {entry[search]}")
        # T13: iDLG's rule with soft labels, trained vs untrained (same architecture, paper inits).
        fresh = untrained_like(model, variables, model_name)
        Gu, _, _ = head_gradients(model, fresh, xv, yv)
        entry["idlg_rowsum_accuracy"] = {"trained": idlg_rate(G, yv), "untrained": idlg_rate(Gu, yv)}
        log(f"  iDLG rule: {entry['idlg_rowsum_accuracy']}")
        if (dataset, model_name, kind) == ("cifar10", "resnet18", "smoothing"):
            entry["landscape"] = _landscape(out, G, W, p, yv, log)
        results[name] = entry
        _write(out, results, t0)  # after every case: an interrupted run keeps what it finished
    _write(out, results, t0)
    log(f"wrote {out / 'results.json'} and results.md ({results['seconds']:.0f}s)")
    return results


def _previous(out: pathlib.Path, config: dict) -> dict:
    """The cases of an earlier run into ``out`` with the same ``config`` (resume), else ``{}``."""
    path = pathlib.Path(out) / "results.json"
    if not path.exists():
        return {}
    doc = json.loads(path.read_text())
    return doc.get("summary", {}) if doc.get("config") == report._jsonable(config) else {}


def _write(out: pathlib.Path, results: dict, t0: float) -> None:
    results["seconds"] = time.time() - t0
    report.write_results(out, results["config"], {k: v for k, v in results.items() if k != "config"}, [])
    (pathlib.Path(out) / "results.md").write_text(markdown(results))


def markdown(results: dict) -> str:
    """One row per trained victim network: recovery by both searches (paper criterion / max-abs / swarm) and T13."""
    pct = lambda v: "—" if v is None else f"{100 * v:.1f} %"
    rows = ["| network (training set, regime) | test acc | victims | robust: paper crit. / maxabs | "
            "paper mode: paper crit. / maxabs / swarm | iDLG rule, dominant class: trained / untrained |",
            "|---|---|---|---|---|---|"]
    for name, e in results.items():
        if not isinstance(e, dict) or "checkpoint" not in e:
            continue
        rb, pm = e.get("robust", {}), e.get("paper", {})
        idlg = e["idlg_rowsum_accuracy"]
        size = "x".join(map(str, e.get("image_size", ())))
        rows.append(f"| {e.get('model', name)} ({e.get('dataset', 'cifar10')} {size}, {e['checkpoint']['label_regime']}) | "
                    f"{pct(e['checkpoint']['test_accuracy'])} | {e['victims']} | "
                    f"{pct(rb.get('paper_criterion'))} / {pct(rb.get('label_maxabs_lt_1e-3'))} | "
                    f"{pct(pm.get('paper_criterion'))} / {pct(pm.get('label_maxabs_lt_1e-3'))} / {pm.get('swarm_used', '—')} | "
                    f"{pct(idlg['trained']['dominant'])} / {pct(idlg['untrained']['dominant'])} |")
    return "\n".join(rows) + "\n"


def _landscape(out, G, W, p, y, log, n_max=200):
    """T12 with c = 1: per sample, spurious interior minima of L on a lam grid around the truth (float64)."""
    with jax.enable_x64(True):
        return _landscape64(out, np.asarray(G, np.float64), jnp.asarray(np.asarray(W), jnp.float64),
                            np.asarray(p, np.float64), np.asarray(y, np.float64), log, n_max)


def _landscape64(out, G, W, p, y, log, n_max):
    V = min(len(y), n_max)
    rows = np.argmax(np.sum(G * G, axis=1), axis=1)
    lam_true = 1.0 / (p - y)[np.arange(len(y)), rows]
    counts, below, examples = 0, 0, []
    for i in range(V):
        lt = lam_true[i]
        lams = np.linspace(-3 * abs(lt), 3 * abs(lt), 3001)
        lams = lams[np.abs(lams) > 1e-3 * abs(lt)]
        L = landscape_loss(jnp.asarray(G[i]), W, lams)
        sp = spurious_minima(lams, L, lt)
        if sp:
            counts += 1
            if any(np.sign(s) == np.sign(lt) and abs(s) < abs(lt) for s in sp):
                below += 1
            examples.append((i, lt, sp))
    log(f"  landscape: {counts}/{V} samples have a spurious local minimum; {below} between 0 and lam*")
    below_ex = [e for e in examples if any(np.sign(s) == np.sign(e[1]) and abs(s) < abs(e[1]) for s in e[2])]
    pick = (below_ex or examples or [(0, lam_true[0], [])])[0]
    i, lt, sp = pick
    lams = np.linspace(-3 * abs(lt), 3 * abs(lt), 6001)
    lams = lams[np.abs(lams) > 1e-3 * abs(lt)]
    L = landscape_loss(jnp.asarray(G[i]), W, lams)
    plt = report._plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.semilogy(lams, np.maximum(L, 1e-16), lw=1)
    ax.axvline(lt, color="g", ls="--", label=f"true lambda = {lt:.4f}")
    for s in sp:
        ax.axvline(s, color="r", ls=":", lw=0.8)
    ax.set_xlabel("lambda (c = 1)")
    ax.set_ylabel("L(lambda) = 1000 Var")
    ax.set_title(f"trained ResNet18 (smoothing), sample {i}; red: spurious minima", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(pathlib.Path(out) / "landscape_resnet18.png", dpi=120)
    plt.close(fig)
    return {"samples": V, "with_spurious_minimum": counts, "spurious_between_0_and_true": below,
            "plotted_sample": int(i), "plotted_lam_true": float(lt), "plotted_spurious": sp[:10]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/trained_recovery"), help="output folder")
    p.add_argument("--quick", action="store_true", help="smoke test on a handful of victims")
    p.add_argument("--per-pair", type=int, default=20, help="mixup victims per class pair (the paper: 20)")
    p.add_argument("--per-class", type=int, default=100, help="smoothing victims per class (the paper: 100)")
    p.add_argument("--searches", nargs="+", default=["robust", "paper"], choices=["robust", "paper"], help="soft-label searches to run")
    p.add_argument("--npz-dir", default=None,
                   help="folder of cifar10_subset.npz and flowers17_64.npz (default $JAXLEAK_DATA, else ../shared/data)")
    from jaxleak.cli import ScriptOutput, add_output_flags

    add_output_flags(p)
    a = p.parse_args(argv)
    o = ScriptOutput(a)
    res = run(a.out, a.quick, per_pair=a.per_pair, per_class=a.per_class, searches=a.searches, npz_dir=a.npz_dir,
              log=o.log if a.json else o.report)
    o.summary({"experiment": "trained_recovery", "out": str(a.out), **res})
    return 0


if __name__ == "__main__":
    jax.config.update("jax_compilation_cache_dir", os.environ.get("JAX_COMPILATION_CACHE_DIR", "/tmp/jaxleak-jax-cache"))
    sys.exit(main())
