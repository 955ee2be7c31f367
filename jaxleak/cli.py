"""The ``jaxleak`` command: a thin layer over the library.

``jaxleak attack``     audit how much a setting leaks (the main job; no options = built-in default)
``jaxleak recover``    analytic label/feature recovery from a saved last-layer gradient (.npz)
``jaxleak data``       which datasets are available offline; prepare a tfds data_dir from .npz subsets
``jaxleak reproduce``  the paper reproductions (scripts in the checkout's ``experiments/``)
``jaxleak bench``      the benchmarks (likewise)

User mistakes (unknown names, missing data, bad shapes, NaN gradients,
unwritable folders) print one line ``jaxleak: error: ...`` and exit with 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
from typing import Optional, Sequence

EXIT_USAGE = 2
_REPRODUCTIONS = {"idlg": "idlg_reproduction.py", "softlabel": "label_recovery.py", "fcn4": "fcn4_reconstruction.py"}
_BENCHES = {"gradients": "bench_gradients.py", "attack": "bench_attack.py"}


class UserError(Exception):
    """A mistake in the command's input: reported in one line, exit code 2."""


def _float_or_none(s: str) -> Optional[float]:
    return None if s.lower() in ("none", "drawn", "random") else float(s)


def _add_attack(sub) -> None:
    from jaxleak import audit

    d = audit.AuditConfig()
    p = sub.add_parser(
        "attack",
        help="audit how much a federated-learning setting leaks (the main job)",
        description=(
            "Draws victims (one private image and one freshly initialised model each), computes the gradient each "
            "would share, recovers labels analytically and reconstructs the images by gradient matching. With no "
            "options: iDLG on real photographs shipped with scikit-image, LeNet, %d victims." % d.victims
        ),
        formatter_class=_Help,
    )
    p.add_argument("--dataset", default=d.dataset,
                   help="skimage (built in), a tfds name (mnist, cifar10, cifar100, lfw, imagenet2012, "
                        "oxford_flowers102), flowers17, or a path to an .npz subset")
    p.add_argument("--data-dir", default=None, help="a prepared tfds data_dir (see `jaxleak data`)")
    p.add_argument("--npz-dir", default=None,
                   help="folder of the .npz subsets (unset: $JAXLEAK_DATA, and from a source checkout ../shared/data)")
    p.add_argument("--split", default=None, help="dataset split (unset: the dataset's test split)")
    p.add_argument("--model", default=d.model, choices=["lenet", "fcn4", "alexnet", "resnet18", "resnet50"],
                   help="each victim's network (LeNet as in iDLG; FCN-4/AlexNet/ResNets as in Wang, Liang, He 2024)")
    p.add_argument("--init", default=d.init, choices=["uniform", "torch", "torch_resnet", "flax"],
                   help="initialiser of each victim's model (uniform = iDLG's U(-0.5, 0.5))")
    p.add_argument("--no-head-bias", dest="head_bias", action="store_false",
                   help="LeNet without a bias in the last layer (paper 2's variant)")
    p.add_argument("--image-size", type=int, default=None, help="square input size (unset: the model's)")
    p.add_argument("--attack", default=d.attack, choices=["idlg", "dlg", "ig", "soft-label", "labels"],
                   help="idlg: label from the gradient, then gradient matching (Zhao et al. 2020); dlg: label and "
                        "image optimised jointly (Zhu et al. 2019); ig: cosine + TV with Adam (Geiping et al. 2020); "
                        "soft-label: recover the soft label (Wang, Liang, He 2024), then gradient matching with it; "
                        "labels: label recovery only, no reconstruction")
    p.add_argument("--labels", default=d.labels, choices=["onehot", "smoothing", "mixup"], help="the victims' label regime")
    p.add_argument("--epsilon", type=_float_or_none, default=None, help="smoothing factor (unset: drawn U(0, 0.5) per victim)")
    p.add_argument("--mu", type=_float_or_none, default=None, help="mixup weight (unset: drawn U(0, 1) per victim)")
    p.add_argument("--victims", type=int, default=d.victims, help="number of simulated victims")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of every random draw (images, models, labels, starts)")
    p.add_argument("--steps", type=int, default=d.steps, help="outer optimiser steps per victim (the papers use 300)")
    p.add_argument("--optimizer", default=None, choices=["torch_lbfgs", "optax_lbfgs", "adam"],
                   help="unset: the attack's paper optimiser (L-BFGS with PyTorch semantics; Adam for ig)")
    p.add_argument("--restarts", type=int, default=d.restarts,
                   help="random initialisations per victim; the lowest matching loss is kept")
    p.add_argument("--search", default=d.search, choices=["robust", "paper"], help="soft-label search")
    p.add_argument("--normalize", action="store_true", help="CIFAR-10 mean/std normalisation (paper 2)")
    p.add_argument("--chunk-size", type=int, default=d.chunk_size, help="victims per chunk (results saved per chunk)")
    p.add_argument("--strategy", default="auto", choices=["auto", "loop", "vmap", "stream", "processes"],
                   help="how a chunk's attacks run: loop (one victim at a time), vmap (all at once), stream (--slots "
                        "at a time under vmap, each slot refilled with the next victim as soon as its own is done), "
                        "processes (one pinned worker process per CPU core, up to --chunk-size; the same results as "
                        "loop); auto: processes on a CPU with several cores, else the backend's default (vmap on a GPU)")
    p.add_argument("--slots", type=int, default=None,
                   help="with --strategy stream: victims attacked at once per device (unset: as vmap's chunk); "
                        "fewer than --chunk-size, so slots are refilled")
    p.add_argument("--out", default="jaxleak-run", help="output folder")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    _add_common(p)
    p.set_defaults(func=_cmd_attack)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default only where it says something (not for flags or unset options)."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool) or action.help is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _add_common(p) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    p.add_argument("--json", action="store_true", help="print a machine-readable JSON summary on stdout")


