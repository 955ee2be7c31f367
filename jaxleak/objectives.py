"""What gradient matching minimises: distances between gradient pytrees, priors, the feature term.

An attacker holding one victim's shared gradient ``target_grads = grad_theta CE(f_theta(x), y)``
(a pytree shaped like ``variables["params"]``) scores a dummy ``z = {"x": x', ["v": v]}`` by how far
the dummy gradient lies from it (ALGORITHMS.md §2.1, §4.9(b)):

* :func:`l2_distance`: DLG's squared Euclidean distance (Zhu et al. 2019, eq. 4; iDLG uses the same).
* :func:`cosine_distance` and the :func:`total_variation` prior: Inverting Gradients
  (Geiping et al. 2020, eq. 4).
* :func:`feature_distance`: matching the last-layer input against a recovered feature
  (Wang, Liang, He, ICLR 2024; ALGORITHMS.md §4.9(b)).
* :func:`gradient_distance`: a distance of the dummy gradient, with a reverse-over-forward VJP;
  :func:`gradient_distance_and_feature` also returns the last-layer input ``h(x')`` of the same forward pass.
* :func:`matching_objective`: all of it as one function of ``z``, what ``jaxleak.attacks`` optimises.

Everything is a pure function that works under ``jit`` and ``vmap``; how the objective is
minimised (optimisers, restarts, many victims) lives in ``jaxleak.attacks``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from jaxleak import victims as _victims

Array = jax.Array
PyTree = Any
ApplyFn = Callable[..., Any]

# --------------------------------------------------------------------------
# Distances and priors
# --------------------------------------------------------------------------


def tensor_name(path) -> str:
    """The ``/``-joined name of a pytree key path (``"head/kernel"``): how tensors are named here and in errors."""
    return "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)


def tensor_weights(target_grads: PyTree, exclude: Sequence[str] = (), weights: Optional[dict] = None) -> PyTree:
    """Per-tensor weights (a pytree of scalars shaped like ``target_grads``).

    ``exclude`` names tensors by their ``/``-joined path (``"head/kernel"``) to
    drop them (weight 0; paper 2's ``f`` variant drops the last-layer weight,
    ALGORITHMS.md §4.9(b)); ``weights`` maps paths to other weights. Unknown
    names raise ``ValueError``.
    """
    weights = dict(weights or {})
    names = [tensor_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(target_grads)[0]]
    unknown = sorted((set(exclude) | set(weights)) - set(names))
    if unknown:
        raise ValueError(f"unknown gradient tensors {unknown}; the target gradient has {names}")
    return jax.tree_util.tree_map_with_path(
        lambda p, _: 0.0 if tensor_name(p) in exclude else float(weights.get(tensor_name(p), 1.0)), target_grads
    )


def l2_distance(grads: PyTree, target: PyTree, weights: Optional[PyTree] = None) -> Array:
    """DLG's matching loss: ``sum_t w_t ||grads_t - target_t||_F^2`` over all parameter tensors.

    Zhu et al. 2019 eq. (4); iDLG uses the same (ALGORITHMS.md §2.1). No
    normalisation: weights and biases of every layer count alike.
    """
    sq = jax.tree_util.tree_map(lambda a, b: jnp.sum((a - b) ** 2), grads, target)
    if weights is not None:
        sq = jax.tree_util.tree_map(lambda s, w: w * s, sq, weights)
    return sum(jax.tree_util.tree_leaves(sq))


def cosine_distance(grads: PyTree, target: PyTree, weights: Optional[PyTree] = None) -> Array:
    """Inverting Gradients' loss: ``1 - <g, t> / (||g|| ||t||)`` over the concatenation of all tensors.

    Geiping et al. 2020 eq. (4), one cosine over the whole (weighted) gradient
    vector, not a mean of per-tensor cosines. Invariant to positive rescaling
    of either argument; 0 iff parallel, 2 iff antiparallel.
    """
    if weights is None:
        weights = jax.tree_util.tree_map(lambda _: 1.0, target)
    dot = sum(jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a, b, w: w * jnp.vdot(a, b), grads, target, weights)))
    na = sum(jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a, w: w * jnp.vdot(a, a), grads, weights)))
    nb = sum(jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda b, w: w * jnp.vdot(b, b), target, weights)))
    return 1.0 - dot / (jnp.sqrt(na) * jnp.sqrt(nb) + 1e-12)


def total_variation(x: Array) -> Array:
    """Anisotropic total variation of one image ``(H, W, C)``: ``mean|dx| + mean|dy|``.

    The form used by paper 2's and Inverting Gradients' code (ALGORITHMS.md §4.9(b)).
    """
    if x.ndim != 3:
        raise ValueError(f"total_variation expects one image (H, W, C), got shape {x.shape}")
    return jnp.mean(jnp.abs(x[1:] - x[:-1])) + jnp.mean(jnp.abs(x[:, 1:] - x[:, :-1]))


DISTANCES: dict[str, Callable[..., Array]] = {"l2": l2_distance, "cosine": cosine_distance}

# --------------------------------------------------------------------------
# The distance of a dummy gradient, and the matching objective
# --------------------------------------------------------------------------


def _split_variables(variables: PyTree) -> tuple[PyTree, dict]:
    if isinstance(variables, dict) and "params" in variables:
        return variables["params"], {k: v for k, v in variables.items() if k != "params"}
    return variables, None  # a bare params dict (no "params" collection)


def _dummy_loss_and_feature(apply_fn, soft: bool, with_feature: bool, params, rest, z, label):
    """``(CE(f(x'), y'), h(x') or None)``; ``y' = softmax(v)`` when ``soft``; ``h`` from the same forward pass."""
    y = jax.nn.softmax(z["v"]) if soft else label
    v = params if rest is None else {**rest, "params": params}
    if with_feature:
        return _victims.loss_and_feature(apply_fn, v, z["x"], y)
    return _victims.loss(apply_fn, v, z["x"], y), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _distance_and_feature(apply_fn, distance, soft, with_feature, z, variables, target_grads, weights, label):
    return _distance_and_feature_fwd(apply_fn, distance, soft, with_feature, z, variables, target_grads, weights, label)[0]


def _distance_and_feature_fwd(apply_fn, distance, soft, with_feature, z, variables, target_grads, weights, label):
    params, rest = _split_variables(variables)
    grads, h = jax.grad(_dummy_loss_and_feature, argnums=3, has_aux=True)(
        apply_fn, soft, with_feature, params, rest, z, label
    )
    value, d_grads = jax.value_and_grad(lambda g: distance(g, target_grads, weights))(grads)
    return (value, h), (z, variables, target_grads, weights, label, d_grads)


def _distance_and_feature_bwd(apply_fn, distance, soft, with_feature, res, cts):
    z, variables, target_grads, weights, label, d_grads = res
    ct, ct_h = cts
    params, rest = _split_variables(variables)

    def scalarised(zz):  # c <G(zz), dD/dG> [+ <c_h, h(zz)>]: the primal h and the tangent from one jvp
        (_, h), (directional, _) = jax.jvp(
            lambda p: _dummy_loss_and_feature(apply_fn, soft, with_feature, p, rest, zz, label), (params,), (d_grads,)
        )
        return ct * directional + (jnp.vdot(ct_h, h) if with_feature else 0.0)

    zeros = lambda t: jax.tree_util.tree_map(jnp.zeros_like, t)
    return jax.grad(scalarised)(z), zeros(variables), zeros(target_grads), zeros(weights), zeros(label)


_distance_and_feature.defvjp(_distance_and_feature_fwd, _distance_and_feature_bwd)


def gradient_distance(apply_fn, distance, soft, z, variables, target_grads, weights, label):
    """``distance(grad_theta CE(f(x'), y'), target_grads, weights)`` for dummy ``z = {"x": x', ["v": v]}``.

    ``y' = softmax(v)`` when ``soft`` (DLG), else ``label``. Its gradient in
    ``z`` is ``J^T dD/dG`` with ``G = grad_theta CE``; because ``<G, u> =
    d/de CE(theta + e u)``, that is ``grad_z jvp_theta CE[u]`` at ``u = dD/dG``
    (reverse over forward, a custom VJP), ~15 % cheaper on CPU than
    differentiating ``jax.grad`` twice. Only ``z`` is differentiable.
    """
    return _distance_and_feature(apply_fn, distance, soft, False, z, variables, target_grads, weights, label)[0]


def gradient_distance_and_feature(apply_fn, distance, soft, z, variables, target_grads, weights, label):
    """``(gradient_distance(...), h(x'))``: the distance and the last-layer input ``h(x')`` ``(d,)``, one forward pass.

    Paper 2's feature matching (Wang, Liang, He, ICLR 2024; ALGORITHMS.md
    §4.9(b)) needs ``h(x')`` next to the dummy gradient; the forward pass that
    gives ``grad_theta CE`` gives it too (``apply_fn(..., return_feature=True)``,
    ``jax.grad(..., has_aux=True)``). Arguments as :func:`gradient_distance`.
    With cotangents ``(c, c_h)`` the VJP is ``grad_z [c jvp_theta CE[dD/dG] +
    <c_h, h>]``, one reverse pass over one reverse-over-forward function, so a
    feature term costs no extra forward or backward pass of the network.
    Only ``z`` is differentiable.
    """
    return _distance_and_feature(apply_fn, distance, soft, True, z, variables, target_grads, weights, label)


def feature_distance(h: Array, target: Array, distance: str = "l2") -> Array:
    """Feature-matching term of paper 2 (ALGORITHMS.md §4.9(b)): ``||h - target||^2`` or ``1 - cos(h, target)``.

    The same :data:`DISTANCES` as for gradients, applied to the feature vector (a one-leaf pytree).
    """
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {sorted(DISTANCES)}, got {distance!r}")
    return DISTANCES[distance](h, target)


def matching_objective(
    apply_fn: ApplyFn,
    variables: PyTree,
    target_grads: PyTree,
    label: Optional[Array],
    feature: Optional[Array] = None,
    *,
    distance: str = "l2",
    tv: float = 0.0,
    exclude_tensors: Sequence[str] = (),
    feature_weight: float = 0.0,
) -> Callable[[PyTree], Array]:
    """The function of the dummy ``z = {"x": x' (H, W, C), ["v": v (K,)]}`` that gradient matching minimises.

    ``gradient_distance`` under ``DISTANCES[distance]`` (tensors named in
    ``exclude_tensors`` dropped, :func:`tensor_weights`) ``+ tv * total_variation(x')``
    ``+ feature_weight * feature_distance(h(x'), feature, distance)``: DLG/iDLG
    (``"l2"``, Zhu et al. 2019), Inverting Gradients (``"cosine"`` + TV, Geiping et
    al. 2020) and paper 2's feature matching (ALGORITHMS.md §4.9(b)).

    ``label`` ``(K,)`` is the fixed dummy label; ``None`` makes it ``softmax(z["v"])``
    (DLG). ``feature`` ``(d,)`` is a recovered last-layer input, used only when
    ``feature_weight > 0``; ``h(x')`` comes from ``apply_fn(variables, x, return_feature=True)``
    in the forward pass of the dummy gradient (:func:`gradient_distance_and_feature`).
    """
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {sorted(DISTANCES)}, got {distance!r}")
    dist = DISTANCES[distance]
    weights = tensor_weights(target_grads, exclude_tensors) if exclude_tensors else None
    soft = label is None
    y = jnp.zeros(()) if soft else label
    use_feature = feature is not None and feature_weight > 0

    def objective(z):
        if use_feature:
            d, h = gradient_distance_and_feature(apply_fn, dist, soft, z, variables, target_grads, weights, y)
        else:
            d = gradient_distance(apply_fn, dist, soft, z, variables, target_grads, weights, y)
        if tv:
            d = d + tv * total_variation(z["x"])
        if use_feature:
            d = d + feature_weight * feature_distance(h, feature, distance)
        return d

    return objective
