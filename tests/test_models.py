"""Models: LeNet against an independent PyTorch-layout computation, the last-layer convention, initialisers."""

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxleak as jl
from jaxleak import models


def _count(tree):
    return sum(x.size for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize(
    "shape,classes,params,hidden", [((32, 32, 3), 100, 85_036, 768), ((28, 28, 1), 10, 13_426, 588)]
)
def test_lenet_sizes_match_the_reference(shape, classes, params, hidden):
    model = jl.LeNet(classes)
    v = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, *shape)))
    assert _count(v["params"]) == params
    logits, h = jax.eval_shape(lambda v, x: model.apply(v, x, return_feature=True), v, jnp.zeros((2, *shape)))
    assert logits.shape == (2, classes) and h.shape == (2, hidden)


def _torch_layout_lenet(params, x_nhwc):
    """LeNet written independently in PyTorch's NCHW/OIHW layout with padding (2, 2)."""
    x = jnp.transpose(x_nhwc, (0, 3, 1, 2))
    for name, stride in (("conv1", 2), ("conv2", 2), ("conv3", 1)):
        w = jnp.transpose(params[name]["kernel"], (3, 2, 0, 1))  # HWIO -> OIHW
        x = jax.lax.conv_general_dilated(
            x, w, (stride, stride), ((2, 2), (2, 2)), dimension_numbers=("NCHW", "OIHW", "NCHW"),
            precision=jax.lax.Precision.HIGHEST,
        )
        x = jax.nn.sigmoid(x + params[name]["bias"][None, :, None, None])
    n, c, hh, ww = x.shape
    h_torch = x.reshape(n, -1)  # (C, H, W) order
    kernel = params["head"]["kernel"]  # rows in (H, W, C) order
    k_torch = kernel.reshape(hh, ww, c, -1).transpose(2, 0, 1, 3).reshape(c * hh * ww, -1)
    return h_torch @ k_torch + params["head"]["bias"]


def test_lenet_forward_equals_independent_nchw_computation():
    model = jl.LeNet(10)
    x = jax.random.uniform(jax.random.PRNGKey(1), (3, 32, 32, 3))
    v = model.init(jax.random.PRNGKey(0), x)
    v = models.init_uniform(v, jax.random.PRNGKey(2))
    with jax.default_matmul_precision("highest"):
        ours = model.apply(v, x)
        ref = _torch_layout_lenet(v["params"], x)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conv", ["patches", "slices", "s2d"])
def test_patch_conv_lenet_equals_xla_conv_lenet_to_second_order(conv):
    """conv="patches"/"slices"/"s2d" compute the same function as nn.Conv, and the same gradient-of-gradient (float64)."""
    with jax.enable_x64(True):
        x = jax.random.uniform(jax.random.PRNGKey(1), (2, 8, 8, 3), jnp.float64)  # d = 48: small, same code path
        xla, patches = jl.LeNet(10, conv="xla"), jl.LeNet(10, conv=conv)
        v = xla.init(jax.random.PRNGKey(0), x)
        assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(patches.init(jax.random.PRNGKey(0), x))
        v = models.init_uniform(v, jax.random.PRNGKey(2))
        np.testing.assert_allclose(patches.apply(v, x), xla.apply(v, x), rtol=1e-12, atol=1e-12)

        def grad_norm(model, xx):  # depends on x through d loss / d params: exercises second order
            g = jax.grad(lambda p: jnp.sum(jax.nn.log_softmax(model.apply({"params": p}, xx))[:, 3]))(v["params"])
            return sum(jnp.sum(a**2) for a in jax.tree_util.tree_leaves(g))

        # jitted: two compiled programs instead of hundreds of eager float64 ops (28-31 s each, eager).
        np.testing.assert_allclose(jax.jit(jax.grad(lambda xx: grad_norm(patches, xx)))(x),
                                   jax.jit(jax.grad(lambda xx: grad_norm(xla, xx)))(x), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="conv must be"):
        jl.LeNet(10, conv="fft").init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))


@pytest.mark.parametrize("extract", ["conv", "slices", "s2d"])
@pytest.mark.parametrize("strides,padding", [((1, 1), "SAME"), ((2, 3), "VALID"), ((2, 2), ((1, 2), (0, 1))),
                                             ((3, 2), ((2, 0), (1, 1)))])
