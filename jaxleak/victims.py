"""The victim side of the threat model: one client's shared gradient, and many clients at once.

A victim holds one example ``(x, y)`` (``x`` an HWC image without a batch
axis, ``y`` a probability vector of length K: one-hot, smoothed or mixed) and
a model ``params`` (flax variables: ``{"params": ..., "batch_stats": ...}``).
It shares ``grad_theta CE(f_theta(x), y)``: :func:`gradient`. Many victims are
the same function under ``jax.vmap`` (:func:`gradients`), with one shared
model or one model per victim (stacked params, :func:`init_victims`), run in
chunks that fit a memory budget.

``apply_fn`` is ``model.apply``: ``apply_fn(variables, x_batch)`` returns
logits, and with ``return_feature=True`` returns ``(logits, h)``. BatchNorm
runs in inference mode (attacks use eval-mode networks).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxleak import models as _models
from jaxleak import processes as _processes

Array = jax.Array
PyTree = Any
ApplyFn = Callable[..., Any]

#: Default memory budget for one chunk of victims (bytes), per backend.
DEFAULT_MEMORY_BUDGET = {"cpu": 2 * 2**30, "gpu": 16 * 2**30, "tpu": 8 * 2**30}

#: Fastest strategy per (backend, per-victim params) for per-example gradients,
#: measured with ``experiments/bench_gradients.py`` (LeNet, 1,024 victims, 2-core
#: CPU: shared model vmap 0.52 vs loop 1.00 ms/victim; one model per victim vmap
#: 1.20 vs loop 0.81 ms/victim). GPUs are assumed to favour vmap (not yet measured).
DEFAULT_STRATEGY = {
    ("cpu", False): "vmap",
    ("cpu", True): "loop",
    ("gpu", False): "vmap",
    ("gpu", True): "vmap",
    ("tpu", False): "vmap",
    ("tpu", True): "vmap",
}


def default_strategy(per_victim_params: bool) -> str:
    """The measured fastest strategy (``"vmap"`` or ``"loop"``) on the current backend."""
    return DEFAULT_STRATEGY.get((jax.default_backend(), bool(per_victim_params)), "vmap")


def _is_concrete(x: Any) -> bool:
    """``x`` holds values (not a tracer). Test the concreteness of a check's *result*: under ``jit`` even a concrete
    (closed-over) array gives a traced result from ``jnp``, which cannot be turned into a Python bool."""
    return not isinstance(x, jax.core.Tracer)


def _all_finite_or_unknown(x: Array) -> bool:
    """False only when ``x`` certainly holds a NaN or Inf; the reduction stays on ``x``'s device."""
    finite = jnp.all(jnp.isfinite(x))
    return not _is_concrete(finite) or bool(finite)