def _attack_strategy(name: str) -> str:
    """``jaxleak attack --strategy auto``: pinned worker processes on a CPU with several cores, else ``name``.

    ``run_audit``'s own ``"auto"`` (a library call, maybe from a script without the ``__main__`` guard that
    ``multiprocessing``'s spawn needs) keeps ``attacks.DEFAULT_STRATEGY``; this command is spawn-safe. The
    default job (16 iDLG victims, 100 steps) ran in 20.8-24.3 s against 29.2-34.1 s for the loop on the
    2-core Zen 5 CPU, with the same records (2026-12-07).
    """
    import jax

    from jaxleak import processes

    if name == "auto" and jax.default_backend() == "cpu" and len(processes.available_cores()) > 1:
        return "processes"
    return name


def _cmd_attack(args) -> int:
    from jaxleak import audit

    fields = {f.name for f in dataclasses.fields(audit.AuditConfig)}
    if args.slots is not None and args.strategy != "stream":
        raise ValueError(f"--slots goes with --strategy stream, not {args.strategy}")
    cfg = audit.AuditConfig(**{k: v for k, v in vars(args).items() if k in fields})
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr))
    summary = audit.run_audit(cfg, args.out, resume=args.resume, progress=not args.quiet, log=log,
                              strategy=_attack_strategy(args.strategy), slots=args.slots)
    out = pathlib.Path(args.out)
    if args.json:
        print(to_json({"out": str(out), "summary": summary}))
    else:
        _print_summary(summary, out)
    return 0


def _print_summary(summary: dict, out: pathlib.Path) -> None:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    print(f"jaxleak attack: {summary['victims']} victims in {summary['seconds']:.1f} s")
    for k, v in summary.items():
        if k in ("victims", "seconds"):
            continue
        if isinstance(v, dict):
            v = ", ".join(f"MSE<{t}: {100 * f:.0f}%" for t, f in v.items())
        print(f"  {k:26s} {fmt(v)}")
    figs = sorted(p.name for p in out.glob("*.png"))
    print(f"results: {out / 'results.json'}, {out / 'results.csv'}")
    if figs:
        print(f"figures: {', '.join(str(out / f) for f in figs)}")


