"""Gradient-matching attacks: iDLG recovery, vmap == loop, masking, restarts, bad input."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxleak import attacks, lbfgs, models

SHAPE = (8, 8, 1)
K = 10  # SHAPE and K are those of the `tiny` fixture (conftest.py)


# ---------------------------------------------------------------- attacks


@pytest.fixture(scope="module")
def idlg_tiny(tiny):
    run = jax.jit(lambda k, p, g: attacks.idlg(k, tiny["model"].apply, p, g, SHAPE, config=attacks.PAPER))
    p, g = tiny["take"](tiny["params"], 0), tiny["take"](tiny["grads"], 0)
    return run(jax.random.PRNGKey(3), p, g)


def test_idlg_recovers_tiny_image(tiny, idlg_tiny):
    res = idlg_tiny
    assert int(res.label.argmax()) == 3
    assert float(jnp.mean((res.x - tiny["x"][0]) ** 2)) < 1e-4
    assert float(res.loss) < 1e-6
    # The paper's early stop: tested after steps 0, 10, 20, ... so the run count is 1 + a multiple of 10.
    assert int(res.steps) % 10 == 1 and int(res.steps) < 300
    hist = np.asarray(res.loss_history)
    assert np.all(np.isnan(hist[int(res.steps):])) and np.isfinite(hist[: int(res.steps)]).all()


def _few_steps(steps, **kw):
    # Two inner iterations per step: float32 vmap/loop drift stays ~1e-6 (JAX_NOTES.md: compare after 1-2 steps).
    return dataclasses.replace(attacks.PAPER, steps=steps, lbfgs=lbfgs.TorchLBFGSConfig(max_iter=2, max_eval=3), **kw)


@pytest.mark.parametrize("attack", ["idlg", "dlg"])
def test_vmap_equals_per_victim(tiny, attack):
    cfg = _few_steps(2)
    fn = lambda k, p, g: getattr(attacks, attack)(k, tiny["model"].apply, p, g, SHAPE, config=cfg)
    keys = jax.random.split(jax.random.PRNGKey(4), 2)
    batched = jax.jit(jax.vmap(fn))(keys, tiny["params"], tiny["grads"])
    single = jax.jit(fn)
    for i in range(2):
        one = single(keys[i], tiny["take"](tiny["params"], i), tiny["take"](tiny["grads"], i))
        np.testing.assert_allclose(batched.x[i], one.x, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(batched.loss[i], one.loss, rtol=1e-3)
        assert int(batched.evals[i]) == int(one.evals)


def test_masking_stops_finished_victims(tiny):
    fn = lambda k, p, g, cfg: attacks.idlg(k, tiny["model"].apply, p, g, SHAPE, config=cfg)
    keys = jax.random.split(jax.random.PRNGKey(5), 2)
    probe = _few_steps(1)
    losses = [float(jax.jit(fn, static_argnums=3)(keys[i], tiny["take"](tiny["params"], i),
                                                   tiny["take"](tiny["grads"], i), probe).loss) for i in range(2)]
    lo, hi = sorted(losses)
    cfg = _few_steps(4, stop_loss=float(np.sqrt(lo * hi)), check_every=1)
    batched = jax.jit(jax.vmap(lambda k, p, g: fn(k, p, g, cfg)))(keys, tiny["params"], tiny["grads"])
    finished = int(np.argmin(losses))
    assert int(batched.steps[finished]) == 1 and int(batched.steps[1 - finished]) >= 2
    single = jax.jit(fn, static_argnums=3)(keys[finished], tiny["take"](tiny["params"], finished),
                                           tiny["take"](tiny["grads"], finished), probe)
    np.testing.assert_allclose(batched.x[finished], single.x, rtol=1e-3, atol=1e-4)


def test_driver_loop_equals_vmap_and_scores(tiny):
    cfg = _few_steps(1)
    kw = dict(config=cfg, x_true=tiny["x"])
    a = attacks.attack_victims("idlg", jax.random.PRNGKey(6), tiny["model"].apply, tiny["params"], tiny["grads"],
                               SHAPE, strategy="vmap", **kw)
    b = attacks.attack_victims("idlg", jax.random.PRNGKey(6), tiny["model"].apply, tiny["params"], tiny["grads"],
                               SHAPE, strategy="loop", **kw)
    np.testing.assert_allclose(a["reconstruction"], b["reconstruction"], rtol=1e-4, atol=1e-4)
    assert a["label_index"].tolist() == [3, 7]
    for name in ("mse", "psnr", "ssim", "loss_history", "snapshots"):
        assert a[name].shape[0] == 2
    np.testing.assert_allclose(a["mse"], np.mean((a["reconstruction"] - np.asarray(tiny["x"])) ** 2, axis=(1, 2, 3)), rtol=1e-5)


@pytest.mark.parametrize("config", [
    dataclasses.replace(attacks.OPTAX_LBFGS, steps=30),
    dataclasses.replace(attacks.INVERTING_GRADIENTS, steps=30, box=(0.0, 1.0), signed=True),
])
def test_first_order_modes_decrease_the_objective(tiny, config):
    p, g = tiny["take"](tiny["params"], 0), tiny["take"](tiny["grads"], 0)
    res = jax.jit(lambda k: attacks.given_label(k, tiny["model"].apply, p, g, SHAPE, tiny["y"][0], config))(jax.random.PRNGKey(7))
    hist = np.asarray(res.loss_history)
    assert hist[-1] < hist[0]
    if config.box is not None:
        assert float(res.x.min()) >= 0.0 and float(res.x.max()) <= 1.0


def test_restarts_keep_the_best(tiny):
    p, g = tiny["take"](tiny["params"], 0), tiny["take"](tiny["grads"], 0)
    cfg = _few_steps(2, restarts=3)
    best = attacks.idlg(jax.random.PRNGKey(8), tiny["model"].apply, p, g, SHAPE, config=cfg)
    one = jax.jit(lambda k, pp, gg: attacks.idlg(k, tiny["model"].apply, pp, gg, SHAPE, config=dataclasses.replace(cfg, restarts=1)))
    singles = [one(k, p, g) for k in jax.random.split(jax.random.PRNGKey(8), 3)]
    np.testing.assert_allclose(float(best.loss), min(float(s.loss) for s in singles), rtol=1e-4)


# ---------------------------------------------------------------- bad input


def test_bad_input_gets_clear_errors(tiny):
    apply, p, g = tiny["model"].apply, tiny["take"](tiny["params"], 0), tiny["take"](tiny["grads"], 0)
    key = jax.random.PRNGKey(0)
    missing = {k: v for k, v in g.items() if k != "conv1"}
    with pytest.raises(ValueError, match="target_grads must have the structure"):
        attacks.idlg(key, apply, p, missing, SHAPE)
    wrong = jax.tree_util.tree_map(lambda a: a, g)
    wrong["head"]["bias"] = jnp.zeros(K + 1)
    with pytest.raises(ValueError, match="shapes differ"):
        attacks.idlg(key, apply, p, wrong, SHAPE)
    with pytest.raises(ValueError, match="x_shape must be one image"):
        attacks.idlg(key, apply, p, g, (8, 8))
    nan = jax.tree_util.tree_map(lambda a: a, g)
    nan["conv2"]["kernel"] = nan["conv2"]["kernel"].at[0, 0, 0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match="NaN or Inf in \\['conv2/kernel'\\]"):
        attacks.dlg(key, apply, p, nan, SHAPE)
    with pytest.raises(ValueError, match="label must be a distribution of shape \\(10,\\)"):
        attacks.given_label(key, apply, p, g, SHAPE, jnp.ones(3) / 3)
    with pytest.raises(ValueError, match="optimizer must be"):
        attacks.AttackConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="precision must be"):
        attacks.AttackConfig(precision="fp8")


def test_gpu_code_paths_agree_with_cpu_ones(tiny):
    """What "auto" picks on a GPU (compact L-BFGS direction, patch convolutions) gives the attack the CPU gives."""
    cfg = dataclasses.replace(attacks.PAPER, steps=6, lbfgs=lbfgs.TorchLBFGSConfig(max_iter=4, history_size=3))
    gpu_like = dataclasses.replace(cfg, lbfgs=dataclasses.replace(cfg.lbfgs, direction="compact"))
    with jax.enable_x64(True):  # float32 rounding differences grow along an L-BFGS run; float64 keeps them tiny
        f64 = lambda t: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), t)
        p, g, key = f64(tiny["take"](tiny["params"], 0)), f64(tiny["take"](tiny["grads"], 0)), jax.random.PRNGKey(4)
        cpu = attacks.idlg(key, models.LeNet(K, conv="xla").apply, p, g, SHAPE, config=cfg)
        gpu = attacks.idlg(key, models.LeNet(K, conv="patches").apply, p, g, SHAPE, config=gpu_like)
        assert cpu.x.dtype == jnp.float64 and int(cpu.evals) > 3 * 3  # the 3-slot history wrapped
        np.testing.assert_allclose(gpu.x, cpu.x, rtol=1e-6, atol=1e-8)


def test_keep_best_picks_the_lowest_finite_iterate():
    """Snapshots are x' before steps 0, e, 2e, ...; snapshot j is scored by loss_history[j e - 1]."""
    e, steps = 2, 6
    snaps = jnp.arange(4, dtype=jnp.float32)[:, None, None, None] * jnp.ones((4, 2, 2, 1))  # x' = j at snapshot j
    hist = jnp.array([9.0, 5.0, 7.0, 3.0, 8.0, jnp.nan])  # snapshot 1 <- 5, 2 <- 3, 3 <- nan
    res = attacks.AttackResult(x=jnp.full((2, 2, 1), jnp.nan), label=jnp.zeros(3), loss=jnp.array(jnp.nan),
                               loss_history=hist, steps=jnp.array(steps), evals=jnp.array(steps), snapshots=snaps)
    x, loss = attacks.keep_best(res, e)
    assert float(loss) == 3.0 and np.all(np.asarray(x) == 2.0)  # the run diverged: its best finite iterate
    x, loss = attacks.keep_best(res._replace(x=jnp.full((2, 2, 1), 7.0), loss=jnp.array(1.0)), e)
    assert float(loss) == 1.0 and np.all(np.asarray(x) == 7.0)  # the final iterate when it is the best
    x, loss = jax.jit(attacks.keep_best, static_argnums=1)(res._replace(loss_history=jnp.full(steps, jnp.nan)), e)
    assert np.isinf(float(loss))  # nothing finite
