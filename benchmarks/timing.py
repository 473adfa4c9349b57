"""Timing and reporting shared by the benchmark scripts.

JAX is imported inside the functions, so a script can still set `XLA_FLAGS`
(e.g. simulated devices) after importing this module.
"""

import json
import os
import platform
import statistics
import time
from collections.abc import Callable


def interleaved_medians(fns: dict[str, Callable], args: tuple, repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, after one warm-up call each.

    Repetitions are interleaved across the functions, so that drifts of a
    shared, noisy machine affect all of them alike. Every output is waited
    for with `block_until_ready`.
    """
    import jax

    for fn in fns.values():
        jax.block_until_ready(fn(*args))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in samples.items()}


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