# --------------------------------------------------------------------------
# recover
# --------------------------------------------------------------------------


def _add_recover(sub) -> None:
    p = sub.add_parser(
        "recover",
        help="analytic label (and feature) recovery from a saved last-layer gradient",
        description=(
            "Reads an .npz with the last layer's kernel and its gradient (keys 'weight' and 'weight_grad', optionally "
            "'bias' and 'bias_grad'), in flax layout (d, K) or, with --layout torch, PyTorch's (K, d); one victim or a "
            "leading victim axis. Recovers the one-hot label (iDLG) or the soft label and feature (Wang et al. 2024)."
        ),
        formatter_class=_Help,
    )
    p.add_argument("file", help=".npz gradient file")
    p.add_argument("--kind", default="onehot", choices=["onehot", "smoothing", "mixup"], help="the label regime to recover")
    p.add_argument("--layout", default="flax", choices=["flax", "torch"],
                   help="flax: kernel (d, K); torch: Linear.weight (K, d)")
    p.add_argument("--method", default="rowsum", choices=["rowsum", "inner", "bias"], help="iDLG rule (onehot)")
    p.add_argument("--search", default="robust", choices=["robust", "paper"], help="soft-label search")
    p.add_argument("--out", default=None, help="write the recovered labels/features to this .npz")
    _add_common(p)
    p.set_defaults(func=_cmd_recover)


def _read_gradient_file(path: str, layout: str) -> dict:
    import numpy as np

    if not os.path.exists(path):
        raise UserError(f"gradient file {path!r} does not exist")
    try:
        with np.load(path) as z:
            arrays = {k: np.asarray(z[k]) for k in z.files}
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input problem
        raise UserError(f"cannot read {path!r} as .npz: {e}") from None
    for key in ("weight", "weight_grad"):
        if key not in arrays:
            raise UserError(f"{path!r} has no {key!r} array (found {sorted(arrays)}); expected weight, weight_grad[, bias, bias_grad]")
    for key, a in arrays.items():
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            raise UserError(f"{path!r}: {key!r} contains NaN or Inf")
    if layout == "torch":
        for key in ("weight", "weight_grad"):
            arrays[key] = np.swapaxes(arrays[key], -1, -2)
    w, g = arrays["weight"], arrays["weight_grad"]
    if g.ndim not in (2, 3) or w.shape[-2:] != g.shape[-2:]:
        raise UserError(f"weight {w.shape} and weight_grad {g.shape} must both be (d, K) or (V, d, K) "
                        f"in the {layout} layout{'' if layout == 'torch' else ' (use --layout torch for (K, d))'}")
    for key in ("bias", "bias_grad"):
        if key in arrays and arrays[key].shape[-1] != w.shape[-1]:
            raise UserError(f"{key!r} has {arrays[key].shape[-1]} entries but the kernel has K = {w.shape[-1]} classes in "
                            f"the {layout} layout: wrong --layout? (flax: (d, K), torch: (K, d))")
    return arrays


