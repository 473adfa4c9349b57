"""Normalization layers side by side: bnjax, Flax, Haiku, Equinox, PyTorch, numpy-ml.

For each (workload, op), in one process: every implementation is built,
called once (compiling it), and its outputs (gradients for fwd+bwd) are
checked against bnjax's; one that disagrees is reported and left out of the
row, never timed. The others are then timed interleaved, round-robin, after
a warm-up call each. Prints the median milliseconds, the ratios to the floor
(a jit-compiled per-channel `x * a + b`, or its fwd+bwd) and the ratio of
bnjax to the fastest alternative, and each one's effective bandwidth (the
bytes the op must move at least, `norm_cases.TRAFFIC`, over its time; with
the device's peak, its percentage of it), and writes everything, with the
machine, versions and malloc settings, to JSON. It runs on JAX's default
backend: `--gpu` is the plan for a GPU, working sets of 256 MB and more,
with PyTorch on CUDA and a same-size copy as the roofline.

    .venv/bin/python benchmarks/bench_norms.py [--quick | --smoke | --scaling | --gpu]
        [--repeats N] [--out FILE] [--only flax,torch-nhwc] [--ops bn-train-fwd+bwd]
        [--peak-gbps 4800]

The process re-executes itself once with glibc malloc settings that make
timings steady (see `timing.STEADY_MALLOC`; `--no-malloc-tuning` keeps glibc's
defaults).
"""

import argparse
import datetime
import os
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from importlib import metadata
from typing import NamedTuple

import timing
from norm_cases import (
    OPS,
    TOLERANCES,
    Bench,
    Inputs,
    NotApplicable,
    Op,
    Skip,
    Workload,
    ideal_bytes,
    make_inputs,
    mismatch,
)
from timing import (
    cpu_model,
    cpu_topology,
    ensure_steady_malloc,
    interleaved_samples,
    malloc_settings,
    summarize,
    write_results,
)

