"""Analytic read-outs from the last layer's gradient: iDLG labels, soft labels and features.

One victim, one example (B = 1), cross-entropy with a label distribution ``y``.
In flax layout the last layer is ``z = h @ W (+ b)`` with ``W`` ``(d, K)``, so its
gradient is ``G = outer(h, delta)`` ``(d, K)`` with ``delta = p - y`` and, with a
bias, ``db = delta`` (ALGORITHMS.md §1).

* :func:`idlg_label` — iDLG (Zhao, Mopuri, Bilen 2020): the class of a one-hot
  label is the only one with a negative ``delta``.
* :func:`soft_label` — Wang, Liang, He (ICLR 2024): label smoothing / mixup
  labels and the feature ``h``. Column ``r`` of ``G`` gives ``h = lam * G[:, r]``
  with ``lam = 1 / delta_r`` unknown; every ``lam`` yields a candidate
  ``(h_hat, y_hat)`` reproducing ``G`` exactly (Theorem 1,
  :func:`pseudo_label`), and ``lam`` is fixed by the label's parametric form
  (the variance criterion, §4.5).

Everything is a pure function of arrays, jit-compiled and vmappable; arrays
with a leading victim axis ``(V, d, K)`` are mapped automatically. The search
runs in the dtype of its inputs (cast to float64 under
``jax.enable_x64(True)`` for the tightest results).
"""

from __future__ import annotations

import dataclasses
import functools
import math
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
    "ambiguous: several lambdas give valid labels of this kind (not identifiable; happens for small K)",
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