def _cmd_recover(args) -> int:
    import jax.numpy as jnp
    import numpy as np

    from jaxleak import recovery

    a = _read_gradient_file(args.file, args.layout)
    g, w = jnp.asarray(a["weight_grad"]), jnp.asarray(a["weight"])
    b = a.get("bias")
    db = a.get("bias_grad")
    if args.kind == "onehot":
        if args.method == "bias" and db is None:
            raise UserError("--method bias needs a 'bias_grad' array in the file")
        cls = np.atleast_1d(np.asarray(recovery.idlg_label(g, bias_grad=None if db is None else jnp.asarray(db),
                                                           method=args.method)))
        result = {"label": cls}
        rows = [{"victim": i, "label": int(c)} for i, c in enumerate(cls)]
    else:
        res = recovery.soft_label(g, w, kind=args.kind, bias=None if b is None else jnp.asarray(b),
                                  bias_grad=None if db is None else jnp.asarray(db), search=args.search, errors="flag")
        arr = {f.name: np.asarray(getattr(res, f.name)) for f in dataclasses.fields(res)}
        result = arr
        batched = arr["label"].ndim == 2
        take = (lambda k, i: arr[k][i]) if batched else (lambda k, i: arr[k])
        n = arr["label"].shape[0] if batched else 1
        rows = []
        for i in range(n):
            row = {"victim": i, "class": int(np.argmax(take("label", i))), "ok": bool(take("ok", i)),
                   "reason": recovery.REASONS[int(take("reason", i))], "lam": float(take("lam", i))}
            row["epsilon" if args.kind == "smoothing" else "mu"] = float(take("epsilon" if args.kind == "smoothing" else "mu", i))
            row["label"] = [round(float(v), 6) for v in take("label", i)]
            rows.append(row)
    if args.out:
        from jaxleak.report import ensure_writable

        ensure_writable(pathlib.Path(args.out).parent or ".")
        np.savez(args.out, **result)
    if args.json:
        print(to_json({"file": args.file, "kind": args.kind, "victims": rows}))
    else:
        for r in rows:
            print(" ".join(f"{k}={v}" for k, v in r.items() if k != "label" or len(v) <= 12))
    return 0


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------


def _add_data(sub) -> None:
    p = sub.add_parser(
        "data",
        help="show which datasets are available offline; prepare a tfds data_dir from .npz subsets",
        description="Without --prepare: lists every known dataset and where it would be loaded from. With --prepare "
                    "NAME: writes the .npz subset of NAME into --data-dir under its real tfds name (offline; then "
                    "`jaxleak attack --dataset NAME --data-dir DIR` reads it through tfds).",
    )
    p.add_argument("--data-dir", default=None, help="tfds data_dir to inspect or prepare")
    p.add_argument("--npz-dir", default=None, help="folder of the .npz subsets")
    p.add_argument("--prepare", nargs="*", metavar="NAME", default=None, help="tfds names to prepare (none: all with a subset)")
    _add_common(p)
    p.set_defaults(func=_cmd_data)


def _cmd_data(args) -> int:
    from jaxleak import data

    prepared = []
    if args.prepare is not None:
        if not args.data_dir:
            raise UserError("--prepare needs --data-dir (the tfds data_dir to write)")
        folder = data.npz_folder(args.npz_dir)
        if folder is None:
            raise UserError("no .npz subsets found: pass --npz-dir or set JAXLEAK_DATA")
        names = args.prepare or [n for n in data.TFDS_NAMES if n in data.NPZ_FILES and (folder / data.NPZ_FILES[n]).exists()]
        for name in names:
            if name not in data.NPZ_FILES or name not in data.TFDS_NAMES:
                raise UserError(f"cannot prepare {name!r}: expected one of "
                                f"{[n for n in data.TFDS_NAMES if n in data.NPZ_FILES]}")
            # tfds reports progress on stdout and stderr: keep stdout for our own output (--json)
            import contextlib

            with contextlib.ExitStack() as stack:
                sink = stack.enter_context(open(os.devnull, "w")) if args.quiet else sys.stderr
                stack.enter_context(contextlib.redirect_stdout(sink))
                if args.quiet:
                    stack.enter_context(contextlib.redirect_stderr(sink))
                data.prepare_tfds(folder / data.NPZ_FILES[name], name, args.data_dir)
            prepared.append(name)
    avail = data.available(args.data_dir, args.npz_dir)
    if args.json:
        print(to_json({"prepared": prepared, "available": avail}))
    else:
        for name in prepared:
            print(f"prepared {name} in {args.data_dir}")
        for name, src in avail.items():
            print(f"{name:18s} {src or 'not available offline'}")
    return 0


# --------------------------------------------------------------------------
# reproduce / bench: the experiment scripts of a source checkout
# --------------------------------------------------------------------------


