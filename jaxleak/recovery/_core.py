"""Shared pieces of the last-layer read-outs: reason codes, input checks and the soft-label family.

Everything :mod:`jaxleak.recovery`'s searches have in common: the ``reason``
codes and the checks behind them (non-finite, all-zero, rank > 1), Theorem 1's
one-parameter family of candidates (:func:`pseudo_label`; Wang, Liang, He,
ICLR 2024), the variance criterion that picks ``lam`` (:func:`variance_loss`,
§4.5), the validity checks and the :class:`SoftLabel` result.
"""

from __future__ import annotations

import functools
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

#: ``reason`` codes of :class:`SoftLabel` (and of invalid iDLG inputs).
REASONS: tuple[str, ...] = (
    "ok",
    "non-finite input (NaN or Inf in the gradient, weight or bias)",
    "all-zero last-layer gradient (nothing to recover)",
    "last-layer gradient has rank > 1 (a batch of several examples? recovery needs B = 1)",
    "no valid solution: the search found no lambda whose label passes the validity checks",
    "ambiguous: several lambdas give valid labels of this kind (not identifiable: small K, or a saturated "
    "softmax that predicts one of the label's classes)",
)
OK, NON_FINITE, ZERO_GRADIENT, RANK_GT_1, NO_SOLUTION, AMBIGUOUS = range(6)

KINDS = ("smoothing", "mixup")
SEARCHES = ("robust", "paper")
IDLG_METHODS = ("rowsum", "inner", "bias")


@flax.struct.dataclass
class SoftLabel:
    """Result of :func:`soft_label` for one victim (fields gain a leading ``V`` axis when mapped).

    Attributes:
      label: recovered label distribution ``y_hat`` ``(K,)``.
      feature: recovered last-layer input ``h_hat = lam * G[:, row]`` ``(d,)``.
      lam: the scalar ``lam_r = 1 / (p_r - y_r)`` (Wang et al. §3; ALGORITHMS.md §4.2).
      loss: the variance criterion ``1000 * Var_pop`` of the K-1 (smoothing) or
        K-2 (mixup) smallest entries of ``label`` (the paper's scale, §4.5).
      ok: the solution passed the validity checks (robust / closed form) or the
        paper's acceptance ``loss < 1e-9`` (paper mode).
      reason: index into :data:`REASONS` (0 when ``ok``).
      epsilon: smoothing factor ``K * mean(K-1 smallest entries)`` (NaN for mixup).
      mu: mixup coefficient, the second-largest entry of ``label``, i.e.
        ``min(mu, 1 - mu)`` (NaN for smoothing).
      row: the class ``r`` whose gradient column defines ``lam``.
      swarm: paper mode only: the particle-swarm fallback was needed.
    """

    label: Array
    feature: Array
    lam: Array
    loss: Array
    ok: Array
    reason: Array
    epsilon: Array
    mu: Array
    row: Array
    swarm: Array


# --------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------


def _is_concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs if x is not None)


def _dtype(*xs):
    return jnp.result_type(*[x for x in xs if x is not None])


def _rank_one_fit(G: Array) -> tuple[Array, Array, Array, Array, Array]:
    """Everything the checks and the search need from ``G`` ``(d, K)``, in few passes over it.

    Returns ``(finite, scale, r, c, resid)``: whether ``G`` is finite,
    ``max |G|``, the column ``r`` of largest norm, ``c = G^T g_r / |g_r|^2``
    (so ``G ~ g_r c^T``) and the relative residual of that rank-1 fit. Only
    the diagonal and column ``r`` of the Gram matrix ``G^T G`` are needed: the
    column sums of squares and one full-precision matrix-vector product, O(dK)
    (the whole ``K x K`` Gram matrix would cost O(d K^2): 51 GFLOP for LFW's
    d = 768, K = 5,749). The residual is summed explicitly (computing it from
    Gram entries loses it to cancellation in float32). A NaN or Inf in ``G``
    makes ``scale`` non-finite, which is all the caller needs then.
    """
    scale = jnp.max(jnp.abs(G))  # NaN propagates through max
    finite = jnp.isfinite(scale)
    Gn = G * (1 / jnp.where(finite & (scale > 0), scale, 1))  # |Gn| <= 1: no overflow in the squares
    col_sq = jnp.sum(Gn * Gn, axis=0)  # the Gram matrix's diagonal
    r = jnp.argmax(col_sq)
    tiny = jnp.finfo(Gn.dtype).tiny
    c = jnp.matmul(Gn.T, Gn[:, r], precision=jax.lax.Precision.HIGHEST) / jnp.maximum(col_sq[r], tiny)
    resid = jnp.sqrt(jnp.sum((Gn - Gn[:, r, None] * c[None, :]) ** 2)) / jnp.maximum(jnp.sqrt(jnp.sum(col_sq)), tiny)
    return finite, scale, r, c, resid


