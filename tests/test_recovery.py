"""Tests of jaxleak.recovery: iDLG labels, Theorem 1, soft-label search, closed form, bad inputs, real nets."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxleak import labels, models, recovery, victims
from jaxleak.recovery import _core as recovery_core

D = 32  # feature size of the synthetic last layers (zero-padding d changes nothing, so keep it small)


def problem(rng, K, kind, *, bias=False, d=D, scale=3.0, sign="nonneg", eps=None, mu=None):
    """A random last layer, feature and soft label; returns float64 numpy (G, W, b, db, y, h)."""
    W = rng.normal(size=(d, K)) * scale / np.sqrt(d)
    h = rng.normal(size=d)
    h = np.maximum(h, 0) if sign == "nonneg" else h
    b = rng.normal(size=K) * 0.5 if bias else np.zeros(K)
    z = h @ W + b
    p = np.exp(z - z.max())
    p /= p.sum()
    if kind == "smoothing":
        eps = rng.uniform(0.01, 0.5) if eps is None else eps
        y = np.full(K, eps / K)
        y[rng.integers(K)] += 1 - eps
    elif kind == "mixup":
        mu = rng.uniform(0.01, 0.99) if mu is None else mu
        i, j = rng.choice(K, 2, replace=False)
        y = np.zeros(K)
        y[i], y[j] = 1 - mu, mu
    else:
        y = np.eye(K)[rng.integers(K)]
    return np.outer(h, p - y), W, b, p - y, y, h


def batch(seed, n, K, kind, **kw):
    rng = np.random.default_rng(seed)
    probs = [problem(rng, K, kind, **kw) for _ in range(n)]
    return [np.stack(x) for x in zip(*probs)]


# --------------------------------------------------------------------------
# Theorem 1 and the O(K) family (T5)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["smoothing", "mixup"])
def test_theorem1_sum_invariance_and_truth(kind):
    rng = np.random.default_rng(1)
    G, W, b, delta, y, h = problem(rng, 7, kind, bias=True)
    with jax.enable_x64(True):
        Gj, Wj, bj = (jnp.asarray(x) for x in (G, W, b))
        r = int(np.argmax((G * G).sum(0)))
        for lam in (-50.0, -3.0, -1.0, 0.3, 1.0, 2.5, 1e3):
            y_hat, h_hat, p_hat = recovery.pseudo_label(Gj, Wj, lam, bias=bj)
            np.testing.assert_allclose(float(jnp.sum(y_hat)), 1.0, atol=1e-12)
            np.testing.assert_allclose(np.outer(h_hat, p_hat - y_hat), G, atol=1e-12)
            # The O(K) path used by the search agrees with the direct formula.
            _, a, c, bb = recovery_core._precompute(Gj, Wj, bj, r)
            np.testing.assert_allclose(recovery_core._label_at(1.0 / lam, a, c, bb), y_hat, atol=1e-12)
        y_star, h_star, _ = recovery.pseudo_label(Gj, Wj, 1.0 / delta[r], bias=bj, row=r)
        np.testing.assert_allclose(y_star, y, atol=1e-12)
        np.testing.assert_allclose(h_star, h, atol=1e-12)
        assert float(recovery.variance_loss(y_star, kind)) < 1e-25


def test_swarm_windows_match_reference_logs():
    # ALGORITHMS.md §4.6: pso(50) windows printed by the mixup notebooks.
    assert recovery.swarm_windows(50.0) == ((0.7, 6.0), (-6.3, -1.0), (5.7, 16.0), (-16.3, -6.0), (15.7, 66.0), (-66.3, -16.0))
    wins = recovery.swarm_windows(20.0)
    assert wins[-1] == (-50.3, -30.0) and len(wins) == 8  # windows up to |s| <= 50


# --------------------------------------------------------------------------
# iDLG
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_hot_batch():
    return batch(2, 64, 10, "onehot", bias=True)


@pytest.mark.parametrize("method", ["rowsum", "inner", "bias"])
def test_idlg_one_hot_exact_and_vmap_equals_loop(one_hot_batch, method):
    G, _, _, db, y, _ = one_hot_batch
    truth = y.argmax(1)
    out = recovery.idlg_label(jnp.asarray(G, jnp.float32), bias_grad=jnp.asarray(db, jnp.float32), method=method)
    np.testing.assert_array_equal(out, truth)
    loop = [int(recovery.idlg_label(jnp.asarray(G[i]), bias_grad=jnp.asarray(db[i]), method=method)) for i in range(4)]
    np.testing.assert_array_equal(loop, truth[:4])
    jitted = jax.jit(lambda g, d: recovery.idlg_label(g, bias_grad=d, method=method))
    np.testing.assert_array_equal(jitted(jnp.asarray(G), jnp.asarray(db)), truth)


def test_idlg_rowsum_breaks_for_negative_features_inner_and_bias_do_not():
    rng = np.random.default_rng(3)
    hits = {"rowsum": 0, "inner": 0, "bias": 0}
    n = 0
    for _ in range(40):
        G, W, b, db, y, h = problem(rng, 10, "onehot", bias=True, sign="any")
        if h.sum() >= 0:
            continue
        n += 1
        for m in hits:
            hits[m] += int(recovery.idlg_label(jnp.asarray(G), bias_grad=jnp.asarray(db), method=m)) == y.argmax()
    assert n >= 5
    assert hits["inner"] == n and hits["bias"] == n
    assert hits["rowsum"] == 0  # sum(h) < 0 flips the order: argmin is a wrong class


# --------------------------------------------------------------------------
# Soft labels: robust search, closed form, paper mode
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["smoothing", "mixup"])
@pytest.mark.parametrize("K", [5, 10, 100, 1000])
def test_robust_search_recovers_batches(kind, K):
    n = 24 if K == 1000 else 64
    G, W, _, _, y, h = batch(10 + K, n, K, kind)
    with jax.enable_x64(True):
        out = recovery.soft_label(jnp.asarray(G), jnp.asarray(W), kind=kind)
        err = np.abs(np.asarray(out.label) - y).max(1)
        assert (err < 1e-4).mean() >= 0.98, err
        assert np.all(err[np.asarray(out.ok)] < 1e-4)  # ok never certifies a wrong label
        good = err < 1e-4
        np.testing.assert_allclose(np.asarray(out.feature)[good], h[good], rtol=1e-4, atol=1e-6)
        if kind == "smoothing":
            eps = K * np.sort(y, 1)[:, :-1].mean(1)
            np.testing.assert_allclose(np.asarray(out.epsilon)[good], eps[good], atol=1e-3)
        else:
            np.testing.assert_allclose(np.asarray(out.mu)[good], np.sort(y, 1)[:, -2][good], atol=1e-4)


def test_mixup_with_an_extreme_coefficient_is_found_between_grid_points():
    """With mu near 0 or 1 the root's basin can be narrower than the coarse grid's spacing: the grid
    intervals where most entries change sign are candidates too (RobustSearch.crossing_candidates).
    The first victim is the case hypothesis found (seed 4421, mu = 0.9921875): the root sits between
    the grid's last two points."""
    rng = np.random.default_rng(4421)
    probs = [problem(rng, 10, "mixup", bias=True, mu=0.9921875)]
    rng = np.random.default_rng(3)
    probs += [problem(rng, 10, "mixup", bias=True, mu=m) for m in np.concatenate([rng.uniform(0.001, 0.02, 100),
                                                                                   rng.uniform(0.98, 0.999, 100)])]
    G, W, b, _, y, _ = [np.stack(x) for x in zip(*probs)]
    with jax.enable_x64(True):
        run = lambda cfg: recovery.soft_label(jnp.asarray(G), jnp.asarray(W), kind="mixup", bias=jnp.asarray(b),
                                              config=cfg, errors="flag")
        out = run(recovery.RobustSearch())
        err = np.abs(np.asarray(out.label) - y).max(1)
        assert np.asarray(out.ok).all() and err.max() < 1e-6, (np.flatnonzero(~np.asarray(out.ok)), err.max())
        grid_only = run(recovery.RobustSearch(crossing_candidates=0))  # the local minima of the grid alone
        missed = ~np.asarray(grid_only.ok)
        assert missed[0] and missed.sum() >= 3
        assert np.asarray(grid_only.reason)[0] == recovery.NO_SOLUTION


