"""Reconstruction and label metrics: MSE, PSNR, SSIM (dm-pix), label accuracy, iDLG fidelity curves.

Images are NHWC (or HWC) floats with an explicit ``data_range``; reconstructions
are clamped to ``[0, data_range]`` before PSNR/SSIM (as one would before
saving them as pictures). MSE is computed unclamped, as the iDLG code does.
"""

from __future__ import annotations

from typing import Sequence

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

#: iDLG Figure 1 thresholds on the final MSE (pixels in [0, 1]).
FIDELITY_THRESHOLDS: tuple[float, ...] = (0.01, 0.005, 0.001, 0.0005, 0.0001)


def _as_batch(x: Array) -> Array:
    x = jnp.asarray(x)
    if x.ndim == 3:
        return x[None]
    if x.ndim != 4:
        raise ValueError(f"expected images (H, W, C) or (N, H, W, C), got shape {x.shape}")
    return x


def mse(x: Array, y: Array) -> Array:
    """Per-image mean squared error over all pixels: ``(N,)`` (or a scalar for one HWC image)."""
    x, y = jnp.asarray(x), jnp.asarray(y)
    if x.shape != y.shape:
        raise ValueError(f"mse: shapes differ, {x.shape} vs {y.shape}")
    axes = tuple(range(x.ndim - 3, x.ndim)) if x.ndim >= 3 else None
    return jnp.mean((x - y) ** 2, axis=axes)


def psnr(x: Array, y: Array, data_range: float = 1.0) -> Array:
    """Peak signal-to-noise ratio in dB, ``10 log10(range^2 / MSE)``, after clamping both to the range."""
    single = jnp.ndim(x) == 3
    x, y = _as_batch(x), _as_batch(y)
    x, y = jnp.clip(x, 0.0, data_range), jnp.clip(y, 0.0, data_range)
    out = 10.0 * jnp.log10(data_range**2 / jnp.mean((x - y) ** 2, axis=(1, 2, 3)))
    return out[0] if single else out


def psnr_uint8(x, y) -> np.ndarray:
    """Paper 2's PSNR (Wang, Liang, He, ICLR 2024; ALGORITHMS.md §4.9(b)), on images in [0, 1].

    Both images are clamped to [0, 1] and truncated to uint8 as ``ToPILImage`` does
    (``floor(255 v)``), then ``10 log10(256^2 / MSE)`` (skimage with ``data_range=256``).
    Truncation turns a float-exact reconstruction a hair below an integer level into an
    off-by-one pixel, which caps this PSNR near 50 dB: the paper's 51 dB. Per image
    ``(N,)`` (a float for one HWC image), ``inf`` where the quantised images are equal.
    Host-side numpy in float64, so the quantisation is exact.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim not in (3, 4):
        raise ValueError(f"psnr_uint8: expected two images (H, W, C) or (N, H, W, C) of one shape, got {x.shape} and {y.shape}")
    q = lambda a: np.floor(np.clip(a, 0.0, 1.0) * 255)
    mse = np.mean((q(x) - q(y)) ** 2, axis=(-3, -2, -1))
    with np.errstate(divide="ignore"):
        out = 10 * np.log10(256.0**2 / mse)
    return float(out) if x.ndim == 3 else out


def ssim(x: Array, y: Array, data_range: float = 1.0) -> Array:
    """Structural similarity (Wang et al. 2004) via ``dm_pix.ssim`` (11x11 Gaussian window, sigma 1.5).

    Images are scaled by ``1 / data_range`` and clamped to [0, 1] first.
    Windows larger than the image are shrunk to fit (e.g. 28x28 MNIST keeps 11).
    """
    single = jnp.ndim(x) == 3
    x, y = _as_batch(x), _as_batch(y)
    if x.shape != y.shape:
        raise ValueError(f"ssim: shapes differ, {x.shape} vs {y.shape}")
    x = jnp.clip(x / data_range, 0.0, 1.0)
    y = jnp.clip(y / data_range, 0.0, 1.0)
    size = min(11, x.shape[1], x.shape[2])
    out = dm_pix.ssim(x, y, max_val=1.0, filter_size=size)
    return out[0] if single else out


def label_accuracy(predicted: Array, truth: Array) -> float:
    """Fraction of victims whose recovered class index equals the true one."""
    predicted, truth = np.asarray(predicted), np.asarray(truth)
    if predicted.shape != truth.shape:
        raise ValueError(f"label_accuracy: shapes differ, {predicted.shape} vs {truth.shape}")
    return float(np.mean(predicted == truth)) if predicted.size else float("nan")


def fidelity_curve(mses: Array, thresholds: Sequence[float] = FIDELITY_THRESHOLDS) -> dict[str, float]:
    """iDLG Figure 1: the fraction of victims whose final MSE is below each threshold.

    Returns ``{str(threshold): fraction}`` (keys ``"0.01"``, ``"0.005"``, ...).
    Non-finite MSEs (diverged runs) count as failures.
    """
    mses = np.asarray(mses, dtype=np.float64)
    ok = np.isfinite(mses)
    return {str(t): float(np.mean(ok & (mses < t))) if mses.size else float("nan") for t in thresholds}
