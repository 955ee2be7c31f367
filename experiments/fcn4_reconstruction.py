"""FCN-4 on Flowers-17 64x64: soft-label feature recovery + analytic inversion vs DLG (T10, T11).

Wang, Liang, He (ICLR 2024), §4.9(a) and Figure 3: an untrained bias-free FCN-4
(PyTorch default init) sees one Flowers-17 image (64x64, CIFAR-10
normalisation) with a label-smoothed target of unknown eps ~ U(0, 0.5) (or a
mixup of two classes, mu ~ U(0, 1)). The attacker recovers the label and the
last feature from the head's gradient (:func:`jaxleak.recovery.soft_label`),
then inverts the network layer by layer (:func:`jaxleak.inversion.invert_fcn4`).
DLG (joint image + label logits, PyTorch-semantics L-BFGS lr 0.3) on the same
victims is the contrast (the paper: 51.2 dB vs 8.3 dB on its demo image).

    python experiments/fcn4_reconstruction.py --victims 100 --out results/fcn4
    jaxleak reproduce fcn4 --victims N --out DIR      # calls run()

``DIR/results.json`` holds ``analytic`` and ``dlg`` (per-victim ``psnr``,
``ssim``, ``kind``, ``victim``), a summary, the config and per-victim records;
``DIR/fcn4_grid_<kind>.png`` are the truth / analytic / DLG grids.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxleak import data, inversion, labels, metrics, models, recovery, report
from jaxleak.cli import ScriptOutput, add_output_flags
from jaxleak import victims as _victims

SIZE = (64, 64)
SEED = 100  # the paper's FCN demo seed


def _model_and_params(num_classes: int, seed: int):
    model = models.FCN4(num_classes=num_classes)
    template = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *SIZE, 3))))
    params = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), template)
    return model, models.init_torch_default(params, jax.random.PRNGKey(seed))


def make_victims(ds: data.Dataset, n: int, kind: str, rng: np.random.Generator):
    """``(x (n,64,64,3) normalised, y (n,K), truth (n,64,64,3) in [0,1], info)`` for one label regime (§5.2)."""
    k = ds.num_classes
    img = np.asarray(data.to_float(ds.images))
    if kind == "smoothing":
        idx = rng.choice(len(ds), n, replace=False)
        eps = rng.uniform(0.0, 0.5, n)
        y = np.asarray(labels.smooth(jnp.asarray(ds.labels[idx]), k, jnp.asarray(eps, jnp.float32)))
        truth = img[idx]
        info = [{"index": int(i), "class": int(ds.labels[i]), "epsilon": float(e)} for i, e in zip(idx, eps)]
    elif kind == "mixup":
        a = rng.choice(len(ds), n, replace=False)
        b = np.array([rng.choice(np.flatnonzero(ds.labels != ds.labels[i])) for i in a])
        mu = rng.uniform(0.0, 1.0, n)
        onehot = np.eye(k, dtype=np.float32)
        truth, y = labels.mixup(img[a], img[b], onehot[ds.labels[a]], onehot[ds.labels[b]], jnp.asarray(mu, jnp.float32))
        truth, y = np.asarray(truth), np.asarray(y)
        info = [{"index": int(i), "partner": int(j), "class": int(ds.labels[i]), "partner_class": int(ds.labels[j]),
                 "mu": float(m)} for i, j, m in zip(a, b, mu)]
    else:
        raise ValueError(f"kind must be 'smoothing' or 'mixup', got {kind!r}")
    x = np.asarray(data.normalize(jnp.asarray(truth)))
    return x, y, truth, info


def _invert_chunk(variables, grads, features):
    return jax.vmap(lambda g, h: inversion.invert_fcn4(variables, g, h, (*SIZE, 3)))(grads, features)


_invert_chunk_jit = jax.jit(_invert_chunk)


def analytic(model, variables, x, y, kind: str, *, chunk: int = 8, search: str = "robust"):
    """Label + feature recovery and layer inversion for victims ``x (V,H,W,C)``, ``y (V,K)``; host arrays out."""
    W, _ = models.last_layer(variables)
    recs, outs = [], []
    for s in range(0, len(x), chunk):
        g = _victims.gradients(model.apply, variables, jnp.asarray(x[s:s + chunk]), jnp.asarray(y[s:s + chunk]),
                              chunk_size=chunk)
        G, _ = models.last_layer(g)
        sl = recovery.soft_label(G, W, kind=kind, search=search, errors="flag")
        outs.append(np.asarray(_invert_chunk_jit(variables, g, sl.feature)))
        recs.append(jax.device_get(sl))
        del g
    sl = jax.tree_util.tree_map(lambda *a: np.concatenate(a), *recs)
    return np.concatenate(outs), sl


def dlg_attack(model, variables, x, y, *, steps: int, lr: float = 0.3, seed: int = 0):
    """DLG (Zhu et al. 2019) as in paper 2's FCN demo: L-BFGS lr 0.3, no TV, random label logits; keep-best."""
    from jaxleak import attacks, lbfgs

    cfg = attacks.AttackConfig(steps=steps, lbfgs=lbfgs.TorchLBFGSConfig(lr=lr))
    recs, losses = [], []
    for i in range(len(x)):
        g = _victims.gradient(model.apply, variables, jnp.asarray(x[i]), jnp.asarray(y[i]))
        res = attacks.dlg(jax.random.PRNGKey(seed + i), model.apply, variables, g, x.shape[1:], config=cfg)
        best, loss = attacks.keep_best(res, cfg.snapshot_every)  # lr-0.3 L-BFGS can diverge to NaN late
        recs.append(np.nan_to_num(np.asarray(best)))  # nothing finite at all: scored as the mean image
        losses.append(float(loss))
        del g
    return np.stack(recs), np.asarray(losses)


