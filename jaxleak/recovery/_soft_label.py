"""The public :func:`soft_label` (Wang, Liang, He, ICLR 2024): argument checks, jit/vmap and dispatch.

Routes one configuration to the closed form (bias gradient given), the robust
search or the paper's search, compiled once per static configuration; batched
concrete calls of the paper search run the swarm only for victims that need it.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxleak.recovery._core import (
    KINDS, SEARCHES, Array, SoftLabel, _check_last_layer, _dtype, _is_concrete, _raise_for_reasons,
)
from jaxleak.recovery._paper import PaperSearch, _paper_finish, _paper_stage_a, _paper_swarm, _paper_traced
from jaxleak.recovery._robust import RobustSearch, _closed_form, _robust


def _one(G, W, b, db, kind, search, cfg) -> SoftLabel:
    dtype = _dtype(G, W, b, db)
    G, W = G.astype(dtype), W.astype(dtype)
    b = None if b is None else b.astype(dtype)
    if db is not None:
        return _closed_form(G, W, jnp.zeros(G.shape[-1], dtype) if b is None else b, db.astype(dtype), kind, cfg)
    if search == "robust":
        return _robust(G, W, b, kind, cfg)
    return _paper_traced(G, W, b, kind, cfg)


@functools.lru_cache(maxsize=128)
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


def _paper_host(G, W, b, axes, kind, cfg) -> Optional[SoftLabel]:
    """Concrete victims: stage A for all, the swarm only for those that gave up (no select over victims).

    ``None`` when stage A's results are traced (inside an outer ``jit``): the caller then runs the compiled search."""
    s, L, give_up = _compiled("stage_a", kind, "paper", cfg, axes + (None,))(G, W, b, None)
    if isinstance(give_up, jax.core.Tracer):  # concrete inputs closed over by an outer jit: results are traced
        return None
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
    out = None
    if search == "paper" and db is None and _is_concrete(G, W, b, db):
        if batched:
            out = _paper_host(G, W, b, axes[:3], kind, config)
        else:
            out = _paper_host(G[None], W, b, (0, None, None), kind, config)
            out = None if out is None else jax.tree_util.tree_map(lambda x: x[0], out)
    if out is None:
        out = _compiled("one", kind, search, config, axes)(G, W, b, db)
    if errors == "raise" and _is_concrete(out.reason):  # traced under an outer jit even for concrete inputs
        _raise_for_reasons(out.reason, "soft_label: weight_grad is unusable")
    return out


def _check_vec(x, name, G, K, batched):
    ok_shapes = [(K,)] + ([(G.shape[0], K)] if batched else [])
    if x.shape not in ok_shapes:
        raise ValueError(f"{name} must have shape {' or '.join(map(str, ok_shapes))}, got {x.shape}")
    return x
