"""Results files, resume and figures.

A run folder holds:

* ``records.jsonl`` - one JSON line per finished victim, appended chunk by chunk
  (an interrupted run loses at most the chunk in flight);
* ``results.json`` - the config, environment and summary, plus every record;
* ``results.csv`` - the per-victim records as a table;
* PNG figures.

Resuming reads ``records.jsonl`` back (:func:`load_records`) and the caller
skips the victims already there. A run refuses to resume into a folder whose
saved config differs from its own (:func:`start_run`).
"""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib
import platform
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

RECORDS = "records.jsonl"
CONFIG = "config.json"


def _jsonable(x: Any, strict: bool = False) -> Any:
    """Plain JSON values: numpy/jax arrays and scalars to Python, anything else unknown to ``str``.

    NaN becomes ``null``; +-Inf becomes +-1e308 (so result files keep the order), or ``null`` too when
    ``strict`` (the ``--json`` summaries).
    """
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v, strict) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v, strict) for v in x]
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):  # numpy / jax arrays and scalars
        return _jsonable(np.asarray(x).tolist(), strict)
    if isinstance(x, float) and not math.isfinite(x):
        return None if strict or math.isnan(x) else (1e308 if x > 0 else -1e308)
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def environment() -> dict[str, Any]:
    """Versions and device of this run (recorded in ``results.json``)."""
    import flax
    import jax
    import optax

    import jaxleak

    return {
        "jaxleak": jaxleak.__version__,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        "device_count": jax.device_count(),
    }


def ensure_writable(out_dir: str | os.PathLike) -> pathlib.Path:
    """Creates ``out_dir`` if needed and checks it is writable; raises ``OSError`` naming the folder."""
    out = pathlib.Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise OSError(f"output folder {str(out)!r} is not writable: {e.strerror or e}") from None
    return out


def start_run(out_dir: str | os.PathLike, config: Mapping[str, Any], *, resume: bool) -> list[dict]:
    """Prepares a run folder and returns the records already done (empty unless resuming).

    Without ``resume`` an existing ``records.jsonl`` is an error (no silent
    overwrite); with it, the saved config must equal ``config``.
    """
    out = ensure_writable(out_dir)
    cfg = _jsonable(dict(config))
    saved = out / CONFIG
    records = out / RECORDS
    if records.exists() and records.stat().st_size > 0:
        if not resume:
            raise FileExistsError(f"{str(out)!r} already holds results: pass --resume to continue that run, or choose another folder")
        if saved.exists():
            old = json.loads(saved.read_text())
            if old != cfg:
                diff = sorted(k for k in set(old) | set(cfg) if old.get(k) != cfg.get(k))
                raise ValueError(f"cannot resume {str(out)!r}: its config differs in {diff}")
    saved.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return load_records(out) if resume else []


def load_records(out_dir: str | os.PathLike) -> list[dict]:
    """Reads the per-victim records of a run; a truncated last line (a killed write) is dropped."""
    path = pathlib.Path(out_dir) / RECORDS
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def append_records(out_dir: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> None:
    """Appends finished victims' records (one JSON line each) and flushes them to disk."""
    path = pathlib.Path(out_dir) / RECORDS
    with path.open("a") as f:
        for r in records:
            f.write(json.dumps(_jsonable(r)) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_results(
    out_dir: str | os.PathLike,
    config: Mapping[str, Any],
    summary: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    *,
    csv_fields: Optional[Sequence[str]] = None,
    extra: Optional[Mapping[str, Any]] = None,
) -> pathlib.Path:
    """Writes ``results.json`` (config, environment, summary, records) and ``results.csv``."""
    out = pathlib.Path(out_dir)
    doc = {"config": config, "environment": environment(), "summary": summary, **(extra or {}), "victims": list(records)}
    (out / "results.json").write_text(json.dumps(_jsonable(doc), indent=2))
    scalar = lambda v: isinstance(v, (str, int, float, bool)) or v is None
    fields = list(csv_fields or [k for k, v in (records[0].items() if records else []) if scalar(v)])
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerow({k: r.get(k) for k in fields})
    return out / "results.json"


# --------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> pathlib.Path:
    """Lays out, writes (PNG, 120 dpi) and closes a figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return pathlib.Path(path)


def plot_reconstructions(
    path: str | os.PathLike,
    originals: np.ndarray,
    reconstructions: Mapping[str, np.ndarray] | np.ndarray,
    *,
    captions: Optional[Mapping[str, Sequence[str]]] = None,
    max_images: int = 8,
) -> pathlib.Path:
    """A grid: originals in the first row, one row per reconstruction method (NHWC in [0, 1])."""
    plt = _plt()
    if not isinstance(reconstructions, Mapping):
        reconstructions = {"reconstruction": reconstructions}
    n = min(max_images, len(originals))
    rows = [("original", originals)] + list(reconstructions.items())
    fig, axes = plt.subplots(len(rows), n, figsize=(1.6 * n, 1.7 * len(rows)), squeeze=False)
    for i, (name, imgs) in enumerate(rows):
        for j in range(n):
            ax = axes[i, j]
            img = np.clip(np.asarray(imgs[j], np.float32), 0, 1)
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                      vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, fontsize=8)
            if captions and name in captions:
                ax.set_title(captions[name][j], fontsize=6)
    return _save(fig, path)


def plot_fidelity(
    path: str | os.PathLike,
    curves: Mapping[str, Mapping[str, float]],
    *,
    reference: Optional[Mapping[str, Mapping[str, float]]] = None,
    title: str = "",
) -> pathlib.Path:
    """iDLG Figure 1: % of victims with final MSE below each threshold; dashed lines are the paper's values."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, curve in curves.items():
        xs = list(curve)
        line, = ax.plot(range(len(xs)), [100 * curve[k] for k in xs], "o-", label=f"{name} (jaxleak)")
        if reference and name in reference:
            ref = reference[name]
            ax.plot(range(len(xs)), [ref[k] for k in xs], "s--", color=line.get_color(), alpha=0.6, label=f"{name} (paper)")
    ax.set_xticks(range(len(xs)))
    ax.set_xticklabels(xs)
    ax.set_xlabel("MSE threshold")
    ax.set_ylabel("% victims with good fidelity")
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_histogram(
    path: str | os.PathLike, values: Mapping[str, Sequence[float]], *, xlabel: str, log: bool = True, title: str = ""
) -> pathlib.Path:
    """Histogram(s) of per-victim errors (e.g. label-recovery max|y_hat - y|, on a log axis)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, v in values.items():
        v = np.asarray(v, np.float64)
        v = v[np.isfinite(v)]
        if log:
            v = np.log10(np.maximum(v, 1e-16))
        ax.hist(v, bins=30, alpha=0.6, label=name)
    ax.set_xlabel(f"log10 {xlabel}" if log else xlabel)
    ax.set_ylabel("victims")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)
