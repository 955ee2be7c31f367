"""Shared test fixtures: the compile cache and the location of the real data subsets."""

from __future__ import annotations

import os
import pathlib

import jax
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# Compilation dominates small tests (JAX_NOTES.md): reuse compiled programs across runs.
jax.config.update("jax_compilation_cache_dir", os.environ.get("JAX_COMPILATION_CACHE_DIR", str(REPO / ".jax_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


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