def test_a_candidate_near_the_spurious_end_is_no_rival_of_the_root():
    """Candidates are ranked by the search's objective, loss / u^2: by their raw loss, other near-valid
    candidates passed for rivals of the exact root and flagged these victims (confident logits, K = 10) as
    ambiguous, as a crossing candidate at lam ~ 1e4 (the spurious family near |u| = u_min: y_hat -> one-hot,
    loss ~ u^2) did for untrained ResNet50 and AlexNet victims. K = 3 keeps the raw loss."""
    rng = np.random.default_rng(21)
    mus = rng.uniform(0.001, 0.999, 1000)
    probs = [problem(rng, 10, "mixup", scale=10.0, mu=m) for m in mus[:384]]
    G, W, _, _, y, _ = [np.stack(x)[[222, 281, 383]] for x in zip(*probs)]
    with jax.enable_x64(True):
        out = recovery.soft_label(jnp.asarray(G), jnp.asarray(W), kind="mixup", errors="flag")
    assert np.asarray(out.ok).all(), [recovery.REASONS[int(r)] for r in out.reason]
    assert np.abs(np.asarray(out.label) - y).max() < 1e-9


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(["smoothing", "mixup"]), K=st.sampled_from([3, 10, 100]),
       bias=st.booleans(), eps=st.floats(0.001, 0.499), mu=st.floats(0.001, 0.999))
