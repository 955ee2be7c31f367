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

from jaxleak import models as _models
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
    return _cosine_from_sums(*_cosine_sums(grads, target, weights))


def _cosine_sums(grads: PyTree, target: PyTree, weights: Optional[PyTree]) -> tuple[Array, Array, Array]:
    """``(sum_t w_t <g_t, t_t>, sum_t w_t |g_t|^2, sum_t w_t |t_t|^2)``."""
    if weights is None:
        weights = jax.tree_util.tree_map(lambda _: 1.0, target)
    dot = sum(jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a, b, w: w * jnp.vdot(a, b), grads, target, weights)))
    na = sum(jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a, w: w * jnp.vdot(a, a), grads, weights)))
    nb = sum(jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda b, w: w * jnp.vdot(b, b), target, weights)))
    return dot, na, nb


def _cosine_from_sums(dot: Array, na: Array, nb: Array) -> Array:
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


# The head kernel in factored form. For ONE example and a dense last layer ``logits = h W + b``, the
# kernel's gradient is the outer product ``h a^T`` with ``a = dCE/dlogits`` (what iDLG and paper 2 read
# labels and features from). Its distance terms are then ``<hA, hA> = |h|^2 |a|^2`` and ``<hA, T> = h^T T a``,
# and the objective's VJP needs ``dD/dG_W = c1 h a^T + c2 T`` only through ``(h . h0)(a . a0)`` and ``h^T T a``:
# no (d, K) array is formed except the one fused pass that computes the L2 value without cancellation.


def _split_head(tree):
    head = dict(tree[_models.HEAD])
    kernel = head.pop("kernel")
    return {**tree, _models.HEAD: head}, kernel


def _dummy_loss_factored(apply_fn, soft, params_rest, kernel, rest, z, label):
    """``(CE(f(x'), y'), (h, a))`` with the head kernel held as a constant, ``a = dCE/dlogits`` in closed form."""
    y = jax.nn.softmax(z["v"]) if soft else label
    params = {**params_rest, _models.HEAD: {**params_rest[_models.HEAD], "kernel": kernel}}
    logits, h = _victims._logits_and_feature(apply_fn, params if rest is None else {**rest, "params": params}, z["x"])
    # victims.cross_entropy's gradient in the logits, exactly: softmax * sum(y) - y.
    return _victims._checked_cross_entropy(logits, y), (h, jax.nn.softmax(logits) * jnp.sum(y) - y)


def _head_distance(distance, g_rest, t_rest, w_rest, w_head, gg, gt, tt):
    """``distance`` of the whole gradient from the rest's tensors and the head kernel's three inner products."""
    if distance is l2_distance:
        return l2_distance(g_rest, t_rest, w_rest) + w_head * (gg - 2 * gt + tt)
    if distance is cosine_distance:
        dot, na, nb = _cosine_sums(g_rest, t_rest, w_rest)
        return _cosine_from_sums(dot + w_head * gt, na + w_head * gg, nb + w_head * tt)
    raise ValueError(f"factored_head supports the distances {sorted(DISTANCES)}, got {distance!r}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _distance_and_feature_factored(apply_fn, distance, soft, with_feature, with_head, z, variables, target_grads, weights,
                                   label):
    return _distance_and_feature_factored_fwd(apply_fn, distance, soft, with_feature, with_head, z, variables, target_grads,
                                              weights, label)[0]


def _distance_and_feature_factored_fwd(apply_fn, distance, soft, with_feature, with_head, z, variables, target_grads, weights,
                                       label):
    """``with_head=False``: the head kernel is excluded (weight 0), so its terms are not computed at all."""
    params, rest = _split_variables(variables)
    p_rest, kernel = _split_head(params)
    t_rest, t_head = _split_head(target_grads)
    w_rest, w_head = _split_head(weights) if weights is not None else (None, 1.0)
    g_rest, (h, a) = jax.grad(_dummy_loss_factored, argnums=2, has_aux=True)(apply_fn, soft, p_rest, kernel, rest, z, label)
    if with_head:
        gg, gt, tt = jnp.vdot(h, h) * jnp.vdot(a, a), h @ t_head @ a, jnp.vdot(t_head, t_head)
    else:
        gg = gt = tt = w_head = jnp.zeros((), h.dtype)
    value, (d_rest, d_gg, d_gt) = jax.value_and_grad(
        lambda g, gg_, gt_: _head_distance(distance, g, t_rest, w_rest, w_head, gg_, gt_, tt), argnums=(0, 1, 2)
    )(g_rest, gg, gt)
    if distance is l2_distance:  # the same value without the cancellation of gg - 2 gt + tt near a match
        value = l2_distance(g_rest, t_rest, w_rest)
        if with_head:
            value = value + w_head * jnp.sum((jnp.outer(h, a) - t_head) ** 2)
    return (value, h), (z, variables, target_grads, weights, label, d_rest, 2 * d_gg, d_gt, h, a)


