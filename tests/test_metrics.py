"""Metrics against independent numpy/skimage computations."""

import jax.numpy as jnp
import numpy as np
import pytest
from skimage.metrics import structural_similarity

import jaxleak as jl
from jaxleak import metrics


def test_mse_and_psnr_against_numpy():
    rng = np.random.default_rng(0)
    a = rng.uniform(size=(3, 8, 8, 3)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1).astype(np.float32)
    m = ((a - b) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(jl.mse(a, b), m, rtol=1e-5)
    np.testing.assert_allclose(jl.psnr(a, b), 10 * np.log10(1 / m), rtol=1e-5)
    np.testing.assert_allclose(jl.psnr(a[0], b[0]), 10 * np.log10(1 / m[0]), rtol=1e-5)
    np.testing.assert_allclose(jl.psnr(255 * a, 255 * b, data_range=255.0), 10 * np.log10(1 / m), rtol=1e-4)


def test_psnr_clamps_to_range_but_mse_does_not():
    a = np.zeros((4, 4, 1), np.float32)
    b = np.full((4, 4, 1), 2.0, np.float32)
    assert float(jl.mse(a, b)) == 4.0
    np.testing.assert_allclose(jl.psnr(a, b), 0.0, atol=1e-6)  # clamped to 1 -> MSE 1


def test_ssim_agrees_with_skimage_gaussian_window():
    rng = np.random.default_rng(1)
    a = rng.uniform(size=(32, 32, 3)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1).astype(np.float32)
    ref = structural_similarity(a, b, channel_axis=2, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False)
    np.testing.assert_allclose(float(jl.ssim(a, b)), ref, atol=2e-3)
    np.testing.assert_allclose(float(jl.ssim(a, a)), 1.0, atol=1e-5)


def test_fidelity_curve_and_label_accuracy():
    mses = [1e-5, 3e-4, 2e-3, 0.5, float("nan")]
    curve = jl.fidelity_curve(mses)
    assert list(curve) == ["0.01", "0.005", "0.001", "0.0005", "0.0001"]
    assert curve == {"0.01": 0.6, "0.005": 0.6, "0.001": 0.4, "0.0005": 0.4, "0.0001": 0.2}
    assert jl.label_accuracy(np.array([1, 2, 3]), np.array([1, 0, 3])) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="shapes differ"):
        jl.label_accuracy(np.array([1]), np.array([1, 2]))
    with pytest.raises(ValueError, match="shapes differ"):
        jl.mse(jnp.zeros((2, 2, 1)), jnp.zeros((2, 3, 1)))


def test_psnr_uint8_is_paper_2s_truncated_metric():
    """floor(255 v) quantisation (ToPILImage), data_range 256: one pixel one level off in an N-pixel image
    gives 10 log10(256^2 N); a float-exact value a hair below a level lands one level lower."""
    x = np.full((4, 4, 3), 100.5 / 255)  # level 100
    y = x.copy()
    y[0, 0, 0] = 101.5 / 255  # level 101
    np.testing.assert_allclose(metrics.psnr_uint8(x, y), 10 * np.log10(256.0**2 * 48))
    assert metrics.psnr_uint8(x, x) == float("inf")
    hair = np.full((4, 4, 3), (101 - 1e-6) / 255)  # 1e-6/255 below level 101: truncated to 100
    np.testing.assert_allclose(metrics.psnr_uint8(hair, np.full_like(x, 101.5 / 255)), 10 * np.log10(256.0**2))
    batch = metrics.psnr_uint8(np.stack([x, x]), np.stack([y, x]))
    assert batch.shape == (2,) and batch[1] == float("inf")
    np.testing.assert_allclose(metrics.psnr_uint8(np.full_like(x, 2.0), np.ones_like(x)), np.inf)  # clamped first
    with pytest.raises(ValueError, match="psnr_uint8"):
        metrics.psnr_uint8(x, x[:2])
