"""Set-up shared by the experiment scripts: XLA flags (before jax is imported) and the data folder."""

from __future__ import annotations

import os
import pathlib
import platform
import sys


def cpu_devices_flag(default: int = 2) -> None:
    """``--cpu-devices N`` (read before jax is imported): N virtual CPU devices so a loop of victims uses N cores.

    JAX_NOTES.md: XLA used about one core; two host devices with victims dealt
    round-robin gained ~1.3x on the 2-core machine.
    """
    n = default
    if "--cpu-devices" in sys.argv:
        n = int(sys.argv[sys.argv.index("--cpu-devices") + 1])
    flags = os.environ.get("XLA_FLAGS", "")
    if n > 1 and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def default_data_dir() -> pathlib.Path:
    """``$JAXLEAK_DATA``, else ``../shared/data`` beside this checkout."""
    env = os.environ.get("JAXLEAK_DATA")
    return pathlib.Path(env) if env else pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


def machine() -> dict:
    """The CPU a benchmark ran on (``/proc/cpuinfo``'s model name, family and model where there is one) and its
    usable cores: speed ratios are taken within one run, but they differ from one CPU to another."""
    info = {}
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key in ("model name", "cpu family", "model") and key not in info:
                info[key] = value
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": info.get("model name") or platform.processor() or platform.machine(),
            "cpu_family": info.get("cpu family"), "cpu_model": info.get("model"), "cores": cores}
