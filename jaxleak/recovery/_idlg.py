"""iDLG label extraction (Zhao, Mopuri, Bilen 2020): a one-hot label's class is the only negative ``delta``."""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from jaxleak.recovery._core import (
    IDLG_METHODS, OK, Array, _check_last_layer, _input_reason, _is_concrete, _raise_for_reasons,
)


def _idlg_one(G: Array, db: Optional[Array], method: str) -> Array:
    reason = _input_reason(G, db=db)
    if method == "rowsum":
        label = jnp.argmin(jnp.sum(G, axis=0))
    elif method == "bias":
        label = jnp.argmin(db)
    else:  # "inner": class i with <g_i, g_j> <= 0 for all j != i (sign opposition, any sign of h).
        r = jnp.argmax(jnp.sum(G * G, axis=0))
        v = G.T @ G[:, r]  # v_k = delta_k delta_r |h|^2, so <g_i, g_j> = v_i v_j / v_r
        top2 = jax.lax.top_k(v, 2)[0]
        bot2 = -jax.lax.top_k(-v, 2)[0]
        max_other = jnp.where(v == top2[0], top2[1], top2[0])
        min_other = jnp.where(v == bot2[0], bot2[1], bot2[0])
        worst = jnp.where(v >= 0, v * max_other, v * min_other)  # max_{j != i} v_i v_j
        label = jnp.argmin(worst / jnp.where(v[r] != 0, jnp.abs(v[r]), 1))
    return jnp.where(reason == OK, label, -1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("method", "batched"))
def _idlg_jit(G, db, method, batched):
    fn = functools.partial(_idlg_one, method=method)
    if batched:
        return jax.vmap(fn)(G, db)
    return fn(G, db)


def idlg_label(weight_grad: Array, *, bias_grad: Optional[Array] = None, method: str = "rowsum",
               errors: str = "raise") -> Array:
    """iDLG label extraction (Zhao, Mopuri, Bilen 2020, §3; ALGORITHMS.md §3.1).

    For a one-hot label ``c``, ``delta = p - e_c`` is negative only at ``c``.

    Args:
      weight_grad: last-layer kernel gradient ``(d, K)`` (flax layout), or ``(V, d, K)``.
      bias_grad: last-layer bias gradient ``(K,)`` / ``(V, K)``; needed by ``"bias"``.
      method: ``"rowsum"`` — argmin over classes of the summed gradient column
        (the iDLG code; needs ``h >= 0``); ``"inner"`` — the class whose gradient
        vector has a non-positive inner product with every other (the paper's
        sign-opposition rule, valid for features of any sign; O(K d) through the
        rank-1 structure); ``"bias"`` — argmin of ``bias_grad`` (any sign of ``h``).

    Returns:
      The class index (int32), shape ``()`` or ``(V,)``. Non-finite, all-zero or
      rank > 1 gradients raise ``ValueError`` on concrete inputs (``errors="raise"``);
      under ``jit``/``vmap``, or with ``errors="flag"``, they give ``-1``.
    """
    if errors not in ("raise", "flag"):
        raise ValueError(f"errors must be 'raise' or 'flag', got {errors!r}")
    if method not in IDLG_METHODS:
        raise ValueError(f"method must be one of {IDLG_METHODS}, got {method!r}")
    _check_last_layer(weight_grad)
    weight_grad = jnp.asarray(weight_grad)
    batched = weight_grad.ndim == 3
    if method == "bias":
        if bias_grad is None:
            raise ValueError("method='bias' needs bias_grad (the last layer's bias gradient, shape (K,))")
    if bias_grad is not None:
        bias_grad = jnp.asarray(bias_grad)
        if bias_grad.shape != weight_grad.shape[:-2] + weight_grad.shape[-1:]:
            raise ValueError(f"bias_grad must have shape {weight_grad.shape[:-2] + weight_grad.shape[-1:]}, got {bias_grad.shape}")
    label = _idlg_jit(weight_grad, bias_grad, method, batched)
    if errors == "raise" and _is_concrete(label) and bool(jnp.any(label < 0)):  # label: traced under an outer jit
        reasons = jax.jit(jax.vmap(_input_reason) if batched else _input_reason)(weight_grad, None, None, bias_grad)
        _raise_for_reasons(reasons, "idlg_label: weight_grad is unusable")
    return label
