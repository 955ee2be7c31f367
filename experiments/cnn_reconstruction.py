"""LeNet on CIFAR-10: does the recovered soft label and feature help gradient-matching reconstruction?

Wang, Liang, He (ICLR 2024), ALGORITHMS.md §4.9(b) (project issue 5). An
untrained LeNet (paper 2's bias-free head, every weight and bias ~ U(-0.5, 0.5),
a fresh draw per victim) sees one CIFAR-10 image (CIFAR-10 mean/std
normalisation, §4.10) with a label-smoothed target (eps ~ U(0, 0.5)) or a mixup
of two classes (mu ~ U(0, 1)). The attacker recovers the label ``y_hat`` and the
last-layer feature ``h_hat`` from the head's gradient
(:func:`jaxleak.recovery.soft_label`, robust search); following the paper's
protocol, eps (mu) is re-drawn until the recovery succeeds (``ok`` and
``max|y_hat - y| < 1e-3``, the oracle check of §4.8). Then every option below
reconstructs the image from the full shared gradient, starting at
``x' ~ N(0, 1)`` in normalised space:

========  ==============================================================
origin    gradient matching with the true soft label (an oracle upper reference)
hard      one-hot of the dominant class (what iDLG would use)
dlg       DLG: label logits ``v ~ N(0, 1)`` optimised jointly, label softmax(v)
optimal   the recovered label ``y_hat``, fixed
f         ``y_hat``; gradient matching on all tensors except the head's kernel
          + ``f_s * feature term`` on ``h(x')`` vs ``h_hat``
gf        ``y_hat``; all tensors + ``f_s * feature term``
========  ==============================================================

Costs (§4.9(b); TV weight 1e-2 for the untrained net on both):

* ``l2_lbfgs``: sum of squared gradient differences, PyTorch-semantics L-BFGS
  lr 1 (20 inner iterations per step) with the paper's MultiStepLR: x0.1 at
  3/8, 5/8, 7/8 of the run (``LBFGS_MILESTONES``; of 300 steps: 112/188/262,
  the paper's int(it/1.6) gives 187); feature term ``f_s ||h(x') - h_hat||^2``.
* ``cos_adam``: 1 - global cosine similarity, Adam lr 0.1 with x0.1 steps at
  3/8, 5/8, 7/8 of the run; feature term ``f_s (1 - cos(h(x'), h_hat))``.

Restarts and keep-best: each (victim, option, cost) runs ``--restarts``
independent starts; within each the iterate with the lowest objective is kept
(checked every ``SNAPSHOT`` steps and at the end), and the best over restarts wins.

Budget (chosen for a shared 2-core CPU; the paper's is 10 restarts, 300 L-BFGS
steps, 4,800 Adam steps, 30 smoothing and 45 mixup victims): by default
**8 victims per kind, 200 L-BFGS steps (up to 4,000 objective evaluations),
1,000 Adam steps, 1 restart, f_s = 1**. Measured on this machine (~3 ms per
objective evaluation): one 300-step L-BFGS run 10-25 s, one 100-step run 6-12 s,
one 1,000-step Adam run 3-8 s, per victim and option, plus one-off compilation.
100 L-BFGS steps were not enough (objective still 10-1000, PSNR ~7 dB on the first
victim); from a good start 300 steps reach the TV floor (~2e-3, 40-50 dB) and
150 steps already got close, so 200 is the compromise.
``--quick`` is a smoke test: 2 victims per kind, 3 L-BFGS / 10 Adam steps.

Outputs in ``--out`` (default ``results/cnn_reconstruction``):
``records.jsonl`` (one line per (kind, victim, option, cost), appended as each
finishes; a rerun skips those already there, so the run can be done in pieces,
e.g. with ``--max-seconds``), ``recon/*.npy`` (the reconstructions, for the grid),
``results.json`` (config, summary, every record), ``results.md`` (option x cost:
mean PSNR, mean SSIM, n, paired PSNR gain over ``hard``) and ``grid.png``
(truth + one row per option and cost, a few victims of each kind).

    python experiments/cnn_reconstruction.py --victims 8 --max-seconds 270   # repeat until done
    python experiments/cnn_reconstruction.py --quick --out /tmp/cnn_quick --json
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import pathlib
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxleak import attacks, data, labels, lbfgs, metrics, models, recovery, report
from jaxleak import victims as _victims
from jaxleak.cli import ScriptOutput, add_output_flags

SEED = 2023  # paper 2's seed
SHAPE = (32, 32, 3)
K = 10
SNAPSHOT = 10  # keep-best granularity (steps)
HEAD_KERNEL = f"{models.HEAD}/kernel"
OPTIONS = ("origin", "hard", "dlg", "optimal", "f", "gf")
COSTS = ("l2_lbfgs", "cos_adam")
KINDS = ("smoothing", "mixup")
RECOVERY_TRIES = 50
LABEL_TOL = 1e-3
LBFGS_MILESTONES = (3 / 8, 5 / 8, 7 / 8)  # paper 2's L-BFGS lr x0.1 at it/2.667, it/1.6, it/1.142
SUCCESS_PSNR = 30.0  # dB: a run counts as a successful reconstruction above this (results are bimodal)

OPTION_HELP = {
    "origin": "true soft label (oracle)",
    "hard": "one-hot of the dominant class",
    "dlg": "DLG joint label (softmax(v))",
    "optimal": "recovered label",
    "f": "recovered label + feature, grads w/o head kernel",
    "gf": "recovered label + feature, all grads",
}


# --------------------------------------------------------------------------- configuration


def defaults(quick: bool) -> dict:
    if quick:
        return {"victims": 2, "lbfgs_steps": 3, "adam_steps": 10, "restarts": 1}
    return {"victims": 8, "lbfgs_steps": 200, "adam_steps": 1000, "restarts": 1}


def attack_config(cost: str, option: str, *, lbfgs_steps: int, adam_steps: int, tv: float, fs: float) -> attacks.AttackConfig:
    """The :class:`jaxleak.attacks.AttackConfig` of one (cost, option) pair (restarts are looped outside)."""
    extra = {}
    if option in ("f", "gf"):
        extra["feature_weight"] = fs
    if option == "f":
        extra["exclude_tensors"] = (HEAD_KERNEL,)
    if cost == "l2_lbfgs":
        return attacks.AttackConfig(distance="l2", optimizer="torch_lbfgs", steps=lbfgs_steps, lbfgs=lbfgs.TorchLBFGSConfig(lr=1.0),
                                    lbfgs_milestones=LBFGS_MILESTONES, tv=tv, stop_loss=0.0, snapshot_every=SNAPSHOT, **extra)
    if cost == "cos_adam":
        return attacks.AttackConfig(distance="cosine", optimizer="adam", steps=adam_steps, lr=0.1, tv=tv, stop_loss=0.0,
                                    snapshot_every=SNAPSHOT, **extra)
    raise ValueError(f"unknown cost {cost!r}; expected one of {COSTS}")


@functools.lru_cache(maxsize=None)
def _runner(option: str, config: attacks.AttackConfig):
    """A jitted ``(key, variables, grads, label, feature) -> AttackResult``; one compile per option kind and config."""
    model = _model()
    if option == "dlg":
        fn = lambda k, v, g, y, h: attacks.dlg(k, model.apply, v, g, SHAPE, config=config)
    elif option in ("f", "gf"):
        fn = lambda k, v, g, y, h: attacks.given_label(k, model.apply, v, g, SHAPE, y, config=config, feature=h)
    else:
        fn = lambda k, v, g, y, h: attacks.given_label(k, model.apply, v, g, SHAPE, y, config=config)
    return jax.jit(fn)


@functools.lru_cache(maxsize=None)
def _model():
    return models.LeNet(K, head_bias=False)


def _variables(victim_key: jax.Array):
    """Paper 2's untrained LeNet: bias-free head, all weights and biases ~ U(-0.5, 0.5) (§5.3)."""
    model = _model()
    template = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *SHAPE))))
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), template)
    return models.init_uniform(zeros, victim_key)