def test_property_soft_label(seed, kind, K, bias, eps, mu):
    rng = np.random.default_rng(seed)
    G, W, b, db, y, h = problem(rng, K, kind, bias=bias, eps=eps, mu=mu)
    with jax.enable_x64(True):
        out = recovery.soft_label(jnp.asarray(G), jnp.asarray(W), kind=kind, bias=jnp.asarray(b) if bias else None)
        if K >= 10:
            assert bool(out.ok), recovery.REASONS[int(out.reason)]
            assert np.abs(np.asarray(out.label) - y).max() < 1e-4
        elif bool(out.ok):
            # K = 3 has one constraint for one unknown: several valid roots can exist (not identifiable).
            # Whatever is returned must still be a member of the family with the right form.
            p_hat = jax.nn.softmax(out.feature @ W + b)
            np.testing.assert_allclose(np.outer(out.feature, p_hat - out.label), G, atol=1e-9)
            assert float(out.loss) < 1e-9 and np.asarray(out.label).min() > -1e-5
        # With the bias gradient: closed form, exact to float precision, any K.
        cf = recovery.soft_label(jnp.asarray(G), jnp.asarray(W), kind=kind, bias=jnp.asarray(b), bias_grad=jnp.asarray(db))
        np.testing.assert_allclose(np.asarray(cf.label), y, atol=1e-12)
        np.testing.assert_allclose(np.asarray(cf.feature), h, rtol=1e-10, atol=1e-12)
        assert bool(cf.ok)


@pytest.mark.parametrize("kind", ["smoothing", "mixup"])
def test_closed_form_k2_and_float32(kind):
    G, W, b, db, y, h = batch(5, 16, 2, kind, bias=True)
    out = recovery.soft_label(jnp.asarray(G, jnp.float32), jnp.asarray(W, jnp.float32), kind=kind,
                              bias=jnp.asarray(b, jnp.float32), bias_grad=jnp.asarray(db, jnp.float32))
    np.testing.assert_allclose(np.asarray(out.label), y, atol=1e-5)
    with pytest.raises(ValueError, match="K >= 3"):
        recovery.soft_label(jnp.asarray(G[0]), jnp.asarray(W[0]), kind=kind)


