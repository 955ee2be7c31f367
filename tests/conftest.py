"""Shared test fixtures: the compile cache, the location of the real data subsets, two tiny LeNet victims."""

from __future__ import annotations

import os
import pathlib

# Compilation dominates these tiny programs, not execution: LLVM at -O0 compiles them about 1.8x faster
# (tests/test_attacks.py -k "vmap_equals or masking or restarts" from a cold cache: 64 s against 113 s),
# and XLA's older CPU emitters, without the MLIR fusion emitters, another 2.2x (a tiny-LeNet DLG program:
# 1.1 s against 2.4-2.7 s, the same run time; 2026-12-07).
# Set before jax starts its backend; subprocesses started by tests (the CLI smoke runs) inherit it.
#: The compile-speed flags this suite runs with; a test that checks float32 results the production build
#: gives (which point a chaotic run stalls at) runs its script without them (:func:`production_env`).
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
_PRODUCTION_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")
for _flag in TEST_XLA_FLAGS:
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()

# Every program, eager operations' too: jax.clear_caches() empties the in-memory caches after each
# module (below), and the CLI tests' subprocesses start empty; from disk they load instead of compiling.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax
import jax.numpy as jnp
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# Compilation dominates small tests (JAX_NOTES.md): reuse compiled programs across runs.
jax.config.update("jax_compilation_cache_dir", os.environ.get("JAX_COMPILATION_CACHE_DIR", str(REPO / ".jax_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))

from jaxleak import models, victims  # noqa: E402  (after the cache is configured: importing may compile)


@pytest.fixture(autouse=True)
def _restore_xla_flags():
    """Undo a test's change to ``XLA_FLAGS``: importing an experiment script adds its host device count
    (``experiments/_xla.py``). The backend here is already up, so the change would only alter the
    compilation-cache keys of every later test in this process, to a configuration it does not have."""
    saved = os.environ.get("XLA_FLAGS")
    yield
    if saved is None:
        os.environ.pop("XLA_FLAGS", None)
    else:
        os.environ["XLA_FLAGS"] = saved


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Free each test module's compiled programs when it ends. Each CPU executable holds its own memory
    mappings; kept for the whole suite they passed Linux's 65,530 per process (``vm.max_map_count``) at
    about 85 % of the run and XLA segfaulted while compiling (measured: 64,736 mappings just before).
    ``jax.clear_caches`` frees every program jaxleak compiled too: its own caches keep jitted wrappers,
    whose executables live in JAX's caches (``tests/test_victims.py`` checks this)."""
    yield
    jax.clear_caches()


def production_env() -> dict[str, str]:
    """This process's environment with ``XLA_FLAGS`` as it was before the suite added :data:`TEST_XLA_FLAGS`."""
    env = dict(os.environ)
    if _PRODUCTION_XLA_FLAGS:
        env["XLA_FLAGS"] = _PRODUCTION_XLA_FLAGS
    else:
        env.pop("XLA_FLAGS", None)
    return env


def shared_data_dir() -> pathlib.Path | None:
    """The folder holding the real ``.npz`` subsets (``$JAXLEAK_DATA``, else ``<repo>/../shared/data``)."""
    path = pathlib.Path(os.environ.get("JAXLEAK_DATA", REPO.parent / "shared" / "data"))
    return path if (path / "cifar10_subset.npz").exists() or any(path.glob("*.npz")) else None


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """Path to the real image subsets; skips the test with the reason when they are absent."""
    path = shared_data_dir()
    if path is None:
        pytest.skip(
            "real image subsets not found: set JAXLEAK_DATA to a folder with the shared .npz files "
            "(e.g. ../shared/data beside the checkout)"
        )
    return path


@pytest.fixture(scope="session")
def tiny():
    """Two victims: a tiny LeNet-Zhu (8x8x1 -> d=48, K=10) with iDLG's U(-0.5, 0.5) init, smooth images, labels 3, 7."""
    k, shape = 10, (8, 8, 1)
    model = models.LeNet(k)
    params = victims.init_victims(model, jax.random.PRNGKey(0), 2, shape, init="uniform")
    grid = jnp.linspace(0.0, 1.0, 8)
    x = jnp.stack([jnp.outer(grid, 1 - grid)[..., None], jnp.outer(grid**2, grid)[..., None]])
    y = jax.nn.one_hot(jnp.array([3, 7]), k)
    grads = victims.gradients(model.apply, params, x, y, per_victim_params=True)
    take = lambda t, i: jax.tree_util.tree_map(lambda a: a[i], t)
    return dict(model=model, params=params, x=x, y=y, grads=grads, take=take)
