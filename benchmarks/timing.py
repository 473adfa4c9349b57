"""Timing and reporting shared by the benchmark scripts.

JAX is imported inside the functions, so a script can still set `XLA_FLAGS`
(e.g. simulated devices) after importing this module.
"""

import functools
import gc
import glob
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

# glibc settings that keep freed memory in the process, so that a fresh 30 MB
# output reuses pages already mapped instead of page-faulting them in anew on
# every call: no `mmap` for large blocks (they come from the heap and are
# reused), never give the top of the heap back, grow it in large steps, and one
# arena for all threads (a thread's own arena maps any block larger than its
# 64 MiB heap with `mmap`, whatever MALLOC_MMAP_MAX_ says).
STEADY_MALLOC = {
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(1 << 40),
    "MALLOC_TOP_PAD_": str(1 << 28),
    "MALLOC_ARENA_MAX": "1",
}
# Set on the re-executed process, so that it never re-executes itself again.
_REEXECUTED = "BNJAX_BENCH_REEXECUTED"


class Timing(NamedTuple):
    """Seconds per call: the median and the minimum of the timed repetitions."""

    median: float
    min: float


def largest_cache_bytes() -> int | None:
    """The bytes of the CPU's largest cache (usually its L3), from sysfs; None if unknown."""
    sizes = []
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        with open(index) as f:
            text = f.read().strip()
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=None)


# Read before every timed call so that each starts with the caches holding
# none of its data: twice the largest cache, and at least 64 MiB. Without it
# a call's time depends on what the previous call left in cache (an input of
# 26 MB nearly fits a 32 MiB L3), so the same implementation measured 1.5x or
# 2.4x the floor depending on its neighbours in the round-robin. A fixed
# 64 MiB was not enough on an Intel Xeon whose L3 is 480 MiB: the inputs
# stayed in it, and the floor's (32, 56, 56, 64) call took 1.85 ms against
# 4.35 ms after a 1 GiB read.
MIN_CACHE_FLUSH_BYTES = 64 * 2**20
CACHE_FLUSH_BYTES = max(MIN_CACHE_FLUSH_BYTES, 2 * (largest_cache_bytes() or 0))


@functools.cache
def _scratch(size: int) -> Any:
    import numpy as np

    return np.ones(size // 8)


def flush_caches(scratch: Any) -> None:
    """Reads `scratch` (a numpy array) end to end, evicting other data from cache."""
    scratch.sum()


def interleaved_samples(
    thunks: Mapping[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    flush_bytes: int = CACHE_FLUSH_BYTES,
) -> dict[str, list[float]]:
    """Seconds of each timed call of each thunk, after `warmup` untimed calls each.

    Repetitions go round-robin across the thunks, so that drifts of a shared,
    noisy machine affect all of them alike. Before each timed call the caches
    are flushed (a read of `flush_bytes`), so every call starts cold. Every output
    is waited for with `jax.block_until_ready` (a no-op for PyTorch and numpy
    results, which are ready on return). The garbage collector is paused
    while timing.
    """
    import jax

    scratch = _scratch(flush_bytes)

    for _ in range(warmup):
        for thunk in thunks.values():
            jax.block_until_ready(thunk())
    samples: dict[str, list[float]] = {name: [] for name in thunks}
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            for name, thunk in thunks.items():
                flush_caches(scratch)
                start = time.perf_counter()
                jax.block_until_ready(thunk())
                samples[name].append(time.perf_counter() - start)
    finally:
        gc.enable()
    return samples


def summarize(samples: list[float]) -> Timing:
    """The median and the minimum of timed samples."""
    return Timing(statistics.median(samples), min(samples))


def interleaved_medians(fns: dict[str, Callable], args: tuple, repeats: int) -> dict[str, float]:
    """Median seconds per call of each function on `args`, after one warm-up call each.

    Repetitions are interleaved across the functions, as in `interleaved_samples`.
    """
    thunks = {name: (lambda fn=fn: fn(*args)) for name, fn in fns.items()}
    samples = interleaved_samples(thunks, repeats)
    return {name: summarize(times).median for name, times in samples.items()}


def ensure_steady_malloc(enabled: bool = True) -> None:
    """Re-executes this process with `STEADY_MALLOC` in its environment if missing.

    glibc reads these variables once, at start-up, so they cannot be set from
    Python afterwards. Values already in the environment are kept. Call this
    before anything heavy is imported; it does not return when it re-executes.
    """
    if not enabled or os.environ.get(_REEXECUTED) or not sys.platform.startswith("linux"):
        return
    missing = {k: v for k, v in STEADY_MALLOC.items() if k not in os.environ}
    if not missing:
        return
    env = {**os.environ, **missing, _REEXECUTED: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def malloc_settings() -> dict[str, str | None]:
    """The glibc malloc variables of this process's environment (None when unset)."""
    return {name: os.environ.get(name) for name in STEADY_MALLOC}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (as `lscpu`'s "Model name"), else
    what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_topology() -> dict[str, Any]:
    """Logical CPUs, the ones this process may run on, and `lscpu`'s sockets,
    cores per socket and threads per core (None where unknown)."""
    schedulable = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    )
    topology: dict[str, Any] = {"logical_cpus": os.cpu_count(), "schedulable_cpus": schedulable}
    fields = {
        "Socket(s)": "sockets",
        "Core(s) per socket": "cores_per_socket",
        "Thread(s) per core": "threads_per_core",
    }
    topology.update(dict.fromkeys(fields.values()))
    try:
        lines = subprocess.run(
            ["lscpu"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return topology
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() in fields and value.strip().isdigit():
            topology[fields[key.strip()]] = int(value.strip())
    return topology


def write_results(path: str, rows: list[dict], **meta) -> None:
    """Writes the rows with the device and versions they were measured on."""
    import jax

    import bnjax

    meta = {
        "device": str(jax.devices()[0]),
        "devices": jax.device_count(),
        "jax": jax.__version__,
        "bnjax": bnjax.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        **meta,
    }
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(f"wrote {path}")
