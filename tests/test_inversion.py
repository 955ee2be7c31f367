"""Analytic FCN inversion (Wang, Liang, He 2024, §4.9(a)): exact recovery on constructed victims."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxleak import inversion, labels, metrics, models, victims

SHAPE = (8, 8, 3)
K = 10
WIDTHS = (64, 32, 16)


@pytest.fixture(scope="module")
def fcn():
    model = models.FCN4(num_classes=K, widths=WIDTHS)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, *SHAPE)))
    variables = models.init_torch_default(variables, jax.random.PRNGKey(1))
    return model, variables


def _cases():
    """Three victims in [0, 1]: one-hot, smoothed (eps 0.3) and mixed (mu 0.35) labels."""
    xs = jax.random.uniform(jax.random.PRNGKey(2), (3, *SHAPE))
    ys = jnp.stack([
        labels.one_hot(jnp.array(3), K),
        labels.smooth(jnp.array(7), K, 0.3),
        labels.mixup(xs[0], xs[1], labels.one_hot(jnp.array(1), K), labels.one_hot(jnp.array(4), K), 0.35)[1],
    ])
    xs = xs.at[2].set(0.65 * xs[0] + 0.35 * xs[1])
    return xs, ys


@pytest.fixture(scope="module")
def victims_data(fcn):
    model, variables = fcn
    xs, ys = _cases()
    grads = victims.gradients(model.apply, variables, xs, ys)
    feats = jax.vmap(lambda x: victims.feature(model.apply, variables, x))(xs)
    return xs, ys, grads, feats


def _one(variables, g, h):
    return inversion.invert_fcn4(variables, g, h, SHAPE)


def test_exact_recovery_from_true_feature(fcn, victims_data):
    _, variables = fcn
    xs, _, grads, feats = victims_data
    for i in range(3):
        g = jax.tree_util.tree_map(lambda a: a[i], grads)
        x_hat = _one(variables, g, feats[i])
        err = float(jnp.max(jnp.abs(x_hat - xs[i])))
        assert err < 1e-4, (i, err)
        assert float(metrics.psnr(x_hat, xs[i])) > 60.0


def test_intermediate_features_and_residuals(fcn, victims_data):
    model, variables = fcn
    xs, ys, grads, feats = victims_data
    g = jax.tree_util.tree_map(lambda a: a[1], grads)
    out = inversion.invert_fcn(inversion.fcn_kernels(variables), inversion.fcn_kernels(g), feats[1])
    # Independent forward pass: the hidden activations of the true image.
    _, state = model.apply(variables, xs[1][None], capture_intermediates=True, mutable=["intermediates"])
    inter = state["intermediates"]
    for l, name in enumerate(("fc1", "fc2", "fc3")):
        h_true = jax.nn.relu(inter[name]["__call__"][0][0])
        np.testing.assert_allclose(out.features[l + 1], h_true, atol=1e-4, rtol=1e-4)
    logits = model.apply(variables, xs[1][None])[0]
    np.testing.assert_allclose(out.deltas[-1], jax.nn.softmax(logits) - ys[1], atol=1e-5)
    assert float(jnp.max(out.residuals)) < 1e-3
    # A wrong feature (right support, wrong values) cannot fit every layer's rank-1 gradient.
    wrong = feats[1] * jax.random.uniform(jax.random.PRNGKey(5), feats[1].shape, minval=0.5, maxval=1.5)
    bad = inversion.invert_fcn(inversion.fcn_kernels(variables), inversion.fcn_kernels(g), wrong)
    assert float(jnp.max(bad.residuals)) > 1e-2


def test_feature_scale_scales_input(fcn, victims_data):
    _, variables = fcn
    xs, _, grads, feats = victims_data
    g = jax.tree_util.tree_map(lambda a: a[0], grads)
    np.testing.assert_allclose(_one(variables, g, 2.5 * feats[0]), 2.5 * xs[0], atol=3e-4, rtol=1e-3)


def test_float64_oracle_is_tighter(fcn, victims_data):
    _, variables = fcn
    xs, ys, _, _ = victims_data
    model = models.FCN4(num_classes=K, widths=WIDTHS)
    with jax.enable_x64(True):
        v64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), variables)
        x64, y64 = jnp.asarray(xs[1], jnp.float64), jnp.asarray(ys[1], jnp.float64)
        g = victims.gradient(model.apply, v64, x64, y64)
        h = victims.feature(model.apply, v64, x64)
        x_hat = inversion.invert_fcn4(v64, g, h, SHAPE)
        assert x_hat.dtype == jnp.float64
        assert float(jnp.max(jnp.abs(x_hat - x64))) < 1e-10


def test_vmap_and_jit_agree_with_loop(fcn, victims_data):
    _, variables = fcn
    xs, _, grads, feats = victims_data
    batched = jax.jit(jax.vmap(_one, in_axes=(None, 0, 0)))(variables, grads, feats)
    for i in range(3):
        g = jax.tree_util.tree_map(lambda a: a[i], grads)
        np.testing.assert_allclose(batched[i], _one(variables, g, feats[i]), atol=1e-6)
    assert float(jnp.max(jnp.abs(batched - xs))) < 1e-4


def test_dead_layer_gives_zeros_not_nan():
    W = [jnp.ones((4, 3)), jnp.ones((3, 5))]
    G = [jnp.zeros((4, 3)), jnp.zeros((3, 5))]
    out = inversion.invert_fcn(W, G, jnp.zeros(3))
    assert bool(jnp.all(jnp.isfinite(out.x))) and float(jnp.max(jnp.abs(out.x))) == 0.0


def test_end_to_end_with_recovered_feature(fcn, victims_data):
    recovery = pytest.importorskip("jaxleak.recovery")
    _, variables = fcn
    xs, ys, grads, _ = victims_data
    W, _ = models.last_layer(variables)
    G, _ = models.last_layer(grads)
    for i, kind in ((1, "smoothing"), (2, "mixup")):
        res = recovery.soft_label(G[i], W, kind=kind)
        assert bool(res.ok), (kind, int(res.reason))
        np.testing.assert_allclose(res.label, ys[i], atol=1e-3)
        g = jax.tree_util.tree_map(lambda a: a[i], grads)
        x_hat = _one(variables, g, res.feature)
        assert float(metrics.psnr(x_hat, xs[i])) > 40.0, kind


def test_bad_inputs_raise(fcn):
    _, variables = fcn
    ks = inversion.fcn_kernels(variables)
    with pytest.raises(ValueError, match="same layers"):
        inversion.invert_fcn(ks, ks[:-1], jnp.zeros(WIDTHS[-1]))
    with pytest.raises(ValueError, match="feature"):
        inversion.invert_fcn(ks, ks, jnp.zeros(WIDTHS[-1] + 1))
    with pytest.raises(ValueError, match="input size"):
        inversion.invert_fcn([ks[0], ks[2]], [ks[0], ks[2]], jnp.zeros(WIDTHS[-1]))
    with pytest.raises(ValueError, match="image_shape"):
        inversion.invert_fcn4(variables, variables, jnp.zeros(WIDTHS[-1]), (8, 8, 4))
    with pytest.raises(ValueError, match="FCN4"):
        inversion.fcn_kernels({"params": {"conv1": {"kernel": ks[0]}, "head": {"kernel": ks[-1]}}})
    with pytest.raises(ValueError, match="bias"):
        inversion.fcn_kernels({"fc1": {"kernel": ks[0], "bias": jnp.zeros(WIDTHS[0])}, "head": {"kernel": ks[-1]}})


@pytest.mark.slow
def test_fcn4_experiment_end_to_end(shared_data, tmp_path):
    """The Flowers-17 FCN-4 experiment (T10) on 2 victims per regime: every image above 40 dB."""
    import importlib.util
    import json
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "fcn4_reconstruction.py"
    spec = importlib.util.spec_from_file_location("fcn4_reconstruction", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.run(2, tmp_path, kinds=("smoothing", "mixup"), dlg=False, npz_dir=shared_data, log=lambda *a: None)
    assert min(res["analytic"]["psnr"]) > 40.0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["analytic"]["psnr"]) == 4 and saved["dlg"]["psnr"] == []
    assert (tmp_path / "fcn4_grid_smoothing.png").exists()