@dataclasses.dataclass(frozen=True)
class RobustSearch:
    """jaxleak's bounded search on ``u = 1 / lam`` (ALGORITHMS.md §4.11).

    ``|delta_r| <= 1`` gives ``|u| <= 1``; for non-negative features the sign
    of ``u`` is the sign of the chosen gradient column. A log-spaced grid of
    ``grid_size`` points on ``|u|`` in ``[u_min, 1]`` is evaluated at O(K) per
    point, the ``candidates`` best local minima are refined by a finer grid
    (``fine_size`` points) and golden-section search (``refine_iters`` steps in
    ``log|u|``) on ``loss / u^2`` (which removes the spurious minimum at ``u -> 0``), and spurious solutions are
    rejected (entries below ``-entry_tol``; for smoothing the K-1 small entries
    equal and >= 0, for mixup K-2 entries ~0 and the top two >= 0).
    ``nonnegative=False`` searches both signs (features of any sign).
    Default tolerances: entries 1e-5, loss 1e-9 (the paper's threshold).
    """

    grid_size: int = 512
    u_min: float = 1e-4
    candidates: int = 4
    fine_size: int = 64
    refine_iters: int = 40
    nonnegative: bool = True
    entry_tol: Optional[float] = None
    loss_tol: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class PaperSearch:
    """The reference procedure of Wang, Liang, He (ybwang119/label_recovery; ALGORITHMS.md §4.6).

    Search variable ``s`` with ``lam = s / coefficient`` (default 4 smoothing,
    2 mixup). Stage A: PyTorch-semantics L-BFGS (lr 0.5, 20 inner iterations per
    step, no line search) from ``s = +1`` for ``epochs`` steps with "skip" on
    plateaus and a "flip" to ``s = -1`` past ``|s| > bound``. Stage B (when A
    gives up): particle swarm (``particles`` x ``swarm_iters``, w 0.8, c1 = c2
    = 0.5) over widening windows (``inter_bound``: 20 smoothing, 50 mixup).
    ``seed`` makes the swarm deterministic.
    """

    coefficient: Optional[float] = None
    lr: float = 0.5
    epochs: int = 100
    bound: float = 100.0
    threshold: float = 1e-9
    max_iter: int = 20
    max_eval: int = 25
    tolerance_grad: float = 1e-7
    tolerance_change: float = 1e-9
    particles: int = 500
    swarm_iters: int = 40
    inter_bound: Optional[float] = None
    inertia: float = 0.8
    c1: float = 0.5
    c2: float = 0.5
    seed: int = 0


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
    (so ``G ~ g_r c^T``) and the relative residual of that rank-1 fit. The
    Gram matrix ``G^T G`` (one matrix product, full precision) gives ``r`` and
    ``c``; the residual is summed explicitly (computing it from the Gram matrix
    loses it to cancellation in float32). A NaN or Inf in ``G`` makes ``scale``
    non-finite, which is all the caller needs then.
    """
    scale = jnp.max(jnp.abs(G))  # NaN propagates through max
    finite = jnp.isfinite(scale)
    Gn = G * (1 / jnp.where(finite & (scale > 0), scale, 1))  # |Gn| <= 1: no overflow in the squares
    M = jnp.matmul(Gn.T, Gn, precision=jax.lax.Precision.HIGHEST)
    r = jnp.argmax(jnp.diagonal(M))
    tiny = jnp.finfo(Gn.dtype).tiny
    c = M[:, r] / jnp.maximum(M[r, r], tiny)
    resid = jnp.sqrt(jnp.sum((Gn - Gn[:, r, None] * c[None, :]) ** 2)) / jnp.maximum(jnp.sqrt(jnp.trace(M)), tiny)
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
# iDLG
# --------------------------------------------------------------------------


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
    if errors == "raise" and _is_concrete(weight_grad, bias_grad) and bool(jnp.any(label < 0)):
        reasons = jax.jit(jax.vmap(_input_reason) if batched else _input_reason)(weight_grad, None, None, bias_grad)
        _raise_for_reasons(reasons, "idlg_label: weight_grad is unusable")
    return label


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


def _precompute(G: Array, W: Array, b: Optional[Array], r: Array):
    """O(K d) once: ``a = g_r @ W`` and ``c = G^T g_r / |g_r|^2`` so that ``y_hat(u) = softmax(a/u + b) - u c``."""
    hi = jax.lax.Precision.HIGHEST  # TF32 on GPUs would perturb the label at the 1e-3 level
    g = G[:, r]
    a = jnp.matmul(g, W, precision=hi)
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


def _derived(y: Array, kind: str):
    mask, _, second = _split(y, kind)
    nan = jnp.array(jnp.nan, y.dtype)
    if kind == "smoothing":
        return y.shape[-1] * jnp.sum(jnp.where(mask, y, 0)) / jnp.sum(mask), nan
    return nan, second


def _tolerances(dtype, cfg: RobustSearch):
    f64 = jnp.dtype(dtype) == jnp.float64
    # Near |u| = u_min the family approaches a one-hot label whose small entries are ~u * c_k: loose
    # tolerances would accept it. The true root is at rounding level (1e-13 float32, 1e-25 float64).
    # Inputs are often float32 gradients cast to float64: their rank-1 structure holds to ~1e-7 only,
    # so the float64 tolerances cannot be much tighter than float32's.
    del f64
    entry = cfg.entry_tol if cfg.entry_tol is not None else 1e-5
    loss = cfg.loss_tol if cfg.loss_tol is not None else 1e-9
    return entry, loss


def _result(y, h, lam, loss, ok, reason, kind, r, swarm) -> SoftLabel:
    eps, mu = _derived(y, kind)
    return SoftLabel(label=y, feature=h, lam=lam, loss=loss, ok=ok, reason=reason.astype(jnp.int32),
                     epsilon=eps, mu=mu, row=r.astype(jnp.int32), swarm=swarm)


# --------------------------------------------------------------------------
# Closed form with a bias gradient
# --------------------------------------------------------------------------


def _closed_form(G, W, b, db, kind, cfg: RobustSearch) -> SoftLabel:
    """``delta = db`` is observed: ``h = G[:, r] / db_r``, ``y = softmax(h W + b) - db`` (ALGORITHMS.md §4.7)."""
    reason = _input_reason(G, W, b, db)
    r = jnp.argmax(jnp.abs(db))
    u = db[r]
    u = jnp.where(u == 0, 1, u)
    h = G[:, r] / u
    y = jax.nn.softmax(h @ W + b) - db
    loss = variance_loss(y, kind)
    entry_tol, loss_tol = _tolerances(y.dtype, cfg)
    ok = (reason == OK) & _valid(y, _objective(y, kind), kind, entry_tol, loss_tol)
    reason = jnp.where((reason == OK) & ~ok, NO_SOLUTION, reason)
    return _result(y, h, 1 / u, loss, ok, reason, kind, r, jnp.array(False))


# --------------------------------------------------------------------------
# Robust search on u = 1 / lam
# --------------------------------------------------------------------------


def _golden(f, lo, hi, iters):
    """Golden-section minimisation of a unimodal ``f`` on ``[lo, hi]`` (one evaluation per step)."""
    gr = (math.sqrt(5.0) - 1.0) / 2.0
    x1, x2 = hi - gr * (hi - lo), lo + gr * (hi - lo)
    f1, f2 = f(x1), f(x2)

    def body(_, c):
        lo, hi, x1, x2, f1, f2 = c
        left = f1 < f2  # minimum in [lo, x2]
        lo, hi = jnp.where(left, lo, x1), jnp.where(left, x2, hi)
        xn = jnp.where(left, hi - gr * (hi - lo), lo + gr * (hi - lo))
        fn = f(xn)
        x1, x2, f1, f2 = (jnp.where(left, xn, x2), jnp.where(left, x1, xn),
                          jnp.where(left, fn, f2), jnp.where(left, f1, fn))
        return lo, hi, x1, x2, f1, f2

    lo, hi, x1, x2, f1, f2 = jax.lax.fori_loop(0, iters, body, (lo, hi, x1, x2, f1, f2))
    return jnp.where(f1 < f2, x1, x2), jnp.minimum(f1, f2)


def _robust(G, W, b, kind, cfg: RobustSearch) -> SoftLabel:
    reason, r, c = _checks(G, W, b)  # r, c: as _precompute's, without more passes over G
    dtype = G.dtype
    g = G[:, r]
    a = jnp.matmul(g, W, precision=jax.lax.Precision.HIGHEST)
    b = jnp.zeros_like(a) if b is None else b.astype(a.dtype)
    # As u -> 0 the candidate tends to a one-hot label and the loss to 0 like u^2 (the spurious minimum
    # at |lam| -> infinity); dividing by u^2 leaves a positive limit there and the true root at 0.
    loss_u = lambda u: _objective(_label_at(u, a, c, b), kind) / (u * u)

    # For h >= 0, sign(delta_r) = sign of the column g_r (ALGORITHMS.md §4.2).
    signs = jnp.where(jnp.sum(g) >= 0, 1.0, -1.0).astype(dtype)[None] if cfg.nonnegative else jnp.array([-1.0, 1.0], dtype)
    ts = jnp.linspace(math.log(cfg.u_min), 0.0, cfg.grid_size, dtype=dtype)
    f = jax.vmap(lambda s: jax.vmap(lambda t: loss_u(s * jnp.exp(t)))(ts))(signs)  # (S, N)
    f = jnp.where(jnp.isfinite(f), f, jnp.inf)
    pad = jnp.pad(f, ((0, 0), (1, 1)), constant_values=jnp.inf)
    # The end at |u| = u_min is the spurious limit |lam| -> infinity (y_hat -> one-hot, loss -> 0):
    # never a candidate by itself; the end |u| = 1 is.
    is_min = (f <= pad[:, :-2]) & (f <= pad[:, 2:]) & (jnp.arange(f.shape[1]) > 0)
    score = jnp.where(is_min, f, jnp.inf).reshape(-1)
    m = min(cfg.candidates, score.shape[0])
    _, idx = jax.lax.top_k(-score, m)
    si, ti = idx // cfg.grid_size, idx % cfg.grid_size
    n = cfg.grid_size
    lo = ts[jnp.clip(ti - 1, 0, n - 1)]
    hi = ts[jnp.clip(ti + 1, 0, n - 1)]

    def refine(s, lo, hi, t0):
        # A finer grid first: for mixup with a small mu the basin is narrower than the coarse spacing
        # (the second-largest entry swaps with a near-zero one just beside the root).
        fl = lambda t: loss_u(s * jnp.exp(t))
        fine = jnp.linspace(lo, hi, cfg.fine_size, dtype=lo.dtype)
        j = jnp.argmin(jnp.where(jnp.isfinite(fv := jax.vmap(fl)(fine)), fv, jnp.inf))
        lo, hi = fine[jnp.maximum(j - 1, 0)], fine[jnp.minimum(j + 1, cfg.fine_size - 1)]
        t0 = fine[j]
        t, ft = _golden(fl, lo, hi, cfg.refine_iters)
        f0 = fl(t0)
        t = jnp.where(ft <= f0, t, t0)
        u = s * jnp.exp(t)
        y = _label_at(u, a, c, b)
        return u, y, _objective(y, kind)

    us, ys, objs = jax.vmap(refine)(signs[si], lo, hi, ts[ti])
    entry_tol, loss_tol = _tolerances(dtype, cfg)
    valid = jax.vmap(lambda y, l: _valid(y, l, kind, entry_tol, loss_tol))(ys, objs)
    objs = jnp.where(jnp.isfinite(objs), objs, jnp.inf)
    best = jnp.where(jnp.any(valid), jnp.argmin(jnp.where(valid, objs, jnp.inf)), jnp.argmin(objs))
    u, y = us[best], ys[best]
    # Two valid candidates with different labels, both at rounding level: the data cannot tell them
    # apart (happens for small K). A rival far above the best root's loss is merely near-valid.
    differs = jnp.max(jnp.abs(ys - y), axis=-1) > 100 * entry_tol
    rival = objs <= jnp.maximum(100.0 * objs[best], 1e-3 * loss_tol)
    ambiguous = jnp.any(valid & differs & rival)
    ok = (reason == OK) & valid[best] & ~ambiguous
    reason = jnp.where(reason != OK, reason, jnp.where(~valid[best], NO_SOLUTION, jnp.where(ambiguous, AMBIGUOUS, OK)))
    return _result(y, g / u, 1 / u, variance_loss(y, kind), ok, reason, kind, r, jnp.array(False))


# --------------------------------------------------------------------------
# Paper mode: L-BFGS with flip/skip, particle-swarm fallback
# --------------------------------------------------------------------------


def _paper_defaults(kind: str, cfg: PaperSearch):
    coef = cfg.coefficient if cfg.coefficient is not None else (4.0 if kind == "smoothing" else 2.0)
    inter = cfg.inter_bound if cfg.inter_bound is not None else (20.0 if kind == "smoothing" else 50.0)
    return coef, inter


def swarm_windows(inter_bound: float) -> tuple[tuple[float, float], ...]:
    """The reference's widening PSO windows: ``[lo-.3, hi]`` then ``[-hi-.3, -lo]`` while ``hi < 70``."""
    lo, hi, wins = 1.0, 6.0, []
    steps = iter([inter_bound / 5] + [inter_bound] * 100)
    while hi < 70:
        wins += [(lo - 0.3, hi), (-hi - 0.3, -lo)]
        lo, hi = hi, hi + next(steps)
    return tuple(wins)


