"""The reference soft-label search of Wang, Liang, He (ICLR 2024; ybwang119/label_recovery).

L-BFGS on ``s = coefficient * lam`` with "skip" and "flip" (stage A), then a
particle swarm over widening windows for the victims it gives up on (stage B);
ALGORITHMS.md §4.6.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from jaxleak.recovery._core import (
    AMBIGUOUS, NO_SOLUTION, OK, SoftLabel, _flat_valley, _input_reason, _label_at, _precompute, _result,
    variance_loss,
)


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
    found = loss < cfg.threshold  # the reference's own test
    # jaxleak's addition: a valley of exact solutions means the label is not identifiable (see _flat_valley)
    flat = _flat_valley(u, y, a, c, bb, kind, 1e-5, cfg.threshold)
    ok = (reason == OK) & found & ~flat
    reason = jnp.where(reason != OK, reason, jnp.where(~found, NO_SOLUTION, jnp.where(flat, AMBIGUOUS, OK)))
    return _result(y, g / u, s / coef, loss, ok, reason, kind, r, used_swarm)


def _paper_traced(G, W, b, kind, cfg: PaperSearch) -> SoftLabel:
    s, L, give_up = _paper_stage_a(G, W, b, kind, cfg)
    s, L = jax.lax.cond(give_up, lambda: _paper_swarm(G, W, b, s, L, kind, cfg), lambda: (s, L))
    return _paper_finish(G, W, b, s, give_up, kind, cfg)
