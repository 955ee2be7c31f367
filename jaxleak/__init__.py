"""jaxleak: gradient-leakage attacks on federated learning in pure functional JAX.

Layers (one-way): ``models``/``labels`` -> ``victims`` (shared gradients) ->
``recovery``/``inversion`` (analytic read-outs) -> ``objectives`` (what gradient
matching minimises) -> ``attacks`` (how: ``lbfgs``, the loops) -> ``metrics`` ->
``report`` -> ``audit`` (the main job) -> ``cli``.
``data`` feeds images to the victims; ``train`` makes trained victims; ``processes`` runs
victims over pinned single-device worker processes (``map_victims(strategy="processes")``).
"""

from jaxleak import (attacks, data, inversion, labels, lbfgs, metrics, models, objectives, processes, recovery, report,
                     train, victims)
from jaxleak.attacks import attack_victims, dlg, given_label, idlg, inverting_gradients
from jaxleak.labels import mixup, one_hot, smooth
from jaxleak.metrics import fidelity_curve, label_accuracy, mse, psnr, ssim
from jaxleak.models import FCN4, AlexNet, LeNet, ResNet18, ResNet50, last_layer
from jaxleak.recovery import idlg_label, soft_label
from jaxleak.victims import cross_entropy, gradient, gradients, init_victims, map_victims

__version__ = "0.1.0"

__all__ = [
    "attacks", "data", "inversion", "labels", "lbfgs", "metrics", "models", "objectives", "processes", "recovery", "report", "train",
    "victims",
    "attack_victims", "dlg", "given_label", "idlg", "inverting_gradients",
    "one_hot", "smooth", "mixup",
    "mse", "psnr", "ssim", "label_accuracy", "fidelity_curve",
    "LeNet", "FCN4", "AlexNet", "ResNet18", "ResNet50", "last_layer",
    "idlg_label", "soft_label",
    "cross_entropy", "gradient", "gradients", "init_victims", "map_victims",
]