def test_patch_conv_equals_nn_conv(extract, strides, padding):
    """PatchConv = nn.Conv with the same parameters, for string and explicit padding, uneven strides and sizes."""
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 7, 2), jnp.float64)
        ref = nn.Conv(4, (3, 2), strides=strides, padding=padding)
        v = ref.init(jax.random.PRNGKey(0), x)
        v = jax.tree_util.tree_map(lambda a: a + 0.1, v)  # a non-zero bias too
        ours = models.PatchConv(4, (3, 2), strides=strides, padding=padding, extract=extract)
        np.testing.assert_allclose(ours.apply(v, x), ref.apply(v, x), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="extract must be"):
        models.PatchConv(4, (3, 3), extract="fft").init(jax.random.PRNGKey(0), jnp.zeros((1, 9, 7, 2)))  # float32: x64 is off here


@pytest.mark.parametrize("d,block", [(768, 32), (588, 32), (5, 32), (100, 7)])
def test_blocked_matmul_is_within_its_error_bound(d, block):
    """x @ kernel against float64, within the bound of a block sum then a pairwise sum (Higham 2002, §4.2):
    (block - 1 + ceil(log2 n_blocks)) u sum_i |x_i w_ik|, u = 2^-24; batch axes kept, zero padding when block does not divide d."""
    rng = np.random.default_rng(d)
    x = rng.uniform(0, 1, (3, 2, d)).astype(np.float32)
    w = rng.uniform(-0.5, 0.5, (d, 9)).astype(np.float32)
    ours = np.asarray(models.blocked_matmul(jnp.asarray(x), jnp.asarray(w), block), np.float64)
    chex.assert_shape(ours, (3, 2, 9))
    exact = x.astype(np.float64) @ w.astype(np.float64)
    n = -(-d // block)
    bound = (block - 1 + math.ceil(math.log2(n)) + 1e-3) * 2.0**-24 * (np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)))
    assert np.all(np.abs(ours - exact) <= bound)


def test_blocked_matmul_keeps_what_a_running_sum_loses():
    """1 followed by 767 terms of 2^-25: a running float32 sum rounds each away (1 + 2^-25 -> 1), losing 767 * 2^-25;
    in blocks of 32 only the first block's 31 are lost, the other 23 blocks sum exactly to 2^-20 each."""
    w = np.full((768, 1), 2.0**-25, np.float32)
    w[0] = 1.0
    ours = float(models.blocked_matmul(jnp.ones(768, jnp.float32), jnp.asarray(w))[0])
    assert ours == 1.0 + 23 * 2.0**-20


def test_conv_and_head_options_resolve_per_backend():
    """"auto" names the backend's implementation (what run records store); unknown names are refused."""
    cpu = jax.default_backend() == "cpu"
    assert models.conv_layer("auto") == ("s2d" if cpu else "patches") and models.conv_layer("slices") == "slices"
    assert models.head_layer("auto") == ("blocked" if cpu else "dense")
    with pytest.raises(ValueError, match="conv must be one of"):
        models.conv_layer("im2col")
    with pytest.raises(ValueError, match="conv must be one of"):
        jl.LeNet(10, conv="im2col").init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))


def test_blocked_head_lenet_has_dense_parameters():
    """head="blocked" takes nn.Dense's parameters and computes the same logits; "auto" is it on the CPU."""
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3))
    dense, blocked = jl.LeNet(100, head="dense"), jl.LeNet(100, head="blocked")
    v = dense.init(jax.random.PRNGKey(0), x)
    assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(blocked.init(jax.random.PRNGKey(0), x))
    np.testing.assert_allclose(blocked.apply(v, x), dense.apply(v, x), rtol=1e-5, atol=1e-5)
    auto = jl.LeNet(100).apply(v, x)
    np.testing.assert_array_equal(auto, (blocked if jax.default_backend() == "cpu" else dense).apply(v, x))
    with pytest.raises(ValueError, match="head must be one of"):
        jl.LeNet(10, head="sparse").init(jax.random.PRNGKey(0), x)


@pytest.mark.parametrize(
    "name,kwargs,shape,d",
    [
        ("lenet", {"head_bias": False, "head": "dense"}, (32, 32, 3), 768),
        ("lenet", {"head_bias": False, "head": "blocked"}, (32, 32, 3), 768),
        ("fcn4", {"widths": (64, 32, 16)}, (8, 8, 3), 16),
        ("resnet18", {"stem": "cifar"}, (16, 16, 3), 512),
        ("resnet18", {"stem": "imagenet"}, (32, 32, 3), 512),
    ],
)
def test_logits_are_head_of_feature(name, kwargs, shape, d):
    model = models.get_model(name, 7, **kwargs)
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, *shape))
    v = model.init(jax.random.PRNGKey(1), x)
    logits, h = model.apply(v, x, return_feature=True)
    kernel, bias = jl.last_layer(v)
    chex.assert_shape(h, (2, d))
    chex.assert_shape(kernel, (d, 7))
    assert (bias is None) == (name != "lenet" or not kwargs.get("head_bias", True))
    np.testing.assert_allclose(logits, h @ kernel, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.apply(v, x), logits)