def _paper_loss_fn(G, W, b, kind, coef):
    r = jnp.argmax(jnp.abs(jnp.sum(G, axis=0)))  # the reference's row: largest |column sum|
    g, a, c, b = _precompute(G, W, b, r)
    loss_s = lambda s: variance_loss(_label_at(coef / s, a, c, b), kind)  # lam = s / coef, u = coef / s
    return r, g, a, c, b, loss_s


def _lbfgs_fresh(dtype):
    z = jnp.zeros((), dtype)
    return dict(n_iter=jnp.zeros((), jnp.int32), d=z, t=z, prev_g=z, prev_loss=z, ps=z, py=z,
                pairs=jnp.zeros((), jnp.int32))


def _lbfgs_step(vg, s, st, cfg: PaperSearch):
    """One ``torch.optim.LBFGS.step`` on a scalar (no line search; ALGORITHMS.md §2.3).

    In one dimension the two-loop recursion collapses to the secant step with
    the most recently accepted pair: ``d = -g * s_k / y_k``.
    """
    loss, g = vg(s)

    def cond(c):
        return ~c["stop"]

    def body(c):
        s, loss, g, st = c["s"], c["loss"], c["g"], c["st"]
        n = c["n"] + 1
        n_iter = st["n_iter"] + 1
        first = n_iter == 1
        y = g - st["prev_g"]
        sd = st["d"] * st["t"]
        accept = (~first) & (y * sd > 1e-10)
        ps, py = jnp.where(accept, sd, st["ps"]), jnp.where(accept, y, st["py"])
        pairs = jnp.where(first, 0, st["pairs"] + accept)
        d = jnp.where(first | (pairs == 0), -g, -g * ps / jnp.where(py == 0, 1, py))
        t = jnp.where(first, jnp.minimum(1.0, 1.0 / jnp.abs(g)) * cfg.lr, cfg.lr).astype(s.dtype)
        st = dict(n_iter=n_iter, d=d, t=t, prev_g=g, prev_loss=loss, ps=ps, py=py, pairs=pairs)
        gtd_stop = g * d > -cfg.tolerance_change
        s_new = s + t * d
        evaluate = n != cfg.max_iter
        loss_n, g_n = vg(s_new)
        loss_n, g_n = jnp.where(evaluate, loss_n, loss), jnp.where(evaluate, g_n, g)
        evals = c["evals"] + evaluate
        stop = ((n == cfg.max_iter) | (evals >= cfg.max_eval) | (jnp.abs(g_n) <= cfg.tolerance_grad)
                | (jnp.abs(t * d) <= cfg.tolerance_change) | (jnp.abs(loss_n - loss) < cfg.tolerance_change))
        return dict(
            s=jnp.where(gtd_stop, s, s_new), loss=jnp.where(gtd_stop, loss, loss_n), g=jnp.where(gtd_stop, g, g_n),
            st=st, n=n, evals=evals, stop=gtd_stop | stop | ~jnp.isfinite(s_new),
        )

    init = dict(s=s, loss=loss, g=g, st=st, n=jnp.zeros((), jnp.int32), evals=jnp.ones((), jnp.int32),
                stop=jnp.abs(g) <= cfg.tolerance_grad)
    out = jax.lax.while_loop(cond, body, init)
    return out["s"], out["st"]