def test_vmap_jit_equal_single_calls():
    G, W, _, _, y, _ = batch(6, 6, 10, "mixup")
    G, W = jnp.asarray(G, jnp.float32), jnp.asarray(W, jnp.float32)
    batched = recovery.soft_label(G, W, kind="mixup")
    user = jax.jit(jax.vmap(lambda g, w: recovery.soft_label(g, w, kind="mixup")))(G, W)
    for i in range(3):
        one = recovery.soft_label(G[i], W[i], kind="mixup")
        np.testing.assert_allclose(one.label, batched.label[i], atol=1e-6)
        np.testing.assert_allclose(one.label, user.label[i], atol=1e-6)


@pytest.mark.parametrize("search", ["robust", "paper"])
def test_jit_with_concrete_arrays_closed_over(search):
    """Inside jit, closed-over arrays are concrete but results computed from them are traced: the error
    checks must not turn such a result into a Python bool (TracerBoolConversionError)."""
    G, W, *_ = problem(np.random.default_rng(9), 10, "smoothing")
    G, W = jnp.asarray(G, jnp.float32), jnp.asarray(W, jnp.float32)
    assert int(jax.jit(lambda: recovery.idlg_label(G))()) == int(recovery.idlg_label(G))
    inside = jax.jit(lambda: recovery.soft_label(G, W, kind="smoothing", search=search))()
    np.testing.assert_allclose(inside.label, recovery.soft_label(G, W, kind="smoothing", search=search).label, atol=1e-6)


@pytest.mark.parametrize("kind", ["smoothing", "mixup"])
def test_paper_search_reproduces_labels(kind):
    G, W, _, _, y, _ = batch(7, 16, 10, kind)
    with jax.enable_x64(True):
        out = recovery.soft_label(jnp.asarray(G), jnp.asarray(W), kind=kind, search="paper")
        err = np.abs(np.asarray(out.label) - y).max(1)
        assert (err < 1e-3).mean() >= 0.9
        assert np.all(err[np.asarray(out.ok)] < 1e-3)
        again = recovery.soft_label(jnp.asarray(G), jnp.asarray(W), kind=kind, search="paper")
        np.testing.assert_array_equal(out.lam, again.lam)  # deterministic, swarm included


@pytest.mark.parametrize("search", ["robust", "paper"])
@pytest.mark.parametrize("kind", ["smoothing", "mixup"])
def test_saturated_softmax_on_the_label_class_is_flagged_not_guessed(kind, search):
    """p = e_j with j the label's top class: delta has the label's own form, so every lam in an interval
    gives a valid label (eps / mu not identifiable). Seen on untrained AlexNet/Flowers-17 (1/17 of victims).
    The same layer with a non-saturated softmax is recovered exactly."""
    rng = np.random.default_rng(3)
    K, d, j = 10, 16, 4
    h = np.abs(rng.normal(size=d)) + 0.1
    y = np.full(K, 0.2 / K)
    y[j] += 0.8
    if kind == "mixup":
        y = np.zeros(K)
        y[j], y[7] = 0.7, 0.3
    for scale, saturated in ((200.0, True), (0.3, False)):
        W = rng.normal(size=(d, K)) * 0.3 / np.sqrt(d)
        W[:, j] += scale / np.sqrt(d)  # logit of class j far above the rest when scale is large
        z = h @ W
        p = np.exp(z - z.max())
        p /= p.sum()
        assert (p[j] == 1.0) == saturated
        G = np.outer(h, p - y)
        with jax.enable_x64(True):
            out = recovery.soft_label(jnp.asarray(G), jnp.asarray(W), kind=kind, search=search, errors="flag")
        if saturated:
            assert not bool(out.ok) and int(out.reason) == recovery.AMBIGUOUS
        else:
            assert bool(out.ok) and int(out.reason) == recovery.OK
            np.testing.assert_allclose(np.asarray(out.label), y, atol=1e-4)  # the paper search stops at loss 1e-9


