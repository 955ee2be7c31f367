"""Label regimes of the victim: one-hot, label smoothing and mixup.

All functions are pure ``jax.numpy`` and work under ``jit``/``vmap``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def one_hot(labels: Array, num_classes: int) -> Array:
    """One-hot rows ``(..., K)`` for integer ``labels`` of any shape."""
    return jax.nn.one_hot(labels, num_classes)


def smooth(labels: Array, num_classes: int, eps: Array | float) -> Array:
    """Label smoothing (Szegedy et al. 2016): ``(1 - eps) * onehot + eps / K``.

    Wang, Liang, He (ICLR 2024) §3: ``y_c = 1 - eps + eps/K``, ``y_k = eps/K``.
    ``eps`` broadcasts against ``labels`` (one value per label, or a scalar).
    """
    eps = jnp.asarray(eps)[..., None]
    return (1.0 - eps) * one_hot(labels, num_classes) + eps / num_classes


def mixup(x_a: Array, x_b: Array, y_a: Array, y_b: Array, mu: Array | float) -> tuple[Array, Array]:
    """Mixup (Zhang et al. 2018) with weights ``(1 - mu, mu)``: returns ``(x, y)``.

    ``x = (1 - mu) x_a + mu x_b`` and ``y = (1 - mu) y_a + mu y_b``. ``y_a``,
    ``y_b`` are probability vectors (use :func:`one_hot` for class indices).
    For batches, ``mu`` has one value per example and broadcasts over the rest.
    """
    mu = jnp.asarray(mu)
    mu_x = mu.reshape(mu.shape + (1,) * (jnp.ndim(x_a) - mu.ndim))
    mu_y = mu.reshape(mu.shape + (1,) * (jnp.ndim(y_a) - mu.ndim))
    return (1.0 - mu_x) * x_a + mu_x * x_b, (1.0 - mu_y) * y_a + mu_y * y_b