def _paper_stage_a(G, W, b, kind, cfg: PaperSearch):
    """L-BFGS from s = +1 with skip/flip, then from s = -1 (ALGORITHMS.md §4.6, stage A).

    Returns ``(s, loss, give_up)``; ``give_up`` sends the victim to the swarm.
    """
    coef, _ = _paper_defaults(kind, cfg)
    _, _, _, _, _, loss_s = _paper_loss_fn(G, W, b, kind, coef)
    vg = jax.value_and_grad(loss_s)
    dtype = G.dtype
    one = jnp.ones((), dtype)
    E = cfg.epochs

    def cond(c):
        return c["e"] < 2 * E

    def body(c):
        e, s = c["e"], c["s"]
        neg = e >= E
        L = loss_s(s)
        L = jnp.where(jnp.isfinite(L), L, jnp.inf)
        last3 = jnp.stack([c["last3"][1], c["last3"][2], L])
        out = ~(jnp.abs(s) <= cfg.bound)
        conv = L < cfg.threshold
        plateau = (jnp.max(last3) - jnp.min(last3)) < jnp.sum(last3) / 3000
        s_step, st_step = jax.lax.cond(plateau | out | conv, lambda: (s, c["st"]),
                                       lambda: _lbfgs_step(vg, s, c["st"], cfg))
        jump_s = jnp.where(neg, s - c["jump"], s + c["jump"])
        s_next = jnp.where(plateau, jump_s, s_step)
        st_next = jax.tree_util.tree_map(lambda x, y: jnp.where(plateau, x, y), c["st"], st_step)
        jump_next = jnp.where(plateau, 2 * c["jump"], c["jump"])
        rem_L, rem_s = c["rem_L"], c["rem_s"]
        # Phase +: out of bound -> remember and flip; last epoch -> remember.
        remember = (~neg) & (out | (e == E - 1))
        rem_L = jnp.where(remember, L, rem_L)
        rem_s = jnp.where(remember & out, s, jnp.where(remember, s_next, rem_s))
        # Phase -: at the last epoch keep the remembered point if it was better.
        last_neg = neg & (e == 2 * E - 1) & ~out & ~conv
        s_next = jnp.where(last_neg & (L > rem_L), rem_s, s_next)
        to_neg = (~neg) & (out | (e == E - 1)) & ~(conv & ~out)
        fresh = _lbfgs_fresh(dtype)
        s_next = jnp.where(to_neg, -one, s_next)
        st_next = jax.tree_util.tree_map(lambda x, y: jnp.where(to_neg, x, y), fresh, st_next)
        last3_next = jnp.where(to_neg, jnp.zeros(3, dtype), last3)
        jump_next = jnp.where(to_neg, 0.5 * one, jump_next)
        finished = (conv & ~out) | (neg & out)
        e_next = jnp.where(finished, 2 * E, jnp.where(to_neg, E, e + 1))
        s_final = jnp.where(finished, s, s_next)
        give_up = jnp.where(conv & ~out, False, jnp.where(neg & out, True, c["give_up"]))
        give_up = jnp.where(~finished & (e_next >= 2 * E), True, give_up)
        return dict(e=e_next, s=s_final, st=st_next, last3=last3_next, jump=jump_next, rem_L=rem_L, rem_s=rem_s,
                    give_up=give_up)

    init = dict(e=jnp.zeros((), jnp.int32), s=one, st=_lbfgs_fresh(dtype), last3=jnp.zeros(3, dtype),
                jump=0.5 * one, rem_L=jnp.array(jnp.inf, dtype), rem_s=one, give_up=jnp.array(False))
    out = jax.lax.while_loop(cond, body, init)
    s = out["s"]
    return s, loss_s(s), out["give_up"]