# --------------------------------------------------------------------------- victims


def _class_lists(ds: data.Dataset):
    return [np.flatnonzero(ds.labels == c) for c in range(K)]


def make_victim(ds: data.Dataset, members, kind: str, index: int, seed: int = SEED) -> dict:
    """One victim: image, label, truth, net, shared gradient and the recovered label/feature.

    Smoothing: victim ``i`` is a random image of class ``i mod 10``; mixup: the
    ``i``-th of the 45 class pairs (in a seeded order), one random image of each.
    eps (mu) is re-drawn until the recovery succeeds (§4.9(b) protocol).
    """
    rng = np.random.default_rng([seed, KINDS.index(kind), index])
    img = lambda i: np.asarray(ds.images[i], np.float32) / 255.0
    if kind == "smoothing":
        c = index % K
        a = int(rng.choice(members[c]))
        truth, info = img(a), {"index": a, "class": c}
    else:
        pairs = list(itertools.combinations(range(K), 2))
        order = np.random.default_rng([seed, 99]).permutation(len(pairs))
        ci, cj = pairs[order[index % len(pairs)]]
        a, b = int(rng.choice(members[ci])), int(rng.choice(members[cj]))
        info = {"index": a, "partner": b, "class": ci, "partner_class": cj}
    variables = _variables(jax.random.fold_in(jax.random.PRNGKey(seed), 1000 * KINDS.index(kind) + index))
    W, _ = models.last_layer(variables)
    for tries in range(1, RECOVERY_TRIES + 1):
        if kind == "smoothing":
            coef = float(rng.uniform(0.0, 0.5))
            y = np.asarray(labels.smooth(jnp.asarray(info["class"]), K, coef))
            x_img = truth
        else:
            coef = float(rng.uniform(0.0, 1.0))
            onehot = np.eye(K, dtype=np.float32)
            x_img, y = labels.mixup(img(a), img(b), onehot[ci], onehot[cj], coef)
            x_img, y = np.asarray(x_img), np.asarray(y)
        x = data.normalize(jnp.asarray(x_img))
        grads = _victims.gradient(_model().apply, variables, x, jnp.asarray(y))
        G, _ = models.last_layer(grads)
        sl = recovery.soft_label(G, W, kind=kind, errors="flag")
        label_err = float(np.max(np.abs(np.asarray(sl.label) - y)))
        ok = bool(sl.ok) and label_err < LABEL_TOL
        if ok:
            break
    h_true = np.asarray(_victims.feature(_model().apply, variables, x))
    h_hat = np.asarray(sl.feature)
    info.update({"kind": kind, "victim": index, "coef": coef, "recovery_tries": tries, "recovery_ok": ok,
                 "label_err": label_err, "feature_rel_err": float(np.linalg.norm(h_hat - h_true) / np.linalg.norm(h_true))})
    return {"info": info, "truth": np.asarray(x_img), "variables": variables, "grads": grads, "y": y,
            "y_hat": np.asarray(sl.label), "h_hat": h_hat}