# --------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------


def test_bad_inputs_raise_outside_jit_and_flag_inside():
    rng = np.random.default_rng(8)
    G1, W, *_ = problem(rng, 10, "smoothing")
    G2, *_ = problem(rng, 10, "smoothing")
    batch_grad = jnp.asarray((G1 + G2) / 2, jnp.float32)  # the mean gradient of two examples: rank 2
    W = jnp.asarray(W, jnp.float32)
    nan = jnp.asarray(G1, jnp.float32).at[0, 0].set(jnp.nan)
    zero = jnp.zeros_like(batch_grad)
    for bad, words in ((batch_grad, "rank > 1"), (nan, "non-finite"), (zero, "all-zero")):
        with pytest.raises(ValueError, match=words):
            recovery.soft_label(bad, W, kind="smoothing")
        with pytest.raises(ValueError, match=words):
            recovery.idlg_label(bad)
    stacked = jnp.stack([batch_grad, nan, zero, jnp.asarray(G1, jnp.float32)])
    out = jax.jit(jax.vmap(lambda g: recovery.soft_label(g, W, kind="smoothing")))(stacked)
    np.testing.assert_array_equal(out.reason, [recovery.RANK_GT_1, recovery.NON_FINITE, recovery.ZERO_GRADIENT, recovery.OK])
    np.testing.assert_array_equal(out.ok, [False, False, False, True])
    np.testing.assert_array_equal(jax.jit(jax.vmap(recovery.idlg_label))(stacked)[:3], [-1, -1, -1])
    codes = [recovery.RANK_GT_1, recovery.NON_FINITE, recovery.ZERO_GRADIENT, recovery.OK]
    np.testing.assert_array_equal(recovery.gradient_reason(stacked), codes)  # (V, d, K) -> (V,)
    assert [int(recovery.gradient_reason(g)) for g in stacked] == codes
    exact = jnp.outer(jnp.arange(1.0, 9.0), jnp.array([0.3, -0.5, 0.2]))  # h (p - y)^T: rank 1 exactly
    assert int(recovery.gradient_reason(exact)) == recovery.OK
    assert int(recovery.gradient_reason(exact.at[0, 0].add(0.1))) == recovery.RANK_GT_1
    with pytest.raises(ValueError, match="weight_grad must be the last layer's kernel gradient"):
        recovery.gradient_reason(jnp.ones(5))


def test_argument_errors_name_the_argument():
    G = jnp.ones((8, 5))
    with pytest.raises(ValueError, match="weight_grad"):
        recovery.idlg_label(jnp.ones(5))
    with pytest.raises(ValueError, match="weight must"):
        recovery.soft_label(G, jnp.ones((8, 4)), kind="smoothing")
    with pytest.raises(ValueError, match="kind"):
        recovery.soft_label(G, G, kind="distillation")
    with pytest.raises(ValueError, match="bias_grad"):
        recovery.idlg_label(G, method="bias")
    with pytest.raises(ValueError, match="without bias"):
        recovery.soft_label(G, G, kind="mixup", bias_grad=jnp.ones(5))


# --------------------------------------------------------------------------
# Real networks on real images
# --------------------------------------------------------------------------


def _cifar10(shared_data, n):
    z = np.load(shared_data / "cifar10_subset.npz")
    images, y = z["images"][:n], z["labels"][:n]
    mean, std = np.array([0.4914672, 0.4822617, 0.4467701]), np.array([0.2470322, 0.2434851, 0.2615879])
    return jnp.asarray((images / 255.0 - mean) / std, jnp.float32), np.asarray(y)