def _distance_and_feature_factored_bwd(apply_fn, distance, soft, with_feature, with_head, res, cts):
    z, variables, target_grads, weights, label, d_rest, c1, c2, h0, a0 = res
    ct, ct_h = cts
    params, rest = _split_variables(variables)
    p_rest, kernel = _split_head(params)
    t_head = _split_head(target_grads)[1]

    def scalarised(zz):  # c <G(zz), dD/dG> [+ <c_h, h(zz)>], dD/dG_W = c1 h0 a0^T + c2 T_W
        (_, (h, a)), (directional, _) = jax.jvp(
            lambda p: _dummy_loss_factored(apply_fn, soft, p, kernel, rest, zz, label), (p_rest,), (d_rest,)
        )
        head = c1 * jnp.vdot(h, h0) * jnp.vdot(a, a0) + c2 * (h @ t_head @ a) if with_head else 0.0
        return ct * (directional + head) + (jnp.vdot(ct_h, h) if with_feature else 0.0)

    zeros = lambda t: jax.tree_util.tree_map(jnp.zeros_like, t)
    return jax.grad(scalarised)(z), zeros(variables), zeros(target_grads), zeros(weights), zeros(label)


_distance_and_feature_factored.defvjp(_distance_and_feature_factored_fwd, _distance_and_feature_factored_bwd)


def _distance_fn(factored_head, weights):
    """The custom-VJP distance to use; a factored head whose kernel has weight 0 (excluded) skips its terms."""
    if not factored_head:
        return _distance_and_feature
    w_kernel = None if weights is None else weights[_models.HEAD]["kernel"]
    with_head = not (isinstance(w_kernel, (int, float)) and w_kernel == 0)
    return lambda apply_fn, distance, soft, with_feature, *args: _distance_and_feature_factored(
        apply_fn, distance, soft, with_feature, with_head, *args)


def gradient_distance(apply_fn, distance, soft, z, variables, target_grads, weights, label, factored_head=False):
    """``distance(grad_theta CE(f(x'), y'), target_grads, weights)`` for dummy ``z = {"x": x', ["v": v]}``.

    ``y' = softmax(v)`` when ``soft`` (DLG), else ``label``. Its gradient in
    ``z`` is ``J^T dD/dG`` with ``G = grad_theta CE``; because ``<G, u> =
    d/de CE(theta + e u)``, that is ``grad_z jvp_theta CE[u]`` at ``u = dD/dG``
    (reverse over forward, a custom VJP), ~15 % cheaper on CPU than
    differentiating ``jax.grad`` twice. Only ``z`` is differentiable.

    ``factored_head=True`` (for models that follow ``jaxleak.models``' last layer convention)
    never forms the head kernel's ``(d, K)`` dummy gradient: for one example it is ``h a^T``
    with ``a = dCE/dlogits`` (the fact iDLG's label rule rests on), so its distance terms are
    ``|h|^2 |a|^2`` and ``h^T T a``, and the VJP needs ``dD/dG_W = c1 h a^T + c2 T`` only
    through ``(h . h0)(a . a0)`` and ``h^T T a``. The L2 value is still computed as
    ``sum((h a^T - T)^2)`` in one fused pass (``|h|^2|a|^2 - 2 h^T T a + |T|^2`` cancels in
    float32 near a match). Same value and gradient to rounding; 10x cheaper with 5,749 classes.
    A head kernel excluded by a weight of Python ``0`` (what :func:`tensor_weights` gives) is
    skipped altogether: none of its terms is computed, and its target values never enter.
    """
    return _distance_fn(factored_head, weights)(apply_fn, distance, soft, False, z, variables, target_grads, weights, label)[0]


def gradient_distance_and_feature(apply_fn, distance, soft, z, variables, target_grads, weights, label, factored_head=False):
    """``(gradient_distance(...), h(x'))``: the distance and the last-layer input ``h(x')`` ``(d,)``, one forward pass.

    Paper 2's feature matching (Wang, Liang, He, ICLR 2024; ALGORITHMS.md
    §4.9(b)) needs ``h(x')`` next to the dummy gradient; the forward pass that
    gives ``grad_theta CE`` gives it too (``apply_fn(..., return_feature=True)``,
    ``jax.grad(..., has_aux=True)``). Arguments (``factored_head`` too) as :func:`gradient_distance`.
    With cotangents ``(c, c_h)`` the VJP is ``grad_z [c jvp_theta CE[dD/dG] +
    <c_h, h>]``, one reverse pass over one reverse-over-forward function, so a
    feature term costs no extra forward or backward pass of the network.
    Only ``z`` is differentiable.
    """
    return _distance_fn(factored_head, weights)(apply_fn, distance, soft, True, z, variables, target_grads, weights, label)


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
    factored_head: bool = False,
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
    ``factored_head``: the head kernel's gradient in factored form (:func:`gradient_distance`).
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
            d, h = gradient_distance_and_feature(apply_fn, dist, soft, z, variables, target_grads, weights, y, factored_head)
        else:
            d = gradient_distance(apply_fn, dist, soft, z, variables, target_grads, weights, y, factored_head)
        if tv:
            d = d + tv * total_variation(z["x"])
        if use_feature:
            d = d + feature_weight * feature_distance(h, feature, distance)
        return d

    return objective