def _label_for(option: str, v: dict) -> np.ndarray:
    if option == "origin":
        return v["y"]
    if option == "hard":
        return np.eye(K, dtype=np.float32)[int(np.argmax(v["y"]))]
    return v["y_hat"]  # optimal, f, gf (dlg ignores it)


# --------------------------------------------------------------------------- one attack


def run_option(v: dict, option: str, cost: str, cfg: dict, seed: int = SEED) -> tuple[dict, np.ndarray]:
    config = attack_config(cost, option, lbfgs_steps=cfg["lbfgs_steps"], adam_steps=cfg["adam_steps"], tv=cfg["tv"], fs=cfg["fs"])
    fn = _runner(option, config)
    label = jnp.asarray(_label_for(option, v), jnp.float32)
    feature = jnp.asarray(v["h_hat"], jnp.float32)
    info = v["info"]
    base = jax.random.fold_in(jax.random.PRNGKey(seed + 1), 1000 * KINDS.index(info["kind"]) + info["victim"])
    t0 = time.time()
    best_x, best_loss, best_label = None, np.inf, None
    for r in range(cfg["restarts"]):
        res = fn(jax.random.fold_in(base, r), v["variables"], v["grads"], label, feature)
        x, loss = (np.asarray(a) for a in attacks.keep_best(res, SNAPSHOT))
        loss = float(loss)
        if best_x is None or loss < best_loss:
            best_x, best_loss, best_label = x, loss, np.asarray(res.label)
    seconds = time.time() - t0
    if not np.all(np.isfinite(best_x)):
        best_x = np.nan_to_num(best_x, nan=0.0, posinf=0.0, neginf=0.0)
    rec = np.asarray(data.denormalize(jnp.asarray(best_x)))
    truth = v["truth"]
    record = {**{k: info[k] for k in ("kind", "victim")}, "option": option, "cost": cost,
              "psnr": float(metrics.psnr(rec, truth)), "ssim": float(metrics.ssim(rec, truth)),
              "mse": float(np.mean((np.clip(rec, 0, 1) - truth) ** 2)), "psnr_uint8": metrics.psnr_uint8(rec, truth),
              "loss": best_loss, "label_used_err": float(np.max(np.abs(best_label - v["y"]))), "seconds": seconds,
              "recovery_ok": info["recovery_ok"]}
    return record, rec