def _pso(loss_s, key, lo, hi, cfg: PaperSearch, dtype):
    """scikit-opt's PSO in 1-D: ``particles`` candidates evaluated in one batched call per iteration."""
    P = cfg.particles
    k0, k1, key = jax.random.split(key, 3)
    x = jax.random.uniform(k0, (P,), dtype, lo, hi)
    v = jax.random.uniform(k1, (P,), dtype, -(hi - lo), hi - lo)
    batched = jax.vmap(loss_s)
    fx = batched(x)
    fx = jnp.where(jnp.isfinite(fx), fx, jnp.inf)
    pbx, pby = x, fx
    gi = jnp.argmin(fx)
    gbx, gby = x[gi], fx[gi]

    def body(i, c):
        x, v, pbx, pby, gbx, gby = c
        r1, r2 = jax.random.uniform(jax.random.fold_in(key, i), (2, P), dtype)
        v = cfg.inertia * v + cfg.c1 * r1 * (pbx - x) + cfg.c2 * r2 * (gbx - x)
        x = jnp.clip(x + v, lo, hi)
        fx = batched(x)
        fx = jnp.where(jnp.isfinite(fx), fx, jnp.inf)
        better = fx < pby
        pbx, pby = jnp.where(better, x, pbx), jnp.where(better, fx, pby)
        gi = jnp.argmin(pby)
        gbx, gby = jnp.where(pby[gi] < gby, pbx[gi], gbx), jnp.minimum(pby[gi], gby)
        return x, v, pbx, pby, gbx, gby

    _, _, _, _, gbx, gby = jax.lax.fori_loop(0, cfg.swarm_iters, body, (x, v, pbx, pby, gbx, gby))
    return gbx, gby


