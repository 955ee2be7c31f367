"""What gradient matching minimises: distances, priors, the feature term, the custom-VJP gradient distance."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxleak import objectives, victims

SHAPE = (8, 8, 1)
K = 10  # SHAPE and K are those of the `tiny` fixture (conftest.py)


# ---------------------------------------------------------------- distances


def _random_tree(key, like):
    leaves, treedef = jax.tree_util.tree_flatten(like)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [jax.random.normal(k, a.shape) for k, a in zip(keys, leaves)])


def test_distances_zero_at_truth_and_documented_invariances(tiny):
    g = tiny["take"](tiny["grads"], 0)
    other = _random_tree(jax.random.PRNGKey(1), g)
    assert float(objectives.l2_distance(g, g)) == 0.0
    assert abs(float(objectives.cosine_distance(g, g))) < 1e-6
    scaled = jax.tree_util.tree_map(lambda a: 7.5 * a, other)
    np.testing.assert_allclose(objectives.cosine_distance(scaled, g), objectives.cosine_distance(other, g), rtol=1e-5)
    neg = jax.tree_util.tree_map(lambda a: -a, g)
    np.testing.assert_allclose(objectives.cosine_distance(neg, g), 2.0, rtol=1e-6)
    # L2 is the plain sum of squares over all tensors (float64 oracle).
    ref = sum(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
              for a, b in zip(jax.tree_util.tree_leaves(other), jax.tree_util.tree_leaves(g)))
    np.testing.assert_allclose(objectives.l2_distance(other, g), ref, rtol=1e-5)


def test_tensor_weights_exclude(tiny):
    g = tiny["take"](tiny["grads"], 0)
    other = _random_tree(jax.random.PRNGKey(2), g)
    w = objectives.tensor_weights(g, exclude=("head/kernel",))
    only_head = jax.tree_util.tree_map(lambda a: a, g)
    only_head["head"]["kernel"] = other["head"]["kernel"]
    assert float(objectives.l2_distance(only_head, g, w)) == 0.0
    assert float(objectives.l2_distance(only_head, g)) > 0.0
    with pytest.raises(ValueError, match="unknown gradient tensors"):
        objectives.tensor_weights(g, exclude=("head/kernels",))


def test_total_variation():
    assert float(objectives.total_variation(jnp.full((4, 5, 3), 0.3))) == 0.0
    x = jnp.zeros((3, 4, 1)).at[:, 2:].set(1.0)  # one vertical edge: |dx| = 1 on 1 of 3 columns
    np.testing.assert_allclose(objectives.total_variation(x), 1.0 / 3.0, rtol=1e-6)
    with pytest.raises(ValueError, match="one image"):
        objectives.total_variation(jnp.zeros((2, 3, 4, 1)))


def test_feature_distance():
    h = jnp.array([1.0, 2.0, 3.0])
    assert float(objectives.feature_distance(h, h, "l2")) == 0.0
    assert abs(float(objectives.feature_distance(h, 2 * h, "cosine"))) < 1e-6  # scale invariant
    np.testing.assert_allclose(float(objectives.feature_distance(h, h + 1, "l2")), 3.0)
    np.testing.assert_allclose(float(objectives.feature_distance(h, -h, "cosine")), 2.0, rtol=1e-6)


# ---------------------------------------------------------------- gradient distance, objective


@pytest.mark.parametrize("factored", [False, True], ids=["dense", "factored"])
@pytest.mark.parametrize("distance,soft", [("l2", False), ("l2", True), ("cosine", False), ("cosine", True)])
def test_gradient_distance_vjp_equals_double_backprop(tiny, distance, soft, factored):
    """The reverse-over-forward gradient (and its factored-head form) equals jax.grad through jax.grad (float64 oracle)."""
    with jax.enable_x64(True):
        f64 = lambda t: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), t)
        p, g = f64(tiny["take"](tiny["params"], 0)), f64(tiny["take"](tiny["grads"], 0))
        dist = objectives.DISTANCES[distance]
        w = objectives.tensor_weights(g, weights={"conv1/kernel": 3.0, "head/kernel": 0.5}, exclude=("head/bias",))
        z = {"x": jax.random.normal(jax.random.PRNGKey(9), SHAPE, jnp.float64),
             "v": jax.random.normal(jax.random.PRNGKey(10), (K,), jnp.float64)}
        label = f64(tiny["y"][0])

        def reference(zz):
            y = jax.nn.softmax(zz["v"]) if soft else label
            return dist(victims.gradient(tiny["model"].apply, p, zz["x"], y), g, w)

        ours_value, ours = jax.value_and_grad(
            lambda zz: objectives.gradient_distance(tiny["model"].apply, dist, soft, zz, p, g, w, label, factored))(z)
        ref_value, ref = jax.value_and_grad(reference)(z)
        np.testing.assert_allclose(ours_value, ref_value, rtol=1e-12)
        np.testing.assert_allclose(ours["x"], ref["x"], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(ours["v"], ref["v"], rtol=1e-9, atol=1e-12)


def test_matching_objective_rejects_unknown_distance(tiny):
    p, g = tiny["take"](tiny["params"], 0), tiny["take"](tiny["grads"], 0)
    with pytest.raises(ValueError, match="distance must be one of \\['cosine', 'l2'\\], got 'l1'"):
        objectives.matching_objective(tiny["model"].apply, p, g, tiny["y"][0], distance="l1")


@pytest.mark.parametrize("factored", [False, True], ids=["dense", "factored"])
@pytest.mark.parametrize("distance,soft", [("l2", False), ("cosine", False), ("cosine", True)])
def test_feature_objective_equals_two_forward_formulation(tiny, distance, soft, factored):
    """One-forward feature matching = plain jax.grad of [distance of jax.grad + TV + feature term with its own forward]."""
    apply, exclude, fw, tv = tiny["model"].apply, ("head/kernel",), 2.0, 0.1
    with jax.enable_x64(True):
        f64 = lambda t: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), t)
        p, g = f64(tiny["take"](tiny["params"], 0)), f64(tiny["take"](tiny["grads"], 0))
        label = None if soft else f64(tiny["y"][0])
        target = victims.feature(apply, p, jnp.asarray(tiny["x"][1], jnp.float64))
        z = {"x": jnp.asarray(tiny["x"][0], jnp.float64) + 0.3 * jax.random.normal(jax.random.PRNGKey(11), SHAPE, jnp.float64)}
        if soft:
            z["v"] = jax.random.normal(jax.random.PRNGKey(12), (K,), jnp.float64)
        w = objectives.tensor_weights(g, exclude)

        def reference(zz):
            y = jax.nn.softmax(zz["v"]) if soft else label
            h = victims.feature(apply, p, zz["x"])
            return (objectives.DISTANCES[distance](victims.gradient(apply, p, zz["x"], y), g, w)
                    + tv * objectives.total_variation(zz["x"]) + fw * objectives.feature_distance(h, target, distance))

        ours = objectives.matching_objective(apply, p, g, label, target, distance=distance, tv=tv, exclude_tensors=exclude,
                                             feature_weight=fw, factored_head=factored)
        value, grad = jax.jit(jax.value_and_grad(ours))(z)
        ref_value, ref_grad = jax.value_and_grad(reference)(z)
        np.testing.assert_allclose(value, ref_value, rtol=1e-12)
        for name in z:
            np.testing.assert_allclose(grad[name], ref_grad[name], rtol=1e-9, atol=1e-12)
        # The feature term is really there: its gradient alone is a sizeable part of the total.
        no_feature = objectives.matching_objective(apply, p, g, label, target, distance=distance, tv=tv, exclude_tensors=exclude)
        assert np.max(np.abs(jax.grad(no_feature)(z)["x"] - grad["x"])) > 1e-3 * np.max(np.abs(grad["x"]))
    # float32, the attacks' precision: the same to float32 tolerance.
    p32, g32 = tiny["take"](tiny["params"], 0), tiny["take"](tiny["grads"], 0)
    z32 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), z)
    y32 = None if soft else tiny["y"][0]
    h32 = jnp.asarray(target, jnp.float32)
    ours32 = objectives.matching_objective(apply, p32, g32, y32, h32, distance=distance, tv=tv, exclude_tensors=exclude,
                                           feature_weight=fw, factored_head=factored)
    value32, grad32 = jax.value_and_grad(ours32)(z32)
    np.testing.assert_allclose(value32, ref_value, rtol=1e-4)
    for name in z:
        np.testing.assert_allclose(grad32[name], ref_grad[name], rtol=2e-3, atol=2e-4 * np.max(np.abs(ref_grad[name])))


def test_gradient_distance_and_feature_returns_the_forward_feature(tiny):
    apply, p, g = tiny["model"].apply, tiny["take"](tiny["params"], 0), tiny["take"](tiny["grads"], 0)
    z = {"x": tiny["x"][1]}
    dist = objectives.DISTANCES["l2"]
    value, h = objectives.gradient_distance_and_feature(apply, dist, False, z, p, g, None, tiny["y"][0])
    np.testing.assert_array_equal(h, victims.feature(apply, p, tiny["x"][1]))
    np.testing.assert_allclose(value, objectives.gradient_distance(apply, dist, False, z, p, g, None, tiny["y"][0]), rtol=1e-6)


def test_factored_head_l2_value_does_not_cancel_at_a_match(tiny):
    """At the true image the L2 distance is ~0 in float32 with the factored head too: its value is the fused
    sum((h a^T - T)^2), not |h|^2|a|^2 - 2 h^T T a + |T|^2, whose float32 rounding (~1e-7 |T|^2) would hide
    the 1e-6 stopping threshold."""
    apply, p, g, y = tiny["model"].apply, tiny["take"](tiny["params"], 0), tiny["take"](tiny["grads"], 0), tiny["y"][0]
    dist = objectives.DISTANCES["l2"]
    z = {"x": tiny["x"][0]}
    dense = objectives.gradient_distance(apply, dist, False, z, p, g, None, y)
    factored = objectives.gradient_distance(apply, dist, False, z, p, g, None, y, True)
    scale = float(jnp.sum(g["head"]["kernel"] ** 2))
    assert scale > 1e-3 and float(dense) < 1e-12 * scale
    assert float(factored) < 1e-12 * scale


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_factored_head_excluded_is_not_computed(tiny, distance):
    """With ``head/kernel`` excluded (paper 2's ``f`` variant) the factored form skips the head's terms, so the
    target's head kernel does not enter at all: a 1e30 there changes nothing (times a weight of 0 it gave NaN)."""
    apply, p, g, y = tiny["model"].apply, tiny["take"](tiny["params"], 0), tiny["take"](tiny["grads"], 0), tiny["y"][0]
    w = objectives.tensor_weights(g, exclude=("head/kernel",))
    huge = jax.tree_util.tree_map(lambda a: a, g)
    huge["head"]["kernel"] = jnp.full_like(g["head"]["kernel"], 1e30)
    dist = objectives.DISTANCES[distance]
    run = lambda t, factored: jax.value_and_grad(
        lambda zz: objectives.gradient_distance(apply, dist, False, zz, p, t, w, y, factored))({"x": tiny["x"][1]})
    (v, dv), (v_huge, dv_huge) = run(g, True), run(huge, True)
    assert np.isfinite(float(v_huge)) and float(v_huge) == float(v)
    np.testing.assert_array_equal(dv_huge["x"], dv["x"])
    v_dense, dv_dense = run(g, False)  # and it is still the same distance as the dense form's
    np.testing.assert_allclose(v, v_dense, rtol=1e-5)
    np.testing.assert_allclose(dv["x"], dv_dense["x"], rtol=1e-4, atol=1e-6 * float(jnp.max(jnp.abs(dv_dense["x"]))))