# --------------------------------------------------------------------------- tables and figures


def summarise(records: Sequence[dict], options: Sequence[str], costs: Sequence[str], kinds: Sequence[str]) -> dict:
    """Per kind (and ``all``) x cost x option: mean/std PSNR and SSIM, n, and the paired PSNR gain over ``hard``."""
    out = {}
    idx = {(r["kind"], r["victim"], r["option"], r["cost"]): r for r in records}
    for kind in list(kinds) + ["all"]:
        ks = list(kinds) if kind == "all" else [kind]
        for cost in costs:
            for opt in options:
                rs = [r for r in records if r["kind"] in ks and r["cost"] == cost and r["option"] == opt]
                if not rs:
                    continue
                ps, ss = np.array([r["psnr"] for r in rs]), np.array([r["ssim"] for r in rs])
                pairs = [(r["psnr"], idx[(r["kind"], r["victim"], "hard", cost)]["psnr"]) for r in rs
                         if (r["kind"], r["victim"], "hard", cost) in idx]
                gain = [a - b for a, b in pairs]
                out.setdefault(kind, {}).setdefault(cost, {})[opt] = {
                    "n": len(rs), "psnr_mean": float(ps.mean()), "psnr_std": float(ps.std()),
                    "ssim_mean": float(ss.mean()), "ssim_std": float(ss.std()),
                    "psnr_gain_vs_hard": float(np.mean(gain)) if gain else None,
                    "wins_vs_hard": int(np.sum(np.array(gain) > 0)) if gain else None,
                    "psnr_uint8_mean": float(np.mean([r["psnr_uint8"] for r in rs])),
                    "psnr_median": float(np.median(ps)),
                    "success_rate": float(np.mean(ps >= SUCCESS_PSNR)),
                }
    return out