def _paper_swarm(G, W, b, s0, L0, kind, cfg: PaperSearch):
    """Stage B: PSO over the widening windows until one reaches ``loss < threshold`` (§4.6)."""
    coef, inter = _paper_defaults(kind, cfg)
    _, _, _, _, _, loss_s = _paper_loss_fn(G, W, b, kind, coef)
    wins = jnp.asarray(swarm_windows(inter), G.dtype)
    key = jax.random.PRNGKey(cfg.seed)
    L0 = jnp.where(jnp.isfinite(L0), L0, jnp.inf)

    def cond(c):
        return (c[0] < wins.shape[0]) & ~(c[2] < cfg.threshold)

    def body(c):
        i, s, L = c
        sx, sl = _pso(loss_s, jax.random.fold_in(key, i), wins[i, 0], wins[i, 1], cfg, G.dtype)
        better = sl < L
        return i + 1, jnp.where(better, sx, s), jnp.where(better, sl, L)

    _, s, L = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), s0, jnp.array(jnp.inf, G.dtype)))
    keep = L0 < L  # nothing better found: keep stage A's point
    return jnp.where(keep, s0, s), jnp.where(keep, L0, L)


def _paper_finish(G, W, b, s, used_swarm, kind, cfg: PaperSearch) -> SoftLabel:
    reason = _input_reason(G, W, b)
    coef, _ = _paper_defaults(kind, cfg)
    r, g, a, c, bb, _ = _paper_loss_fn(G, W, b, kind, coef)
    u = coef / s
    y = _label_at(u, a, c, bb)
    loss = variance_loss(y, kind)
    ok = (reason == OK) & (loss < cfg.threshold)
    reason = jnp.where((reason == OK) & ~ok, NO_SOLUTION, reason)
    return _result(y, g / u, s / coef, loss, ok, reason, kind, r, used_swarm)


