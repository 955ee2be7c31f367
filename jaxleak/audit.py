"""One audit = "how much does this setting leak?": victims -> shared gradients -> attack -> metrics -> report.

:func:`run_audit` is the main job behind ``jaxleak attack``: it draws victims
(one private example each, and a freshly initialised model each, as in the
iDLG protocol), computes their shared gradients, recovers labels analytically,
reconstructs the images by gradient matching and scores everything. Victims
are processed in chunks; each finished chunk is appended to the run folder, so
an interrupted run resumes (``resume=True``) without recomputing anything.
Victim ``i``'s data, label noise and model depend only on ``(seed, i)``, never
on chunking.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxleak import attacks as _attacks
from jaxleak import data as _data
from jaxleak import labels as _labels
from jaxleak import metrics as _metrics
from jaxleak import models as _models
from jaxleak import processes as _processes
from jaxleak import recovery as _recovery
from jaxleak import report as _report
from jaxleak import victims as _victims

ATTACK_NAMES = ("idlg", "dlg", "ig", "soft-label", "labels")
#: How :func:`run_audit` maps a chunk's attacks over its victims (``attacks.attack_victims``' strategies).
STRATEGIES = ("auto", "loop", "vmap", "stream", "processes")
LABEL_REGIMES = ("onehot", "smoothing", "mixup")
#: Input sizes the reference networks were built for (others keep the dataset's size, 32 if larger than 64).
MODEL_SIZES = {"fcn4": 64, "alexnet": 224, "resnet50": 224}


@dataclasses.dataclass(frozen=True)
class AuditConfig:
    """What to audit. The defaults are the built-in main job: iDLG on real photographs shipped by scikit-image.

    Attributes:
      dataset: a ``jaxleak.data`` name (``skimage``, a tfds name, ``flowers17``) or an ``.npz`` path.
      data_dir, npz_dir, split: where ``jaxleak.data.load`` looks.
      model: ``lenet``, ``fcn4``, ``alexnet``, ``resnet18``, ``resnet50``.
      init: initialiser name (``uniform`` is iDLG's U(-0.5, 0.5)); one fresh model per victim.
      head_bias: LeNet's last layer has a bias (iDLG) or not (paper 2).
      image_size: square input size (default: :data:`MODEL_SIZES`, else the dataset's, 32 if larger than 64).
      attack: ``idlg`` (iDLG label + matching), ``dlg`` (joint image/label), ``ig``
        (Inverting Gradients: cosine + TV, Adam), ``soft-label`` (Wang et al.
        label + feature recovery, then matching with the recovered label) or
        ``labels`` (analytic label recovery only, no reconstruction).
      labels: the victims' label regime: ``onehot``, ``smoothing`` or ``mixup`` (soft-label
        recovery treats a one-hot label as smoothing with epsilon = 0).
      epsilon, mu: fixed smoothing factor / mixup weight; ``None`` draws
        U(0, 0.5) / U(0, 1) per victim (paper 2's protocol).
      victims, seed: how many victims, and the seed of everything random.
      steps, optimizer, restarts: the matching budget (``None``: the attack's paper default).
      search: soft-label search, ``robust`` or ``paper``.
      normalize: feed CIFAR-10-normalised images (paper 2) instead of [0, 1] pixels (iDLG).
      chunk_size: victims per chunk (one chunk is written at a time).
    """

    dataset: str = "skimage"
    data_dir: Optional[str] = None
    npz_dir: Optional[str] = None
    split: Optional[str] = None
    model: str = "lenet"
    init: str = "uniform"
    head_bias: bool = True
    image_size: Optional[int] = None
    attack: str = "idlg"
    labels: str = "onehot"
    epsilon: Optional[float] = None
    mu: Optional[float] = None
    victims: int = 16
    seed: int = 0
    steps: Optional[int] = 100
    optimizer: Optional[str] = None
    restarts: int = 1
    search: str = "robust"
    normalize: bool = False
    chunk_size: int = 8

    def __post_init__(self):
        if self.attack not in ATTACK_NAMES:
            raise ValueError(f"unknown attack {self.attack!r}; expected one of {list(ATTACK_NAMES)}")
        if self.labels not in LABEL_REGIMES:
            raise ValueError(f"unknown label regime {self.labels!r}; expected one of {list(LABEL_REGIMES)}")
        if self.model not in _models.MODELS:
            raise ValueError(f"unknown model {self.model!r}; expected one of {sorted(_models.MODELS)}")
        _models.get_init(self.init)
        if self.search not in _recovery.SEARCHES:
            raise ValueError(f"unknown search {self.search!r}; expected one of {list(_recovery.SEARCHES)}")
        if self.victims < 1 or self.chunk_size < 1 or self.restarts < 1:
            raise ValueError("victims, chunk_size and restarts must be >= 1")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.epsilon is not None and not 0 <= self.epsilon < 1:
            raise ValueError(f"epsilon must be in [0, 1), got {self.epsilon}")
        if self.mu is not None and not 0 <= self.mu <= 1:
            raise ValueError(f"mu must be in [0, 1], got {self.mu}")


def attack_config(config: AuditConfig) -> _attacks.AttackConfig:
    """The gradient-matching configuration for an audit: the paper preset with the audit's budget."""
    base = _attacks.INVERTING_GRADIENTS if config.attack == "ig" else _attacks.PAPER
    changes: dict[str, Any] = {"restarts": config.restarts}
    if config.steps is not None:
        changes["steps"] = config.steps
    if config.optimizer is not None:
        changes["optimizer"] = config.optimizer
    return dataclasses.replace(base, **changes)


def _model(config: AuditConfig):
    kwargs = {"head_bias": config.head_bias} if config.model == "lenet" else {}
    return lambda k: _models.get_model(config.model, k, **kwargs)


def _plan(config: AuditConfig, dataset: _data.Dataset) -> dict[str, np.ndarray]:
    """Draws every victim's example(s) and label noise up front, from ``config.seed`` alone."""
    rng = np.random.default_rng(config.seed)
    n = len(dataset)
    first = rng.choice(n, size=config.victims, replace=config.victims > n)
    plan = {"index": first}
    if config.labels == "mixup":
        if len(np.unique(dataset.labels)) < 2:
            raise ValueError("mixup needs a dataset with at least two classes")
        second = np.empty_like(first)
        for i, a in enumerate(first):
            while True:
                b = rng.integers(n)
                if dataset.labels[b] != dataset.labels[a]:
                    second[i] = b
                    break
        plan["partner"] = second
        plan["mu"] = np.full(config.victims, config.mu) if config.mu is not None else rng.uniform(0, 1, config.victims)
    if config.labels == "smoothing":
        plan["epsilon"] = (
            np.full(config.victims, config.epsilon) if config.epsilon is not None else rng.uniform(0, 0.5, config.victims)
        )
    return plan


def _images(config: AuditConfig, dataset: _data.Dataset, idx: np.ndarray, size: int) -> jax.Array:
    x = _data.to_float(jnp.asarray(dataset.images[idx]))
    if x.shape[1:3] != (size, size):
        x = jnp.clip(_data.resize(x, (size, size)), 0.0, 1.0)
    if config.model != "lenet" and x.shape[-1] == 1:
        x = _data.grayscale_to_rgb(x)
    return x


def _victim_batch(config, dataset, plan, ids, size, num_classes):
    """Private inputs (model space), their [0, 1] pictures and labels for victims ``ids``."""
    pix = _images(config, dataset, plan["index"][ids], size)
    cls = jnp.asarray(dataset.labels[plan["index"][ids]])
    if config.labels == "onehot":
        y = _labels.one_hot(cls, num_classes)
    elif config.labels == "smoothing":
        y = _labels.smooth(cls, num_classes, jnp.asarray(plan["epsilon"][ids], jnp.float32))
    else:
        other = _images(config, dataset, plan["partner"][ids], size)
        cls_b = jnp.asarray(dataset.labels[plan["partner"][ids]])
        mu = jnp.asarray(plan["mu"][ids], jnp.float32)
        pix, y = _labels.mixup(pix, other, _labels.one_hot(cls, num_classes), _labels.one_hot(cls_b, num_classes), mu)
    x = _data.normalize(pix) if config.normalize else pix
    return x, pix, y


def run_audit(
    config: AuditConfig = AuditConfig(),
    out_dir: str | pathlib.Path = "jaxleak-run",
    *,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = lambda s: None,
    strategy: str = "auto",
    slots: Optional[int] = None,
) -> dict[str, Any]:
    """Runs one audit and writes its folder; returns the summary (also in ``results.json``).

    Files: ``records.jsonl`` (per victim, appended per chunk), ``recon_*.npz``
    (reconstructions per chunk), ``results.json``, ``results.csv`` and the
    figures ``reconstructions.png``, ``fidelity.png``, ``label_error.png``
    (soft labels).

    ``strategy``: how each chunk's attacks are mapped over its victims
    (``jaxleak.attacks.attack_victims``): ``"auto"`` (the backend's
    ``attacks.DEFAULT_STRATEGY``), ``"loop"``, ``"vmap"``, ``"stream"`` (``slots``
    victims of the chunk at a time, refilled as they finish) or ``"processes"``
    (pinned single-device worker processes, one per core up to ``chunk_size``,
    started once for the whole run; a script that calls this needs the
    ``if __name__ == "__main__":`` guard of ``multiprocessing``'s spawn).
    How, not what: it is not part of the config, and a run may resume under
    another strategy (the loop and the processes give the same bits, vmap
    the same maths in another float32 rounding).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {list(STRATEGIES)}")
    if slots is not None and strategy != "stream":
        raise ValueError(f"slots= is the width of strategy='stream', got strategy={strategy!r}")
    out = _report.ensure_writable(out_dir)
    cfg_dict = dataclasses.asdict(config)
    done = _report.start_run(out, cfg_dict, resume=resume)
    dataset = _data.load(config.dataset, config.split, data_dir=config.data_dir, npz_dir=config.npz_dir)
    num_classes = dataset.num_classes
    native = dataset.images.shape[1]
    size = config.image_size or MODEL_SIZES.get(config.model) or (native if native <= 64 else 32)
    channels = dataset.images.shape[-1] if config.model == "lenet" else 3
    shape = (size, size, channels)
    model = _model(config)(num_classes)
    plan = _plan(config, dataset)
    acfg = attack_config(config)
    kind = "mixup" if config.labels == "mixup" else "smoothing"
    root = jax.random.PRNGKey(config.seed)
    model_keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(root, 1), i))(jnp.arange(config.victims))
    attack_keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(root, 2), i))(jnp.arange(config.victims))
    log(f"dataset {dataset.name} ({dataset.source}), {len(dataset)} images, {num_classes} classes; "
        f"model {config.model} {shape}; attack {config.attack}; labels {config.labels}; {config.victims} victims")

    starts = list(range(len(done), config.victims, config.chunk_size))
    if progress and starts:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="victims", unit="chunk", total=len(starts))
    # One pool for every chunk (as idlg_reproduction.py's), when there is an attack to run.
    use_pool = strategy == "processes" and config.attack != "labels" and starts
    with (_processes.WorkerPool(_processes.pool_size(min(config.chunk_size, config.victims))) if use_pool
          else contextlib.nullcontext()) as pool:
        attack = lambda name, *a: _attacks.attack_victims(name, *a, config=acfg, strategy=strategy, pool=pool, slots=slots)
        for start in starts:
            ids = np.arange(start, min(config.victims, start + config.chunk_size))
            t0 = time.perf_counter()
            x, pix, y = _victim_batch(config, dataset, plan, ids, size, num_classes)
            variables = _victims.init_victims(model, model_keys[ids], len(ids), shape, init=config.init)
            grads = _victims.gradients(model.apply, variables, x, y, per_victim_params=True)
            G, db = _models.last_layer(grads)
            W, b = _models.last_layer(variables)
            idlg_cls = np.asarray(_recovery.idlg_label(G, method="rowsum"))
            soft = None
            if config.attack == "soft-label" or config.labels != "onehot":
                soft = _recovery.soft_label(G, W, kind=kind, bias=b, bias_grad=db, search=config.search, errors="flag")
            result = None
            if config.attack == "idlg":
                result = attack("idlg", attack_keys[ids], model.apply, variables, grads, shape)
            elif config.attack == "dlg":
                result = attack("dlg", attack_keys[ids], model.apply, variables, grads, shape)
            elif config.attack in ("ig", "soft-label"):
                if soft is not None:
                    lab = jnp.where(jnp.asarray(soft.ok)[:, None], soft.label, _labels.one_hot(idlg_cls, num_classes))
                else:
                    lab = _labels.one_hot(idlg_cls, num_classes)
                name = "inverting_gradients" if config.attack == "ig" else "given_label"
                result = attack(name, attack_keys[ids], model.apply, variables, grads, shape, lab)
            jax.block_until_ready(grads)
            seconds = time.perf_counter() - t0

            records = []
            true_cls = np.asarray(jnp.argmax(y, -1))
            if result is not None:
                rec = jnp.asarray(result["reconstruction"])
                rec_pix = _data.denormalize(rec) if config.normalize else rec
                mse = np.asarray(_metrics.mse(rec_pix, pix))
                psnr = np.asarray(_metrics.psnr(rec_pix, pix))
                ssim = np.asarray(_metrics.ssim(rec_pix, pix))
                np.savez_compressed(out / f"recon_{start:06d}.npz", victims=ids, original=np.asarray(pix),
                                    reconstruction=np.asarray(rec_pix))
            for j, i in enumerate(ids):
                r: dict[str, Any] = {"victim": int(i), "image": int(plan["index"][i]), "true_class": int(true_cls[j]),
                                     "idlg_class": int(idlg_cls[j]), "idlg_correct": bool(idlg_cls[j] == true_cls[j])}
                if config.labels == "smoothing":
                    r["epsilon"] = float(plan["epsilon"][i])
                if config.labels == "mixup":
                    r["partner"] = int(plan["partner"][i])
                    r["mu"] = float(plan["mu"][i])
                if soft is not None:
                    err = float(jnp.max(jnp.abs(soft.label[j] - y[j])))
                    r.update(soft_ok=bool(soft.ok[j]), soft_reason=_recovery.REASONS[int(soft.reason[j])],
                             soft_class=int(jnp.argmax(soft.label[j])), soft_max_error=err,
                             soft_correct=bool(err < 1e-3))
                    if config.labels == "smoothing":
                        r["epsilon_hat"] = float(soft.epsilon[j])
                    if config.labels == "mixup":
                        r["mu_hat"] = float(soft.mu[j])
                if result is not None:
                    r.update(attack_class=int(result["label_index"][j]),
                             attack_correct=bool(result["label_index"][j] == true_cls[j]),
                             mse=float(mse[j]), psnr=float(psnr[j]), ssim=float(ssim[j]),
                             loss=float(result["loss"][j]), steps=int(result["steps"][j]), evals=int(result["evals"][j]))
                r["chunk_seconds"] = seconds
                records.append(r)
            _report.append_records(out, records)
            done.extend(records)

    summary = summarize(config, done)
    _report.write_results(out, cfg_dict, summary, done)
    figures(out, config, done)
    return summary


def summarize(config: AuditConfig, records: list[dict]) -> dict[str, Any]:
    """Label accuracy, soft-label errors, reconstruction quality and throughput of an audit's records."""
    n = len(records)
    col = lambda k: np.array([r[k] for r in records if r.get(k) is not None], dtype=np.float64)
    s: dict[str, Any] = {"victims": n, "idlg_label_accuracy": float(np.mean(col("idlg_correct"))) if n else None}
    if any("soft_ok" in r for r in records):
        err = col("soft_max_error")
        s.update(soft_label_accuracy=float(np.mean(err < 1e-3)), soft_label_ok=float(np.mean(col("soft_ok"))),
                 soft_argmax_accuracy=float(np.mean(col("soft_class") == col("true_class"))),
                 soft_max_error_median=float(np.median(err)))
        if config.labels == "smoothing":
            s["epsilon_abs_error_mean"] = float(np.mean(np.abs(col("epsilon_hat") - col("epsilon"))))
        if config.labels == "mixup":
            mu = col("mu")
            s["mu_abs_error_mean"] = float(np.mean(np.abs(col("mu_hat") - np.minimum(mu, 1 - mu))))
    if any("mse" in r for r in records):
        mse = col("mse")
        s.update(attack_label_accuracy=float(np.mean(col("attack_correct"))),
                 mse_median=float(np.median(mse)), psnr_mean=float(np.mean(col("psnr"))),
                 ssim_mean=float(np.mean(col("ssim"))), fidelity=_metrics.fidelity_curve(mse))
    secs = {}
    for r in records:
        secs.setdefault(r["victim"] // config.chunk_size, r["chunk_seconds"])
    s["seconds"] = float(sum(secs.values()))
    s["victims_per_second"] = n / s["seconds"] if s["seconds"] > 0 else None
    return s


def figures(out: pathlib.Path, config: AuditConfig, records: list[dict]) -> list[pathlib.Path]:
    """Writes the audit's PNG figures; returns their paths."""
    paths = []
    files = sorted(out.glob("recon_*.npz"))
    if files:
        with np.load(files[0]) as z:
            orig, rec, ids = z["original"], z["reconstruction"], z["victims"]
        by_victim = {r["victim"]: r for r in records}
        caps = [f"{by_victim[int(i)]['psnr']:.1f} dB" for i in ids]
        paths.append(_report.plot_reconstructions(out / "reconstructions.png", orig, {config.attack: rec},
                                                  captions={config.attack: caps}))
        mses = [r["mse"] for r in records if "mse" in r]
        paths.append(_report.plot_fidelity(out / "fidelity.png", {config.attack: _metrics.fidelity_curve(mses)},
                                           title=f"{config.attack} on {config.dataset}, {len(mses)} victims"))
    errs = [r["soft_max_error"] for r in records if "soft_max_error" in r]
    if errs:
        paths.append(_report.plot_histogram(out / "label_error.png", {"soft-label max|y_hat - y|": errs},
                                            xlabel="max |y_hat - y|", title=f"{config.labels}, {len(errs)} victims"))
    return paths
