"""Victims: the shared gradient of one example and of many (vmap, loop, chunks, per-victim models)."""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxleak as jl
from jaxleak import models, victims

K = 10
SHAPE = (16, 16, 3)


@pytest.fixture(scope="module")
def lenet():
    model = jl.LeNet(K)
    v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, *SHAPE)))
    return model, models.init_uniform(v, jax.random.PRNGKey(1))


@pytest.fixture(scope="module")
def batch():
    xs = jax.random.uniform(jax.random.PRNGKey(2), (7, *SHAPE))
    labels = jnp.arange(7) % K
    return xs, labels


def _labels(kind, c):
    if kind == "onehot":
        return jl.one_hot(c, K)
    if kind == "smoothing":
        return jl.smooth(c, K, 0.3)
    return 0.6 * jl.one_hot(c, K) + 0.4 * jl.one_hot((c + 3) % K, K)


@pytest.mark.parametrize("kind", ["onehot", "smoothing", "mixup"])
def test_last_layer_gradient_is_the_outer_product(lenet, batch, kind):
    model, v = lenet
    x, y = batch[0][0], _labels(kind, batch[1][0])
    g = jl.gradient(model.apply, v, x, y)
    logits, h = model.apply(v, x[None], return_feature=True)
    p = jax.nn.softmax(logits[0])
    dW, db = jl.last_layer(g)
    chex.assert_shape(dW, (h.shape[1], K))
    np.testing.assert_allclose(dW, np.outer(h[0], p - y), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(db, p - y, rtol=1e-4, atol=1e-7)
    # rank one, whatever the label
    s = np.linalg.svd(np.asarray(dW, np.float64), compute_uv=False)
    assert s[1] <= 1e-5 * s[0]


def test_gradient_structure_follows_the_params_collection(lenet, batch):
    model, v = lenet
    g = jl.gradient(model.apply, v, batch[0][0], jl.one_hot(batch[1][0], K))
    chex.assert_trees_all_equal_shapes(g, v["params"])
    g2 = jl.gradient(model.apply, v["params"], batch[0][0], jl.one_hot(batch[1][0], K))
    chex.assert_trees_all_close(g, g2)


def _loop(model, v, xs, ys, per_victim):
    outs = []
    for i in range(xs.shape[0]):
        vi = jax.tree_util.tree_map(lambda a: a[i], v) if per_victim else v
        outs.append(jl.gradient(model.apply, vi, xs[i], ys[i]))
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *outs)