def _paper_traced(G, W, b, kind, cfg: PaperSearch) -> SoftLabel:
    s, L, give_up = _paper_stage_a(G, W, b, kind, cfg)
    s, L = jax.lax.cond(give_up, lambda: _paper_swarm(G, W, b, s, L, kind, cfg), lambda: (s, L))
    return _paper_finish(G, W, b, s, give_up, kind, cfg)


# --------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------


def _one(G, W, b, db, kind, search, cfg) -> SoftLabel:
    dtype = _dtype(G, W, b, db)
    G, W = G.astype(dtype), W.astype(dtype)
    b = None if b is None else b.astype(dtype)
    if db is not None:
        return _closed_form(G, W, jnp.zeros(G.shape[-1], dtype) if b is None else b, db.astype(dtype), kind, cfg)
    if search == "robust":
        return _robust(G, W, b, kind, cfg)
    return _paper_traced(G, W, b, kind, cfg)


@functools.lru_cache(maxsize=None)
def _compiled(name: str, kind: str, search: str, cfg, axes: Optional[tuple]):
    """jit(fn) or jit(vmap(fn, in_axes=axes)) for one static configuration."""
    if name == "one":
        fn = lambda G, W, b, db: _one(G, W, b, db, kind, search, cfg)
    elif name == "stage_a":
        def fn(G, W, b, db):
            del db
            dtype = _dtype(G, W, b)
            return _paper_stage_a(G.astype(dtype), W.astype(dtype), None if b is None else b.astype(dtype), kind, cfg)
    elif name == "swarm":
        def fn(G, W, b, s, L):
            dtype = _dtype(G, W, b)
            return _paper_swarm(G.astype(dtype), W.astype(dtype), None if b is None else b.astype(dtype), s, L, kind, cfg)
    elif name == "finish":
        def fn(G, W, b, s, used):
            dtype = _dtype(G, W, b)
            return _paper_finish(G.astype(dtype), W.astype(dtype), None if b is None else b.astype(dtype), s, used, kind, cfg)
    else:
        raise KeyError(name)
    return jax.jit(jax.vmap(fn, in_axes=axes) if axes is not None else fn)


def _paper_host(G, W, b, axes, kind, cfg) -> SoftLabel:
    """Concrete victims: stage A for all, the swarm only for those that gave up (no select over victims)."""
    s, L, give_up = _compiled("stage_a", kind, "paper", cfg, axes + (None,))(G, W, b, None)
    need = np.flatnonzero(np.asarray(give_up))
    if need.size:
        take = lambda x, ax: x if (x is None or ax is None) else x[need]
        sw_axes = axes[:3] + (0, 0)
        s_sw, _ = _compiled("swarm", kind, "paper", cfg, sw_axes)(
            take(G, 0), take(W, axes[1]), take(b, axes[2]), s[need], L[need])
        s = s.at[need].set(s_sw)
    return _compiled("finish", kind, "paper", cfg, axes[:3] + (0, 0))(G, W, b, s, give_up)


