"""The feature-matching option of ``attacks.given_label`` and the ``experiments/cnn_reconstruction.py`` smoke run."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxleak import attacks, models, objectives, victims

REPO = pathlib.Path(__file__).resolve().parents[1]
SHAPE = (8, 8, 1)
K = 10
ALL_OPTS = ("origin", "hard", "dlg", "optimal", "f", "gf")


@pytest.fixture(scope="module")
def tiny():
    """One tiny bias-free LeNet victim (8x8x1 -> d=48, K=10) with a smoothed label, and its true feature.

    Overrides conftest's two-victim ``tiny`` in this module."""
    model = models.LeNet(K, head_bias=False)
    params = victims.init_victims(model, jax.random.PRNGKey(0), 1, SHAPE, init="uniform")
    params = jax.tree_util.tree_map(lambda a: a[0], params)
    grid = jnp.linspace(0.0, 1.0, 8)
    x = jnp.outer(grid, 1 - grid)[..., None]
    y = 0.8 * jax.nn.one_hot(3, K) + 0.02
    grads = victims.gradient(model.apply, params, x, y)
    h = victims.feature(model.apply, params, x)
    return dict(model=model, params=params, x=x, y=y, grads=grads, h=h)


def _cfg(**kw):
    return attacks.AttackConfig(steps=3, stop_loss=0.0, **kw)


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_feature_term_adds_to_the_objective(tiny, distance):
    apply = tiny["model"].apply
    cfg = _cfg(distance=distance, feature_weight=2.0, exclude_tensors=(f"{models.HEAD}/kernel",))
    target = tiny["h"] + 0.1
    obj = attacks._objective(apply, tiny["params"], tiny["grads"], cfg, tiny["y"], target)
    plain = attacks._objective(apply, tiny["params"], tiny["grads"], dataclasses.replace(cfg, feature_weight=0.0), tiny["y"], target)
    z = {"x": tiny["x"] + 0.05}
    h = victims.feature(apply, tiny["params"], z["x"])
    expected = float(plain(z)) + 2.0 * float(objectives.feature_distance(h, target, distance))
    np.testing.assert_allclose(float(obj(z)), expected, rtol=1e-5)
    # At the truth with the true feature the whole objective (no TV) is zero.
    exact = attacks._objective(apply, tiny["params"], tiny["grads"], cfg, tiny["y"], tiny["h"])
    assert float(exact({"x": tiny["x"]})) < 1e-6


def test_feature_weight_zero_keeps_behaviour(tiny):
    apply, key = tiny["model"].apply, jax.random.PRNGKey(1)
    a = attacks.given_label(key, apply, tiny["params"], tiny["grads"], SHAPE, tiny["y"], _cfg())
    b = attacks.given_label(key, apply, tiny["params"], tiny["grads"], SHAPE, tiny["y"], _cfg(), feature=tiny["h"] + 1.0)
    np.testing.assert_array_equal(np.asarray(a.x), np.asarray(b.x))
    np.testing.assert_array_equal(np.asarray(a.loss_history), np.asarray(b.loss_history))
    c = attacks.given_label(key, apply, tiny["params"], tiny["grads"], SHAPE, tiny["y"], _cfg(feature_weight=1.0), feature=tiny["h"])
    assert np.all(np.isfinite(np.asarray(c.loss_history)))


def test_feature_option_errors(tiny):
    apply = tiny["model"].apply
    with pytest.raises(ValueError, match="feature_weight must be >= 0"):
        attacks.AttackConfig(feature_weight=-1.0)
    with pytest.raises(ValueError, match="needs the recovered feature"):
        attacks.given_label(jax.random.PRNGKey(0), apply, tiny["params"], tiny["grads"], SHAPE, tiny["y"], _cfg(feature_weight=1.0))
    with pytest.raises(ValueError, match="feature must be the last-layer input"):
        attacks.given_label(jax.random.PRNGKey(0), apply, tiny["params"], tiny["grads"], SHAPE, tiny["y"], _cfg(feature_weight=1.0),
                            feature=jnp.zeros(3))


@pytest.mark.data
@pytest.mark.slow
@pytest.mark.parametrize("opts", [("gf",), ALL_OPTS], ids=["gf", "all"])
def test_quick_run_writes_files_and_resumes(tmp_path, shared_data, opts):
    """``--quick`` on 2 victims (one per kind): files, well-formed JSON, and a rerun recomputes nothing.

    In the slow selection (a script's end-to-end run, 18 s of the default suite from a cold cache): the
    full feature-matching option alone, and all six (each option costs one more compilation)."""
    env = {**os.environ, "JAXLEAK_DATA": str(shared_data),
           "JAX_COMPILATION_CACHE_DIR": os.environ.get("JAX_COMPILATION_CACHE_DIR", str(REPO / ".jax_cache"))}
    cmd = [sys.executable, str(REPO / "experiments" / "cnn_reconstruction.py"), "--quick", "--victims", "1",
           "--kinds", "smoothing,mixup", "--options", ",".join(opts), "--out", str(tmp_path), "--quiet", "--json"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads(first.stdout)
    assert summary["complete"] and summary["done"] == 2 * len(opts) * 2
    for name in ("records.jsonl", "results.json", "results.md", "grid.png", "config.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    doc = json.loads((tmp_path / "results.json").read_text())
    assert set(doc["summary"]) == {"smoothing", "mixup", "all"}
    for cost in ("l2_lbfgs", "cos_adam"):
        for opt in opts:
            s = doc["summary"]["all"][cost][opt]
            assert s["n"] == 2 and np.isfinite(s["psnr_mean"]) and np.isfinite(s["ssim_mean"])
    assert all(v["recovery_ok"] for v in doc["victim_info"])
    assert "| gf" in (tmp_path / "results.md").read_text()

    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (tmp_path / "records.jsonl").read_text().splitlines() == lines  # nothing recomputed or appended
    keys = [(r["kind"], r["victim"], r["option"], r["cost"]) for r in map(json.loads, lines) if "option" in r]
    assert len(keys) == len(set(keys)) == 2 * len(opts) * 2
    assert json.loads(second.stdout)["summary"] == summary["summary"]
