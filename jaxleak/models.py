"""Victim networks, their initialisers and the "last layer" convention.

Every model is a ``flax.linen`` module taking NHWC images with a leading batch
axis and returning logits ``(N, K)``; called with ``return_feature=True`` it
returns ``(logits, h)`` where ``h`` ``(N, d)`` is the input of the last layer
(needed by Wang, Liang, He, ICLR 2024).

The last layer convention
-------------------------
Every model names its last ``Dense`` ``"head"``. Its kernel is stored in flax
layout ``(d, K)`` (PyTorch's ``Linear.weight`` is the transpose, ``(K, d)``),
so for one example ``logits = h @ kernel (+ bias)`` and the cross-entropy
gradient is ``d kernel = outer(h, p - y)``, ``d bias = p - y``.
:func:`last_layer` fetches ``(kernel, bias_or_None)`` from any params pytree
*or* from a gradient pytree of the same structure.

Initialisers
------------
Pure functions ``(params, key) -> params`` acting on the ``"params"``
collection (``batch_stats`` are never touched):
:func:`init_uniform` (iDLG: U(-0.5, 0.5) on every weight and bias),
:func:`init_torch_default` (PyTorch's default ``Linear``/``Conv`` init,
BatchNorm gamma=1, beta=0) and :func:`init_torch_resnet` (torchvision's
ResNet constructor: Kaiming-normal fan-out convs).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
PyTree = Any

HEAD = "head"


# --------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------


def _flatten(x: Array) -> Array:
    """Flattens all but the batch axis in NHWC order (H, W, C)."""
    return x.reshape((x.shape[0], -1))


class PatchConv(nn.Module):
    """A 2-D convolution as image patches times a matrix, with ``nn.Conv``'s parameters.

    ``kernel`` ``(kh, kw, c_in, c_out)`` and ``bias`` ``(c_out,)`` are laid out
    and initialised as ``flax.linen.Conv``'s, so parameter pytrees are
    interchangeable. The patches are an exact selection of input pixels,
    contracted with the kernel by one matrix product. Why: when every victim
    carries its own weights, ``vmap`` turns ``nn.Conv`` into one grouped
    convolution with a group per victim, which GPUs run slowly (measured on an
    H100: 0.13 ms per iDLG evaluation per victim at 64 victims, no faster than
    one victim at a time); here the victim axis becomes the batch axis of a
    batched matrix product instead.

    ``extract``: ``"conv"`` takes the patches with
    ``lax.conv_general_dilated_patches`` (a convolution with a 0/1 kernel: what
    was measured on the H100); ``"slices"`` concatenates ``kh * kw`` strided
    slices of the padded input (pure data movement; on the 2-core CPU the iDLG
    LeNet's value-and-gradient took 1.8-2.0 ms against 2.6-3.3 ms with
    ``nn.Conv`` and 13 ms with ``"conv"``, experiments/bench_attack.py
    ``--convs``); ``"s2d"`` is ``"slices"`` except for strided convolutions,
    which it computes by space-to-depth (:func:`_s2d_patches`): a stride-``s``
    convolution of the padded input is a stride-1 convolution of its
    ``s x s`` blocks stacked as channels, with the kernel zero-padded to a
    multiple of ``s`` and regrouped the same way, so ``ceil(kh/s) * ceil(kw/s)``
    contiguous slices replace ``kh * kw`` strided ones (LeNet's 5x5 stride-2
    layers: 9 instead of 25) at the cost of the zero taps (36 x C columns
    instead of 25 x C). iDLG LeNet value-and-gradient on one CPU core: 0.61
    against 0.70 ms for ``"slices"`` (2026-12-06).
    """

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: Any = "VALID"
    extract: str = "conv"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kh, kw = self.kernel_size
        c_in = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (kh, kw, c_in, self.features), x.dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), x.dtype)
        if self.extract == "s2d" and self.strides != (1, 1):
            patches = _s2d_patches(x, (kh, kw), self.strides, self.padding)
            w = _s2d_kernel(kernel, self.strides)
        elif self.extract in ("slices", "s2d"):
            patches = _slice_patches(x, (kh, kw), self.strides, self.padding)  # features ordered (kh, kw, c_in)
            w = kernel.reshape(kh * kw * c_in, self.features)
        elif self.extract == "conv":
            patches = jax.lax.conv_general_dilated_patches(
                x, (kh, kw), self.strides, self.padding, dimension_numbers=("NHWC", "OIHW", "NHWC"),
                precision=jax.lax.Precision.HIGHEST,  # a pure selection: keep it exact under TF32 defaults
            )  # (N, H', W', c_in * kh * kw), features ordered (c_in, kh, kw)
            w = jnp.transpose(kernel, (2, 0, 1, 3)).reshape(c_in * kh * kw, self.features)
        else:
            raise ValueError(f"extract must be 'conv', 'slices' or 's2d', got {self.extract!r}")
        return patches @ w + bias


def _padded(x: Array, window: tuple[int, int], strides: tuple[int, int], padding: Any) -> tuple[Array, int, int]:
    """NHWC ``x`` padded as ``nn.Conv`` pads it (a padding name or explicit pairs), and the output size ``H', W'``."""
    pads = jax.lax.padtype_to_pads(x.shape[1:3], window, strides, padding) if isinstance(padding, str) else padding
    xp = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
    return xp, (xp.shape[1] - window[0]) // strides[0] + 1, (xp.shape[2] - window[1]) // strides[1] + 1


def _windows(xp: Array, window: tuple[int, int], strides: tuple[int, int], ho: int, wo: int) -> Array:
    """``(N, H', W', kh * kw * C)``: the ``kh * kw`` strided windows of padded ``xp``, features ordered (kh, kw, C)."""
    (kh, kw), (sh, sw) = window, strides
    cols = [xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw] for i in range(kh) for j in range(kw)]
    return jnp.concatenate(cols, axis=-1)


def _slice_patches(x: Array, window: tuple[int, int], strides: tuple[int, int], padding: Any) -> Array:
    """``(N, H', W', kh * kw * C)``: the ``kh * kw`` strided windows of NHWC ``x``, features ordered (kh, kw, C)."""
    xp, ho, wo = _padded(x, window, strides, padding)
    return _windows(xp, window, strides, ho, wo)


def _s2d_patches(x: Array, window: tuple[int, int], strides: tuple[int, int], padding: Any) -> Array:
    """``(N, H', W', ah * aw * sh * sw * C)``: the patches of a strided convolution by space-to-depth.

    ``a = ceil(k / s)`` per axis. The padded input (padded further at the end, or cropped, to
    ``(H' + ah - 1) sh`` by ``(W' + aw - 1) sw``) is cut into ``sh x sw`` blocks, stacked as
    channels; output pixel ``(i, j)`` then sees the blocks ``(i + a, j + b)``, ``a < ah``,
    ``b < aw``: ``ah * aw`` contiguous slices. Features ordered ``(a, b, di, dj, C)``, input
    pixel ``(s a + di, s b + dj)`` of the window, as :func:`_s2d_kernel` orders the kernel.
    """
    (kh, kw), (sh, sw) = window, strides
    xp, ho, wo = _padded(x, window, strides, padding)
    ah, aw = -(-kh // sh), -(-kw // sw)
    h2, w2 = ho + ah - 1, wo + aw - 1  # blocks needed per axis
    extra = [(0, max(0, h2 * sh - xp.shape[1])), (0, max(0, w2 * sw - xp.shape[2]))]  # read only by zero taps
    xp = jnp.pad(xp, ((0, 0), *extra, (0, 0)))[:, :h2 * sh, :w2 * sw]
    n, c = xp.shape[0], xp.shape[-1]
    blocks = xp.reshape(n, h2, sh, w2, sw, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, h2, w2, sh * sw * c)
    return _windows(blocks, (ah, aw), (1, 1), ho, wo)


def _s2d_kernel(kernel: Array, strides: tuple[int, int]) -> Array:
    """``(kh, kw, C, F)`` zero-padded to ``(ah sh, aw sw, C, F)`` and regrouped as :func:`_s2d_patches`' features."""
    kh, kw, c, f = kernel.shape
    (sh, sw) = strides
    ah, aw = -(-kh // sh), -(-kw // sw)
    k = jnp.pad(kernel, ((0, ah * sh - kh), (0, aw * sw - kw), (0, 0), (0, 0)))
    return k.reshape(ah, sh, aw, sw, c, f).transpose(0, 2, 1, 3, 4, 5).reshape(ah * aw * sh * sw * c, f)


def blocked_matmul(x: Array, kernel: Array, block: int = 32) -> Array:
    """``x @ kernel`` summed in blocks of ``block`` terms, then pairwise over the blocks (float32 accuracy).

    A block sum followed by a pairwise sum of the ``ceil(d / block)`` partial
    sums has an error bound that grows with ``block + log2(d / block)`` instead
    of ``d`` (Higham 2002, *Accuracy and Stability of Numerical Algorithms*,
    §4.2). Near a gradient match this matters: for the iDLG LeNet on CIFAR-100
    (d = 768, logits up to 12) XLA's CPU dot rounded the logits to within
    8.4e-6 of float64, PyTorch's to 4.2e-6 and this to 1.7e-6; ``h a^T``
    carries the error of the logits into the head's gradient residual, and
    where the PyTorch-semantics L-BFGS stalls the float32 matching gradient was
    then mostly rounding noise (docs/reproductions.md, "Accurate head"). ``x`` ``(..., d)``,
    ``kernel`` ``(d, K)``.
    """
    d = x.shape[-1]
    n = -(-d // block)
    pad = n * block - d
    if pad:  # zero terms add nothing
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
        kernel = jnp.pad(kernel, ((0, pad), (0, 0)))
    part = jnp.einsum("...ni,nik->...nk", x.reshape(*x.shape[:-1], n, block), kernel.reshape(n, block, -1))
    while part.shape[-2] > 1:
        if part.shape[-2] % 2:
            part = jnp.concatenate([part, jnp.zeros_like(part[..., :1, :])], axis=-2)
        part = part[..., 0::2, :] + part[..., 1::2, :]
    return part[..., 0, :]


class BlockedDense(nn.Dense):
    """``nn.Dense`` (same parameters) whose matrix product is :func:`blocked_matmul`.

    ``nn.Dense``'s ``precision`` and ``dot_general`` are not used: the matmul
    precision is ``jax.default_matmul_precision``'s (``AttackConfig.precision``).
    """

    block: int = 32

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        kernel = self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        y = blocked_matmul(inputs, kernel, self.block)
        return y if bias is None else y + bias


#: LeNet's ``conv="auto"`` per backend, decided at trace time: grouped convolutions (``nn.Conv`` under
#: ``vmap`` with per-victim weights) are slow on GPUs, and slicing beats XLA's convolutions on the CPU,
#: space-to-depth for the strided layers most (iDLG on CIFAR-100 LeNet, one core, whole attacks: 0.68-0.69
#: against 0.81-0.90 ms per evaluation for "slices"; 48 victims: the same fidelity at every threshold).
AUTO_CONV = {"cpu": "s2d"}
CONVS = ("auto", "xla", "patches", "slices", "s2d")


def conv_layer(conv: str) -> str:
    """LeNet's ``conv`` option resolved for the current backend: ``"xla"``, ``"patches"``, ``"slices"`` or ``"s2d"``."""
    if conv not in CONVS:
        raise ValueError(f"conv must be one of {CONVS}, got {conv!r}")
    return AUTO_CONV.get(jax.default_backend(), "patches") if conv == "auto" else conv


def _conv_layer(conv: str) -> Callable[..., nn.Module]:
    conv = conv_layer(conv)
    if conv == "xla":
        return nn.Conv
    return functools.partial(PatchConv, extract="conv" if conv == "patches" else conv)


#: LeNet's ``head="auto"`` per backend, decided at trace time. On the 2-core CPU the blocked head took
#: iDLG (CIFAR-100, the paper's L-BFGS) from 65.6 to 74.0 % of 250 victims below MSE 1e-4 and cost 0.76
#: against 0.88 ms per value-and-gradient (9 % more with LFW's 5,749 classes); on GPUs it is unmeasured.
AUTO_HEAD = {"cpu": "blocked"}
HEADS = ("auto", "dense", "blocked")


def head_layer(head: str) -> str:
    """LeNet's ``head`` option resolved for the current backend: ``"dense"`` or ``"blocked"``."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    return AUTO_HEAD.get(jax.default_backend(), "dense") if head == "auto" else head


class LeNet(nn.Module):
    """The DLG/iDLG "LeNet-Zhu" (Zhu et al. 2019; Zhao et al. 2020), ALGORITHMS.md §2.5.

    Three 5x5 convolutions with 12 channels, strides 2, 2, 1 and explicit
    symmetric padding 2 (XLA's 'SAME' pads (1, 2) at stride 2), a sigmoid after
    each, flatten (NHWC order) and one ``Dense`` to ``num_classes``.
    ``head_bias=False`` is paper 2's bias-free variant. 32x32x3 input -> d=768;
    28x28x1 -> d=588. ``conv``: ``"xla"`` (``nn.Conv``), ``"patches"``,
    ``"slices"`` or ``"s2d"`` (:class:`PatchConv` with ``extract="conv"`` /
    ``"slices"`` / ``"s2d"``, same parameters) or ``"auto"`` (:data:`AUTO_CONV`:
    ``"s2d"`` on CPU, ``"patches"`` elsewhere); the function computed is the same.
    ``head``: ``"dense"`` (``nn.Dense``), ``"blocked"`` (:class:`BlockedDense`,
    same parameters, the logits summed in blocks for float32 accuracy) or
    ``"auto"`` (:data:`AUTO_HEAD`: ``"blocked"`` on CPU, ``"dense"`` elsewhere).
    """

    num_classes: int
    head_bias: bool = True
    conv: str = "auto"
    head: str = "auto"

    @nn.compact
    def __call__(self, x: Array, *, return_feature: bool = False, train: bool = False):
        del train  # No dropout or normalisation.
        conv = _conv_layer(self.conv)
        dense = BlockedDense if head_layer(self.head) == "blocked" else nn.Dense
        for i, stride in enumerate((2, 2, 1)):
            x = conv(12, (5, 5), strides=(stride, stride), padding=((2, 2), (2, 2)), name=f"conv{i + 1}")(x)
            x = nn.sigmoid(x)
        h = _flatten(x)
        logits = dense(self.num_classes, use_bias=self.head_bias, name=HEAD)(h)
        return (logits, h) if return_feature else logits


class FCN4(nn.Module):
    """Paper 2's bias-free 4-layer MLP: in -> 4096 -> 1024 -> 256 -> K with ReLU (§5.3).

    The image is flattened in NHWC order (12288 inputs for 64x64x3). The last
    feature ``h`` (256) is post-ReLU, hence non-negative.
    """

    num_classes: int
    widths: Sequence[int] = (4096, 1024, 256)

    @nn.compact
    def __call__(self, x: Array, *, return_feature: bool = False, train: bool = False):
        del train
        h = _flatten(x)
        for i, width in enumerate(self.widths):
            h = nn.relu(nn.Dense(width, use_bias=False, name=f"fc{i + 1}")(h))
        logits = nn.Dense(self.num_classes, use_bias=False, name=HEAD)(h)
        return (logits, h) if return_feature else logits


def _max_pool(x: Array, window: int = 3, stride: int = 2, padding: int = 0) -> Array:
    pad = ((padding, padding), (padding, padding))
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=pad)


def adaptive_avg_pool(x: Array, output_size: tuple[int, int]) -> Array:
    """PyTorch's ``AdaptiveAvgPool2d`` on NHWC input (bins floor(i*H/o) .. ceil((i+1)*H/o))."""
    _, height, width, _ = x.shape
    out_h, out_w = output_size
    if (height, width) == (out_h, out_w):
        return x
    rows = []
    for i in range(out_h):
        h0, h1 = (i * height) // out_h, -(-((i + 1) * height) // out_h)
        cols = []
        for j in range(out_w):
            w0, w1 = (j * width) // out_w, -(-((j + 1) * width) // out_w)
            cols.append(jnp.mean(x[:, h0:h1, w0:w1, :], axis=(1, 2)))
        rows.append(jnp.stack(cols, axis=1))
    return jnp.stack(rows, axis=1)


class AlexNet(nn.Module):
    """torchvision-style AlexNet with a bias-free head, as in paper 2 (§5.3).

    Features: conv11 s4 p2 (64), pool, conv5 p2 (192), pool, conv3 p1 (384,
    256, 256), pool, adaptive average pool to 6x6; classifier: dropout,
    9216->4096, ReLU, dropout, 4096->4096, ReLU, head 4096->K (no bias).
    Dropout is active only with ``train=True`` (needs a ``"dropout"`` rng).
    """

    num_classes: int

    @nn.compact
    def __call__(self, x: Array, *, return_feature: bool = False, train: bool = False):
        conv = lambda f, k, s, p, name: nn.Conv(f, (k, k), strides=(s, s), padding=((p, p), (p, p)), name=name)
        x = _max_pool(nn.relu(conv(64, 11, 4, 2, "conv1")(x)))
        x = _max_pool(nn.relu(conv(192, 5, 1, 2, "conv2")(x)))
        x = nn.relu(conv(384, 3, 1, 1, "conv3")(x))
        x = nn.relu(conv(256, 3, 1, 1, "conv4")(x))
        x = _max_pool(nn.relu(conv(256, 3, 1, 1, "conv5")(x)))
        x = adaptive_avg_pool(x, (6, 6))
        # PyTorch flattens (C, H, W); keep that order so ported weights line up.
        h = x.transpose(0, 3, 1, 2).reshape((x.shape[0], -1))
        h = nn.Dropout(0.5, deterministic=not train)(h)
        h = nn.relu(nn.Dense(4096, name="fc1")(h))
        h = nn.Dropout(0.5, deterministic=not train)(h)
        h = nn.relu(nn.Dense(4096, name="fc2")(h))
        logits = nn.Dense(self.num_classes, use_bias=False, name=HEAD)(h)
        return (logits, h) if return_feature else logits


def _batch_norm(train: bool, name: Optional[str] = None) -> nn.BatchNorm:
    # PyTorch momentum 0.1 == flax momentum 0.9; eps 1e-5 as PyTorch.
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def _resnet_conv(features: int, k: int, stride: int, name: str) -> nn.Conv:
    """A bias-free ``k x k`` convolution with PyTorch's ``padding=k // 2``, as torchvision's ResNets."""
    return nn.Conv(features, (k, k), strides=(stride, stride), padding=((k // 2, k // 2),) * 2, use_bias=False, name=name)


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs), projection shortcut when shape changes."""

    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        y = nn.relu(_batch_norm(train, "bn1")(_resnet_conv(self.features, 3, self.stride, "conv1")(x)))
        y = _batch_norm(train, "bn2")(_resnet_conv(self.features, 3, 1, "conv2")(y))
        if self.stride != 1 or x.shape[-1] != self.features:
            x = _batch_norm(train, "shortcut_bn")(_resnet_conv(self.features, 1, self.stride, "shortcut")(x))
        return nn.relu(x + y)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv, as torchvision), expansion 4."""

    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        out = self.features * 4
        y = nn.relu(_batch_norm(train, "bn1")(_resnet_conv(self.features, 1, 1, "conv1")(x)))
        y = nn.relu(_batch_norm(train, "bn2")(_resnet_conv(self.features, 3, self.stride, "conv2")(y)))
        y = _batch_norm(train, "bn3")(_resnet_conv(out, 1, 1, "conv3")(y))
        if self.stride != 1 or x.shape[-1] != out:
            x = _batch_norm(train, "shortcut_bn")(_resnet_conv(out, 1, self.stride, "shortcut")(x))
        return nn.relu(x + y)


class _ResNet(nn.Module):
    num_classes: int
    stage_sizes: Sequence[int]
    block: Callable[..., nn.Module]
    stem: str = "imagenet"

    @nn.compact
    def __call__(self, x: Array, *, return_feature: bool = False, train: bool = False):
        if self.stem == "imagenet":
            x = nn.Conv(64, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), use_bias=False, name="stem_conv")(x)
            x = nn.relu(_batch_norm(train, "stem_bn")(x))
            x = _max_pool(x, 3, 2, 1)
        elif self.stem == "cifar":
            x = nn.Conv(64, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name="stem_conv")(x)
            x = nn.relu(_batch_norm(train, "stem_bn")(x))
        else:
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {self.stem!r}")
        for stage, num_blocks in enumerate(self.stage_sizes):
            for b in range(num_blocks):
                stride = 2 if stage > 0 and b == 0 else 1
                x = self.block(64 * 2**stage, stride, name=f"layer{stage + 1}_{b}")(x, train)
        h = jnp.mean(x, axis=(1, 2))
        logits = nn.Dense(self.num_classes, use_bias=False, name=HEAD)(h)
        return (logits, h) if return_feature else logits


def ResNet18(num_classes: int, stem: str = "imagenet") -> nn.Module:
    """ResNet18 with a bias-free head (paper 2, §5.3).

    ``stem="imagenet"``: conv7x7 s2 + BN + ReLU + maxpool3 s2 (paper 2's
    ``model.py``, used untrained on every dataset); ``stem="cifar"``: conv3x3
    s1, no maxpool (its ``resnet.py``, the trained CIFAR/Flowers variant).
    BatchNorm runs in inference mode unless ``train=True``.
    """
    return _ResNet(num_classes=num_classes, stage_sizes=(2, 2, 2, 2), block=BasicBlock, stem=stem)


def ResNet50(num_classes: int) -> nn.Module:
    """ResNet50 (torchvision v1.5 bottlenecks [3, 4, 6, 3], ImageNet stem), bias-free head."""
    return _ResNet(num_classes=num_classes, stage_sizes=(3, 4, 6, 3), block=Bottleneck, stem="imagenet")


# --------------------------------------------------------------------------
# The last layer
# --------------------------------------------------------------------------


def _params_collection(tree: PyTree) -> PyTree:
    """Accepts a variables dict ``{"params": ..., ...}`` or the params dict itself."""
    if isinstance(tree, dict) or hasattr(tree, "keys"):
        if "params" in tree:
            return tree["params"]
        if HEAD in tree:
            return tree
    raise ValueError(
        f"expected a flax variables/params pytree with a {HEAD!r} layer (the last-layer convention), "
        f"got keys {list(tree.keys()) if hasattr(tree, 'keys') else type(tree).__name__}"
    )


def follows_head_convention(apply_fn: Callable[..., Any]) -> bool:
    """Whether ``apply_fn`` is the ``apply`` of one of this module's networks, so the last layer convention holds.

    Then ``apply_fn(variables, x, return_feature=True)`` returns ``(logits, h)`` with ``logits = h @ head.kernel
    (+ head.bias)``, which ``jaxleak.objectives``' factored head relies on. Other callables (a user's module, a
    wrapped ``apply``) return ``False``: they may follow the convention, but it cannot be checked.
    """
    return isinstance(getattr(apply_fn, "__self__", None), (LeNet, FCN4, AlexNet, _ResNet))


def last_layer(tree: PyTree) -> tuple[Array, Optional[Array]]:
    """Returns ``(kernel (d, K), bias (K,) or None)`` of the last layer.

    Works equally on a params pytree and on a gradient pytree with the same
    structure (then it returns the kernel gradient and bias gradient). Leading
    (victim) axes are kept: stacked params give ``(V, d, K)``.
    """
    head = _params_collection(tree)[HEAD]
    return head["kernel"], head.get("bias")


# --------------------------------------------------------------------------
# Initialisers: pure functions (params, key) -> params
# --------------------------------------------------------------------------


def _map_modules(params: PyTree, key: Array, fn: Callable[[dict, Array], dict]) -> PyTree:
    """Applies ``fn(module_dict, key)`` to every leaf module (a dict of arrays)."""

    def rec(node, key):
        if all(not isinstance(v, dict) for v in node.values()):
            return fn(dict(node), key)
        keys = jax.random.split(key, len(node))
        return {name: rec(child, k) for (name, child), k in zip(sorted(node.items()), keys)}

    collection = _params_collection(params)
    new = rec(collection, key)
    if "params" in params:
        return {**params, "params": new}
    return new


def init_uniform(params: PyTree, key: Array, scale: float = 0.5) -> PyTree:
    """iDLG's init (Zhao et al. 2020, ``weights_init``): every weight and bias ~ U(-scale, scale).

    Includes BatchNorm's gamma/beta, as paper 2's untrained ResNet50 does.
    (``flax.linen.initializers.uniform`` draws from [0, s): not this.)
    """
    leaves, treedef = jax.tree_util.tree_flatten(_params_collection(params))
    keys = jax.random.split(key, len(leaves))
    new = [jax.random.uniform(k, x.shape, x.dtype, -scale, scale) for k, x in zip(keys, leaves)]
    new = jax.tree_util.tree_unflatten(treedef, new)
    return {**params, "params": new} if "params" in params else new


def _torch_default_module(module: dict, key: Array) -> dict:
    if "scale" in module:  # BatchNorm
        return {"scale": jnp.ones_like(module["scale"]), "bias": jnp.zeros_like(module["bias"])}
    kernel = module["kernel"]
    bound = 1.0 / math.sqrt(math.prod(kernel.shape[:-1]))  # fan_in: kh*kw*in or in
    kw, kb = jax.random.split(key)
    out = {"kernel": jax.random.uniform(kw, kernel.shape, kernel.dtype, -bound, bound)}
    if "bias" in module:
        out["bias"] = jax.random.uniform(kb, module["bias"].shape, kernel.dtype, -bound, bound)
    return out


def init_torch_default(params: PyTree, key: Array) -> PyTree:
    """PyTorch's default init: ``Linear``/``Conv`` weight and bias ~ U(+-1/sqrt(fan_in)), BN gamma=1, beta=0.

    ``kaiming_uniform_(a=sqrt(5))`` reduces to this bound. Paper 2's untrained
    FCN-4 uses it (§5.3).
    """
    return _map_modules(params, key, _torch_default_module)


def _torch_resnet_module(module: dict, key: Array) -> dict:
    kernel = module.get("kernel")
    if kernel is not None and kernel.ndim == 4:
        fan_out = kernel.shape[0] * kernel.shape[1] * kernel.shape[3]
        out = {"kernel": jax.random.normal(key, kernel.shape, kernel.dtype) * math.sqrt(2.0 / fan_out)}
        if "bias" in module:
            out["bias"] = jnp.zeros_like(module["bias"])
        return out
    return _torch_default_module(module, key)


def init_torch_resnet(params: PyTree, key: Array) -> PyTree:
    """torchvision's ResNet init: convs Kaiming-normal (fan_out, ReLU), BN 1/0, Linear PyTorch default.

    Paper 2's untrained ResNet18 (§5.3).
    """
    return _map_modules(params, key, _torch_resnet_module)


def init_flax(params: PyTree, key: Array) -> PyTree:
    """Keeps flax's own initialisation (identity; for a uniform ``init=`` interface)."""
    del key
    return params


INITS: dict[str, Callable[[PyTree, Array], PyTree]] = {
    "uniform": init_uniform,
    "torch": init_torch_default,
    "torch_resnet": init_torch_resnet,
    "flax": init_flax,
}


def get_init(init: str | Callable[[PyTree, Array], PyTree]) -> Callable[[PyTree, Array], PyTree]:
    """Resolves an initialiser by name (``uniform``, ``torch``, ``torch_resnet``, ``flax``) or passes a callable."""
    if callable(init):
        return init
    try:
        return INITS[init]
    except KeyError:
        raise ValueError(f"unknown init {init!r}; expected one of {sorted(INITS)} or a callable") from None


MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet": LeNet,
    "fcn4": FCN4,
    "alexnet": AlexNet,
    "resnet18": ResNet18,
    "resnet50": ResNet50,
}


def get_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Builds a model by name (``lenet``, ``fcn4``, ``alexnet``, ``resnet18``, ``resnet50``)."""
    try:
        return MODELS[name](num_classes, **kwargs)
    except KeyError:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}") from None
