"""jaxleak's soft-label search: the closed form with a bias gradient, and the robust search on ``u = 1 / lam``.

Wang, Liang, He (ICLR 2024) fix ``lam`` by the label's parametric form; this
module finds it by a bounded grid + golden-section search (ALGORITHMS.md
§4.11), or reads it off the bias gradient when there is one (§4.7).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp

from jaxleak.recovery._core import (
    AMBIGUOUS, NO_SOLUTION, OK, SoftLabel, _checks, _flat_valley, _input_reason, _label_at, _objective, _precompute,
    _result, _valid,
    variance_loss,
)


@dataclasses.dataclass(frozen=True)
class RobustSearch:
    """jaxleak's bounded search on ``u = 1 / lam`` (ALGORITHMS.md §4.11).

    ``|delta_r| <= 1`` gives ``|u| <= 1``; for non-negative features the sign
    of ``u`` is the sign of the chosen gradient column. A log-spaced grid of
    ``grid_size`` points on ``|u|`` in ``[u_min, 1]`` is evaluated at O(K) per
    point, the ``candidates`` best local minima (for mixup also the ``crossing_candidates`` grid
    intervals where the most entries of ``y_hat`` change sign) are refined by a finer grid
    (``fine_size`` points) and golden-section search (``refine_iters`` steps in
    ``log|u|``) on ``loss / u^2`` (which removes the spurious minimum at ``u -> 0``), and spurious solutions are
    rejected (entries below ``-entry_tol``; for smoothing the K-1 small entries
    equal and >= 0, for mixup K-2 entries ~0 and the top two >= 0).
    ``nonnegative=False`` searches both signs (features of any sign).
    Default tolerances: entries 1e-5, loss 1e-9 (the paper's threshold).

    Budget: the grid spacing in ``log|u|`` is ``ln(1/u_min) / (grid_size - 1)``
    (2.4 % of ``u`` at 384 points); the fine grid spans two coarse spacings, and
    28 golden-section steps shrink one fine spacing (~8e-4) by 0.618^28 to
    ~1e-9 in ``log|u|``, below float32 resolution and far below the ~1e-6 a
    label error of 1e-6 needs. Measured on LeNet/CIFAR-10 (1,000 victims each,
    2-core CPU, one run): 512 points and 40 steps gave 12.7k (smoothing) /
    16.8k (mixup) victims/s, 384 and 28 gave 16.6k / 22.6k, both with every
    label within 1e-3.
    """

    grid_size: int = 384
    u_min: float = 1e-4
    candidates: int = 4
    crossing_candidates: int = 1
    fine_size: int = 64
    refine_iters: int = 28
    nonnegative: bool = True
    entry_tol: Optional[float] = None
    loss_tol: Optional[float] = None


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
    reason, r, c = _checks(G, W, b)  # r, c: the rank-1 fit's, so _precompute need not read G again for c
    dtype = G.dtype
    g, a, c, b = _precompute(G, W, b, r, c)
    # As u -> 0 the candidate tends to a one-hot label and the loss to 0 like u^2 (the spurious minimum
    # at |lam| -> infinity); dividing by u^2 leaves a positive limit there and the true root at 0.
    loss_of = lambda y, u: _objective(y, kind) / (u * u)
    loss_u = lambda u: loss_of(_label_at(u, a, c, b), u)

    # For h >= 0, sign(delta_r) = sign of the column g_r (ALGORITHMS.md §4.2).
    signs = jnp.where(jnp.sum(g) >= 0, 1.0, -1.0).astype(dtype)[None] if cfg.nonnegative else jnp.array([-1.0, 1.0], dtype)
    ts = jnp.linspace(math.log(cfg.u_min), 0.0, cfg.grid_size, dtype=dtype)
    n = cfg.grid_size

    def on_grid(s):
        us = s * jnp.exp(ts)
        ys = jax.vmap(lambda u: _label_at(u, a, c, b))(us)  # (N, K)
        f = jax.vmap(loss_of)(ys, us)  # loss_u, keeping the labels for the crossings
        # Entries that change sign between neighbouring grid points (mixup only, see below).
        crossings = jnp.sum((ys[:-1] > 0) != (ys[1:] > 0), axis=-1) if kind == "mixup" else None
        return f, crossings

    f, crossings = jax.vmap(on_grid)(signs)  # (S, N), (S, N - 1)
    f = jnp.where(jnp.isfinite(f), f, jnp.inf)
    pad = jnp.pad(f, ((0, 0), (1, 1)), constant_values=jnp.inf)
    # The end at |u| = u_min is the spurious limit |lam| -> infinity (y_hat -> one-hot, loss -> 0):
    # never a candidate by itself; the end |u| = 1 is.
    is_min = (f <= pad[:, :-2]) & (f <= pad[:, 2:]) & (jnp.arange(f.shape[1]) > 0)
    score = jnp.where(is_min, f, jnp.inf).reshape(-1)
    m = min(cfg.candidates, score.shape[0])
    _, idx = jax.lax.top_k(-score, m)
    si, ti = idx // n, idx % n
    lo = ts[jnp.clip(ti - 1, 0, n - 1)]
    hi = ts[jnp.clip(ti + 1, 0, n - 1)]
    t0 = ts[ti]
    if kind == "mixup" and cfg.crossing_candidates > 0:
        # With a small mu the root's basin can fall between two grid points: as soon as a near-zero entry
        # outgrows mu it takes the second place, mu's entry joins the K-2 "zeros", and the grid sees a
        # smooth slope with no minimum there (measured: K = 10, mu in [0.001, 0.02], 3.9 % of victims
        # found no solution). At the root K-2 entries vanish together, most of them crossing zero, so
        # the grid intervals where the most entries change sign are candidates too (one is enough: with
        # two, the same synthetic victims gave as many solutions, and more flagged ambiguous).
        # (As floats: XLA's CPU top_k is ~10x slower on integers, measured at V=1,000, N=384, K=10.)
        # Not the interval at |u| = u_min, the spurious end (as for the minima above).
        count = jnp.where(jnp.arange(n - 1) > 0, crossings, -1).astype(dtype).reshape(-1)
        mc = min(cfg.crossing_candidates, count.shape[0])
        _, cidx = jax.lax.top_k(count, mc)
        csi, cti = cidx // (n - 1), cidx % (n - 1)
        si = jnp.concatenate([si, csi])
        lo, hi = jnp.concatenate([lo, ts[cti]]), jnp.concatenate([hi, ts[cti + 1]])
        t0 = jnp.concatenate([t0, ts[cti]])

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

    us, ys, objs = jax.vmap(refine)(signs[si], lo, hi, t0)
    entry_tol, loss_tol = _tolerances(dtype, cfg)
    valid = jax.vmap(lambda y, l: _valid(y, l, kind, entry_tol, loss_tol))(ys, objs)
    objs = jnp.where(jnp.isfinite(objs), objs, jnp.inf)
    # Candidates are compared by the search's own objective, loss / u^2 (its floor for rivals, loss_tol, then in
    # the same units). By the raw loss the spurious family near |u| = u_min (y_hat -> one-hot, loss ~ u^2) passed
    # for a rival of the root: on a saturated softmax a crossing candidate at lam ~ 1 / u_min came within 100x
    # of the root's raw loss and flagged correctly recovered victims as ambiguous (untrained ResNet50/ImageNet
    # and AlexNet/Flowers-17 with mixup, 2026-12-07). With K = 3 the form is one equation for one unknown,
    # so any other valid candidate is a genuine rival wherever its u lies: there the raw loss is kept
    # (compared by loss / u^2, 2-5x more wrong mixup labels were accepted at K = 3 in float32, synthetic).
    if ys.shape[-1] > 3:
        norm, floor = objs / (us * us), loss_tol
    else:
        norm, floor = objs, 1e-3 * loss_tol
    best = jnp.where(jnp.any(valid), jnp.argmin(jnp.where(valid, norm, jnp.inf)), jnp.argmin(objs))
    u, y = us[best], ys[best]
    # Two valid candidates with different labels, both at rounding level: the data cannot tell them
    # apart (happens for small K). A rival far above the best root's loss is merely near-valid.
    differs = jnp.max(jnp.abs(ys - y), axis=-1) > 100 * entry_tol
    rival = norm <= jnp.maximum(100.0 * norm[best], floor)
    ambiguous = jnp.any(valid & differs & rival) | _flat_valley(u, y, a, c, b, kind, entry_tol, loss_tol)
    ok = (reason == OK) & valid[best] & ~ambiguous
    reason = jnp.where(reason != OK, reason, jnp.where(~valid[best], NO_SOLUTION, jnp.where(ambiguous, AMBIGUOUS, OK)))
    return _result(y, g / u, 1 / u, variance_loss(y, kind), ok, reason, kind, r, jnp.array(False))
