"""Closed-form inversion of a bias-free ReLU MLP from one example's gradient and its last feature.

Wang, Liang, He (ICLR 2024), §4 "feature recovery" and the FCN-4 demo of their
code (ALGORITHMS.md §4.9(a)): once the last-layer input ``h_{L-1}`` is known
(recovered by :func:`jaxleak.recovery.soft_label`), every earlier layer follows
in closed form, because each layer's weight gradient of ONE example is rank 1.

Layout (flax): layer ``l`` computes ``a_l = h_{l-1} @ W_l`` with the kernel
``W_l`` ``(n_{l-1}, n_l)`` and ``h_l = relu(a_l)``; ``h_0 = x`` flattened in NHWC
``(H, W, C)`` order (``jaxleak.models.FCN4``). With ``delta_l = dloss/da_l`` the
kernel gradient is ``G_l = outer(h_{l-1}, delta_l)``. Going down from the head:

* ``delta_L = G_L^T h_{L-1} / |h_{L-1}|^2``  (``= p - y``),
* ``delta_{l} = (W_{l+1} @ delta_{l+1}) * 1[h_l != 0]``  (back through the ReLU),
* ``h_{l-1} = G_l @ delta_l / |delta_l|^2``.

The paper's code averages the element-wise ratios ``G_l[:, k] / delta_l[k]``
over the non-zero rows; the least-squares form above is the same quantity for
an exact rank-1 ``G_l`` but weights each ratio by ``delta_l[k]^2``, so tiny
(noisy) entries barely count and zeros need no special case. All divisions are
guarded: a layer whose ``delta`` vanishes entirely yields zeros, not NaNs.
Everything is ``jit``- and ``vmap``-compatible (static shapes, no host syncs).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from jaxleak import models as _models

Array = jax.Array
PyTree = Any


class Inversion(NamedTuple):
    """Result of :func:`invert_fcn` for one victim (leading ``V`` axes under ``vmap``).

    Attributes:
      x: the recovered network input ``h_0`` ``(n_0,)`` (flattened; reshape NHWC).
      features: ``(h_0, h_1, ..., h_{L-1})``, the recovered input of every layer.
      deltas: ``(delta_1, ..., delta_L)``, the recovered pre-activation gradients;
        ``deltas[-1] = p - y``.
      residuals: ``(L,)`` relative Frobenius residual ``|G_l - outer(h_{l-1}, delta_l)| / |G_l|``
        of every layer (0 for an exact rank-1 fit; large when the feature was wrong).
    """

    x: Array
    features: tuple[Array, ...]
    deltas: tuple[Array, ...]
    residuals: Array


def _safe_ratio(num: Array, den: Array) -> Array:
    """``num / den`` with ``den == 0`` -> 0 (a dead layer gives zeros, not NaN); dtype-aware floor."""
    tiny = jnp.finfo(num.dtype).tiny
    ok = den > tiny
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def _rank1_residual(G: Array, h: Array, delta: Array) -> Array:
    # |G - h d^T|^2 = |G|^2 - 2 h^T G d + |h|^2 |d|^2, without materialising the outer product.
    g2 = jnp.sum(G * G)
    r2 = g2 - 2.0 * (h @ G @ delta) + (h @ h) * (delta @ delta)
    return jnp.sqrt(_safe_ratio(jnp.maximum(r2, 0.0), g2))


def check_layers(weights: Sequence[Array], grads: Sequence[Array], feature: Array) -> None:
    """Raises ``ValueError`` unless ``weights``/``grads`` are matching chains of kernels and ``feature`` fits.

    ``weights[l]`` and ``grads[l]`` must both be ``(n_l, n_{l+1})`` with
    ``n_{l+1}`` equal to the next kernel's input size, and ``feature`` must be
    ``(n_{L-1},)``, the head's input (shapes only: works on tracers).
    """
    if len(weights) != len(grads):
        raise ValueError(f"weights and grads must list the same layers, got {len(weights)} weights and {len(grads)} grads")
    if len(weights) < 1:
        raise ValueError("weights must hold at least one kernel (the head)")
    for i, (w, g) in enumerate(zip(weights, grads)):
        if jnp.ndim(w) != 2 or jnp.shape(w) != jnp.shape(g):
            raise ValueError(
                f"layer {i}: weights[{i}] and grads[{i}] must be kernels (n_in, n_out) of equal shape, "
                f"got {jnp.shape(w)} and {jnp.shape(g)}"
            )
        if i and jnp.shape(weights[i - 1])[1] != jnp.shape(w)[0]:
            raise ValueError(
                f"layer {i}: kernel input size {jnp.shape(w)[0]} differs from layer {i - 1}'s output size "
                f"{jnp.shape(weights[i - 1])[1]}"
            )
    if jnp.shape(feature) != (jnp.shape(weights[-1])[0],):
        raise ValueError(
            f"feature must be the head's input of shape ({jnp.shape(weights[-1])[0]},), got {jnp.shape(feature)}"
        )


def invert_fcn(weights: Sequence[Array], grads: Sequence[Array], feature: Array) -> Inversion:
    """Analytic layer-by-layer inversion of a bias-free ReLU MLP (Wang, Liang, He, ICLR 2024, §4.9(a)).

    Args:
      weights: kernels ``[W_1, ..., W_L]`` in flax layout ``(n_{l-1}, n_l)``; ``W_L`` is the head.
      grads: the victim's kernel gradients ``[G_1, ..., G_L]``, same shapes
        (ONE example: every ``G_l`` is rank 1).
      feature: the head's input ``h_{L-1}`` ``(n_{L-1},)``, e.g. ``soft_label(...).feature``.
        It must be the post-ReLU feature (exact zeros where the unit is off).

    Returns:
      :class:`Inversion`; ``.x`` ``(n_0,)`` is the flattened input (NHWC order
      for :class:`jaxleak.models.FCN4`). Exact up to rounding when ``feature``
      is exact; a feature off by a factor ``c`` gives an input off by ``c``.
    """
    check_layers(weights, grads, feature)
    dtype = jnp.result_type(*weights, *grads, feature)
    weights = [jnp.asarray(w, dtype) for w in weights]
    grads = [jnp.asarray(g, dtype) for g in grads]
    h = jnp.asarray(feature, dtype)

    # Head: G_L = outer(h_{L-1}, delta_L)  ->  delta_L by least squares over the feature entries.
    delta = _safe_ratio(grads[-1].T @ h, h @ h)
    features, deltas = [h], [delta]
    residuals = [_rank1_residual(grads[-1], h, delta)]
    for W_next, G in zip(weights[:0:-1], grads[-2::-1]):
        delta = (W_next @ delta) * (h != 0).astype(dtype)  # ReLU'(a) = 1[h > 0]; exact zeros of h mark off units
        h = _safe_ratio(G @ delta, delta @ delta)
        features.append(h)
        deltas.append(delta)
        residuals.append(_rank1_residual(G, h, delta))
    return Inversion(x=h, features=tuple(features[::-1]), deltas=tuple(deltas[::-1]), residuals=jnp.stack(residuals[::-1]))


def fcn_kernels(tree: PyTree) -> list[Array]:
    """The kernels of a :class:`jaxleak.models.FCN4` params (or gradient) pytree, input layer first.

    Order: ``fc1, fc2, ..., head``. Raises ``ValueError`` for a layer with a
    bias (the inversion above assumes bias-free layers, as paper 2's FCN-4).
    """
    params = _models._params_collection(tree)
    names = sorted((n for n in params if n.startswith("fc")), key=lambda n: int(n[2:]))
    if not names or _models.HEAD not in params or set(params) != set(names) | {_models.HEAD}:
        raise ValueError(f"tree must be FCN4 params/grads with layers fc1..fcN and {_models.HEAD!r}, got {sorted(params)}")
    for n in names + [_models.HEAD]:
        if "bias" in params[n]:
            raise ValueError(f"layer {n!r} has a bias: invert_fcn handles bias-free layers only (paper 2's FCN-4)")
    return [params[n]["kernel"] for n in names] + [params[_models.HEAD]["kernel"]]


def invert_fcn4(params: PyTree, grads: PyTree, feature: Array, image_shape: Sequence[int]) -> Array:
    """Reconstructs an FCN-4 victim's (normalised) image ``(H, W, C)`` from its gradient and last feature.

    :func:`invert_fcn` on :func:`fcn_kernels` of ``params`` and ``grads``, reshaped
    in NHWC order (Wang, Liang, He 2024, §4.9(a); the paper reshapes CHW, jaxleak
    flattens HWC). ``image_shape`` is ``(H, W, C)`` with ``H*W*C`` the input size.
    """
    weights, gs = fcn_kernels(params), fcn_kernels(grads)
    image_shape = tuple(int(s) for s in image_shape)
    if len(image_shape) != 3 or image_shape[0] * image_shape[1] * image_shape[2] != jnp.shape(weights[0])[0]:
        raise ValueError(
            f"image_shape must be (H, W, C) with H*W*C = {jnp.shape(weights[0])[0]} (the first kernel's input), "
            f"got {image_shape}"
        )
    return invert_fcn(weights, gs, feature).x.reshape(image_shape)


__all__ = ["Inversion", "check_layers", "invert_fcn", "fcn_kernels", "invert_fcn4"]
