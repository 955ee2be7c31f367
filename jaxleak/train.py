"""Training victim networks with soft labels: label smoothing or mixup (optax, pure functions).

Paper 2 (Wang, Liang, He, ICLR 2024) attacks networks *trained* with label
smoothing or mixup (ALGORITHMS.md §5.3); their checkpoints are not available,
so jaxleak trains its own. The loop is optax-style: a frozen
:class:`TrainConfig`, an explicit :class:`TrainState` pytree, a jitted
``train_step(state, batch, key) -> (state, metrics)`` from
:func:`make_train_step`, :func:`evaluate`, and msgpack checkpoints with a JSON
recipe sidecar (:func:`save_checkpoint` / :func:`load_checkpoint`).

* Label smoothing (Szegedy et al. 2016): targets ``(1 - eps) onehot + eps/K``, fixed ``eps``.
* Mixup (Zhang et al. 2018): one ``lam ~ Beta(alpha, alpha)`` per batch, the batch
  mixed with a random permutation of itself, targets mixed alike.
* BatchNorm statistics update in train mode; AlexNet's dropout takes a ``"dropout"`` rng.

Images are ``(N, H, W, C)`` float32 already normalised (``jaxleak.data.normalize``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import flax.serialization
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxleak import labels as _labels

Array = jax.Array
PyTree = Any

REGIMES = ("hard", "smoothing", "mixup")
OPTIMIZERS = ("sgd", "adam")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training recipe (saved beside the checkpoint).

    Attributes:
      regime: ``"smoothing"`` (fixed ``epsilon``), ``"mixup"`` (``Beta(alpha, alpha)``) or ``"hard"``.
      epsilon: label-smoothing factor.
      alpha: mixup Beta parameter (1.0: ``lam ~ U(0, 1)``, as paper 2's victims).
      epochs, batch_size: the schedule length is ``epochs * ceil(N / batch_size)`` steps.
      optimizer: ``"sgd"`` (momentum, Nesterov off) or ``"adam"``; ``lr`` peak rate,
        cosine decay to 0 after ``warmup_epochs`` linear warm-up; ``weight_decay``
        decoupled (AdamW) or L2-coupled (SGD, added to the gradient as PyTorch does).
      augment: random crop (pad 4) and horizontal flip on every batch.
      seed: initialisation, shuffling, augmentation and mixup draws.
    """

    regime: str = "smoothing"
    epsilon: float = 0.1
    alpha: float = 1.0
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    augment: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.regime not in REGIMES:
            raise ValueError(f"regime must be one of {REGIMES}, got {self.regime!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not 0.0 <= self.epsilon < 1.0:
            raise ValueError(f"epsilon must be in [0, 1), got {self.epsilon}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training: ``params``, ``batch_stats`` (maybe ``{}``), ``opt_state``, ``step``."""

    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    step: Array

    @property
    def variables(self) -> dict:
        """flax variables for ``model.apply`` (eval mode)."""
        return {"params": self.params, **({"batch_stats": self.batch_stats} if self.batch_stats else {})}


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    """The optax chain of ``config``: warm-up + cosine schedule, SGD-momentum (coupled L2) or AdamW."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    total = config.epochs * steps_per_epoch
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    schedule = optax.warmup_cosine_decay_schedule(0.0 if warmup else config.lr, config.lr, max(warmup, 0), max(total, warmup + 1))
    if config.optimizer == "adam":
        return optax.adamw(schedule, weight_decay=config.weight_decay)
    return optax.chain(optax.add_decayed_weights(config.weight_decay), optax.sgd(schedule, momentum=config.momentum))


def init_state(model: nn.Module, key: Array, input_shape: Sequence[int], tx: optax.GradientTransformation,
               init: Optional[Callable[[PyTree, Array], PyTree]] = None) -> TrainState:
    """Initialises ``model`` for one example shape ``(H, W, C)`` (optionally re-initialised by ``init(params, key)``)."""
    if len(tuple(input_shape)) != 3:
        raise ValueError(f"input_shape must be one example's (H, W, C), got {tuple(input_shape)}")
    k_init, k_re = jax.random.split(key)
    variables = model.init(k_init, jnp.zeros((1, *input_shape), jnp.float32))
    params = variables["params"]
    if init is not None:
        params = init(params, k_re)
    stats = variables.get("batch_stats", {})
    return TrainState(params=params, batch_stats=stats, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32))


def soft_cross_entropy(logits: Array, targets: Array) -> Array:
    """Mean over the batch of ``-sum_k y_k log softmax(z)_k``; ``logits``, ``targets`` ``(N, K)``."""
    if logits.shape != targets.shape:
        raise ValueError(f"logits {logits.shape} and targets {targets.shape} must have the same shape (N, K)")
    return jnp.mean(-jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1))


def augment(key: Array, images: Array, pad: int = 4) -> Array:
    """Random crop after zero padding by ``pad`` and random horizontal flip, per image of ``(N, H, W, C)``."""
    n, h, w, _ = images.shape
    k_off, k_flip = jax.random.split(key)
    offsets = jax.random.randint(k_off, (n, 2), 0, 2 * pad + 1)
    flips = jax.random.bernoulli(k_flip, 0.5, (n,))
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def one(img, off, flip):
        crop = jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, img.shape[-1]))
        return jnp.where(flip, crop[:, ::-1], crop)

    return jax.vmap(one)(padded, offsets, flips)


def batch_targets(key: Array, images: Array, classes: Array, num_classes: int, config: TrainConfig) -> tuple[Array, Array]:
    """The training inputs and soft targets ``(N, K)`` of one batch under ``config.regime``.

    Smoothing: ``jaxleak.labels.smooth`` with ``config.epsilon``. Mixup: ``mu ~ Beta(alpha, alpha)``
    once per batch, ``x = (1 - mu) x + mu x[perm]`` and likewise for the one-hot targets.
    """
    if config.regime == "smoothing":
        return images, _labels.smooth(classes, num_classes, config.epsilon)
    onehot = _labels.one_hot(classes, num_classes)
    if config.regime == "hard":
        return images, onehot
    k_mu, k_perm = jax.random.split(key)
    mu = jax.random.beta(k_mu, config.alpha, config.alpha)
    perm = jax.random.permutation(k_perm, images.shape[0])
    return _labels.mixup(images, images[perm], onehot, onehot[perm], jnp.full((images.shape[0],), mu))


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, config: TrainConfig, num_classes: int):
    """A jitted ``train_step(state, batch, key) -> (state, metrics)``; ``batch = (images (N,H,W,C), classes (N,))``.

    Runs the model in train mode (BatchNorm batch statistics, their running
    averages updated; dropout with the ``"dropout"`` rng), soft-label CE on the
    regime's targets. ``metrics``: ``loss`` and ``accuracy`` (argmax vs the
    dominant target class) of the batch.
    """

    def loss_fn(params, batch_stats, x, targets, k_drop):
        variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
        mutable = ["batch_stats"] if batch_stats else False
        out = model.apply(variables, x, train=True, rngs={"dropout": k_drop}, mutable=mutable)
        logits, updates = out if mutable else (out, {})
        return soft_cross_entropy(logits, targets), (logits, updates.get("batch_stats", batch_stats))

    @jax.jit
    def train_step(state: TrainState, batch: tuple[Array, Array], key: Array):
        images, classes = batch
        k_aug, k_mix, k_drop = jax.random.split(key, 3)
        if config.augment:
            images = augment(k_aug, images)
        x, targets = batch_targets(k_mix, images, classes, num_classes, config)
        (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.batch_stats, x, targets, k_drop)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        acc = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(targets, -1))
        new = TrainState(params=params, batch_stats=stats, opt_state=opt_state, step=state.step + 1)
        return new, {"loss": loss, "accuracy": acc}

    return train_step


def evaluate(model: nn.Module, variables: PyTree, images: Array, classes: Array, *, batch_size: int = 256) -> dict[str, float]:
    """Eval-mode accuracy and hard-label CE on ``images (N, H, W, C)``, ``classes (N,)``."""
    images, classes = np.asarray(images), np.asarray(classes)
    if images.ndim != 4 or classes.shape != (images.shape[0],):
        raise ValueError(f"images must be (N, H, W, C) and classes (N,), got {images.shape} and {classes.shape}")
    apply = jax.jit(lambda v, x: model.apply(v, x))
    correct, total_loss = 0, 0.0
    for s in range(0, len(images), batch_size):
        logits = apply(variables, jnp.asarray(images[s:s + batch_size]))
        y = classes[s:s + batch_size]
        correct += int(np.sum(np.asarray(jnp.argmax(logits, -1)) == y))
        total_loss += float(-jnp.sum(jax.nn.log_softmax(logits)[np.arange(len(y)), y]))
    n = max(1, len(images))
    return {"accuracy": correct / n, "loss": total_loss / n}


def train_epoch(train_step, state: TrainState, key: Array, images: np.ndarray, classes: np.ndarray,
                batch_size: int) -> tuple[TrainState, dict[str, float]]:
    """One pass over shuffled data in full batches (the ragged tail is dropped, one compiled shape)."""
    n = len(images)
    if n < batch_size:
        raise ValueError(f"need at least batch_size = {batch_size} training images, got {n}")
    k_perm, k_steps = jax.random.split(key)
    order = np.asarray(jax.random.permutation(k_perm, n))
    losses, accs = [], []
    for i, s in enumerate(range(0, n - batch_size + 1, batch_size)):
        idx = order[s:s + batch_size]
        state, m = train_step(state, (jnp.asarray(images[idx]), jnp.asarray(classes[idx])), jax.random.fold_in(k_steps, i))
        losses.append(m["loss"])
        accs.append(m["accuracy"])
    return state, {"loss": float(np.mean(jax.device_get(losses))), "accuracy": float(np.mean(jax.device_get(accs)))}


def stratified_split(classes: np.ndarray, test_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed train/test index split: ``test_per_class`` random images of each class go to test.

    Returns ``(train_idx, test_idx)``, both sorted int64.
    """
    classes = np.asarray(classes)
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(classes):
        members = np.flatnonzero(classes == c)
        if len(members) <= test_per_class:
            raise ValueError(f"test_per_class = {test_per_class} leaves no training image of class {c} ({len(members)} images)")
        test.append(rng.choice(members, test_per_class, replace=False))
    test = np.sort(np.concatenate(test)).astype(np.int64)
    train = np.setdiff1d(np.arange(len(classes)), test).astype(np.int64)
    return train, test


# --------------------------------------------------------------------------
# Checkpoints: msgpack weights (+ optional optimiser state) and a JSON recipe
# --------------------------------------------------------------------------


def _sidecar(path: pathlib.Path) -> pathlib.Path:
    return path.with_suffix(".json")


def save_checkpoint(path: str | os.PathLike, variables: PyTree, recipe: dict, *, state: Optional[TrainState] = None) -> pathlib.Path:
    """Writes ``variables`` to ``path`` (``.msgpack``), ``recipe`` to the ``.json`` beside it.

    With ``state`` the full :class:`TrainState` goes to ``<path>.state`` too, so
    training can resume (:func:`load_state`). Files are written atomically.
    """
    path = pathlib.Path(path)
    if path.suffix != ".msgpack":
        raise ValueError(f"path must end in .msgpack, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(p: pathlib.Path, data: bytes):
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, p)

    write(path, flax.serialization.msgpack_serialize(jax.device_get(flax.serialization.to_state_dict(variables))))
    if state is not None:
        write(path.with_name(path.name + ".state"), flax.serialization.to_bytes(jax.device_get(state)))
    write(_sidecar(path), json.dumps(recipe, indent=2, sort_keys=True, default=_json_default).encode())
    return path


def _json_default(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def load_checkpoint(path: str | os.PathLike) -> tuple[dict, dict]:
    """Reads ``(variables, recipe)`` written by :func:`save_checkpoint` (arrays as ``jnp`` arrays)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no checkpoint at {str(path)!r}")
    variables = flax.serialization.msgpack_restore(path.read_bytes())
    variables = jax.tree_util.tree_map(jnp.asarray, variables)
    side = _sidecar(path)
    recipe = json.loads(side.read_text()) if side.exists() else {}
    return variables, recipe


def load_state(path: str | os.PathLike, template: TrainState) -> Optional[TrainState]:
    """The :class:`TrainState` saved beside checkpoint ``path`` (``None`` if there is none)."""
    p = pathlib.Path(path)
    p = p.with_name(p.name + ".state")
    if not p.exists():
        return None
    return flax.serialization.from_bytes(template, p.read_bytes())


__all__ = [
    "REGIMES", "TrainConfig", "TrainState", "make_optimizer", "init_state", "soft_cross_entropy", "augment",
    "batch_targets", "make_train_step", "evaluate", "train_epoch", "stratified_split",
    "save_checkpoint", "load_checkpoint", "load_state",
]