def markdown(summary: dict, config: dict, victims_info: Sequence[dict]) -> str:
    lines = ["# CNN reconstruction with recovered labels/features (ALGORITHMS.md §4.9(b))", "",
             f"Untrained bias-free LeNet, U(-0.5, 0.5); CIFAR-10 32x32; TV {config['tv']}; f_s = {config['fs']}; "
             f"{config['restarts']} restart(s), keep-best; L-BFGS {config['lbfgs_steps']} steps (lr 1, x0.1 at "
             f"{', '.join(f'{m:g}' for m in config['lbfgs_milestones'])} of the run), "
             f"Adam {config['adam_steps']} steps (lr 0.1). PSNR: data range 1 after de-normalising and clamping; "
             "SSIM: dm-pix 11x11 Gaussian. Gain = paired mean PSNR difference to `hard` (wins = victims better than `hard`). "
             f"succ = share of victims with PSNR >= {SUCCESS_PSNR:.0f} dB (runs either converge or stall, so means are noisy).", ""]
    if victims_info:
        ok = sum(v["recovery_ok"] for v in victims_info)
        lines += [f"Label recovery succeeded for {ok}/{len(victims_info)} victims (eps/mu re-drawn until it does, "
                  f"max tries {RECOVERY_TRIES}); mean tries {np.mean([v['recovery_tries'] for v in victims_info]):.2f}; "
                  f"max feature relative error {max(v['feature_rel_err'] for v in victims_info):.2e}.", ""]
    for kind, per_cost in summary.items():
        lines += [f"## {kind}", "", "| option | " + " | ".join(f"{c} PSNR | {c} SSIM | {c} succ | n | gain vs hard (wins)" for c in per_cost) + " |",
                  "|---|" + "---:|---:|---:|---:|---:|" * len(per_cost)]
        opts = list(dict.fromkeys(o for c in per_cost.values() for o in c))
        for opt in opts:
            cells = []
            for cost, per_opt in per_cost.items():
                s = per_opt.get(opt)
                if s is None:
                    cells.append("- | - | - | 0 | -")
                    continue
                gain = "-" if s["psnr_gain_vs_hard"] is None else f"{s['psnr_gain_vs_hard']:+.2f} ({s['wins_vs_hard']}/{s['n']})"
                cells.append(f"{s['psnr_mean']:.2f} ± {s['psnr_std']:.2f} | {s['ssim_mean']:.3f} | {s['success_rate']:.0%} | {s['n']} | {gain}")
            lines.append(f"| {opt} ({OPTION_HELP.get(opt, opt)}) | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_grid(path, out: pathlib.Path, records, truths: dict, options, costs, per_kind: int = 4) -> Optional[pathlib.Path]:
    """Truth + one row per (option, cost), ``per_kind`` victims of each kind; captions are PSNR."""
    cols = []
    for kind in KINDS:
        cols += [k for k in sorted(truths) if k[0] == kind][:per_kind]
    if not cols:
        return None
    idx = {(r["kind"], r["victim"], r["option"], r["cost"]): r for r in records}
    rows, caps = {}, {}
    for cost in costs:
        for opt in options:
            imgs, cap = [], []
            for kind, victim in cols:
                f = out / "recon" / f"{kind}_{victim}_{opt}_{cost}.npy"
                r = idx.get((kind, victim, opt, cost))
                imgs.append(np.load(f) if f.exists() else np.zeros(SHAPE, np.float32))
                cap.append(f"{r['psnr']:.1f}" if r else "-")
            rows[f"{opt}/{cost}"], caps[f"{opt}/{cost}"] = np.stack(imgs), cap
    return report.plot_reconstructions(path, np.stack([truths[c] for c in cols]), rows, captions=caps, max_images=len(cols))


# --------------------------------------------------------------------------- driver


def run(out="results/cnn_reconstruction", *, kinds=KINDS, victims: Optional[int] = None, options=OPTIONS, costs=COSTS,
        lbfgs_steps: Optional[int] = None, adam_steps: Optional[int] = None, restarts: Optional[int] = None,
        tv: float = 1e-2, fs: float = 1.0, quick: bool = False, max_seconds: Optional[float] = None,
        npz_dir=None, log=print) -> dict:
    """Runs (or resumes) the experiment; returns ``{"config", "summary", "done", "complete"}``.

    ``max_seconds``: stop starting new attacks after this long and still write
    the results so far (rerun to continue).
    """
    t_start = time.time()
    d = defaults(quick)
    cfg = {"lbfgs_steps": lbfgs_steps or d["lbfgs_steps"], "adam_steps": adam_steps or d["adam_steps"],
           "restarts": restarts or d["restarts"], "tv": tv, "fs": fs}
    victims = victims or d["victims"]
    for name, vals, allowed in (("kinds", kinds, KINDS), ("options", options, OPTIONS), ("costs", costs, COSTS)):
        bad = [v for v in vals if v not in allowed]
        if bad:
            raise ValueError(f"unknown {name} {bad}; expected some of {allowed}")
    # Only settings that change a record are pinned for resuming; kinds/victims/options/costs may grow.
    core = {"experiment": "cnn_reconstruction", "seed": SEED, "quick": quick, **cfg,
            "model": "LeNet (sigmoid, bias-free head), U(-0.5,0.5), fresh per victim", "dataset": "cifar10_subset.npz",
            "snapshot_every": SNAPSHOT, "recovery": "robust", "label_tol": LABEL_TOL,
            "lbfgs_milestones": list(LBFGS_MILESTONES)}
    out = pathlib.Path(out)
    done = report.start_run(out, core, resume=True)
    (out / "recon").mkdir(exist_ok=True)
    keys = {(r["kind"], r["victim"], r["option"], r["cost"]) for r in done if "option" in r}
    vinfo = {(r["kind"], r["victim"]): r for r in done if r.get("record") == "victim"}
    ds = data.load("cifar10", npz_dir=npz_dir, source="npz")
    members = _class_lists(ds)
    truths, stopped = {}, False
    for i in range(victims):  # kinds interleaved, so a partial run stays balanced
        for kind in kinds:
            todo = [(o, c) for c in costs for o in options if (kind, i, o, c) not in keys]
            if not todo and (kind, i) in vinfo and (out / "recon" / f"{kind}_{i}_truth.npy").exists():
                truths[(kind, i)] = np.load(out / "recon" / f"{kind}_{i}_truth.npy")
                continue
            if max_seconds is not None and time.time() - t_start > max_seconds:
                stopped = True
                break
            v = make_victim(ds, members, kind, i)
            truths[(kind, i)] = v["truth"]
            np.save(out / "recon" / f"{kind}_{i}_truth.npy", v["truth"])
            if (kind, i) not in vinfo:
                rec = {"record": "victim", **v["info"]}
                report.append_records(out, [rec])
                vinfo[(kind, i)] = rec
                log(f"[{kind} {i}] coef {v['info']['coef']:.3f}, recovery ok {v['info']['recovery_ok']} "
                    f"(tries {v['info']['recovery_tries']}, label err {v['info']['label_err']:.1e}, "
                    f"feature rel err {v['info']['feature_rel_err']:.1e})")
            for opt, cost in todo:
                if max_seconds is not None and time.time() - t_start > max_seconds:
                    stopped = True
                    break
                record, rec = run_option(v, opt, cost, cfg)
                np.save(out / "recon" / f"{kind}_{i}_{opt}_{cost}.npy", rec.astype(np.float32))
                report.append_records(out, [record])
                keys.add((kind, i, opt, cost))
                log(f"[{kind} {i}] {opt:8s} {cost:9s} PSNR {record['psnr']:6.2f} SSIM {record['ssim']:.3f} "
                    f"loss {record['loss']:.3g} ({record['seconds']:.1f}s)")
            if stopped:
                break
        if stopped:
            break
    records = report.load_records(out)
    attacks_done = [r for r in records if "option" in r and r["kind"] in kinds and r["victim"] < victims
                    and r["option"] in options and r["cost"] in costs]
    victims_done = [r for r in records if r.get("record") == "victim" and r["kind"] in kinds and r["victim"] < victims]
    summary = summarise(attacks_done, options, costs, kinds)
    complete = len(attacks_done) == len(kinds) * victims * len(options) * len(costs)
    config = {**core, "kinds": list(kinds), "victims_per_kind": victims, "options": list(options), "costs": list(costs)}
    report.write_results(out, config, summary, attacks_done, extra={"complete": complete, "victim_info": victims_done,
                                                                     "options_help": OPTION_HELP})
    (out / "results.md").write_text(markdown(summary, config, victims_done))
    for key in [(r["kind"], r["victim"]) for r in victims_done]:
        f = out / "recon" / f"{key[0]}_{key[1]}_truth.npy"
        if key not in truths and f.exists():
            truths[key] = np.load(f)
    plot_grid(out / "grid.png", out, attacks_done, truths, options, costs)
    log(f"{len(attacks_done)} attack records ({'complete' if complete else 'INCOMPLETE: rerun to continue'}); "
        f"wrote {out / 'results.md'} in {time.time() - t_start:.0f}s")
    return {"config": config, "summary": summary, "done": len(attacks_done), "complete": complete}


def _csv(s: str) -> list[str]:
    return [t for t in s.split(",") if t]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", type=_csv, default=list(KINDS), help="comma-separated: smoothing,mixup")
    p.add_argument("--victims", type=int, default=None, help="victims per kind (default 8; --quick 2)")
    p.add_argument("--options", type=_csv, default=list(OPTIONS), help=f"comma-separated subset of {','.join(OPTIONS)}")
    p.add_argument("--costs", type=_csv, default=list(COSTS), help="comma-separated: l2_lbfgs,cos_adam")
    p.add_argument("--steps", type=int, default=None, help="L-BFGS outer steps (default 200; --quick 3; Adam gets --adam-steps)")
    p.add_argument("--adam-steps", type=int, default=None, help="Adam steps (default 1000)")
    p.add_argument("--restarts", type=int, default=None, help="random restarts per attack, best objective kept (default 1)")
    p.add_argument("--tv", type=float, default=1e-2, help="total-variation weight (paper 2: 1e-2 for untrained nets)")
    p.add_argument("--fs", type=float, default=1.0, help="feature-term weight f_s of options f/gf")
    p.add_argument("--quick", action="store_true", help="smoke test: 2 victims per kind, a few steps")
    p.add_argument("--max-seconds", type=float, default=None, help="stop starting new attacks after this long")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/cnn_reconstruction"),
                   help="output folder; an existing one is resumed")
    add_output_flags(p)
    a = p.parse_args(argv)
    o = ScriptOutput(a)
    res = run(a.out, kinds=a.kinds, victims=a.victims, options=a.options, costs=a.costs, lbfgs_steps=a.steps,
              adam_steps=a.adam_steps, restarts=a.restarts, tv=a.tv, fs=a.fs, quick=a.quick, max_seconds=a.max_seconds,
              log=o.log)
    o.summary(res)
    return 0


if __name__ == "__main__":
    jax.config.update("jax_compilation_cache_dir", os.environ.get("JAX_COMPILATION_CACHE_DIR", "/tmp/jaxleak-jax-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    sys.exit(main())