def test_big_models_have_the_reference_parameter_counts():
    # torchvision counts minus the biased 1000-way fc, plus a bias-free head.
    cases = [
        (jl.ResNet18(10), (32, 32, 3), 11_689_512 - 513_000 + 5_120),
        (jl.ResNet50(1000), (224, 224, 3), 25_557_032 - 2_049_000 + 2_048_000),
        (jl.AlexNet(17), (224, 224, 3), 61_100_840 - 4_097_000 + 4096 * 17),
        (jl.FCN4(17), (64, 64, 3), 12288 * 4096 + 4096 * 1024 + 1024 * 256 + 256 * 17),
    ]
    for model, shape, count in cases:
        v = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, *shape)))
        assert _count(v["params"]) == count, type(model).__name__


def test_adaptive_avg_pool_matches_pytorch_bins():
    x = jnp.arange(2 * 5 * 7 * 1, dtype=jnp.float32).reshape(2, 5, 7, 1)
    out = models.adaptive_avg_pool(x, (3, 3))
    # PyTorch bins for 5 -> 3: [0,2), [1,4), [3,5); for 7 -> 3: [0,3), [2,5), [4,7).
    rows, cols = [(0, 2), (1, 4), (3, 5)], [(0, 3), (2, 5), (4, 7)]
    ref = np.array([[[x[n, r0:r1, c0:c1, 0].mean() for c0, c1 in cols] for r0, r1 in rows] for n in range(2)])
    np.testing.assert_allclose(out[..., 0], ref, rtol=1e-6)


def test_batchnorm_runs_in_inference_mode_for_single_examples():
    model = jl.ResNet18(5, stem="cifar")
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 16, 3))
    v = model.init(jax.random.PRNGKey(1), x)
    both = model.apply(v, x)
    one = model.apply(v, x[:1])  # eval BN: an example's output does not depend on the batch
    np.testing.assert_allclose(both[:1], one, rtol=1e-5, atol=1e-6)


def test_init_uniform_covers_every_leaf_in_range():
    model = jl.LeNet(10)
    v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    new = models.init_uniform(v, jax.random.PRNGKey(1))
    leaves = jax.tree_util.tree_leaves(new["params"])
    allv = np.concatenate([np.ravel(x) for x in leaves])
    assert allv.min() >= -0.5 and allv.max() <= 0.5
    assert allv.min() < -0.49 and allv.max() > 0.49  # really U(-0.5, 0.5), not [0, s)
    assert abs(allv.mean()) < 0.01


def test_torch_default_bounds_and_batchnorm():
    model = jl.ResNet18(4, stem="cifar")
    v = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
    v = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), v)
    new = models.init_torch_default(v, jax.random.PRNGKey(1))
    p = new["params"]
    k = p["layer1_0"]["conv1"]["kernel"]  # 3x3x64 fan-in
    bound = 1 / math.sqrt(3 * 3 * 64)
    assert np.abs(k).max() <= bound and np.abs(k).max() > 0.9 * bound
    np.testing.assert_array_equal(p["stem_bn"]["scale"], 1.0)
    np.testing.assert_array_equal(p["stem_bn"]["bias"], 0.0)
    head = p["head"]["kernel"]
    assert np.abs(head).max() <= 1 / math.sqrt(512)
    res = models.init_torch_resnet(v, jax.random.PRNGKey(1))["params"]["layer1_0"]["conv1"]["kernel"]
    np.testing.assert_allclose(np.std(res), math.sqrt(2 / (3 * 3 * 64)), rtol=0.05)
    assert new["batch_stats"] is v["batch_stats"] or jax.tree_util.tree_all(
        jax.tree_util.tree_map(lambda a, b: bool(jnp.all(a == b)), new["batch_stats"], v["batch_stats"])
    )


def test_last_layer_rejects_foreign_pytrees_and_unknown_names():
    with pytest.raises(ValueError, match="head"):
        jl.last_layer({"dense": {"kernel": jnp.zeros((2, 2))}})
    with pytest.raises(ValueError, match="unknown model"):
        models.get_model("vgg", 10)
    with pytest.raises(ValueError, match="unknown init"):
        models.get_init("xavier")
