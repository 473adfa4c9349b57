"""The study's tables: per-seed test errors summarized as markdown.

Every table has one row per normalizer and one column per batch size, in
the order the study ran them.
"""

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Record = dict[str, Any]


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max."""
    array = np.asarray(values, dtype=np.float64)
    std = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return dict(mean=float(array.mean()), std=std, min=float(array.min()), max=float(array.max()))


def _grid(records: Sequence[Record], cell: Callable[[Record], str | None]) -> str:
    """A markdown table: normalizers down, batch sizes across; rows with no cell are left out."""
    batch_sizes = list(dict.fromkeys(r["batch_size"] for r in records))
    labels = list(dict.fromkeys(r["label"] for r in records))
    by_key = {(r["label"], r["batch_size"]): r for r in records}
    lines = [
        "| normalizer | " + " | ".join(f"batch {b}" for b in batch_sizes) + " |",
        "| --- |" + " ---: |" * len(batch_sizes),
    ]
    for label in labels:
        cells = [by_key.get((label, b)) for b in batch_sizes]
        texts = [cell(r) if r is not None else None for r in cells]
        if any(t is not None for t in texts):
            lines.append(f"| {label} | " + " | ".join(t or "" for t in texts) + " |")
    return "\n".join(lines) + "\n"


def _percent(values: Sequence[float]) -> str:
    summary = spread(values)
    return f"{100 * summary['mean']:.1f} ± {100 * summary['std']:.1f}"


def _running_vs_precise(record: Record) -> str | None:
    if record["precise_test_error"] is None:
        return None
    running = 100 * np.mean(record["test_error"])
    precise = 100 * np.mean(record["precise_test_error"])
    return f"{running:.1f} → {precise:.1f}"


def markdown(records: Sequence[Record], settings: dict[str, Any]) -> str:
    """The study's results as markdown: test error, precise statistics, training time.

    Args:
      records: one per (normalizer, batch size), as `study.run_configuration`
        returns them.
      settings: epochs, seeds, learning rate, device and versions.

    Returns:
      Markdown text: a settings line and up to three tables.
    """
    seeds = settings["seeds"]
    parts = [
        f"Test error (%) on the {settings['test_examples']} held-out images of "
        f"{settings.get('data', 'digits')}, evaluation mode "
        f"(running statistics), mean ± standard deviation over {seeds} seed"
        f"{'s' if seeds > 1 else ''}; {settings['epochs']} epochs of SGD (momentum 0.9, "
        f"step size {settings['learning_rate_at_64']:g} x batch / 64, warmup then cosine "
        "decay); "
        f"{settings['device']}, jax {settings['jax']}.\n",
        _grid(records, lambda r: _percent(r["test_error"])),
    ]
    if any(r["precise_test_error"] is not None for r in records):
        parts += [
            "BatchNorm family, test error (%) with running statistics → with precise "
            "statistics re-estimated over the training set (`bnjax.precise_batch_stats`), "
            "mean over seeds.\n",
            _grid(records, _running_vs_precise),
        ]
    parts += [
        "Training time per run (s, compilation excluded).\n",
        _grid(records, lambda r: f"{r['train_s']:.1f}"),
    ]
    return "\n".join(parts)
