"""What examples/nnx_digits.py and examples/equinox_digits.py share.

Both train one CNN on the digits with a framework's BatchNorm and with
bnjax's, from the same seed on the same batches, and print one table; only
the model code, in each framework's own style, differs.
"""

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from digits import Split, load_data

BATCH_SIZE = 32
STEPS = 300
MOMENTUM = 0.9  # bnjax's default; Flax's and Equinox's is 0.99

TrainAndScore = Callable[[str, Split, Split, argparse.Namespace], dict[str, float]]


def batch_indices(num_examples: int, steps: int, seed: int) -> np.ndarray:
    """`(steps, BATCH_SIZE)` example indices: shuffled epochs, the same for every norm."""
    rng = np.random.default_rng(seed)
    per_epoch = num_examples // BATCH_SIZE
    epochs = -(-steps // per_epoch)
    order = np.concatenate(
        [rng.permutation(num_examples)[: per_epoch * BATCH_SIZE] for _ in range(epochs)]
    )
    return order.reshape(-1, BATCH_SIZE)[:steps]


def parser(description: str, norms: Sequence[str]) -> argparse.ArgumentParser:
    """The command line both examples take: `--norm`, `--steps`, `--seed`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--norm", nargs="+", choices=norms, default=list(norms), help="default: both, in turn"
    )
    parser.add_argument("--steps", type=int, default=STEPS, help="training steps per norm")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def format_table(results: dict[str, dict[str, float]]) -> str:
    """The markdown table: norm | train-mode acc | eval-mode acc | seconds."""
    lines = [
        "| norm | train-mode acc | eval-mode acc | seconds |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {100 * r['train_mode_accuracy']:.1f}% "
            f"| {100 * r['eval_mode_accuracy']:.1f}% | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def compare(
    args: argparse.Namespace, train_and_score: TrainAndScore, setting: str = ""
) -> dict[str, Any]:
    """Runs `train_and_score` for each norm in `args.norm` and prints the table."""
    train, test = load_data()
    results = {}
    for name in dict.fromkeys(args.norm):
        start = time.perf_counter()
        results[name] = train_and_score(name, train, test, args)
        results[name]["seconds"] = time.perf_counter() - start
    print(
        f"Test accuracy on the {len(test.labels)} held-out digits "
        f"(seed {args.seed}, {args.steps} steps of {BATCH_SIZE}, momentum {MOMENTUM}{setting}):"
    )
    print(format_table(results))
    print(
        "seconds: each norm's whole run, compilation included; the first run also pays "
        "JAX's one-time start-up (a few seconds), so the order counts."
    )
    return dict(seed=args.seed, steps=args.steps, batch_size=BATCH_SIZE, results=results)