@pytest.mark.parametrize("strategy,chunk", [("vmap", None), ("vmap", 3), ("loop", None)])
def test_many_victims_shared_model_equal_a_loop(lenet, batch, strategy, chunk):
    model, v = lenet
    xs, labels = batch
    ys = jl.smooth(labels, K, 0.1)
    got = jl.gradients(model.apply, v, xs, ys, strategy=strategy, chunk_size=chunk)
    chex.assert_trees_all_close(got, _loop(model, v, xs, ys, False), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunk", [None, 4])
def test_many_victims_per_victim_models_equal_a_loop(batch, chunk):
    model = jl.LeNet(K)
    xs, labels = batch
    v = jl.init_victims(model, jax.random.PRNGKey(3), xs.shape[0], SHAPE, init="uniform")
    ys = jl.one_hot(labels, K)
    got = jl.gradients(model.apply, v, xs, ys, per_victim_params=True, chunk_size=chunk)
    chex.assert_trees_all_close(got, _loop(model, v, xs, ys, True), rtol=1e-4, atol=1e-6)


def test_init_victims_draws_independent_models():
    v = jl.init_victims(jl.LeNet(K), jax.random.PRNGKey(0), 3, SHAPE, init="uniform")
    k = v["params"]["conv1"]["kernel"]
    assert k.shape[0] == 3
    assert not np.allclose(k[0], k[1]) and not np.allclose(k[1], k[2])
    assert float(jnp.max(jnp.abs(k))) <= 0.5
    same = jl.init_victims(jl.LeNet(K), jax.random.PRNGKey(0), 3, SHAPE, init="uniform")
    chex.assert_trees_all_equal(v, same)  # explicit keys: deterministic


def test_init_victims_keeps_batch_stats_per_victim():
    v = jl.init_victims(jl.ResNet18(3, stem="cifar"), jax.random.PRNGKey(0), 2, (8, 8, 3), init="torch_resnet")
    var = v["batch_stats"]["stem_bn"]["var"]
    assert var.shape == (2, 64)
    np.testing.assert_array_equal(var, 1.0)


def test_bad_inputs_get_clear_errors(lenet, batch):
    model, v = lenet
    x, y = batch[0][0], jl.one_hot(batch[1][0], K)
    with pytest.raises(ValueError, match="without a batch axis.*gradients"):
        jl.gradient(model.apply, v, x[None], y)
    with pytest.raises(ValueError, match="classes but the model outputs"):
        jl.gradient(model.apply, v, x, jl.one_hot(1, K + 1))
    with pytest.raises(ValueError, match="probability vector"):
        jl.gradient(model.apply, v, x, 2 * y)
    with pytest.raises(ValueError, match="shape \\(K,\\)"):
        jl.gradient(model.apply, v, x, y[None])
    with pytest.raises(ValueError, match="NaN"):
        jl.gradient(model.apply, v, x.at[0, 0, 0].set(jnp.nan), y)
    with pytest.raises(ValueError, match="victims \\[1\\]"):
        ys = jl.one_hot(batch[1][:3], K).at[1].set(0.5)
        jl.gradients(model.apply, v, batch[0][:3], ys)
    with pytest.raises(ValueError, match="ys must be"):
        jl.gradients(model.apply, v, batch[0][:3], jl.one_hot(batch[1][:2], K))
    with pytest.raises(ValueError, match="per-victim params have 7"):
        pv = jl.init_victims(model, jax.random.PRNGKey(0), 7, SHAPE, init="uniform")
        jl.gradients(model.apply, pv, batch[0][:3], jl.one_hot(batch[1][:3], K), per_victim_params=True)
    with pytest.raises(ValueError, match="0 victims"):
        jl.gradients(model.apply, v, batch[0][:0], jl.one_hot(batch[1][:0], K))
    with pytest.raises(ValueError, match="strategy"):
        jl.gradients(model.apply, v, batch[0], jl.one_hot(batch[1], K), strategy="pmap")


def test_gradient_is_jittable_and_vmappable(lenet, batch):
    model, v = lenet
    xs, labels = batch
    ys = jl.one_hot(labels, K)
    f = jax.jit(jax.vmap(lambda x, y: jl.gradient(model.apply, v, x, y)))
    chex.assert_trees_all_close(f(xs, ys), _loop(model, v, xs, ys, False), rtol=1e-4, atol=1e-6)


def test_gradient_under_jit_with_concrete_arrays_closed_over(lenet, batch):
    """Arrays closed over by a jitted function are concrete, but what is computed from them is traced: the
    input checks must not turn such a result into a Python bool (TracerBoolConversionError)."""
    model, v = lenet
    xs, labels = batch
    x, y, ys = xs[0], jl.one_hot(labels[0], K), jl.one_hot(labels, K)
    chex.assert_trees_all_close(jax.jit(lambda: jl.gradient(model.apply, v, x, y))(), jl.gradient(model.apply, v, x, y),
                                rtol=1e-4, atol=1e-6)
    chex.assert_trees_all_close(jax.jit(lambda: jl.gradients(model.apply, v, xs, ys))(), jl.gradients(model.apply, v, xs, ys),
                                rtol=1e-4, atol=1e-6)


def test_chunk_size_respects_the_memory_budget(lenet, batch):
    model, v = lenet
    fn = lambda x, y: jl.gradient(model.apply, v, x, y)
    one = (batch[0][0], jl.one_hot(batch[1][0], K))
    per = victims.victim_bytes(fn, *one)
    assert per > 0
    assert victims.chunk_size_for(fn, one, 1000, memory_budget=10 * per) == 10
    assert victims.chunk_size_for(fn, one, 1000, memory_budget=1) == 1
    assert victims.chunk_size_for(fn, one, 5, memory_budget=10**12) == 5


def test_init_victims_with_explicit_keys_is_chunking_invariant():
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(5), i))(jnp.arange(4))
    whole = jl.init_victims(jl.LeNet(K), keys, 4, SHAPE, init="uniform")
    part = jl.init_victims(jl.LeNet(K), keys[2:], 2, SHAPE, init="uniform")
    chex.assert_trees_all_equal(jax.tree_util.tree_map(lambda a: a[2:], whole), part)
    with pytest.raises(ValueError, match="3 keys for n = 4"):
        jl.init_victims(jl.LeNet(K), keys[:3], 4, SHAPE, init="uniform")


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="counts memory mappings through Linux's /proc")
def test_jax_clear_caches_releases_the_programs_jaxleak_compiled():
    """Each CPU executable holds memory mappings and a process may hold 65,530 (the suite hit it). jaxleak's
    caches keep jitted wrappers only, so ``jax.clear_caches`` must give back every program it compiled."""
    maps = lambda: sum(1 for _ in open("/proc/self/maps"))
    model = jl.LeNet(K)
    cases = []
    for side in (10, 12, 14):
        v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, side, side, 3)))
        xs = jax.random.uniform(jax.random.PRNGKey(side), (3, side, side, 3))
        cases.append((v, xs, jl.one_hot(jnp.arange(3), K)))
    gradients = lambda: [jl.gradients(model.apply, v, xs, ys, strategy=s) for v, xs, ys in cases for s in ("vmap", "loop")]
    gradients()
    assert victims._compiled.cache_info().currsize > 0  # the wrappers stay cached
    before = maps()
    jax.clear_caches()
    assert maps() < before - 100  # measured: about 2,500 for these six programs and their helpers
    # and everything still works afterwards
    for (v, xs, ys), got in zip(cases, gradients()[::2]):
        chex.assert_trees_all_close(got, _loop(model, v, xs, ys, False), rtol=1e-4, atol=1e-6)


