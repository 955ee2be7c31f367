"""jaxleak: gradient-leakage attacks on federated learning in pure functional JAX.

Layers (one-way): ``models``/``labels`` -> ``victims`` (shared gradients) ->
``recovery`` (analytic read-outs) -> ``attacks`` (gradient matching) ->
``metrics`` -> ``report`` -> ``cli``. ``data`` feeds images to the victims.
"""

from jaxleak import data, labels, metrics, models, report, victims
from jaxleak.labels import mixup, one_hot, smooth
from jaxleak.metrics import fidelity_curve, label_accuracy, mse, psnr, ssim
from jaxleak.models import FCN4, AlexNet, LeNet, ResNet18, ResNet50, last_layer
from jaxleak.victims import cross_entropy, gradient, gradients, init_victims

__version__ = "0.1.0"

__all__ = [
    "data", "labels", "metrics", "models", "report", "victims",
    "one_hot", "smooth", "mixup",
    "mse", "psnr", "ssim", "label_accuracy", "fidelity_curve",
    "LeNet", "FCN4", "AlexNet", "ResNet18", "ResNet50", "last_layer",
    "cross_entropy", "gradient", "gradients", "init_victims",
]
