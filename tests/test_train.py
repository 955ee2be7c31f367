"""The optax training loop: loss goes down, smoothing/mixup targets, BatchNorm stats, checkpoints."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxleak import labels, models, train

K = 4
SHAPE = (8, 8, 3)


class TinyBN(nn.Module):
    """A conv + BatchNorm + bias-free head: exercises batch_stats in train mode."""

    num_classes: int = K

    @nn.compact
    def __call__(self, x, *, return_feature=False, train=False):
        x = nn.Conv(4, (3, 3), name="conv")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x))
        h = jnp.mean(x, axis=(1, 2))
        logits = nn.Dense(self.num_classes, use_bias=False, name="head")(h)
        return (logits, h) if return_feature else logits


def _data(n=64):
    key = jax.random.PRNGKey(0)
    classes = jnp.arange(n) % K
    # Class-dependent mean per channel: learnable in a few steps.
    x = jax.random.normal(key, (n, *SHAPE)) * 0.5 + (classes[:, None, None, None] - 1.5)
    return x, classes


@pytest.mark.parametrize("regime", ["smoothing", "mixup"])
def test_few_steps_reduce_loss(regime):
    cfg = train.TrainConfig(regime=regime, epochs=1, batch_size=32, lr=3e-2, augment=False, weight_decay=0.0)
    model = TinyBN()
    tx = optax.adam(3e-2)
    state = train.init_state(model, jax.random.PRNGKey(1), SHAPE, tx)
    step = train.make_train_step(model, tx, cfg, K)
    x, y = _data(32)
    # Evaluate the loss with a fixed key so the mixup draw is the same before and after.
    key = jax.random.PRNGKey(7)
    x_t, t = train.batch_targets(key, x, y, K, cfg)

    def loss(s):
        logits, _ = model.apply({"params": s.params, "batch_stats": s.batch_stats}, x_t, train=True, mutable=["batch_stats"])
        return float(train.soft_cross_entropy(logits, t))

    before = loss(state)
    stats0 = state.batch_stats
    for i in range(15):
        state, m = step(state, (x, y), jax.random.fold_in(key, i))
    assert loss(state) < 0.8 * before
    assert int(state.step) == 15
    # BatchNorm running statistics moved in train mode.
    assert not np.allclose(state.batch_stats["bn"]["mean"], stats0["bn"]["mean"])


def test_smoothing_loss_is_ce_with_smoothed_targets():
    eps = 0.2
    cfg = train.TrainConfig(regime="smoothing", epsilon=eps)
    logits = jax.random.normal(jax.random.PRNGKey(0), (5, K))
    y = jnp.array([0, 1, 2, 3, 1])
    _, t = train.batch_targets(jax.random.PRNGKey(1), jnp.zeros((5, *SHAPE)), y, K, cfg)
    np.testing.assert_allclose(t, labels.smooth(y, K, eps), atol=1e-7)
    # Independent float64 oracle.
    with jax.enable_x64(True):
        z = np.asarray(logits, np.float64)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        tt = (1 - eps) * np.eye(K)[np.asarray(y)] + eps / K
        want = np.mean(-(tt * logp).sum(1))
    np.testing.assert_allclose(float(train.soft_cross_entropy(logits, t)), want, rtol=1e-5)


def test_mixup_targets_are_convex_pairs():
    cfg = train.TrainConfig(regime="mixup", alpha=1.0, augment=False)
    x, y = _data(16)
    key = jax.random.PRNGKey(3)
    xm, t = train.batch_targets(key, x, y, K, cfg)
    np.testing.assert_allclose(t.sum(1), 1.0, atol=1e-6)
    assert int(jnp.max(jnp.sum(t > 1e-6, axis=1))) <= 2
    # One mu per batch, one permutation: inputs and targets mixed with the same weights.
    k_mu, k_perm = jax.random.split(key)
    mu = jax.random.beta(k_mu, 1.0, 1.0)
    perm = jax.random.permutation(k_perm, 16)
    np.testing.assert_allclose(xm, (1 - mu) * x + mu * x[perm], atol=1e-5)
    onehot = np.eye(K)[np.asarray(y)]
    np.testing.assert_allclose(t, (1 - mu) * onehot + mu * onehot[np.asarray(perm)], atol=1e-6)


def test_augment_is_a_crop_or_flip_of_the_padded_image():
    x = jax.random.uniform(jax.random.PRNGKey(0), (6, *SHAPE))
    out = train.augment(jax.random.PRNGKey(1), x, pad=0)
    for i in range(6):
        assert np.allclose(out[i], x[i]) or np.allclose(out[i], x[i][:, ::-1])


def test_checkpoint_round_trip(tmp_path):
    model = TinyBN()
    tx = optax.sgd(0.1, momentum=0.9)
    state = train.init_state(model, jax.random.PRNGKey(0), SHAPE, tx)
    step = train.make_train_step(model, tx, train.TrainConfig(regime="smoothing", augment=False), K)
    x, y = _data(32)
    state, _ = step(state, (x, y), jax.random.PRNGKey(2))
    recipe = {"model": "tiny", "test_accuracy": 0.5, "indices": np.arange(3)}
    path = train.save_checkpoint(tmp_path / "ck.msgpack", state.variables, recipe, state=state)
    variables, rec = train.load_checkpoint(path)
    assert rec["test_accuracy"] == 0.5 and rec["indices"] == [0, 1, 2]
    assert json.loads((tmp_path / "ck.json").read_text())["model"] == "tiny"
    for a, b in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(state.variables)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(model.apply(variables, x), model.apply(state.variables, x))
    fresh = train.init_state(model, jax.random.PRNGKey(9), SHAPE, tx)
    restored = train.load_state(path, fresh)
    assert int(restored.step) == 1
    for a, b in zip(jax.tree_util.tree_leaves(restored.opt_state), jax.tree_util.tree_leaves(state.opt_state)):
        np.testing.assert_array_equal(a, b)


def test_stratified_split_and_bad_config():
    classes = np.repeat(np.arange(10), 200)
    tr, te = train.stratified_split(classes, 40, seed=0)
    assert len(te) == 400 and len(tr) == 1600 and not set(tr) & set(te)
    assert np.all(np.bincount(classes[te]) == 40)
    np.testing.assert_array_equal(te, train.stratified_split(classes, 40, seed=0)[1])
    with pytest.raises(ValueError, match="regime"):
        train.TrainConfig(regime="distill")
    with pytest.raises(ValueError, match="epsilon"):
        train.TrainConfig(epsilon=1.5)
    with pytest.raises(ValueError, match="msgpack"):
        train.save_checkpoint("/tmp/x.bin", {}, {})


def test_lenet_head_is_bias_free_and_trains():
    model = models.LeNet(num_classes=K, head_bias=False)
    tx = optax.adam(1e-2)
    state = train.init_state(model, jax.random.PRNGKey(0), (32, 32, 3), tx)
    assert "bias" not in state.params["head"] and state.batch_stats == {}
    step = train.make_train_step(model, tx, train.TrainConfig(regime="mixup", augment=True), K)
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 32, 32, 3))
    state, m = step(state, (x, jnp.arange(8) % K), jax.random.PRNGKey(2))
    assert np.isfinite(float(m["loss"]))
