"""Train soft-label victims, resumable in chunks of epochs.

Paper 2 (Wang, Liang, He, ICLR 2024) attacks networks trained with label
smoothing or mixup (ALGORITHMS.md §5.3): LeNet and the CIFAR ResNet18 on
CIFAR-10, AlexNet and the CIFAR ResNet18 on Flowers-17. Their checkpoints are
unavailable, so we train our own with :mod:`jaxleak.train`. Data (§4.10: every
dataset normalised with the CIFAR-10 statistics), split by
:func:`jaxleak.train.stratified_split` with seed 0:

* ``cifar10``: the shared CIFAR-10 subset (2,000 images, 200 per class) -> 1,600 train / 400 test (40 per class);
* ``flowers17``: the whole Flowers-17 set at 64x64 (1,360 images, 80 per class; the paper: 224x224)
  -> 1,020 train / 340 test (20 per class).

Checkpoints (never committed) go to ``results/checkpoints/<model>_<regime>_<dataset>.msgpack``
with a JSON recipe.

    python experiments/train_victims.py --model lenet --regime mixup --epochs 30
    python experiments/train_victims.py --model resnet18 --regime smoothing --epochs 8 --max-seconds 200
    python experiments/train_victims.py --model alexnet --dataset flowers17 --regime mixup --epochs 20 --max-seconds 1200
    python experiments/train_victims.py --model resnet18 --dataset flowers17 --size 32 --regime mixup --epochs 8 --max-seconds 900

(The CIFAR ResNet18 keeps full resolution through its first stage: at 64x64 one
epoch of Flowers-17 takes over 8 minutes on a 2-core CPU, so there it is trained
at 32x32 unless a GPU is at hand.)

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
#: Held-out images per class, by dataset (the victims of ``trained_recovery.py`` come from there).
TEST_PER_CLASS = {"cifar10": 40, "flowers17": 20}
DATASET_NOTE = {"cifar10": "cifar10_subset.npz (shared/data: 2,000 images, 200/class)",
                "flowers17": "flowers17_64.npz (shared/data: 1,360 images at 64x64, 80/class)"}

#: Per-model recipes (the paper's are unknown): Adam, cosine decay, crop+flip augmentation.
RECIPES = {
    "lenet": dict(optimizer="adam", lr=3e-3, batch_size=64, weight_decay=5e-4),
    "resnet18": dict(optimizer="adam", lr=2e-3, batch_size=64, weight_decay=5e-4),
    "alexnet": dict(optimizer="adam", lr=2e-4, batch_size=64, weight_decay=5e-4),
}
#: The networks paper 2 trained on each dataset (§5.3).
MODELS = {"cifar10": ("lenet", "resnet18"), "flowers17": ("alexnet", "resnet18")}


def build_model(name: str, num_classes: int):
    if name == "lenet":
        return models.LeNet(num_classes=num_classes, head_bias=False)  # paper 2's bias-free head (§5.3)
    if name == "resnet18":
        return models.ResNet18(num_classes, stem="cifar")  # paper 2's trained CIFAR variant (resnet.py)
    if name == "alexnet":
        return models.AlexNet(num_classes)  # torchvision features, bias-free head (§5.3)
    raise ValueError(f"model must be one of {sorted(RECIPES)}, got {name!r}")


def checkpoint_path(out: pathlib.Path, model: str, regime: str, dataset: str = "cifar10") -> pathlib.Path:
    return pathlib.Path(out) / f"{model}_{regime}_{dataset}.msgpack"


def load_split(npz_dir=None, dataset: str = "cifar10", size=None):
    """``(x_train, y_train, x_test, y_test, train_idx, test_idx, ds)``: normalised float32 NHWC, fixed split.

    ``size`` (an int or ``(h, w)``) resizes as paper 2 does (PIL bicubic, no crop); ``None`` keeps the stored size.
    """
    if dataset not in TEST_PER_CLASS:
        raise ValueError(f"dataset must be one of {sorted(TEST_PER_CLASS)}, got {dataset!r}")
    ds = data.load(dataset, npz_dir=npz_dir, source="npz", size=size)
    x = np.asarray(data.normalize(data.to_float(ds.images)))
    y = np.asarray(ds.labels)
    tr, te = train.stratified_split(y, TEST_PER_CLASS[dataset], SPLIT_SEED)
    return x[tr], y[tr], x[te], y[te], tr, te, ds


def run(model_name: str, regime: str, epochs: int, out: pathlib.Path = DEFAULT_OUT, *, max_seconds: float = 200.0,
        epsilon: float = 0.1, alpha: float = 1.0, seed: int = 0, npz_dir=None, dataset: str = "cifar10", size=None,
        log=print) -> dict:
    """Trains (or resumes) one victim until ``epochs`` or ``max_seconds``; returns the recipe written.

    ``size`` resizes the images first (see :func:`load_split`); the recipe records the input shape and
    ``trained_recovery.py`` attacks the victim at that size.
    """
    if model_name not in MODELS.get(dataset, ()):
        raise ValueError(f"paper 2 trains {MODELS.get(dataset, ())} on {dataset!r}, not {model_name!r}")
    t0 = time.time()
    x_tr, y_tr, x_te, y_te, tr_idx, te_idx, ds = load_split(npz_dir, dataset, size)
    k = ds.num_classes
    cfg = train.TrainConfig(regime=regime, epsilon=epsilon, alpha=alpha, epochs=epochs, seed=seed,
                            **RECIPES[model_name])
    model = build_model(model_name, k)
    steps_per_epoch = len(x_tr) // cfg.batch_size
    tx = train.make_optimizer(cfg, steps_per_epoch)
    state = train.init_state(model, jax.random.PRNGKey(seed), x_tr.shape[1:], tx)
    path = checkpoint_path(out, model_name, regime, dataset)
    done, history = 0, []
    if path.exists():
        _, recipe = train.load_checkpoint(path)
        same = recipe.get("config") == dataclasses.asdict(cfg) and recipe.get("input_shape", list(x_tr.shape[1:])) == list(x_tr.shape[1:])
        if same and recipe.get("epochs_done", 0) < epochs:
            restored = train.load_state(path, state)
            if restored is not None:
                state, done, history = restored, recipe["epochs_done"], recipe.get("history", [])
                log(f"resuming {path.name} at epoch {done}/{epochs}")
        elif same:
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
        "model": model_name, "architecture": type(model).__name__ + {"resnet18": "(stem=cifar)", "lenet": "(head_bias=False)"}.get(model_name, ""),
        "dataset": DATASET_NOTE[dataset], "dataset_name": dataset, "input_shape": list(x_tr.shape[1:]), "num_classes": k,
        "label_regime": regime, "epsilon": epsilon if regime == "smoothing" else None,
        "alpha": alpha if regime == "mixup" else None, "epochs": epochs, "epochs_done": done,
        "optimizer": f"{cfg.optimizer} (lr {cfg.lr}, cosine to 0, weight decay {cfg.weight_decay}, batch {cfg.batch_size})",
        "augmentation": "random crop (pad 4) + horizontal flip" if cfg.augment else "none",
        "preprocessing": "ToTensor + Normalize(CIFAR-10 mean/std)", "init": "flax default", "seed": seed,
        "config": dataclasses.asdict(cfg), "test_accuracy": ev["accuracy"], "test_loss": ev["loss"],
        "train_accuracy": tr_ev["accuracy"],
        "split": {"seed": SPLIT_SEED, "test_per_class": TEST_PER_CLASS[dataset], "train_indices": tr_idx, "test_indices": te_idx},
        "history": history, "jax": jax.__version__, "backend": jax.default_backend(),
    }
    train.save_checkpoint(path, state.variables, recipe, state=state)
    log(f"saved {path} (epoch {done}/{epochs}, test accuracy {ev['accuracy']:.3f}, train {tr_ev['accuracy']:.3f}, "
        f"{time.time() - t0:.0f}s)")
    return recipe


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(RECIPES), required=True, help="network to train (its recipe: RECIPES)")
    p.add_argument("--dataset", choices=sorted(MODELS), default="cifar10",
                   help="training data: cifar10 (lenet, resnet18) or flowers17 (alexnet, resnet18)")
    p.add_argument("--regime", choices=["smoothing", "mixup", "hard"], required=True, help="training labels")
    p.add_argument("--epochs", type=int, default=20, help="training epochs (at most)")
    p.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="checkpoint folder")
    p.add_argument("--max-seconds", type=float, default=200.0, help="stop (and save) after the epoch crossing this")
    p.add_argument("--epsilon", type=float, default=0.1, help="label-smoothing factor (regime smoothing)")
    p.add_argument("--alpha", type=float, default=1.0, help="mixup Beta(alpha, alpha) parameter (regime mixup)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and batches")
    p.add_argument("--size", type=int, default=None,
                   help="resize the images to SIZE x SIZE first (PIL bicubic; default: as stored, CIFAR 32, Flowers-17 64)")
    a = p.parse_args(argv)
    run(a.model, a.regime, a.epochs, a.out, max_seconds=a.max_seconds, epsilon=a.epsilon, alpha=a.alpha, seed=a.seed,
        dataset=a.dataset, size=a.size)
    return 0


if __name__ == "__main__":
    jax.config.update("jax_compilation_cache_dir", os.environ.get("JAX_COMPILATION_CACHE_DIR", "/tmp/jaxleak-jax-cache"))
    sys.exit(main())
