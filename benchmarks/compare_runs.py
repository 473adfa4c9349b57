"""Tables of bnjax against the fastest JAX library and PyTorch, over several `bench_norms.py` runs.

    .venv/bin/python benchmarks/compare_runs.py results/run1.json results/run2.json

For every row (workload, op) and run: bnjax's time over the fastest JAX
library that produced matching outputs (Flax, Haiku, Equinox and the
textbook `naive` JAX version) and over the faster PyTorch layout. A ratio
above 1 means bnjax was slower. Prints a markdown table; the runs must come
from the same machine (checked by the CPU model recorded in each JSON).
"""

import json
import sys
from pathlib import Path

JAX_LIBRARIES = ("flax", "haiku", "equinox", "naive")
TORCH = ("torch-nchw", "torch-nhwc")


def best(results: dict, names: tuple[str, ...]) -> tuple[str, float] | None:
    """The fastest of `names` that was timed with matching outputs: (name, median ms)."""
    ok = [n for n in names if results.get(n, {}).get("status") == "ok"]
    if not ok:
        return None
    fastest = min(ok, key=lambda n: results[n]["median_ms"])
    return fastest, results[fastest]["median_ms"]


def ratios(row: dict) -> tuple[str, str]:
    """`bnjax / best JAX` and `bnjax / best torch`, formatted, for one row of one run."""
    results = row["results"]
    ours = results["bnjax"]["median_ms"]
    cells = []
    for names in (JAX_LIBRARIES, TORCH):
        found = best(results, names)
        cells.append("n/a" if found is None else f"{ours / found[1]:.2f} ({found[0]})")
    return cells[0], cells[1]


def main(paths: list[str]) -> None:
    runs = [json.loads(Path(p).read_text()) for p in paths]
    cpus = {run["meta"]["cpu"] for run in runs}
    if len(cpus) != 1:
        raise SystemExit(f"the runs come from different machines: {sorted(cpus)}")
    print(f"CPU: {cpus.pop()}; dates: {', '.join(run['meta']['date'] for run in runs)}\n")
    header = ["workload", "op"]
    for i in range(len(runs)):
        header += [f"run {i + 1}: / best JAX", f"run {i + 1}: / PyTorch"]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for rows in zip(*(run["rows"] for run in runs), strict=True):
        cells = [rows[0]["workload"], rows[0]["label"]]
        for row in rows:
            cells += ratios(row)
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