def _scores(rec_norm, truth):
    rec = np.asarray(data.denormalize(jnp.asarray(rec_norm)))
    return rec, np.asarray(metrics.psnr(rec, truth)), np.asarray(metrics.ssim(rec, truth)), np.abs(rec - truth).reshape(len(rec), -1).max(1)


def run(victims: int = 100, out: str | os.PathLike = "results/fcn4", quick: bool = False, *,
        kinds: Sequence[str] = ("smoothing", "mixup"), dlg: bool = True, dlg_victims: Optional[int] = None,
        dlg_steps: Optional[int] = None, search: str = "robust", seed: int = SEED, npz_dir=None, log=print) -> dict:
    """Runs the FCN-4 experiment and writes ``out/results.json`` and ``out/fcn4_grid_<kind>.png``.

    Args:
      victims: victims per label regime in ``kinds``.
      quick: a smoke run: at most 8 victims per regime, DLG on 2 victims for 20 steps.
      dlg: also run DLG on the first ``dlg_victims`` victims of each regime
        (default 4; ``dlg_steps`` default 300, the paper's). DLG needs ~0.6 GFLOP
        per objective evaluation here (~20 per step), so it is the slow part on CPU.
      search: ``soft_label`` search mode (``"robust"`` or ``"paper"``).

    Returns:
      The results dict (also written to ``results.json``).
    """
    t0 = time.time()
    out = report.ensure_writable(out)
    if quick:
        victims = min(victims, 8)
    dlg_victims = (2 if quick else 4) if dlg_victims is None else dlg_victims
    dlg_steps = (20 if quick else 300) if dlg_steps is None else dlg_steps
    ds = data.load("flowers17", npz_dir=npz_dir, size=SIZE, source="npz")
    model, variables = _model_and_params(ds.num_classes, seed)
    rng = np.random.default_rng(seed)
    config = {"experiment": "fcn4", "dataset": "flowers17 64x64", "victims_per_kind": victims, "kinds": list(kinds),
              "model": "FCN4 (12288-4096-1024-256-K, bias-free), torch default init", "model_seed": seed,
              "normalisation": "CIFAR-10 mean/std", "search": search, "dlg": dlg, "dlg_victims": dlg_victims,
              "dlg_steps": dlg_steps, "dlg_optimizer": "torch L-BFGS lr 0.3", "quick": quick,
              "psnr": "data_range 1 after denormalising and clamping to [0, 1]"}
    analytic_out = {"psnr": [], "ssim": [], "kind": [], "victim": []}
    dlg_out = {"psnr": [], "ssim": [], "kind": [], "victim": [], "loss": []}
    records, grids = [], {}
    for kind in kinds:
        x, y, truth, info = make_victims(ds, victims, kind, rng)
        ta = time.time()
        rec, sl = analytic(model, variables, x, y, kind, search=search)
        ta = time.time() - ta
        rec, ps, ss, err = _scores(rec, truth)
        pu8 = metrics.psnr_uint8(rec, truth)
        log(f"[{kind}] analytic: {victims} victims in {ta:.1f}s; PSNR median {np.median(ps):.1f} dB, "
            f">40 dB {np.mean(ps > 40):.1%}; label ok {np.mean(sl.ok):.1%}")
        lab_err = np.abs(sl.label - y).max(1)
        for i in range(victims):
            records.append({"kind": kind, "victim": i, **info[i], "psnr": float(ps[i]), "ssim": float(ss[i]),
                            "max_abs_err": float(err[i]), "psnr_uint8": float(pu8[i]), "label_ok": bool(sl.ok[i]),
                            "label_reason": int(sl.reason[i]), "label_max_err": float(lab_err[i]),
                            "epsilon_hat": float(sl.epsilon[i]), "mu_hat": float(sl.mu[i]), "lam": float(sl.lam[i])})
            analytic_out["psnr"].append(float(ps[i]))
            analytic_out["ssim"].append(float(ss[i]))
            analytic_out["kind"].append(kind)
            analytic_out["victim"].append(i)
        grids[kind] = {"truth": truth[:8], "analytic": rec[:8], "psnr": ps[:8]}
        if dlg and dlg_victims > 0:
            m = min(dlg_victims, victims)
            td = time.time()
            drec, dloss = dlg_attack(model, variables, x[:m], y[:m], steps=dlg_steps, seed=seed)
            td = time.time() - td
            drec, dps, dss, _ = _scores(drec, truth[:m])
            log(f"[{kind}] DLG ({dlg_steps} steps): {m} victims in {td:.1f}s; PSNR median {np.median(dps):.1f} dB")
            for i in range(m):
                records[len(records) - victims + i].update({"dlg_psnr": float(dps[i]), "dlg_ssim": float(dss[i]),
                                                            "dlg_loss": float(dloss[i])})
            dlg_out["psnr"] += dps.tolist()
            dlg_out["ssim"] += dss.tolist()
            dlg_out["kind"] += [kind] * m
            dlg_out["victim"] += list(range(m))
            dlg_out["loss"] += dloss.tolist()
            grids[kind].update(dlg=drec, dlg_psnr=dps)
    summary = {}
    for kind in kinds:
        ps = np.array([p for p, k in zip(analytic_out["psnr"], analytic_out["kind"]) if k == kind])
        ss = np.array([p for p, k in zip(analytic_out["ssim"], analytic_out["kind"]) if k == kind])
        lab = np.array([r["label_ok"] for r in records if r["kind"] == kind])
        dps = np.array([p for p, k in zip(dlg_out["psnr"], dlg_out["kind"]) if k == kind])
        summary[kind] = {"victims": int(len(ps)), "analytic_psnr_median": float(np.median(ps)),
                         "analytic_psnr_min": float(ps.min()), "analytic_psnr_gt40": float(np.mean(ps > 40)),
                         "analytic_ssim_median": float(np.median(ss)),
                         "analytic_psnr_uint8_median": float(np.median([r["psnr_uint8"] for r in records if r["kind"] == kind])), "label_recovered": float(lab.mean()),
                         "dlg_victims": int(len(dps)), "dlg_psnr_median": float(np.median(dps)) if len(dps) else None}
    summary["seconds"] = time.time() - t0
    report.write_results(out, config, summary, records, extra={"analytic": analytic_out, "dlg": dlg_out})
    _plot(out / "fcn4_grid.png", grids)
    log(f"wrote {out / 'results.json'} ({summary['seconds']:.0f}s)")
    return {"config": config, "summary": summary, "analytic": analytic_out, "dlg": dlg_out}