def test_devices_are_checked_before_anything_runs(lenet, batch):
    model, v = lenet
    xs, labels = batch
    ys = jl.one_hot(labels, K)
    with pytest.raises(ValueError, match="devices= is empty"):
        jl.gradients(model.apply, v, xs, ys, strategy="vmap", devices=[])
    with pytest.raises(ValueError, match="'processes' gives each worker one device"):
        jl.map_victims(lambda x: x, (xs,), (0,), strategy="processes", devices=jax.local_devices())
    # On the CPU "vmap" keeps one device by default (the host devices share one thread pool); "loop" deals to all.
    assert victims.default_devices("vmap") == tuple(jax.local_devices())[:1]
    assert victims.default_devices("loop") == tuple(jax.local_devices())


# Runs in a fresh process: the host device count is fixed when jax starts its backend.
_SHARDED_SCRIPT = r"""
import os, sys
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
import jaxleak as jl
from jaxleak import attacks, lbfgs, victims

devices = jax.local_devices()
assert len(devices) == 2, devices

# 1. Each device's loop ends with its own last victim: the loop runs while any member of the vmap axis
# runs (lbfgs.any_running), and every member counts the iterations its loop ran.
def iterations(n):
    cond = lambda c: lbfgs.any_running(c[0] < n, "v")
    return jax.lax.while_loop(cond, lambda c: (c[0] + 1,), (0,))[0]

trips = jnp.array([1, 2, 3, 9, 4])
ran = lambda **kw: np.asarray(jl.map_victims(iterations, (trips,), (0,), strategy="vmap", axis_name="v", **kw)).tolist()
assert ran(devices=devices[:1]) == [9, 9, 9, 9, 9], ran(devices=devices[:1])
# One chunk of 6 (5 rounded up to a multiple of 2, padded with the last victim): [1, 2, 3 | 9, 4, 4].
assert ran(devices=devices) == [3, 3, 3, 9, 9], ran(devices=devices)
# Chunks of 2: one victim per device, so each loop runs exactly its own victim's trips.
assert ran(devices=devices, chunk_size=2) == [1, 2, 3, 9, 4], ran(devices=devices, chunk_size=2)
# A chunk size of 3 is rounded up to 4: [1, 2 | 3, 9], then [4, 4 | 4, 4].
assert ran(devices=devices, chunk_size=3) == [2, 2, 9, 9, 4], ran(devices=devices, chunk_size=3)

# 2. Gradients and an attack sharded over both devices equal one device's.
K, shape = 10, (8, 8, 1)
model = jl.LeNet(K)
params = victims.init_victims(model, jax.random.PRNGKey(0), 3, shape, init="uniform")
x = jax.random.uniform(jax.random.PRNGKey(1), (3, *shape))
y = jax.nn.one_hot(jnp.array([3, 7, 1]), K)
kw = dict(per_victim_params=True, strategy="vmap")
grads = victims.gradients(model.apply, params, x, y, devices=devices, **kw)
one = victims.gradients(model.apply, params, x, y, devices=devices[:1], **kw)
for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(one)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
# One device other than the default: the chunk runs there.
second = victims.gradients(model.apply, params, x, y, devices=devices[1:], **kw)
assert {l.devices().pop() for l in jax.tree_util.tree_leaves(second)} == {devices[1]}

import dataclasses
cfg = dataclasses.replace(attacks.PAPER, steps=1, lbfgs=lbfgs.TorchLBFGSConfig(max_iter=2, max_eval=3))
run = lambda **kw: attacks.attack_victims("idlg", jax.random.PRNGKey(6), model.apply, params, grads, shape,
                                          config=cfg, x_true=x, **kw)
sharded, loop = run(strategy="vmap", devices=devices), run(strategy="loop")
np.testing.assert_allclose(sharded["reconstruction"], loop["reconstruction"], rtol=1e-4, atol=1e-4)
assert sharded["label_index"].tolist() == [3, 7, 1]
np.testing.assert_array_equal(sharded["evals"], loop["evals"])
# "stream" over both devices: 3 victims padded to 4, 2 per device through 1 slot each (so each device refills
# its slot once), the same runs as the loop's.
streamed = run(strategy="stream", devices=devices, slots=1)
np.testing.assert_allclose(streamed["reconstruction"], loop["reconstruction"], rtol=1e-4, atol=1e-4)
np.testing.assert_array_equal(streamed["evals"], loop["evals"])
assert streamed["label_index"].tolist() == [3, 7, 1]
print("ok")
"""


def test_vmap_shards_victims_over_devices(tmp_path):
    """``devices=`` under ``"vmap"``: each chunk split evenly over the devices (shard_map), each device's loops
    ending with its own victims, results equal to one device's; ``"stream"`` likewise, each device streaming its
    share; two host devices in a fresh process."""
    import subprocess
    import sys

    cache = jax.config.jax_compilation_cache_dir or str(tmp_path / "cache")
    done = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT, cache], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