def _experiments_dir() -> pathlib.Path:
    path = pathlib.Path(os.environ.get("JAXLEAK_EXPERIMENTS", pathlib.Path(__file__).resolve().parents[1] / "experiments"))
    if not path.is_dir():
        raise UserError(f"no experiments/ folder at {str(path)!r}: `jaxleak reproduce` and `jaxleak bench` run the "
                        "scripts of a source checkout; clone the repository and `pip install -e .` there "
                        "(or set JAXLEAK_EXPERIMENTS to its experiments/ folder)")
    return path


# Shared by the experiment scripts: --quiet / --json and where their output goes.


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    """``--quiet`` and ``--json`` for an experiment script (the same meaning as for every ``jaxleak`` command)."""
    parser.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON summary on stdout at the end and nothing else there (logs go to stderr)")


def to_json(obj) -> str:
    """``obj`` as one line of strict JSON: numpy values to Python, non-finite numbers to ``null``."""
    from jaxleak import report

    return json.dumps(report._jsonable(obj, strict=True), allow_nan=False)


class ScriptOutput:
    """Where an experiment script writes: log lines and progress bars on stderr (none with ``--quiet``), its
    human-readable report on stdout, or with ``--json`` one JSON summary on stdout and nothing else there."""

    def __init__(self, args) -> None:
        self.quiet = bool(getattr(args, "quiet", False))
        self.json = bool(getattr(args, "json", False))

    def log(self, *parts) -> None:
        if not self.quiet:
            from tqdm import tqdm

            tqdm.write(" ".join(map(str, parts)), file=sys.stderr)  # above a running progress bar, if any

    def report(self, *parts) -> None:
        """A result line: stdout normally; with --json a log line (stderr, unless --quiet)."""
        if self.json:
            self.log(*parts)
        else:
            print(*parts, flush=True)

    def progress(self, iterable=None, **kwargs):
        from tqdm import tqdm

        return tqdm(iterable, disable=self.quiet, file=sys.stderr, dynamic_ncols=True, **kwargs)

    def summary(self, obj) -> None:
        if self.json:
            print(to_json(obj), flush=True)


def _run_script(script: str, argv: Sequence[str]) -> int:
    import runpy

    path = _experiments_dir() / script
    if not path.exists():
        raise UserError(f"{script} is not in {str(path.parent)!r} (not implemented yet in this version)")
    old_argv, old_path = sys.argv, list(sys.path)
    sys.argv = [str(path), *argv]
    sys.path.insert(0, str(path.parent))  # as `python experiments/X.py` would: scripts share helpers there
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as e:
        if isinstance(e.code, str):  # sys.exit("message"): Python would print it; runpy does not
            print(f"jaxleak: error: {e.code}", file=sys.stderr)
            return EXIT_USAGE
        return int(e.code or 0)
    finally:
        sys.argv, sys.path[:] = old_argv, old_path
    return 0


def _add_script_group(sub, name: str, table: dict, help_: str) -> None:
    p = sub.add_parser(name, help=help_, description=f"{help_}. Remaining arguments go to the script; "
                       f"`jaxleak {name} WHICH --help` lists them.")
    p.add_argument("which", choices=sorted(table))
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the script")
    p.set_defaults(func=lambda a: _run_script(table[a.which], a.rest))


# --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jaxleak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    _add_attack(sub)
    _add_recover(sub)
    _add_data(sub)
    _add_script_group(sub, "reproduce", _REPRODUCTIONS, "run a paper reproduction (idlg, softlabel, fcn4)")
    _add_script_group(sub, "bench", _BENCHES, "run a benchmark (gradients, attack)")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args)
    except (UserError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError) as e:
        msg = " ".join(line.strip() for line in str(e).strip("'\"").splitlines() if line.strip())
        print(f"jaxleak: error: {msg or type(e).__name__}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"jaxleak: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("jaxleak: interrupted (finished chunks are saved; rerun with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