def _checks(G: Array, W: Optional[Array] = None, b: Optional[Array] = None, db: Optional[Array] = None,
            rank_tol: float = 1e-3) -> tuple[Array, Array, Array]:
    """``(reason, r, c)``: the reason code for unusable inputs (non-finite, all-zero, or rank > 1) and the
    rank-1 fit of :func:`_rank_one_fit`."""
    finite, scale, r, c, resid = _rank_one_fit(G)
    for x in (W, b, db):
        if x is not None:
            finite &= jnp.all(jnp.isfinite(x))
    reason = jnp.where(~finite, NON_FINITE, jnp.where(scale == 0, ZERO_GRADIENT, jnp.where(resid > rank_tol, RANK_GT_1, OK)))
    return reason, r, c


def _input_reason(G: Array, W: Optional[Array] = None, b: Optional[Array] = None, db: Optional[Array] = None,
                  rank_tol: float = 1e-3) -> Array:
    """Reason code for unusable inputs: non-finite, all-zero, or rank > 1 (``G`` ``(d, K)``)."""
    return _checks(G, W, b, db, rank_tol)[0]


@functools.partial(jax.jit, static_argnames=("rank_tol",))
def gradient_reason(weight_grad: Array, rank_tol: float = 1e-3) -> Array:
    """Whether a last-layer kernel gradient can be one example's: a :data:`REASONS` code per victim.

    One example's gradient of a dense last layer is the outer product ``h (p - y)^T``
    (rank 1; Zhao et al. 2020 §3, Wang et al. 2024 Eq. 3), which every read-out of this
    package and every one-image reconstruction relies on. ``weight_grad`` ``(d, K)`` or
    ``(V, d, K)``; returns ``OK``, ``NON_FINITE``, ``ZERO_GRADIENT`` or ``RANK_GT_1`` (the
    relative residual of the best rank-1 fit above ``rank_tol``: a batch of several
    examples), shape ``()`` or ``(V,)``. O(dK) per victim.
    """
    _check_last_layer(weight_grad)
    fn = functools.partial(_input_reason, rank_tol=rank_tol)
    return jax.vmap(fn)(weight_grad) if weight_grad.ndim == 3 else fn(weight_grad)


def _raise_for_reasons(reason, what: str) -> None:
    reason = np.atleast_1d(np.asarray(reason))
    bad = np.flatnonzero((reason == NON_FINITE) | (reason == ZERO_GRADIENT) | (reason == RANK_GT_1))
    if bad.size:
        codes = sorted(set(reason[bad].tolist()))
        victims = f" (victims {bad[:10].tolist()})" if reason.size > 1 else ""
        raise ValueError(f"{what}: {'; '.join(REASONS[c] for c in codes)}{victims}")


def _check_last_layer(weight_grad, name: str = "weight_grad") -> None:
    if jnp.ndim(weight_grad) not in (2, 3):
        raise ValueError(
            f"{name} must be the last layer's kernel gradient (d, K) in flax layout, or (V, d, K) for V victims; "
            f"got shape {jnp.shape(weight_grad)}"
        )


# --------------------------------------------------------------------------
# Soft labels: the one-parameter family (Theorem 1)
# --------------------------------------------------------------------------


def pseudo_label(weight_grad: Array, weight: Array, lam: Array, *, bias: Optional[Array] = None,
                 row: Optional[Array] = None) -> tuple[Array, Array, Array]:
    """The candidate ``(y_hat, h_hat, p_hat)`` for one value of ``lam`` (Wang et al. 2024, Eq. for ``y_hat``).

    ``h_hat = lam * G[:, r]``, ``p_hat = softmax(h_hat @ W + b)`` and
    ``y_hat = p_hat - G^T h_hat / |h_hat|^2`` (the paper's ``p_hat - g / h_hat``,
    averaged over feature entries). Theorem 1: ``sum(y_hat) = 1`` for every
    ``lam != 0``, and ``outer(h_hat, p_hat - y_hat) = G`` (ALGORITHMS.md §4.4).

    Args:
      weight_grad: ``(d, K)``; weight: ``(d, K)``; lam: scalar; bias: ``(K,)`` or None;
      row: the column ``r`` (default: the largest column norm).
    """
    G = jnp.asarray(weight_grad)
    r = jnp.argmax(jnp.sum(G * G, axis=0)) if row is None else row
    h = lam * G[:, r]
    z = h @ weight + (0 if bias is None else bias)
    p = jax.nn.softmax(z)
    y = p - (G.T @ h) / (h @ h)
    return y, h, p


def _precompute(G: Array, W: Array, b: Optional[Array], r: Array, c: Optional[Array] = None):
    """O(K d) once: ``a = g_r @ W`` and ``c = G^T g_r / |g_r|^2`` so that ``y_hat(u) = softmax(a/u + b) - u c``.

    ``c`` may be passed in when already known (the rank-1 fit of :func:`_checks` gives it), saving a pass over ``G``.
    """
    hi = jax.lax.Precision.HIGHEST  # TF32 on GPUs would perturb the label at the 1e-3 level
    g = G[:, r]
    a = jnp.matmul(g, W, precision=hi)
    if c is None:
        c = jnp.matmul(G.T, g, precision=hi) / (g @ g)
    b = jnp.zeros_like(a) if b is None else b.astype(a.dtype)
    return g, a, c, b