REFERENCE, FLOOR, BASELINE, COPY = "bnjax", "floor", "baseline", "copy"
UNCHECKED = (FLOOR, COPY)  # compute other functions: timed, never compared
ALTERNATIVES = (
    "naive",
    "flax",
    "haiku",
    "equinox",
    "torch-nchw",
    "torch-nhwc",
    "numpy-ml",
)
IMAGE_OPS = [  # every op of the first NHWC workload
    "bn-train-fwd",
    "bn-train-fwd+bwd",
    "bn-eval-fwd",
    "ln-fwd",
    "ln-fwd+bwd",
    "gn-fwd+bwd",
    "rms-fwd+bwd",
    "brn-train-fwd+bwd",
]
NCHW_OPS = ["bn-train-fwd", "bn-train-fwd+bwd", "bn-eval-fwd", "gn-fwd+bwd"]
TRANSFORMER_OPS = ["ln-fwd", "ln-fwd+bwd", "rms-fwd", "rms-fwd+bwd"]  # over the last axis
TRANSFORMER_SHAPES = ((8192, 1024), (2048, 4096))  # (tokens, features)
PLANS: dict[str, list[tuple[Workload, list[str]]]] = {
    "full": [
        (Workload((32, 56, 56, 64), "float32"), IMAGE_OPS),
        (
            Workload((64, 32, 32, 128), "float32"),
            ["bn-train-fwd", "bn-train-fwd+bwd", "bn-eval-fwd", "ln-fwd+bwd", "gn-fwd+bwd"],
        ),
        (
            Workload((4096, 1024), "float32"),
            [
                "bn-train-fwd",
                "bn-train-fwd+bwd",
                "bn-eval-fwd",
                "ln-fwd+bwd",
                "rms-fwd+bwd",
                "brn-train-fwd+bwd",
            ],
        ),
        (
            Workload((32, 56, 56, 64), "bfloat16"),
            ["bn-train-fwd", "bn-train-fwd+bwd", "ln-fwd+bwd", "gn-fwd+bwd", "rms-fwd+bwd"],
        ),
        # The NHWC image shapes above, transposed: each library's channels-first form.
        (Workload((32, 64, 56, 56), "float32", channels_first=True), NCHW_OPS),
        (Workload((64, 128, 32, 32), "float32", channels_first=True), NCHW_OPS),
        *(
            (Workload(shape, dtype), TRANSFORMER_OPS)
            for dtype in ("float32", "bfloat16")
            for shape in TRANSFORMER_SHAPES
        ),
    ],
    "quick": [
        (Workload((16, 32, 32, 64), "float32"), ["bn-train-fwd+bwd", "bn-train-fwd", "ln-fwd+bwd"])
    ],
    # Working sets of 256 MB and more (x alone), which no GPU's L2 holds: larger
    # NHWC and NCHW images, and the transformer shapes with 8x (float32) or 16x
    # (bfloat16) the tokens.
    "gpu": [
        (Workload((96, 112, 112, 64), "float32"), NCHW_OPS),
        (Workload((96, 64, 112, 112), "float32", channels_first=True), NCHW_OPS),
        (Workload((192, 112, 112, 64), "bfloat16"), ["bn-train-fwd+bwd", "gn-fwd+bwd"]),
        *(
            (Workload((8 * (4 // itemsize) * tokens, features), dtype), TRANSFORMER_OPS)
            for dtype, itemsize in (("float32", 4), ("bfloat16", 2))
            for tokens, features in TRANSFORMER_SHAPES
        ),
    ],
    # A tiny shape, every normalizer and mode: runs each implementation in seconds (the tests).
    "smoke": [
        (
            Workload((4, 8, 8, 64), "float32"),
            [
                "bn-train-fwd",
                "bn-eval-fwd",
                "ln-fwd+bwd",
                "gn-fwd+bwd",
                "rms-fwd+bwd",
                "brn-train-fwd+bwd",
            ],
        ),
        (Workload((4, 8, 8, 64), "bfloat16"), ["bn-train-fwd+bwd"]),
        (Workload((4, 64, 8, 8), "float32", channels_first=True), ["bn-train-fwd", "gn-fwd+bwd"]),
        (Workload((64, 256), "bfloat16"), ["rms-fwd", "ln-fwd+bwd"]),
    ],
}
DEFAULT_REPEATS = {"full": 25, "quick": 10, "smoke": 2, "scaling": 10, "gpu": 25}
# Published peak memory bandwidth, GB/s, by JAX's `device_kind` (`--peak-gbps` for others).
PEAK_GBPS = {
    "NVIDIA H200": 4800,
    "NVIDIA H100 80GB HBM3": 3350,
    "NVIDIA H100 PCIe": 2000,
    "NVIDIA A100-SXM4-80GB": 2039,
    "NVIDIA A100-SXM4-40GB": 1555,
    "NVIDIA A100 80GB PCIe": 1935,
}
SCALING_BATCHES = (8, 16, 32, 64, 128, 256)
SCALING_EXAMPLE = (56, 56, 64)  # one example of the scaling workload (N, 56, 56, 64)
LINEAR_TOLERANCE = 0.15  # the largest relative residual of a fit still called linear
LIBRARIES = ("jax", "jaxlib", "flax", "dm-haiku", "equinox", "torch", "numpy-ml", "numpy")


class Timed(NamedTuple):
    """How a row is timed: calls per implementation, the bytes read before each
    (`timing.CACHE_FLUSH_BYTES`), and the device's peak bandwidth in GB/s, if known."""

    repeats: int
    flush_bytes: int = timing.CACHE_FLUSH_BYTES
    peak_gbps: float | None = None


_BASELINE_MODULE: list = []  # the bnjax copy of `--baseline`, once loaded


def implementations() -> dict[str, Callable[[Inputs, Op], Bench]]:
    """Every implementation by name: a function of the case's inputs and op to a `Bench`."""
    from norm_impls_jax import COPY as COPY_FORWARDS
    from norm_impls_jax import FLOOR as FLOOR_FORWARDS
    from norm_impls_jax import NAIVE, bnjax_bench, jax_bench
    from norm_impls_libs import EQUINOX, FLAX, HAIKU
    from norm_impls_other import numpy_ml_bench, torch_bench

    baseline = (
        {BASELINE: partial(bnjax_bench, bnjax=_BASELINE_MODULE[0])} if _BASELINE_MODULE else {}
    )
    return {
        **baseline,
        FLOOR: partial(jax_bench, FLOOR_FORWARDS),
        COPY: partial(jax_bench, COPY_FORWARDS),
        REFERENCE: bnjax_bench,
        "naive": partial(jax_bench, NAIVE),
        "flax": partial(jax_bench, FLAX),
        "haiku": partial(jax_bench, HAIKU),
        "equinox": partial(jax_bench, EQUINOX),
        "torch-nchw": partial(torch_bench, channels_last=False),
        "torch-nhwc": partial(torch_bench, channels_last=True),
        "numpy-ml": numpy_ml_bench,
    }


def _report(message: str) -> None:
    """A line printed above the progress bar."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stdout)


def _build_and_check(
    name: str, build: Callable[[Inputs, Op], Bench], inputs: Inputs, op: Op, reference: list | None
) -> tuple[dict, Bench | None, list | None]:
    """Builds one implementation, calls it once and checks its outputs.

    Returns its result entry, the `Bench` to time (None if it is not timed)
    and its outputs. The floor and the copy are not checked: they compute other functions.
    """
    try:
        bench = build(inputs, op)
        start = time.perf_counter()
        outputs = bench.outputs(bench.run())
        first_call_s = time.perf_counter() - start
    except NotApplicable as reason:
        return {"status": "n/a", "reason": str(reason)}, None, None
    except Skip as reason:
        return {"status": "skipped", "reason": str(reason)}, None, None
    except Exception as error:  # a broken implementation is reported, not timed
        return {"status": "error", "reason": f"{type(error).__name__}: {error}"}, None, None
    if name not in (REFERENCE, *UNCHECKED):
        problem = (
            "bnjax failed" if reference is None else mismatch(outputs, reference, inputs.dtype)
        )
        if problem:
            return {"status": "mismatch", "reason": problem}, None, None
    return {"status": "ok", "first_call_s": first_call_s}, bench, outputs


def run_case(workload: Workload, op_key: str, names: Sequence[str], timed: Timed) -> dict:
    """One row: every implementation in `names` checked, then the agreeing ones timed.

    bnjax runs first, whether in `names` or not: its outputs are the reference.
    """
    op, builders = OPS[op_key], implementations()
    inputs = make_inputs(workload, op)
    results, benches, reference = {}, {}, None
    for name in [REFERENCE, *(n for n in names if n != REFERENCE)]:
        result, bench, outputs = _build_and_check(name, builders[name], inputs, op, reference)
        reference = outputs if name == REFERENCE else reference
        if result["status"] in ("mismatch", "error"):
            _report(
                f"!!! {result['status'].upper()}: {name} on {workload.name} {op.label}: "
                f"{result['reason']} -- left out of the row"
            )
        results[name] = result
        if bench is not None and name in names:
            benches[name] = bench
    samples = interleaved_samples(
        {n: b.run for n, b in benches.items()}, timed.repeats, flush_bytes=timed.flush_bytes
    )
    traffic = ideal_bytes(workload, op)
    for name, times in samples.items():
        timing = summarize(times)
        gbps = traffic / timing.median / 1e9
        results[name].update(median_ms=1e3 * timing.median, min_ms=1e3 * timing.min, gbps=gbps)
        if timed.peak_gbps:
            results[name]["peak_percent"] = 100 * gbps / timed.peak_gbps
    return {**_row(workload, op_key, results), "ideal_bytes": traffic}


def _row(workload: Workload, op_key: str, results: dict[str, dict]) -> dict:
    """The JSON row: results with ratios to the floor, and bnjax against the best alternative."""
    floor_ms = results.get(FLOOR, {}).get("median_ms")
    for result in results.values():
        if "median_ms" in result and floor_ms:
            result["ratio_to_floor"] = result["median_ms"] / floor_ms
    timed = {n: r["median_ms"] for n, r in results.items() if "median_ms" in r}
    alternatives = {n: ms for n, ms in timed.items() if n not in (REFERENCE, BASELINE, *UNCHECKED)}
    best = min(alternatives, key=alternatives.get) if alternatives else None
    return {
        "workload": workload.name,
        "shape": list(workload.shape),
        "dtype": workload.dtype,
        "op": op_key,
        "label": OPS[op_key].label,
        "results": results,
        "best_alternative": best,
        "bnjax_over_best": (
            timed[REFERENCE] / alternatives[best] if best and REFERENCE in timed else None
        ),
    }


def run_plan(plan: list[tuple[Workload, list[str]]], names: Sequence[str], timed: Timed):
    """Every row of the plan, with a progress bar over the cases."""
    from tqdm import tqdm

    cases = [(workload, op) for workload, ops in plan for op in ops]
    rows = []
    with tqdm(cases, unit="case", file=sys.stderr) as bar:
        for workload, op in bar:
            bar.set_postfix_str(f"{workload.name} {OPS[op].label}")
            rows.append(run_case(workload, op, names, timed))
    return rows


# --- printing -----------------------------------------------------------------


def _cell(result: dict, key: str, fmt: str) -> str:
    """A table cell: the number, or the status when the implementation was not timed."""
    if key in result:
        return format(result[key], fmt)
    return {"n/a": "n/a", "skipped": "skip", "mismatch": "MISMATCH", "error": "ERROR"}.get(
        result.get("status", ""), "-"
    )


def _table(rows: list[dict], names: Sequence[str], key: str, fmt: str) -> list[str]:
    """A header and one line per (workload, op) with each implementation's `key`."""
    lines = [f"{'workload':<24}{'op':<19}" + "".join(f"{n:>11}" for n in names)]
    for row in rows:
        cells = "".join(f"{_cell(row['results'].get(n, {}), key, fmt):>11}" for n in names)
        lines.append(f"{row['workload']:<24}{row['label']:<19}{cells}")
    return lines


def format_tables(rows: list[dict], names: Sequence[str], peak_gbps: float | None = None) -> str:
    """Median milliseconds with bnjax / best alternative, the ratios to the floor, and
    the effective bandwidths (with their share of `peak_gbps`, when known)."""
    milliseconds = _table(rows, names, "median_ms", ".3f")
    milliseconds[0] += "  bnjax/best alternative"
    for i, row in enumerate(rows, start=1):
        if row["bnjax_over_best"] is not None:
            milliseconds[i] += f"  {row['bnjax_over_best']:.2f} ({row['best_alternative']})"
    ratios = _table(rows, names, "ratio_to_floor", ".2f")
    title = "ratio to the floor (x * a + b; its fwd+bwd in fwd+bwd rows)"
    tables = ["median ms", *milliseconds, "", title, *ratios, ""]
    tables += ["effective bandwidth, GB/s (norm_cases.TRAFFIC bytes / median time)"]
    tables += _table(rows, names, "gbps", ".1f")
    if peak_gbps:
        tables += ["", f"percent of the peak memory bandwidth, {peak_gbps:g} GB/s"]
        tables += _table(rows, names, "peak_percent", ".0f")
    return "\n".join(tables)


def format_reasons(rows: list[dict]) -> str:
    """Why implementations were not timed: each distinct (implementation, status, reason)."""
    seen = {}
    for row in rows:
        for name, result in row["results"].items():
            if result["status"] != "ok":
                key = (name, result["status"], result["reason"])
                seen.setdefault(key, []).append(f"{row['workload']} {row['label']}")
    lines = ["not timed:"] if seen else []
    for (name, status, reason), where in seen.items():
        lines.append(f"  {name} {status}: {reason} ({len(where)} rows, e.g. {where[0]})")
    return "\n".join(lines)


# --- scaling --------------------------------------------------------------------


def linear_fit(batches: Sequence[int], ms: Sequence[float]) -> dict:
    """`ms = intercept + per_example * N`, fitted on relative errors, and the worst one."""
    import numpy as np

    n, ms = np.asarray(batches, float), np.asarray(ms, float)
    per_example, intercept = np.polyfit(n, ms, 1, w=1 / ms)  # small N count as much as large
    worst = float(np.max(np.abs(intercept + per_example * n - ms) / ms))
    return {
        "per_example_ms": float(per_example),
        "intercept_ms": float(intercept),
        "max_relative_residual": worst,
    }


def run_scaling(timed: Timed) -> tuple[list[dict], dict]:
    """bnjax BatchNorm train fwd+bwd and its floor at (N, 56, 56, 64) for each N."""
    from tqdm import tqdm

    rows = []
    for n in tqdm(SCALING_BATCHES, unit="batch size", file=sys.stderr):
        workload = Workload((n, *SCALING_EXAMPLE), "float32")
        rows.append(run_case(workload, "bn-train-fwd+bwd", [FLOOR, REFERENCE], timed))
    fits = {}
    for name in (REFERENCE, FLOOR):
        ms = [row["results"][name]["median_ms"] for row in rows]
        fits[name] = linear_fit(SCALING_BATCHES, ms)
    return rows, fits


def format_scaling(rows: list[dict], fits: dict) -> str:
    """Times, times per example and the linear fits."""
    lines = [f"{'N':>5}{'bnjax ms':>10}{'floor ms':>10}{'bnjax/N':>10}{'floor/N':>10}{'ratio':>7}"]
    for n, row in zip(SCALING_BATCHES, rows, strict=True):
        bnjax_ms = row["results"][REFERENCE]["median_ms"]
        floor_ms = row["results"][FLOOR]["median_ms"]
        lines.append(
            f"{n:>5}{bnjax_ms:>10.2f}{floor_ms:>10.2f}{bnjax_ms / n:>10.3f}"
            f"{floor_ms / n:>10.3f}{bnjax_ms / floor_ms:>7.2f}"
        )
    ratios = [r["results"][REFERENCE]["median_ms"] / r["results"][FLOOR]["median_ms"] for r in rows]
    lines.append(f"bnjax / floor from {min(ratios):.2f} to {max(ratios):.2f}")
    for name, fit in fits.items():
        verdict = "linear" if fit["max_relative_residual"] < LINEAR_TOLERANCE else "NOT linear"
        lines.append(
            f"{name}: {fit['per_example_ms']:.3f} ms/example + {fit['intercept_ms']:.2f}"
            f" ms, worst residual {fit['max_relative_residual']:.1%} ({verdict})"
        )
    return "\n".join(lines)


def plot_scaling(rows: list[dict], fits: dict, path: str) -> str | None:
    """A PNG of time against batch size with the fits; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import numpy as np

    figure, axes = plt.subplots(figsize=(6, 4))
    for name, fit in fits.items():
        ms = [row["results"][name]["median_ms"] for row in rows]
        (points,) = axes.plot(SCALING_BATCHES, ms, "o", label=name)
        grid = np.geomspace(SCALING_BATCHES[0], SCALING_BATCHES[-1], 100)
        line = fit["intercept_ms"] + fit["per_example_ms"] * grid
        axes.plot(grid, line, "-", color=points.get_color(), alpha=0.5, label=f"{name}, fit")
    axes.set(
        xscale="log",
        yscale="log",
        xlabel="batch size N of (N, 56, 56, 64)",
        ylabel="median ms",
        title="BatchNorm train fwd+bwd, float32 CPU",
    )
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


# --- the command line -----------------------------------------------------------


def _metadata(args: argparse.Namespace, mode: str, timed: Timed, threads: int) -> dict:
    """What the numbers were measured on and with."""
    import jax
    from norm_impls_jax import NCHW_NOTES as JAX_NCHW_NOTES
    from norm_impls_jax import NOTES as JAX_NOTES
    from norm_impls_libs import NCHW_NOTES as LIBRARY_NCHW_NOTES
    from norm_impls_libs import NOTES as LIBRARY_NOTES
    from norm_impls_other import NCHW_NOTES as OTHER_NCHW_NOTES
    from norm_impls_other import NOTES as OTHER_NOTES

    return {
        "mode": mode,
        "repeats": args.repeats,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "peak_gbps": timed.peak_gbps,
        "cpu": cpu_model(),
        "cpu_topology": cpu_topology(),
        "jax_threads": threads,
        "torch_threads": _torch_threads(),
        "malloc": malloc_settings(),
        "cache_flush_bytes": timed.flush_bytes,
        "largest_cache_bytes": timing.largest_cache_bytes(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {name: _version(name) for name in LIBRARIES},
        "tolerances": {
            dtype: {"rtol": rtol, "atol_times_max_abs": atol}
            for dtype, (rtol, atol) in TOLERANCES.items()
        },
        "notes": {**JAX_NOTES, **LIBRARY_NOTES, **OTHER_NOTES},  # bfloat16, param dtypes
        "nchw_notes": {**JAX_NCHW_NOTES, **LIBRARY_NCHW_NOTES, **OTHER_NCHW_NOTES},
        "xla_flags": os.environ.get("XLA_FLAGS"),
    }


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _torch_threads() -> int | None:
    """PyTorch's intra-op threads as set (None without PyTorch)."""
    try:
        import torch
    except ImportError:
        return None
    return torch.get_num_threads()


def _match_threads() -> int:
    """PyTorch's intra-op threads set to the cores XLA's CPU client uses (the schedulable ones)."""
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        import torch
    except ImportError:
        return threads
    torch.set_num_threads(threads)
    return threads


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a few ops on a smaller shape")
    mode.add_argument("--smoke", action="store_true", help="every op on tiny shapes")
    mode.add_argument("--scaling", action="store_true", help="bnjax vs floor, N = 8..256")
    mode.add_argument("--gpu", action="store_true", help="the GPU plan: 256 MB and more")
    parser.add_argument("--repeats", type=int, help="timed calls per implementation")
    parser.add_argument("--out", help="JSON path (default results/bench_norms*.json)")
    parser.add_argument(
        "--only",
        help="comma-separated alternatives to time besides bnjax, "
        f"floor (default all: {','.join(ALTERNATIVES)})",
    )
    parser.add_argument("--ops", help=f"comma-separated ops (of {','.join(OPS)})")
    parser.add_argument(
        "--baseline",
        help="a directory holding another bnjax source tree (e.g. a git worktree of an "
        "older commit), timed beside the installed one as the column `baseline`",
    )
    parser.add_argument(
        "--peak-gbps",
        type=float,
        help="the device's peak memory bandwidth (default: PEAK_GBPS by device kind, if listed)",
    )
    parser.add_argument(
        "--no-malloc-tuning",
        action="store_true",
        help="keep glibc's malloc defaults (no re-execution)",
    )
    return parser.parse_args(argv)


def _run_scaling(args: argparse.Namespace, timed: Timed) -> tuple[str, list[dict], dict]:
    """The scaling rows, printed and plotted; returns the JSON path, rows and extra metadata."""
    out = args.out or "results/batchnorm_scaling.json"
    rows, fits = run_scaling(timed)
    print(format_scaling(rows, fits))
    plot_path = os.path.join(os.path.dirname(out) or ".", "batchnorm_scaling.png")
    plot = plot_scaling(rows, fits, plot_path)
    print(f"wrote {plot}" if plot else "no plot: matplotlib is not installed")
    return out, rows, {"fits": fits, "plot": plot}


def _run_tables(args: argparse.Namespace, mode: str, timed: Timed) -> tuple[str, list[dict], dict]:
    """The plan's rows, printed; returns the JSON path, rows and extra metadata."""
    default = "bench_norms.json" if mode == "full" else f"bench_norms_{mode}.json"
    out = args.out or os.path.join("results", default)
    alternatives = args.only.split(",") if args.only else ALTERNATIVES
    if mode == "gpu":  # numpy-ml runs on the CPU only
        alternatives = [COPY, *(n for n in alternatives if n != "numpy-ml")]
    names = [FLOOR, REFERENCE, *alternatives]
    if args.baseline:
        from norm_impls_jax import load_baseline

        _BASELINE_MODULE.append(load_baseline(args.baseline))
        names.insert(2, BASELINE)
    ops = args.ops.split(",") if args.ops else list(OPS)
    unknown = (set(names) - set(implementations())) | (set(ops) - set(OPS))
    if unknown:
        raise SystemExit(f"unknown implementations or ops: {sorted(unknown)}")
    plan = [(workload, [op for op in plan_ops if op in ops]) for workload, plan_ops in PLANS[mode]]
    rows = run_plan(plan, names, timed)
    print(format_tables(rows, names, timed.peak_gbps))
    print(format_reasons(rows))
    return out, rows, {"implementations": names}


def _report_failures(rows: list[dict]) -> bool:
    """Repeats every mismatch and error at the end; True if bnjax itself failed."""
    for row in rows:
        for name, result in row["results"].items():
            if result["status"] in ("mismatch", "error"):
                print(
                    f"!!! {result['status'].upper()} (left out): {name} on {row['workload']} "
                    f"{row['label']}: {result['reason']}",
                    file=sys.stderr,
                )
    return any(row["results"][REFERENCE]["status"] != "ok" for row in rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the chosen mode; exit status 1 if bnjax itself failed (nothing was checked)."""
    args = parse_args(argv)
    # Re-executing repeats the command line, so only a run as a script does it.
    ensure_steady_malloc(argv is None and not args.no_malloc_tuning)
    mode = next((m for m in ("quick", "smoke", "scaling", "gpu") if getattr(args, m)), "full")
    args.repeats = args.repeats or DEFAULT_REPEATS[mode]
    import jax

    if mode == "gpu" and jax.default_backend() != "gpu":
        raise SystemExit(f"--gpu needs a GPU; JAX's default backend is {jax.default_backend()}")
    timed = Timed(
        args.repeats,
        # Tiny inputs (smoke), or inputs that live on the GPU: the least flush will do.
        timing.MIN_CACHE_FLUSH_BYTES if mode in ("smoke", "gpu") else timing.CACHE_FLUSH_BYTES,
        args.peak_gbps or PEAK_GBPS.get(jax.devices()[0].device_kind),
    )
    threads = _match_threads()
    start = time.perf_counter()
    if mode == "scaling":
        out, rows, extra = _run_scaling(args, timed)
    else:
        out, rows, extra = _run_tables(args, mode, timed)
    meta = {**_metadata(args, mode, timed, threads), **extra, "wall_s": time.perf_counter() - start}
    print(f"total {meta['wall_s']:.1f} s, {args.repeats} repeats, {threads} threads")
    write_results(out, rows, **meta)
    return 1 if _report_failures(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
