"""Train soft-label victims (LeNet / CIFAR-ResNet18 on the CIFAR-10 subset), resumable in chunks of epochs.

Paper 2 (Wang, Liang, He, ICLR 2024) attacks networks trained with label
smoothing or mixup (ALGORITHMS.md §5.3); their checkpoints are unavailable, so
we train our own with :mod:`jaxleak.train`. Data: the shared CIFAR-10 subset
(2,000 images, 200 per class), split by :func:`jaxleak.train.stratified_split`
into 1,600 train / 400 test (40 per class, seed 0), normalised with the CIFAR-10
statistics (§4.10). Checkpoints (never committed) go to
``results/checkpoints/<model>_<regime>_cifar10.msgpack`` with a JSON recipe.

    python experiments/train_victims.py --model lenet --regime mixup --epochs 30
    python experiments/train_victims.py --model resnet18 --regime smoothing --epochs 8 --max-seconds 200

A run stops after the epoch that crosses ``--max-seconds`` and saves; running
the same command again resumes from the saved optimiser state.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
import time

import jax
import numpy as np

from jaxleak import data, models, train

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "results" / "checkpoints"
SPLIT_SEED = 0
TEST_PER_CLASS = 40

#: Per-model recipes (the paper's are unknown): Adam, cosine decay, crop+flip augmentation.
RECIPES = {
    "lenet": dict(optimizer="adam", lr=3e-3, batch_size=64, weight_decay=5e-4),
    "resnet18": dict(optimizer="adam", lr=2e-3, batch_size=64, weight_decay=5e-4),
}


def build_model(name: str, num_classes: int):
    if name == "lenet":
        return models.LeNet(num_classes=num_classes, head_bias=False)  # paper 2's bias-free head (§5.3)
    if name == "resnet18":
        return models.ResNet18(num_classes, stem="cifar")  # paper 2's trained CIFAR variant (resnet.py)
    raise ValueError(f"model must be 'lenet' or 'resnet18', got {name!r}")


def checkpoint_path(out: pathlib.Path, model: str, regime: str) -> pathlib.Path:
    return pathlib.Path(out) / f"{model}_{regime}_cifar10.msgpack"


def load_split(npz_dir=None):
    """``(x_train, y_train, x_test, y_test, train_idx, test_idx)``: normalised float32 NHWC, fixed split."""
    ds = data.load("cifar10", npz_dir=npz_dir, source="npz")
    x = np.asarray(data.normalize(data.to_float(ds.images)))
    y = np.asarray(ds.labels)
    tr, te = train.stratified_split(y, TEST_PER_CLASS, SPLIT_SEED)
    return x[tr], y[tr], x[te], y[te], tr, te, ds


def run(model_name: str, regime: str, epochs: int, out: pathlib.Path = DEFAULT_OUT, *, max_seconds: float = 200.0,
        epsilon: float = 0.1, alpha: float = 1.0, seed: int = 0, npz_dir=None, log=print) -> dict:
    """Trains (or resumes) one victim until ``epochs`` or ``max_seconds``; returns the recipe written."""
    t0 = time.time()
    x_tr, y_tr, x_te, y_te, tr_idx, te_idx, ds = load_split(npz_dir)
    k = ds.num_classes
    cfg = train.TrainConfig(regime=regime, epsilon=epsilon, alpha=alpha, epochs=epochs, seed=seed,
                            **RECIPES[model_name])
    model = build_model(model_name, k)
    steps_per_epoch = len(x_tr) // cfg.batch_size
    tx = train.make_optimizer(cfg, steps_per_epoch)
    state = train.init_state(model, jax.random.PRNGKey(seed), x_tr.shape[1:], tx)
    path = checkpoint_path(out, model_name, regime)
    done, history = 0, []
    if path.exists():
        _, recipe = train.load_checkpoint(path)
        if recipe.get("config") == dataclasses.asdict(cfg) and recipe.get("epochs_done", 0) < epochs:
            restored = train.load_state(path, state)
            if restored is not None:
                state, done, history = restored, recipe["epochs_done"], recipe.get("history", [])
                log(f"resuming {path.name} at epoch {done}/{epochs}")
        elif recipe.get("config") == dataclasses.asdict(cfg):
            log(f"{path.name} already trained for {recipe['epochs_done']} epochs: test accuracy {recipe['test_accuracy']:.3f}")
            return recipe
        else:
            log(f"{path.name} exists with another recipe: starting over")
    step = train.make_train_step(model, tx, cfg, k)
    key = jax.random.PRNGKey(seed + 1)
    while done < epochs:
        te0 = time.time()
        state, m = train.train_epoch(step, state, jax.random.fold_in(key, done), x_tr, y_tr, cfg.batch_size)
        done += 1
        ev = train.evaluate(model, state.variables, x_te, y_te)
        history.append({"epoch": done, "train_loss": m["loss"], "train_acc": m["accuracy"],
                        "test_acc": ev["accuracy"], "seconds": time.time() - te0})
        log(f"epoch {done}/{epochs}: train loss {m['loss']:.3f} acc {m['accuracy']:.3f} | test acc {ev['accuracy']:.3f} "
            f"({time.time() - te0:.1f}s)")
        if time.time() - t0 > max_seconds and done < epochs:
            log(f"time budget {max_seconds:.0f}s reached: saving at epoch {done}; rerun to continue")
            break
    ev = train.evaluate(model, state.variables, x_te, y_te)
    tr_ev = train.evaluate(model, state.variables, x_tr, y_tr)
    recipe = {
        "model": model_name, "architecture": type(model).__name__ + ("(stem=cifar)" if model_name == "resnet18" else "(head_bias=False)"),
        "dataset": "cifar10_subset.npz (shared/data: 2,000 images, 200/class)", "num_classes": k,
        "label_regime": regime, "epsilon": epsilon if regime == "smoothing" else None,
        "alpha": alpha if regime == "mixup" else None, "epochs": epochs, "epochs_done": done,
        "optimizer": f"{cfg.optimizer} (lr {cfg.lr}, cosine to 0, weight decay {cfg.weight_decay}, batch {cfg.batch_size})",
        "augmentation": "random crop (pad 4) + horizontal flip" if cfg.augment else "none",
        "preprocessing": "ToTensor + Normalize(CIFAR-10 mean/std)", "init": "flax default", "seed": seed,
        "config": dataclasses.asdict(cfg), "test_accuracy": ev["accuracy"], "test_loss": ev["loss"],
        "train_accuracy": tr_ev["accuracy"],
        "split": {"seed": SPLIT_SEED, "test_per_class": TEST_PER_CLASS, "train_indices": tr_idx, "test_indices": te_idx},
        "history": history, "jax": jax.__version__, "backend": jax.default_backend(),
    }
    train.save_checkpoint(path, state.variables, recipe, state=state)
    log(f"saved {path} (epoch {done}/{epochs}, test accuracy {ev['accuracy']:.3f}, train {tr_ev['accuracy']:.3f}, "
        f"{time.time() - t0:.0f}s)")
    return recipe


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(RECIPES), required=True, help="recipe (network and dataset) to train")
    p.add_argument("--regime", choices=["smoothing", "mixup", "hard"], required=True, help="training labels")
    p.add_argument("--epochs", type=int, default=20, help="training epochs (at most)")
    p.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="checkpoint folder")
    p.add_argument("--max-seconds", type=float, default=200.0, help="stop (and save) after the epoch crossing this")
    p.add_argument("--epsilon", type=float, default=0.1, help="label-smoothing factor (regime smoothing)")
    p.add_argument("--alpha", type=float, default=1.0, help="mixup Beta(alpha, alpha) parameter (regime mixup)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and batches")
    a = p.parse_args(argv)
    run(a.model, a.regime, a.epochs, a.out, max_seconds=a.max_seconds, epsilon=a.epsilon, alpha=a.alpha, seed=a.seed)
    return 0


if __name__ == "__main__":
    jax.config.update("jax_compilation_cache_dir", os.environ.get("JAX_COMPILATION_CACHE_DIR", "/tmp/jaxleak-jax-cache"))
    sys.exit(main())
