"""The study's figures, in the shape of the papers' Figure 1s.

* Test error against batch size, one line per normalizer, the batch size on
  a log2 axis shrinking to the right (Wu & He 2018, Figure 1).
* Training loss against step at one batch size, one line per normalizer
  (Ioffe & Szegedy 2015, Figure 1).
* BatchNorm, GroupNorm and GroupNorm + Weight Standardization side by side
  at each batch size, as bars (the comparison of Qiao et al. 2019).
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display needed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter  # noqa: E402

Record = dict[str, Any]

# BatchNorm's family solid, per-example normalizers dashed, the baseline dotted.
LINESTYLE = {"none": ":", "batchnorm": "-", "ghost": "-", "batchrenorm": "-"}
# Test errors above this many times the median are drawn at the top edge.
OUTLIER_FACTOR = 4.0
# The normalizers of the Weight Standardization comparison, in the order drawn.
WS_COMPARISON = ("batchnorm", "groupnorm", "gn_ws")


def _labels(records: Sequence[Record]) -> list[str]:
    return list(dict.fromkeys(r["label"] for r in records))


def _style(record: Record) -> dict[str, Any]:
    return dict(linestyle=LINESTYLE.get(record["normalizer"], "--"), linewidth=1.6)


def error_vs_batch_size(records: Sequence[Record], path: Path, data: str = "digits") -> Path:
    """Plots test error (%) against batch size, mean with a std error bar per point.

    A point far above the others (a run that diverged) would flatten every
    other line: the axis then stops at `OUTLIER_FACTOR` times the median
    error, and such a point is marked at the top with its value.
    """
    fig, ax = plt.subplots(figsize=(7, 4.5))
    means = [100 * np.mean(r["test_error"]) for r in records]
    top = OUTLIER_FACTOR * float(np.median(means))
    for label in _labels(records):
        rows = sorted((r for r in records if r["label"] == label), key=lambda r: r["batch_size"])
        errors = [100 * np.asarray(r["test_error"]) for r in rows]
        for r, e in zip(rows, errors, strict=True):
            if e.mean() > top:
                ax.annotate(
                    f"{e.mean():.0f}% ↑",
                    (r["batch_size"], top),
                    textcoords="offset points",
                    xytext=(0, -12),
                    ha="center",
                    fontsize=8,
                )
        ax.errorbar(
            [r["batch_size"] for r in rows],
            [e.mean() for e in errors],
            yerr=[e.std(ddof=1) if e.size > 1 else 0.0 for e in errors],
            marker="o",
            markersize=4,
            capsize=3,
            label=label,
            **_style(rows[0]),
        )
    batch_sizes = sorted({r["batch_size"] for r in records})
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(batch_sizes))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())
    ax.invert_xaxis()  # as Wu & He: the batch shrinks to the right
    ax.set_xlabel("batch size (examples per step)")
    ax.set_ylabel("test error (%)")
    ax.set_title(f"Test error against batch size, {data}")
    if max(means) > top:
        ax.set_ylim(0, top)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """A trailing moving average; the first points average what there is."""
    sums = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, values.size + 1), window)
    return (sums[1:] - sums[np.arange(1, values.size + 1) - counts]) / counts


def loss_vs_step(
    records: Sequence[Record], batch_size: int, path: Path, data: str = "digits"
) -> Path:
    """Plots the seed-averaged training loss per step at `batch_size`, smoothed."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for record in (r for r in records if r["batch_size"] == batch_size):
        loss = np.array([np.nan if x is None else x for x in record["step_loss"]])
        window = max(1, loss.size // 50)
        ax.plot(
            np.arange(1, loss.size + 1),
            _smooth(loss, window),
            label=record["label"],
            **_style(record),
        )
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title(f"Training loss at batch size {batch_size}, {data}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)


def weight_standardization_bars(records: Sequence[Record], path: Path, data: str) -> Path:
    """Bars of test error (%) per batch size for BatchNorm, GroupNorm and GroupNorm + WS."""
    names = [n for n in WS_COMPARISON if any(r["normalizer"] == n for r in records)]
    batch_sizes = sorted({r["batch_size"] for r in records}, reverse=True)
    by_key = {(r["normalizer"], r["batch_size"]): r for r in records}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        rows = [by_key.get((name, b)) for b in batch_sizes]
        errors = [100 * np.asarray(r["test_error"]) if r else np.array([np.nan]) for r in rows]
        ax.bar(
            np.arange(len(batch_sizes)) + (i - (len(names) - 1) / 2) * width,
            [e.mean() for e in errors],
            width,
            yerr=[e.std(ddof=1) if e.size > 1 else 0.0 for e in errors],
            capsize=2,
            label=next(r["label"] for r in records if r["normalizer"] == name),
        )
    ax.set_xticks(np.arange(len(batch_sizes)), [str(b) for b in batch_sizes])
    ax.set_xlabel("batch size (examples per step)")
    ax.set_ylabel("test error (%)")
    ax.set_title(f"Weight Standardization with GroupNorm against BatchNorm, {data}")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot(records: Sequence[Record], out: Path, data: str = "digits") -> list[Path]:
    """Writes the figures into `out`; the loss curves at the largest batch size.

    The Weight Standardization bars only where GroupNorm + WS and BatchNorm or
    GroupNorm were run.
    """
    largest = max(r["batch_size"] for r in records)
    paths = [
        error_vs_batch_size(records, out / "error_vs_batch_size.png", data),
        loss_vs_step(records, largest, out / "loss_vs_step.png", data),
    ]
    ran = {r["normalizer"] for r in records}
    if "gn_ws" in ran and len(ran & set(WS_COMPARISON)) > 1:
        paths.append(weight_standardization_bars(records, out / "weight_standardization.png", data))
    return paths