def soft_label(
    weight_grad: Array,
    weight: Array,
    *,
    kind: str,
    bias: Optional[Array] = None,
    bias_grad: Optional[Array] = None,
    search: str = "robust",
    config: RobustSearch | PaperSearch | None = None,
    errors: str = "raise",
) -> SoftLabel:
    """Soft-label and feature recovery of Wang, Liang, He (ICLR 2024), from the last layer alone.

    Every ``lam != 0`` gives a candidate ``h_hat = lam * G[:, r]`` and
    ``y_hat = softmax(h_hat W + b) - G^T h_hat / |h_hat|^2`` that reproduces
    ``G`` exactly (Theorem 1); the label's parametric form picks ``lam``: K-1
    equal entries (label smoothing) or K-2 zeros (mixup), measured by the
    variance loss (ALGORITHMS.md §4.2-4.5). With ``bias_grad`` the answer is
    closed form, ``lam = 1 / db_r``.

    Args:
      weight_grad: last-layer kernel gradient ``(d, K)`` (flax layout), or ``(V, d, K)``.
      weight: last-layer kernel ``(d, K)``, shared, or ``(V, d, K)`` per victim.
      kind: ``"smoothing"`` or ``"mixup"``.
      bias: last-layer bias ``(K,)`` / ``(V, K)`` if the layer has one.
      bias_grad: its gradient, same shape; gives the closed form (then ``bias``
        must be given too: the logits need it).
      search: ``"robust"`` (jaxleak's bounded search on ``u = 1/lam``,
        :class:`RobustSearch`) or ``"paper"`` (the reference L-BFGS + swarm,
        :class:`PaperSearch`). Without a bias gradient the problem needs K >= 3.
      config: a :class:`RobustSearch` / :class:`PaperSearch` (defaults reproduce §4.6/§4.11).
      errors: ``"raise"`` (default) raises ``ValueError`` for unusable concrete
        inputs; ``"flag"`` only reports them in ``ok``/``reason`` (many victims).

    Returns:
      A :class:`SoftLabel` (leading ``V`` axis when batched). Non-finite,
      all-zero or rank > 1 gradients raise ``ValueError`` on concrete inputs
      (``errors="raise"``) and otherwise give ``ok=False`` with ``reason`` 1-3 under ``jit``/``vmap``.
      Under a user's ``vmap`` the paper mode runs the swarm for every victim
      (``cond`` becomes ``select``); batched concrete calls run it only where needed.
    """
    if errors not in ("raise", "flag"):
        raise ValueError(f"errors must be 'raise' or 'flag', got {errors!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
    _check_last_layer(weight_grad)
    G, W = jnp.asarray(weight_grad), jnp.asarray(weight)
    batched = G.ndim == 3
    d, K = G.shape[-2:]
    if W.shape[-2:] != (d, K) or W.ndim not in ((2, 3) if batched else (2,)) or (W.ndim == 3 and W.shape[0] != G.shape[0]):
        raise ValueError(f"weight must be the last layer's kernel of shape (d, K) = {(d, K)}"
                         f"{' or (V, d, K)' if batched else ''}, matching weight_grad {G.shape}; got {W.shape}")
    vec = lambda x, name: None if x is None else _check_vec(jnp.asarray(x), name, G, K, batched)
    b, db = vec(bias, "bias"), vec(bias_grad, "bias_grad")
    if db is not None and b is None:
        raise ValueError("bias_grad was given without bias: the closed form needs the bias to compute the logits")
    if db is None and K < 3:
        raise ValueError(f"soft_label without bias_grad needs K >= 3 classes, got K = {K}: with K = 2 every lam "
                         "gives a valid smoothing/mixup label (the family of Theorem 1 is not identifiable)")
    if config is None:
        config = RobustSearch() if (search == "robust" or db is not None) else PaperSearch()
    expected = PaperSearch if (search == "paper" and db is None) else RobustSearch
    if not isinstance(config, expected):
        raise ValueError(f"config must be a {expected.__name__} for search={search!r}, got {type(config).__name__}")

    axes = None
    if batched:
        axes = (0, 0 if W.ndim == 3 else None, None if b is None else (0 if b.ndim == 2 else None),
                None if db is None else (0 if db.ndim == 2 else None))
    concrete = _is_concrete(G, W, b, db)
    if search == "paper" and db is None and concrete:
        if batched:
            out = _paper_host(G, W, b, axes[:3], kind, config)
        else:
            out = _paper_host(G[None], W, b, (0, None, None), kind, config)
            out = jax.tree_util.tree_map(lambda x: x[0], out)
    else:
        out = _compiled("one", kind, search, config, axes)(G, W, b, db)
    if concrete and errors == "raise":
        _raise_for_reasons(out.reason, "soft_label: weight_grad is unusable")
    return out


def _check_vec(x, name, G, K, batched):
    ok_shapes = [(K,)] + ([(G.shape[0], K)] if batched else [])
    if x.shape not in ok_shapes:
        raise ValueError(f"{name} must have shape {' or '.join(map(str, ok_shapes))}, got {x.shape}")
    return x