def _label_at(u, a, c, b):
    return jax.nn.softmax(a / u + b) - u * c


def _split(y: Array, kind: str):
    """Mask of the K-1 (smoothing) / K-2 (mixup) smallest entries, and the top-two values."""
    K = y.shape[-1]
    i1 = jnp.argmax(y)
    mask = jnp.arange(K) != i1
    second = jnp.max(jnp.where(mask, y, -jnp.inf))
    if kind == "mixup":
        i2 = jnp.argmax(jnp.where(mask, y, -jnp.inf))
        mask = mask & (jnp.arange(K) != i2)
    return mask, y[i1], second


def variance_loss(y: Array, kind: str) -> Array:
    """Wang, Liang, He's variance loss of a candidate label ``y`` ``(K,)`` (ALGORITHMS.md §4.5).

    ``1000 * Var_pop`` of the K-1 (``kind="smoothing"``) or K-2 (``"mixup"``)
    smallest entries; 0 at the true ``lam``. Two-pass, O(K).
    """
    mask, _, _ = _split(y, kind)
    n = jnp.sum(mask)
    mean = jnp.sum(jnp.where(mask, y, 0)) / n
    return 1000.0 * jnp.sum(jnp.where(mask, (y - mean) ** 2, 0)) / n


def _objective(y: Array, kind: str) -> Array:
    """The robust search's objective: the variance loss for smoothing; for mixup ``1000 * mean`` of the
    squared K-2 smallest entries (they must vanish, not merely be equal: the variance is blind to a
    constant offset and is identically 0 for K = 3)."""
    if kind == "smoothing":
        return variance_loss(y, kind)
    mask, _, _ = _split(y, kind)
    return 1000.0 * jnp.sum(jnp.where(mask, y * y, 0)) / jnp.sum(mask)


def _valid(y: Array, loss: Array, kind: str, entry_tol: float, loss_tol: float) -> Array:
    mask, top, second = _split(y, kind)
    ok = jnp.isfinite(loss) & (loss <= loss_tol) & jnp.all(y >= -entry_tol)
    if kind == "smoothing":
        eps = y.shape[-1] * jnp.sum(jnp.where(mask, y, 0)) / jnp.sum(mask)
        ok &= (eps < 1.0) & (top >= 1.0 / y.shape[-1] - entry_tol)
    else:
        ok &= jnp.all(jnp.where(mask, jnp.abs(y) <= entry_tol, True)) & (second >= -entry_tol)
    return ok


def _flat_valley(u: Array, y: Array, a: Array, c: Array, b: Array, kind: str, entry_tol: float, loss_tol: float,
                 factors: tuple[float, ...] = (0.5, 0.9, 1.1, 2.0)) -> Array:
    """Whether a label at ``u * f`` (``f`` in ``factors``) is valid too yet differs from ``y``.

    A valley of exact solutions: when the softmax is saturated, ``p = e_j``, with ``j`` a class the label
    puts most weight on (smoothing: the true class; mixup: one of the two), ``delta = p - y`` has the
    label's own form and ``y_hat(t) = e_j - t delta`` is a valid label of that form for a whole interval
    of ``t`` down to 0, so eps (or mu) is not identifiable from the gradient (measured: untrained AlexNet
    on Flowers-17 with U(-0.5, 0.5) weights, 1/17 of smoothing and 2/17 of mixup victims). A search may
    stop anywhere in the valley, near its one-hot end too, so the probes reach a factor 2 either way; an
    isolated root moves the label at first order in ``u``, which leaves the probes' loss far above
    ``loss_tol``.
    """
    us = u * jnp.asarray(factors, u.dtype)
    ys = jax.vmap(lambda v: _label_at(v, a, c, b))(us)
    valid = jax.vmap(lambda yy: _valid(yy, _objective(yy, kind), kind, entry_tol, loss_tol))(ys)
    return jnp.any(valid & (jnp.max(jnp.abs(ys - y), axis=-1) > entry_tol))


def _derived(y: Array, kind: str):
    mask, _, second = _split(y, kind)
    nan = jnp.array(jnp.nan, y.dtype)
    if kind == "smoothing":
        return y.shape[-1] * jnp.sum(jnp.where(mask, y, 0)) / jnp.sum(mask), nan
    return nan, second


def _result(y, h, lam, loss, ok, reason, kind, r, swarm) -> SoftLabel:
    eps, mu = _derived(y, kind)
    return SoftLabel(label=y, feature=h, lam=lam, loss=loss, ok=ok, reason=reason.astype(jnp.int32),
                     epsilon=eps, mu=mu, row=r.astype(jnp.int32), swarm=swarm)
