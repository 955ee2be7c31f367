"""Label regimes: one-hot, smoothing, mixup."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxleak as jl


@settings(max_examples=30, deadline=None)
@given(k=st.integers(2, 1000), c=st.integers(0, 999), eps=st.floats(0.0, 0.999))
def test_smooth_is_a_probability_vector_with_the_paper_values(k, c, eps):
    c = c % k
    y = np.asarray(jl.smooth(jnp.array(c), k, eps), dtype=np.float64)
    assert y.shape == (k,)
    np.testing.assert_allclose(y.sum(), 1.0, rtol=1e-5)
    np.testing.assert_allclose(y[c], 1 - eps + eps / k, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.delete(y, c), eps / k, rtol=1e-5, atol=1e-7)


def test_smooth_broadcasts_one_eps_per_label():
    y = jl.smooth(jnp.array([0, 2]), 4, jnp.array([0.0, 0.4]))
    np.testing.assert_allclose(y, [[1, 0, 0, 0], [0.1, 0.1, 0.7, 0.1]], atol=1e-6)


def test_mixup_weights_and_identity():
    key = jax.random.PRNGKey(0)
    xa, xb = jax.random.uniform(key, (2, 8, 8, 3))
    ya, yb = jl.one_hot(jnp.array(1), 5), jl.one_hot(jnp.array(3), 5)
    x, y = jl.mixup(xa, xb, ya, yb, 0.25)
    np.testing.assert_allclose(x, 0.75 * xa + 0.25 * xb, rtol=1e-6)
    np.testing.assert_allclose(y, [0, 0.75, 0, 0.25, 0], atol=1e-7)
    same, _ = jl.mixup(xa, xa, ya, yb, 0.37)
    np.testing.assert_allclose(same, xa, rtol=1e-6)


def test_mixup_batched_mu():
    xa = jnp.ones((3, 4, 4, 1))
    xb = jnp.zeros((3, 4, 4, 1))
    ya, yb = jl.one_hot(jnp.array([0, 1, 2]), 3), jl.one_hot(jnp.array([1, 2, 0]), 3)
    mu = jnp.array([0.0, 0.5, 1.0])
    x, y = jl.mixup(xa, xb, ya, yb, mu)
    np.testing.assert_allclose(x[:, 0, 0, 0], 1 - mu)
    np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-6)
