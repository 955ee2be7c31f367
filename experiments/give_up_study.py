"""When can a hopeless DLG/iDLG run be told apart from one that will recover the image? (``AttackConfig.give_up``)

Runs iDLG's protocol (``idlg_reproduction.py``'s victims: the same seed, images, networks and
starts) on the first ``--victims`` victims of a dataset, keeps every victim's loss after each
outer step, and asks, for each candidate rule ``give_up=(step, loss)``: how many victims
it abandons, how many of those would have recovered the image (final MSE below ``--success``,
the benchmark's 1e-3) and how many of the failures it catches. It also prints, at the checks
after steps 10, 20, ..., the lowest loss of a failed run against the highest of a successful
one still running: a rule is safe where the two are far apart.

    python experiments/give_up_study.py --dataset cifar100 --victims 128 --out results/give_up_cifar100

The histories are saved to ``OUT/histories.npz`` after each chunk (a rerun resumes); with
``--victims`` at or below what is there, nothing runs and the saved histories are analysed.
Choose a rule on one set of victims and check it on others (``bench_attack.py --give-up``
runs it beside the plain protocol on the benchmark's own victims).

It also scores the other early stop, ``AttackConfig.stall=(loss, ratio)`` (a run below ``loss``
whose loss fell by less than ``1/ratio`` since the previous check stops): how many runs each
candidate stops, the share of outer steps it saves, and how many victims would still end below
each MSE threshold of the fidelity curve, read from the snapshots (``x'`` every 10 steps) one
step before the iterate the rule would have returned.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import pathlib
import sys

from _xla import cpu_devices_flag, default_data_dir  # noqa: E402  (sets XLA_FLAGS before jax is imported)

cpu_devices_flag()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from idlg_reproduction import DATA, load_images, run_chunk  # noqa: E402
from jaxleak import attacks, metrics, models, processes  # noqa: E402
from jaxleak.cli import ScriptOutput, add_output_flags  # noqa: E402

METHODS = ("dlg", "idlg")
FIELDS = ("loss_history", "mse", "evals", "steps", "snapshot_mse")


def loss_at_checks(history: np.ndarray, steps: np.ndarray, check_every: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """The loss each victim's stopping check saw after steps ``0, e, 2e, ...`` (0-based), and whether it was running.

    ``history`` ``(V, S)``: ``AttackResult.loss_history`` (the loss after each outer step, NaN once
    stopped); ``steps`` ``(V,)`` the outer steps run. The check after step ``j`` runs while ``steps > j``.
    Returns ``(loss, running)``, each ``(V, ceil(S / e))``.
    """
    at = np.arange(0, history.shape[1], check_every)
    return history[:, at], steps[:, None] > at[None, :]


def gives_up(history: np.ndarray, steps: np.ndarray, rule: tuple[int, float], check_every: int = 10) -> np.ndarray:
    """Which victims of a run without ``give_up`` the rule ``(step, loss)`` would have abandoned, ``(V,)`` bool.

    The engine's rule (``jaxleak.attacks``): at a check after step ``j >= step`` on a running victim,
    a loss not below ``loss`` (NaN included) stops it. The victims a run would have stopped by
    ``stop_loss`` before that check are not running there, so are never abandoned.
    """
    loss, running = loss_at_checks(history, steps, check_every)
    at = np.arange(0, history.shape[1], check_every)
    return np.any(running & (at[None, :] >= rule[0]) & ~(loss < rule[1]), axis=1)


def stalls(history: np.ndarray, steps: np.ndarray, rule: tuple[float, float], check_every: int = 10) -> np.ndarray:
    """The outer steps each victim of a run without ``stall`` would have run under ``stall=rule``, ``(V,)`` int.

    The engine's rule (``jaxleak.attacks``): at a check after step ``j >= check_every`` on a running
    victim, a loss below ``rule[0]`` and not below ``rule[1]`` times the previous check's stops it
    after ``j + 1`` steps. Victims it does not stop keep their ``steps``.
    """
    loss, running = loss_at_checks(history, steps, check_every)
    with np.errstate(invalid="ignore"):
        hit = running[:, 1:] & (loss[:, 1:] < rule[0]) & ~(loss[:, 1:] < rule[1] * loss[:, :-1])
    first = np.argmax(hit, axis=1)
    return np.where(hit.any(axis=1), (first + 1) * check_every + 1, steps)


def stalled_mse(history, steps, snapshot_mse, mse, rule, check_every=10, snapshot_every=10) -> tuple[np.ndarray, np.ndarray]:
    """Each victim's outer steps under ``stall=rule`` (:func:`stalls`) and the MSE it would have ended at: for a
    stopped victim the snapshot's before step ``stop - 1 - (stop - 1) % snapshot_every`` (one step before the
    stopped iterate when ``snapshot_every`` divides ``stop - 1``, as with the paper's 10 and 10), else ``mse``."""
    stop = stalls(history, steps, rule, check_every)
    slot = np.clip((stop - 1) // snapshot_every, 0, snapshot_mse.shape[1] - 1)
    return stop, np.where(stop < steps, snapshot_mse[np.arange(len(stop)), slot], mse)


def fidelity_counts(mse: np.ndarray) -> dict[str, int]:
    """How many victims end below each of ``metrics.FIDELITY_THRESHOLDS``, keyed as in ``results.json``."""
    return {str(t): int(np.sum(mse < t)) for t in metrics.FIDELITY_THRESHOLDS}


def stall_outcome(history, steps, snapshot_mse, mse, rule, check_every=10, snapshot_every=10) -> dict:
    """What ``stall=rule`` would have changed in a plain run: victims stopped, outer steps saved, and how many
    victims would end below each MSE threshold (:func:`stalled_mse`); the plain run's counts are
    :func:`fidelity_counts` of ``mse``.

    Steps saved are not evaluations saved: a stalled run's late steps are cheap, the tolerances ending their
    inner loops early (on 128 CIFAR-100 victims ``(1e-5, 0.9)`` saved 13 % of iDLG's outer steps and, measured
    by running it, 1 % of its evaluations), so measure the evaluations with ``idlg_reproduction.py --stall``."""
    stop, new_mse = stalled_mse(history, steps, snapshot_mse, mse, rule, check_every, snapshot_every)
    hit = stop < steps
    return {"stall": list(rule), "stops": int(hit.sum()), "steps_saved_share": float((steps - stop).sum() / steps.sum()),
            "fidelity": fidelity_counts(new_mse),
            "worst_ratio_to_plain_mse": float(np.max(new_mse[hit] / mse[hit])) if hit.any() else 1.0}


def separation(history: np.ndarray, steps: np.ndarray, ok: np.ndarray, check_every: int = 10) -> list[dict]:
    """Per check: the lowest loss of a failed run and the highest of a successful one, among those running there."""
    loss, running = loss_at_checks(history, steps, check_every)
    out = []
    for c, j in enumerate(range(0, history.shape[1], check_every)):
        fail, succ = loss[~ok & running[:, c], c], loss[ok & running[:, c], c]
        out.append({"after_step": j, "failed_running": int(fail.size), "successful_running": int(succ.size),
                    "failed_min": float(np.nanmin(fail)) if fail.size and not np.isnan(fail).all() else float("nan"),
                    "successful_max": float(np.nanmax(succ)) if succ.size else float("nan")})
    return out


def collect(dataset: str, victims: int, out: pathlib.Path, seed: int, chunk: int, strategy: str, data_dir: pathlib.Path,
            o: ScriptOutput) -> dict:
    path = out / "histories.npz"
    saved = dict(np.load(path)) if path.exists() else {"protocol": np.array(f"{dataset} seed {seed}")}
    if str(saved["protocol"]) != f"{dataset} seed {seed}":
        raise SystemExit(f"{path} holds {saved['protocol']}, not {dataset} seed {seed}: use another --out")
    done = len(saved["idlg_mse"]) if "idlg_mse" in saved else 0
    missing = [f"{m}_{f}" for m, f in itertools.product(METHODS, FIELDS) if done and f"{m}_{f}" not in saved]
    if missing:
        raise SystemExit(f"{path} was made by an older version of this script and lacks {missing}: use another --out")
    if done >= victims:
        return {k: v if k == "protocol" else v[:victims] for k, v in saved.items()}
    images, labels, classes = load_images(data_dir, dataset)
    model = models.LeNet(classes, head=models.head_layer("auto"))
    template = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, *images.shape[1:]), jnp.float32))
    bar = o.progress(total=victims - done, desc=f"give-up study {dataset}", unit="victim")
    with processes.WorkerPool() if strategy == "processes" else contextlib.nullcontext() as pool:
        for c in range(done, victims, chunk):
            idx = list(range(c, min(c + chunk, victims)))
            x, _, res = run_chunk(model, template, idx, images, labels, classes, seed, attacks.PAPER, strategy, pool)
            for m in METHODS:  # the MSE of x' before steps 0, e, 2e, ... (snapshot_every), (V, slots)
                snaps = res[m]["snapshots"]
                res[m]["snapshot_mse"] = metrics.mse(snaps, jnp.broadcast_to(jnp.asarray(x)[:, None], snaps.shape))
            for m, f in itertools.product(METHODS, FIELDS):
                new = np.asarray(res[m][f])
                saved[f"{m}_{f}"] = np.concatenate([saved[f"{m}_{f}"], new]) if f"{m}_{f}" in saved else new
            np.savez(path, **saved)
            bar.update(len(idx))
    bar.close()
    return saved


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(DATA), default="cifar100")
    p.add_argument("--victims", type=int, default=128, help="victims 0..N-1 of idlg_reproduction.py's draw (default 128)")
    p.add_argument("--out", type=pathlib.Path, required=True, help="folder of histories.npz; an existing one is resumed")
    p.add_argument("--data", type=pathlib.Path, default=None,
                   help="folder of the .npz subsets (default $JAXLEAK_DATA, else ../shared/data beside the checkout)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk", type=int, default=16, help="victims per chunk, the unit of resume")
    p.add_argument("--strategy", choices=("loop", "processes"), default="processes")
    p.add_argument("--success", type=float, default=1e-3, help="final MSE below which a run recovered the image")
    p.add_argument("--rule-steps", type=int, nargs="+", default=[20, 30, 50, 80, 100], help="candidate rule steps")
    p.add_argument("--rule-losses", type=float, nargs="+", default=[0.1, 0.3, 1.0, 3.0], help="candidate rule losses")
    p.add_argument("--stall-losses", type=float, nargs="+", default=[1e-5, 1e-4, 1e-3],
                   help="candidate AttackConfig.stall losses (scored with each of --stall-ratios)")
    p.add_argument("--stall-ratios", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95, 0.99],
                   help="candidate AttackConfig.stall ratios")
    add_output_flags(p)
    args = p.parse_args(argv)
    o = ScriptOutput(args)
    data_dir = args.data or default_data_dir()
    if not (args.out / "histories.npz").exists() and not (data_dir / DATA[args.dataset][0]).is_file():
        p.error(f"{DATA[args.dataset][0]} not found in {data_dir}: pass --data or set JAXLEAK_DATA")
    args.out.mkdir(parents=True, exist_ok=True)
    h = collect(args.dataset, args.victims, args.out, args.seed, args.chunk, args.strategy, data_dir, o)
    summary = {"dataset": args.dataset, "victims": int(len(h["idlg_mse"])), "success_mse": args.success, "methods": {}}
    for m in METHODS:
        hist, steps, evals = h[f"{m}_loss_history"], h[f"{m}_steps"], h[f"{m}_evals"]
        ok = h[f"{m}_mse"] < args.success
        rules = []
        for step, loss in itertools.product(args.rule_steps, args.rule_losses):
            g = gives_up(hist, steps, (step, loss), attacks.PAPER.check_every)
            rules.append({"step": step, "loss": loss, "gives_up": int(g.sum()), "successes_lost": int((g & ok).sum()),
                          "failures_caught": int((g & ~ok).sum())})
        stall = [stall_outcome(hist, steps, h[f"{m}_snapshot_mse"], h[f"{m}_mse"], rule, attacks.PAPER.check_every,
                               attacks.PAPER.snapshot_every)
                 for rule in itertools.product(args.stall_losses, args.stall_ratios)]
        summary["methods"][m] = {"successful": int(ok.sum()), "failed_evals_share": float(evals[~ok].sum() / evals.sum()),
                                 "fidelity": fidelity_counts(h[f"{m}_mse"]),
                                 "rules": rules, "separation": separation(hist, steps, ok, attacks.PAPER.check_every),
                                 "stall_rules": stall}
        o.report(f"{m}: {ok.sum()}/{len(ok)} recovered (MSE < {args.success:g}); the failed runs took "
                 f"{100 * summary['methods'][m]['failed_evals_share']:.0f} % of the evaluations")
        for s in summary["methods"][m]["separation"][1:11]:
            o.report(f"  after step {s['after_step']:3d}: failed runs' lowest loss {s['failed_min']:.3g} ({s['failed_running']} "
                     f"running), successful runs' highest {s['successful_max']:.3g} ({s['successful_running']} running)")
        for r in rules:
            o.report(f"  give_up=({r['step']}, {r['loss']:g}): abandons {r['gives_up']}, of which would have recovered "
                     f"{r['successes_lost']}; failures caught {r['failures_caught']}/{int((~ok).sum())}")
        for r in stall:
            o.report(f"  stall=({r['stall'][0]:g}, {r['stall'][1]:g}): stops {r['stops']}, {100 * r['steps_saved_share']:.1f} % of "
                     f"the outer steps; victims below " + " / ".join(f"{k}: {v}" for k, v in r["fidelity"].items())
                     + " (without: " + " / ".join(map(str, summary["methods"][m]["fidelity"].values())) + ")")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    o.summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