def _plot(path, grids):
    """Figure 3 style: per regime, rows truth / analytic / DLG (DLG columns only where it ran)."""
    for kind, g in grids.items():
        n = len(g["dlg"]) if "dlg" in g else len(g["truth"])
        rows = {"analytic": g["analytic"][:n]}
        caps = {"analytic": [f"{p:.1f} dB" for p in g["psnr"][:n]]}
        if "dlg" in g:
            rows["DLG"] = g["dlg"]
            caps["DLG"] = [f"{p:.1f} dB" for p in g["dlg_psnr"]]
        p = pathlib.Path(path)
        report.plot_reconstructions(p.with_name(f"{p.stem}_{kind}{p.suffix}"), g["truth"][:n], rows, captions=caps, max_images=n)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--victims", type=int, default=100, help="victims per label regime")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/fcn4"), help="output folder; an existing one is resumed")
    p.add_argument("--quick", action="store_true", help="smoke test: a few victims, short DLG runs")
    p.add_argument("--kinds", nargs="+", default=["smoothing", "mixup"], choices=["smoothing", "mixup"], help="label regimes")
    p.add_argument("--no-dlg", action="store_true", help="skip the DLG contrast")
    p.add_argument("--dlg-victims", type=int, default=None, help="victims per regime also attacked by DLG (default: all; --quick 2)")
    p.add_argument("--dlg-steps", type=int, default=None, help="DLG L-BFGS steps (default 300 as the paper; --quick 20)")
    p.add_argument("--search", choices=["robust", "paper"], default="robust", help="soft-label search of jaxleak.recovery.soft_label")
    p.add_argument("--npz-dir", default=None, help="folder of flowers17_64.npz (default $JAXLEAK_DATA, else ../shared/data)")
    add_output_flags(p)
    a = p.parse_args(argv)
    o = ScriptOutput(a)
    res = run(a.victims, a.out, a.quick, kinds=a.kinds, dlg=not a.no_dlg, dlg_victims=a.dlg_victims,
              dlg_steps=a.dlg_steps, search=a.search, npz_dir=a.npz_dir, log=o.log)
    summary = res["summary"]
    o.summary({"experiment": "fcn4", "out": str(a.out), "config": res["config"], "summary": summary})
    for kind in a.kinds:
        s = summary[kind]
        dlg = f"; DLG median {s['dlg_psnr_median']:.1f} dB on {s['dlg_victims']}" if s["dlg_victims"] else ""
        o.report(f"fcn4 {kind}: {s['victims']} victims, labels recovered {100 * s['label_recovered']:.0f}%, analytic PSNR "
                 f"median {s['analytic_psnr_median']:.1f} dB (uint8 metric {s['analytic_psnr_uint8_median']:.1f}), "
                 f"> 40 dB {100 * s['analytic_psnr_gt40']:.0f}%{dlg}")
    o.report(f"results: {a.out / 'results.json'}; figures: "
             + ", ".join(str(a.out / f"fcn4_grid_{k}.png") for k in a.kinds))
    return 0


if __name__ == "__main__":
    jax.config.update("jax_compilation_cache_dir", os.environ.get("JAX_COMPILATION_CACHE_DIR", "/tmp/jaxleak-jax-cache"))
    sys.exit(main())