def cross_entropy(logits: Array, y: Array) -> Array:
    """Soft-label cross-entropy of one example, ``-sum_k y_k log softmax(z)_k``.

    With a one-hot ``y`` this is the standard CE; its gradient w.r.t. the
    logits is ``softmax(z) - y`` for every ``y`` that sums to one.
    """
    return -jnp.sum(y * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def check_example(x: Array, y: Array, *, tol: float = 1e-4) -> None:
    """Raises ``ValueError`` unless ``x`` is one HWC example and ``y`` one probability vector.

    Shape checks always run (shapes are static); value checks (finite,
    non-negative, summing to one within ``tol``) run when the arrays are
    concrete, i.e. outside ``jit``/``vmap``.
    """
    if jnp.ndim(x) != 3:
        hint = " (it looks batched: use gradients() for many victims)" if jnp.ndim(x) == 4 else ""
        raise ValueError(f"x must be one example of shape (H, W, C) without a batch axis, got shape {jnp.shape(x)}{hint}")
    if jnp.ndim(y) != 1:
        raise ValueError(
            f"y must be one probability vector of shape (K,), got shape {jnp.shape(y)}; "
            "use jaxleak.labels.one_hot for class indices"
        )
    if not _all_finite_or_unknown(x):
        raise ValueError("x contains NaN or Inf")
    if _is_concrete(y):
        y = np.asarray(y, dtype=np.float64)
        if not np.all(np.isfinite(y)):
            raise ValueError("y contains NaN or Inf")
        if np.any(y < -tol) or abs(y.sum() - 1.0) > tol:
            raise ValueError(f"y must be a probability vector (entries >= 0, sum 1), got sum {y.sum():.6g}, min {y.min():.3g}")


def _logits_and_feature(apply_fn: ApplyFn, params: PyTree, x: Array) -> tuple[Array, Array]:
    logits, h = apply_fn(params, x[None], return_feature=True)
    return logits[0], h[0]


def _checked_cross_entropy(logits: Array, y: Array) -> Array:
    if logits.shape[-1] != y.shape[-1]:
        raise ValueError(f"y has {y.shape[-1]} classes but the model outputs {logits.shape[-1]} logits")
    return cross_entropy(logits, y)


def loss(apply_fn: ApplyFn, params: PyTree, x: Array, y: Array) -> Array:
    """The victim's training loss on one example: soft-label CE of ``apply_fn(params, x[None])``."""
    return _checked_cross_entropy(apply_fn(params, x[None])[0], y)


def loss_and_feature(apply_fn: ApplyFn, params: PyTree, x: Array, y: Array) -> tuple[Array, Array]:
    """:func:`loss` and the last-layer input ``h`` ``(d,)`` from the same forward pass (``return_feature=True``)."""
    logits, h = _logits_and_feature(apply_fn, params, x)
    return _checked_cross_entropy(logits, y), h


def gradient(apply_fn: ApplyFn, params: PyTree, x: Array, y: Array) -> PyTree:
    """The shared update of ONE victim: ``grad_theta CE(f_theta(x), y)`` for a single example.

    Args:
      apply_fn: ``model.apply``.
      params: flax variables ``{"params": ..., ["batch_stats": ...]}``; a bare params
        collection is wrapped as ``{"params": params}``.
      x: one image ``(H, W, C)``, no batch axis.
      y: label distribution ``(K,)`` summing to one (one-hot, smoothed or mixed).

    Returns:
      The gradient w.r.t. the ``"params"`` collection (same structure as
      ``params["params"]``); ``jaxleak.models.last_layer`` reads its head.
    """
    check_example(x, y)
    if "params" not in params:  # a bare params collection
        params = {"params": params}
    rest = {k: v for k, v in params.items() if k != "params"}
    return jax.grad(lambda p: loss(apply_fn, {**rest, "params": p}, x, y))(params["params"])


def feature(apply_fn: ApplyFn, params: PyTree, x: Array) -> Array:
    """The last-layer input feature ``h`` ``(d,)`` of one example (the quantity paper 2 recovers)."""
    if jnp.ndim(x) != 3:
        raise ValueError(f"x must be one example of shape (H, W, C), got shape {jnp.shape(x)}")
    return _logits_and_feature(apply_fn, params, x)[1]


# --------------------------------------------------------------------------
# Many victims
# --------------------------------------------------------------------------


def _leading_size(tree: PyTree) -> int:
    sizes = {leaf.shape[0] if jnp.ndim(leaf) else None for leaf in jax.tree_util.tree_leaves(tree)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"stacked per-victim params must share one leading victim axis, found sizes {sizes}")
    return sizes.pop()


def _tree_bytes(tree: PyTree) -> int:
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def victim_bytes(fn: Callable, *one_victim_args) -> int:
    """Estimates the device memory one victim needs in ``fn`` (compiled memory analysis, with a fallback)."""
    try:
        stats = jax.jit(fn).lower(*one_victim_args).compile().memory_analysis()
        total = stats.temp_size_in_bytes + stats.output_size_in_bytes + stats.argument_size_in_bytes
        if total > 0:
            return int(total)
    except Exception:  # noqa: BLE001 - memory analysis is best-effort on some backends.
        pass
    return 8 * _tree_bytes(one_victim_args)


def chunk_size_for(fn: Callable, one_victim_args: tuple, num_victims: int, memory_budget: Optional[int] = None) -> int:
    """How many victims fit one chunk of ``fn`` under ``memory_budget`` bytes (backend default if None)."""
    budget = memory_budget or DEFAULT_MEMORY_BUDGET.get(jax.default_backend(), DEFAULT_MEMORY_BUDGET["cpu"])
    return int(max(1, min(num_victims, budget // max(1, victim_bytes(fn, *one_victim_args)))))


#: The mesh axis the victim axis of a chunk is sharded over (``map_victims(devices=...)``).
_DEVICE_AXIS = "jaxleak_victim_devices"


@functools.lru_cache(maxsize=128)
def _compiled(
    fn: Callable, in_axes: Optional[tuple], axis_name: Optional[str] = None, devices: Optional[tuple] = None
) -> Callable:
    """``jit(fn)`` (in_axes None) or ``jit(vmap(fn, in_axes, axis_name))``, cached so repeated calls reuse compilations.

    With several ``devices`` the vmapped function runs under ``jax.shard_map`` over a 1-D mesh of them: each
    device maps ``fn`` over its own slice of the victim axis (arguments with ``in_axes`` None are replicated).
    Collectives over ``axis_name`` (``jaxleak.lbfgs.any_running``) then reduce over that device's victims only,
    so each device's loops end with its own last victim, not the chunk's, and no device waits on another
    inside the program.
    """
    if in_axes is None:
        return jax.jit(fn)
    return _jit_over_devices(jax.vmap(fn, in_axes=in_axes, axis_name=axis_name), in_axes, devices)


def _jit_over_devices(batched: Callable, in_axes: tuple, devices: Optional[tuple]) -> Callable:
    """``jit(batched)`` for a function of a victim axis, or over several ``devices`` ``jit(shard_map(batched))``
    on a 1-D mesh of them: each device runs ``batched`` on its own slice of the arguments with ``in_axes`` 0
    (the others replicated), and the outputs are concatenated along the victim axis."""
    if devices is None or len(devices) == 1:
        return jax.jit(batched)
    P = jax.sharding.PartitionSpec
    mesh = jax.sharding.Mesh(np.asarray(devices, dtype=object), (_DEVICE_AXIS,))
    specs = tuple(P(_DEVICE_AXIS) if ax == 0 else P() for ax in in_axes)
    # check_vma=False: the user's fn may hold primitives without replication rules; every output is per victim.
    return jax.jit(jax.shard_map(batched, mesh=mesh, in_specs=specs, out_specs=P(_DEVICE_AXIS), check_vma=False))


def _per_device_chunk(fn: Callable, one_victim_args: tuple, per_device: int, memory_budget: Optional[int] = None) -> int:
    """Victims per device in a chunk of a batched ``fn``: all ``per_device`` up to 256, else as many as fit
    ``memory_budget`` (:func:`chunk_size_for`)."""
    return per_device if per_device <= 256 else chunk_size_for(fn, one_victim_args, per_device, memory_budget)


def _take(args: tuple, in_axes: Sequence[Optional[int]], sl) -> tuple:
    """Victims ``sl`` (an index or an index array) of each argument with ``in_axes`` 0; the others as they are."""
    return tuple(jax.tree_util.tree_map(lambda v: v[sl], a) if ax == 0 else a for a, ax in zip(args, in_axes))


def _run_chunks(batched: Callable, args: tuple, in_axes: tuple, n: int, chunk_size: int, devices: tuple,
                progress: bool, desc: str) -> PyTree:
    """``batched`` (a compiled function of a victim axis) over ``n`` victims, ``chunk_size`` at a time. The
    last chunk is padded to the chunk size by repeating its final victim, so every chunk reuses one
    program; padding is dropped from the result."""
    starts = range(0, n, chunk_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="chunk")
    outs = []
    for s in starts:
        idx = np.minimum(np.arange(s, s + chunk_size), n - 1)  # pad by repeating the last victim
        chunk = _take(args, in_axes, idx)
        if len(devices) == 1:  # run where asked (jit follows its arguments' device), not on the default device
            chunk = jax.device_put(chunk, devices[0])
        out = batched(*chunk)
        outs.append(jax.tree_util.tree_map(lambda v: v[: min(chunk_size, n - s)], out))
    return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *outs)


def default_devices(strategy: str) -> tuple:
    """The devices :func:`map_victims` spreads victims over by default, per strategy and backend.

    ``"loop"`` deals victims round-robin to every local device. ``"vmap"`` shards each chunk over every local
    device on GPUs and TPUs, and uses one device on the CPU, where the host devices of
    ``--xla_force_host_platform_device_count`` share one thread pool: on the 2-core Zen 5 CPU, two host devices
    gave 1.2-1.4x the gradients/s of one with a shared model but 0.5-0.9x with one model per victim (LeNet,
    V = 64 and 1,024, ``experiments/bench_gradients.py --cpu-devices 2``, 2026-12-07), and one device keeps
    the bits of the CPU records. Pass ``devices=jax.local_devices()`` to shard there anyway.
    """
    local = tuple(jax.local_devices())
    if strategy == "vmap" and local[0].platform == "cpu":
        return local[:1]
    return local


@functools.lru_cache(maxsize=128)
def _gradient_of(apply_fn: ApplyFn) -> Callable:
    """One stable ``(params, x, y) -> gradient`` per model, so :func:`_compiled` hits its cache."""
    return lambda p, x, y: gradient(apply_fn, p, x, y)


def map_victims(
    fn: Callable,
    args: tuple,
    in_axes: tuple,
    *,
    chunk_size: Optional[int] = None,
    strategy: str = "auto",
    memory_budget: Optional[int] = None,
    progress: bool = False,
    desc: str = "victims",
    axis_name: Optional[str] = None,
    workers: Optional[int] = None,
    pool: Optional[_processes.WorkerPool] = None,
    devices: Optional[Sequence[jax.Device]] = None,
) -> PyTree:
    """Maps a one-victim function over a leading victim axis, in memory-sized chunks.

    Args:
      fn: pure function of one victim's arguments. Compilations are cached per
        ``fn`` object: pass the same function (not a fresh lambda) to reuse them.
      args: its arguments; those with ``in_axes`` 0 carry a leading victim axis.
      in_axes: 0 (mapped) or None (shared) per argument, as ``jax.vmap``.
      chunk_size: victims per chunk; default from ``memory_budget`` via :func:`chunk_size_for`.
      strategy: ``"vmap"`` (one ``jit(vmap(fn))`` per chunk), ``"loop"`` (a Python
        loop of ``jit(fn)``), ``"processes"`` (``jit(fn)`` in one worker process per CPU
        core, each pinned to its core with one XLA device: ``jaxleak.processes``; ``fn``
        must be picklable and ``chunk_size`` does not apply) or ``"auto"`` (vmap; callers
        that know better, like :func:`gradients`, resolve ``"auto"`` with :func:`default_strategy`).
      progress: show a tqdm bar over chunks.
      axis_name: the ``jax.vmap`` axis name under ``"vmap"`` (for collectives over the
        victims of a chunk inside ``fn``, e.g. ``jaxleak.lbfgs.any_running``).
      workers: worker processes under ``"processes"`` (``None``: one per available core).
      pool: a ``jaxleak.processes.WorkerPool`` for ``"processes"`` to run in, kept across
        calls (its workers start once and keep their compiled functions); not with ``workers``.
      devices: under ``"vmap"``, the devices each chunk's victims are sharded over (``jax.shard_map``
        on a 1-D mesh: every device maps ``fn`` over its share, and collectives over ``axis_name``
        stay within a device); the chunk size is then a multiple of their number and
        ``memory_budget`` holds per device. Under ``"loop"``, the devices victims are dealt to
        round-robin. Default :func:`default_devices`: every local device, except one under
        ``"vmap"`` on the CPU.

    The last chunk is padded to the chunk size (by repeating its final victim)
    so every chunk reuses one compiled program; padding is dropped from the
    result. Returns ``fn``'s outputs stacked over victims.
    """
    if len(in_axes) != len(args):
        raise ValueError(f"in_axes has {len(in_axes)} entries for {len(args)} arguments")
    if any(ax not in (0, None) for ax in in_axes):
        raise ValueError(f"in_axes entries must be 0 or None, got {tuple(in_axes)}")
    mapped = [a for a, ax in zip(args, in_axes) if ax == 0]
    if not mapped:
        raise ValueError("map_victims needs at least one argument with a victim axis (in_axes 0)")
    sizes = {_leading_size(a) for a in mapped}
    if len(sizes) != 1:
        raise ValueError(f"victim axes disagree: leading sizes {sorted(sizes)}")
    n = sizes.pop()
    if n == 0:
        raise ValueError("map_victims got 0 victims (empty victim axis)")
    if strategy == "auto":
        strategy = default_strategy(per_victim_params=False)
    if strategy not in ("vmap", "loop", "processes"):
        raise ValueError(f"strategy must be 'vmap', 'loop', 'processes' or 'auto', got {strategy!r}")
    if pool is not None and strategy != "processes":
        raise ValueError(f"pool= is a WorkerPool for strategy='processes', got strategy={strategy!r}")
    if strategy == "processes":
        if devices is not None:
            raise ValueError("devices= is for strategy 'vmap' or 'loop'; 'processes' gives each worker one device")
        return _processes.map_in_processes(fn, args, in_axes, n, workers=workers, pool=pool, progress=progress, desc=desc)
    devices = default_devices(strategy) if devices is None else tuple(devices)
    if not devices:
        raise ValueError("devices= is empty")

    if strategy == "loop":
        single = _compiled(fn, None)
        # Dispatch is asynchronous: with several devices (e.g. XLA's
        # --xla_force_host_platform_device_count=2 on a 2-core CPU) victims dealt
        # round-robin run concurrently (JAX_NOTES.md: ~1.3x).
        outs = []
        it = range(n)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc=desc, unit="victim")
        for i in it:
            one = _take(args, in_axes, i)
            if len(devices) > 1:
                one = jax.device_put(one, devices[i % len(devices)])
            outs.append(single(*one))
        if len(devices) > 1:
            outs = jax.device_put(outs, devices[0])
        return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *outs)

    d = len(devices)
    if chunk_size is None:
        chunk_size = _per_device_chunk(fn, _take(args, in_axes, 0), -(-n // d), memory_budget) * d
    # Every device gets the same share of a chunk: round up to a multiple of the device count (padding as below).
    chunk_size = -(-max(1, min(chunk_size, n)) // d) * d
    batched = _compiled(fn, tuple(in_axes), axis_name, devices)
    return _run_chunks(batched, args, in_axes, n, chunk_size, devices, progress, desc)


def gradients(
    apply_fn: ApplyFn,
    params: PyTree,
    xs: Array,
    ys: Array,
    *,
    per_victim_params: bool = False,
    chunk_size: Optional[int] = None,
    strategy: str = "auto",
    memory_budget: Optional[int] = None,
    progress: bool = False,
    devices: Optional[Sequence[jax.Device]] = None,
) -> PyTree:
    """Shared gradients of many victims, one example each: :func:`gradient` under ``vmap``.

    Args:
      apply_fn: ``model.apply``.
      params: one model's variables shared by all victims, or (with
        ``per_victim_params=True``) stacked variables with a leading victim axis
        (:func:`init_victims`).
      xs: ``(V, H, W, C)`` images; ys: ``(V, K)`` label distributions.
      strategy, chunk_size, memory_budget, progress, devices: as :func:`map_victims`.

    Returns:
      The gradient pytree with a leading victim axis ``V``.
    """
    if jnp.ndim(xs) != 4:
        raise ValueError(f"xs must be (V, H, W, C), got shape {jnp.shape(xs)}")
    if jnp.ndim(ys) != 2 or jnp.shape(ys)[0] != jnp.shape(xs)[0]:
        raise ValueError(f"ys must be (V, K) with V = {jnp.shape(xs)[0]}, got shape {jnp.shape(ys)}")
    if _is_concrete(ys):
        y64 = np.asarray(ys, dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(y64).all(1) | (np.abs(y64.sum(1) - 1) > 1e-4) | (y64.min(1) < -1e-4))
        if bad.size:
            raise ValueError(f"ys rows must be probability vectors; victims {bad[:10].tolist()} are not")
    if not _all_finite_or_unknown(xs):
        raise ValueError("xs contains NaN or Inf")
    if per_victim_params and _leading_size(params) != jnp.shape(xs)[0]:
        raise ValueError(f"per-victim params have {_leading_size(params)} victims but xs has {jnp.shape(xs)[0]}")
    if strategy == "auto":
        strategy = default_strategy(per_victim_params)
    return map_victims(
        _gradient_of(apply_fn),
        (params, xs, ys),
        (0 if per_victim_params else None, 0, 0),
        chunk_size=chunk_size,
        strategy=strategy,
        memory_budget=memory_budget,
        progress=progress,
        desc="gradients",
        devices=devices,
    )


def victim_keys(key: Array, n: int) -> Array:
    """``n`` PRNG keys: ``key`` split ``n`` ways, or ``key`` itself when it already is an array of ``n`` keys.

    Drivers accept either, so callers can give victim ``i`` a key that does not
    depend on chunking (e.g. ``jax.random.fold_in(root, i)``).
    """
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    if key.ndim == (1 if typed else 2):
        if key.shape[0] != n:
            raise ValueError(f"got {key.shape[0]} keys for n = {n} victims")
        return key
    return jax.random.split(key, n)


def init_victims(
    model: nn.Module,
    key: Array,
    n: int,
    input_shape: tuple[int, ...],
    init: str | Callable[[PyTree, Array], PyTree] = "flax",
) -> PyTree:
    """``n`` independently initialised copies of ``model`` as one stacked variables pytree.

    The iDLG protocol draws a fresh network per trial. ``key`` is one key
    (split into ``n``) or an array of ``n`` keys (victim ``i`` gets ``key[i]``,
    so a victim's model does not depend on how victims are chunked).
    ``input_shape`` is one example's ``(H, W, C)``. ``init`` is a name in ``jaxleak.models.INITS`` or
    a pure ``(params, key) -> params`` function. For non-flax inits the model
    is initialised once for its structure and only the initialiser is vmapped
    (flax's own init compiles slowly under vmap). ``batch_stats`` (mean 0,
    var 1) are shared values, stacked.
    """
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be one example's (H, W, C), got {input_shape}")
    init_fn = _models.get_init(init)
    dummy = jnp.zeros((1, *input_shape), jnp.float32)
    keys = victim_keys(key, n)
    if init_fn is _models.init_flax:
        return jax.jit(jax.vmap(lambda k: model.init(k, dummy)))(keys)
    template = jax.jit(model.init)(jax.random.PRNGKey(0), dummy)
    rest = {k: v for k, v in template.items() if k != "params"}

    def one(k):
        return {**rest, "params": init_fn(template["params"], k)}

    return jax.jit(jax.vmap(one))(keys)