@pytest.fixture(scope="module")
def lenet_victims(shared_data):
    xs, cls = _cifar10(shared_data, 24)
    rng = np.random.default_rng(0)
    model = models.LeNet(10)  # with head bias: iDLG's variant
    variables = victims.init_victims(model, jax.random.PRNGKey(0), 1, (32, 32, 3), init="uniform")
    variables = jax.tree_util.tree_map(lambda v: v[0], variables)
    eps = jnp.asarray(rng.uniform(0, 0.5, len(cls)), jnp.float32)
    ys = {"onehot": labels.one_hot(jnp.asarray(cls), 10), "smoothing": labels.smooth(jnp.asarray(cls), 10, eps)}
    grads = {k: victims.gradients(model.apply, variables, xs, y) for k, y in ys.items()}
    return variables, ys, grads


def test_lenet_cifar10_idlg_and_soft_labels(lenet_victims):
    variables, ys, grads = lenet_victims
    dW, db = models.last_layer(grads["onehot"])
    truth = np.asarray(ys["onehot"]).argmax(1)
    for method in ("rowsum", "inner", "bias"):
        np.testing.assert_array_equal(recovery.idlg_label(dW, bias_grad=db, method=method), truth)
    W, b = models.last_layer(variables)
    dW, db = models.last_layer(grads["smoothing"])
    y = np.asarray(ys["smoothing"])
    robust = recovery.soft_label(dW, W, kind="smoothing", bias=b)
    assert np.mean(np.abs(np.asarray(robust.label) - y).max(1) < 1e-3) >= 0.95
    closed = recovery.soft_label(dW, W, kind="smoothing", bias=b, bias_grad=db)
    np.testing.assert_allclose(closed.label, y, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name,init,shape,kind", [("resnet18", "torch_resnet", (32, 32, 3), "smoothing"),
                                                  ("fcn4", "torch", (64, 64, 3), "mixup")])
def test_real_networks_soft_labels(shared_data, name, init, shape, kind):
    z = np.load(shared_data / ("cifar10_subset.npz" if shape[0] == 32 else "flowers17_64.npz"))
    idx = np.linspace(0, len(z["labels"]) - 1, 8).astype(int)  # spread over classes (files are class-sorted)
    images, cls = z["images"][idx], z["labels"][idx]
    K = int(z["labels"].max()) + 1
    xs = jnp.asarray(images / 255.0 - 0.5, jnp.float32)
    model = models.get_model(name, K)
    variables = victims.init_victims(model, jax.random.PRNGKey(1), 1, shape, init=init)
    variables = jax.tree_util.tree_map(lambda v: v[0], variables)
    rng = np.random.default_rng(1)
    if kind == "smoothing":
        y = labels.smooth(jnp.asarray(cls), K, jnp.asarray(rng.uniform(0, 0.5, 8), jnp.float32))
    else:
        xs, y = labels.mixup(xs, xs[::-1], labels.one_hot(jnp.asarray(cls), K), labels.one_hot(jnp.asarray(cls[::-1]), K),
                             jnp.asarray(rng.uniform(0, 1, 8), jnp.float32))
        keep = np.asarray(cls != cls[::-1])
        assert keep.sum() >= 4
        xs, y = xs[keep], y[keep]
    dW = models.last_layer(victims.gradients(model.apply, variables, xs, y, chunk_size=4))[0]
    out = recovery.soft_label(dW, models.last_layer(variables)[0], kind=kind)
    assert np.all(np.abs(np.asarray(out.label) - np.asarray(y)).max(1) < 1e-3)


@pytest.mark.slow
def test_experiment_quick(tmp_path, shared_data):
    repo = pathlib.Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(repo / "experiments" / "label_recovery.py"), "--quick", "--out", str(tmp_path),
           "--settings", "lenet_cifar10_smoothing,lenet_cifar10_mixup"]
    subprocess.run(cmd, check=True, cwd=repo, env={**__import__("os").environ, "JAXLEAK_DATA": str(shared_data)})
    import json

    res = json.loads((tmp_path / "results.json").read_text())
    for name in ("lenet_cifar10_smoothing", "lenet_cifar10_mixup"):
        assert res[name]["modes"]["robust_float32"]["acc_maxabs_1e-3"] >= 0.95
    assert (tmp_path / "results.md").exists() and (tmp_path / "landscape_lenet_cifar10_smoothing.png").exists()
