"""Trains a small BatchNorm convnet on scikit-learn's 8x8 digits with bnjax.

The demo shows BatchNorm as a pure function. The network's parameters and its
BatchNorm running statistics are two plain pytrees; the jitted training step
takes both and returns both, updated, with no mutable layer objects anywhere.
The running statistics travel out of the loss as `value_and_grad`'s auxiliary
output, and optax updates the parameters.

At the end the model is scored in both BatchNorm modes: `train=True`, which
normalizes each batch with its own statistics (the padded last batch is masked
out of them), and `train=False`, which uses the running statistics, as a
deployed model would. The data set ships with scikit-learn, so nothing is
downloaded.

Run it with `make demo`, or `python examples/digits.py --help` for options.
"""

import argparse
import time
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import bnjax

NUM_CLASSES = 10
CHANNELS = (32, 64)


class ConvBlock(NamedTuple):
    """Parameters of one conv3x3 -> BatchNorm -> relu block.

    Attributes:
      kernel: convolution weights, `(3, 3, in_channels, out_channels)` (HWIO).
        The convolution has no bias of its own: BatchNorm's bias replaces it.
      norm: BatchNorm's learnable scale and bias, each `(out_channels,)`.
    """

    kernel: jax.Array
    norm: bnjax.NormParams


class Params(NamedTuple):
    """All learnable parameters of the network.

    Attributes:
      blocks: the convolutional blocks, input side first.
      head_kernel: weights of the final dense layer, `(channels, 10)`.
      head_bias: its bias, `(10,)`.
    """

    blocks: tuple[ConvBlock, ...]
    head_kernel: jax.Array
    head_bias: jax.Array


# One `BatchStats` per block: the only state the network carries.
BatchState = tuple[bnjax.BatchStats, ...]


class TrainState(NamedTuple):
    """Everything the training loop threads from one step to the next."""

    params: Params
    batch_stats: BatchState
    opt_state: optax.OptState


class Split(NamedTuple):
    """Images `(N, 8, 8, 1)` in [0, 1] and their integer labels `(N,)`."""

    images: np.ndarray
    labels: np.ndarray


class Accuracies(NamedTuple):
    """Accuracies in [0, 1], per data split and BatchNorm mode."""

    train_batch_stats: float
    test_batch_stats: float
    train_running_stats: float
    test_running_stats: float


def load_data() -> tuple[Split, Split]:
    """Loads the digits, scaled to [0, 1], as a fixed stratified 80/20 split.

    Returns:
      `(train, test)` splits; the same for every `--seed`.
    """
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    labels = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.2, stratify=labels, random_state=0
    )
    return Split(x_train, y_train), Split(x_test, y_test)


def init_model(key: jax.Array) -> tuple[Params, BatchState]:
    """Creates the network's parameters and BatchNorm state.

    Args:
      key: a `jax.random` key.

    Returns:
      `(params, batch_stats)`: He-initialized kernels, BatchNorm's standard
      initial values, and a zero head (so every class starts equally likely).
    """
    keys = jax.random.split(key, len(CHANNELS))
    conv_init = jax.nn.initializers.he_normal()
    blocks, batch_stats = [], []
    in_channels = 1
    for block_key, out_channels in zip(keys, CHANNELS, strict=True):
        kernel = conv_init(block_key, (3, 3, in_channels, out_channels), jnp.float32)
        norm, stats = bnjax.batchnorm_init(out_channels)
        blocks.append(ConvBlock(kernel, norm))
        batch_stats.append(stats)
        in_channels = out_channels
    params = Params(
        blocks=tuple(blocks),
        head_kernel=jnp.zeros((in_channels, NUM_CLASSES), jnp.float32),
        head_bias=jnp.zeros((NUM_CLASSES,), jnp.float32),
    )
    return params, tuple(batch_stats)


def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A stride-1 3x3 convolution with 'SAME' padding on NHWC input."""
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(1, 1),
        padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def forward(
    params: Params,
    batch_stats: BatchState,
    images: jax.Array,
    train: bool,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, BatchState]:
    """Computes class logits.

    Args:
      params: the network's parameters.
      batch_stats: BatchNorm running statistics, one per block.
      images: `(N, 8, 8, 1)` float images.
      train: Python bool: normalize with this batch's statistics (True) or
        with the running ones (False).
      mask: optional boolean `(N,)`: which images count towards the batch
        statistics in training mode.

    Returns:
      `(logits, new_batch_stats)`: `(N, 10)` logits and the updated running
      statistics (unchanged when `train` is False).
    """
    # BatchNorm's mask broadcasts against (N, H, W), hence the trailing axes.
    bn_mask = None if mask is None else mask[:, None, None]
    x = images
    new_stats = []
    for block, stats in zip(params.blocks, batch_stats, strict=True):
        x, stats = bnjax.batchnorm_apply(
            block.norm, stats, conv3x3(x, block.kernel), train, mask=bn_mask
        )
        x = jax.nn.relu(x)
        new_stats.append(stats)
    pooled = jnp.mean(x, axis=(1, 2))
    # Broadcast explicitly: the smoke test runs with jax_numpy_rank_promotion='raise'.
    logits = pooled @ params.head_kernel + params.head_bias[None, :]
    return logits, tuple(new_stats)


def loss_fn(
    params: Params, batch_stats: BatchState, images: jax.Array, labels: jax.Array
) -> tuple[jax.Array, BatchState]:
    """Mean cross-entropy in training mode, and the updated BatchNorm state."""
    logits, new_stats = forward(params, batch_stats, images, train=True)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, new_stats


def make_train_step(
    optimizer: optax.GradientTransformation,
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, jax.Array]]:
    """Builds the compiled training step for `optimizer`.

    Args:
      optimizer: any optax optimizer.

    Returns:
      `train_step(state, images, labels) -> (new_state, loss)`.
    """

    @jax.jit
    def train_step(
        state: TrainState, images: jax.Array, labels: jax.Array
    ) -> tuple[TrainState, jax.Array]:
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, batch_stats), grads = grad_fn(state.params, state.batch_stats, images, labels)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, batch_stats, opt_state), loss

    return train_step


def shuffled_batches(
    data: Split, batch_size: int, rng: np.random.Generator
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields one epoch of full batches in random order.

    The remainder is dropped, so every batch has one shape and `train_step`
    compiles once; each epoch drops different examples.
    """
    order = rng.permutation(len(data.labels))
    for start in range(0, len(order) - batch_size + 1, batch_size):
        index = order[start : start + batch_size]
        yield data.images[index], data.labels[index]


def train(data: Split, epochs: int, batch_size: int, learning_rate: float, seed: int) -> TrainState:
    """Trains the network from scratch.

    Args:
      data: the training split.
      epochs: passes over `data`.
      batch_size: examples per step, in [1, number of examples].
      learning_rate: Adam's initial step size, decayed to 0 on a cosine.
      seed: seeds the initialization and the order of the examples.

    Returns:
      The final `TrainState`.
    """
    if not 1 <= batch_size <= len(data.labels):
        raise ValueError(f"`batch_size` must be in [1, {len(data.labels)}], got {batch_size}.")
    steps = epochs * (len(data.labels) // batch_size)
    # Decaying to zero settles the weights, and so the running statistics, by the end.
    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, max(steps, 1)))
    params, batch_stats = init_model(jax.random.key(seed))
    state = TrainState(params, batch_stats, optimizer.init(params))
    train_step = make_train_step(optimizer)
    rng = np.random.default_rng(seed)
    with tqdm(range(epochs), desc="training", unit="epoch") as bar:
        for _ in bar:
            # Losses stay on the device until the epoch ends: no sync per step.
            losses = []
            for images, labels in shuffled_batches(data, batch_size, rng):
                state, loss = train_step(state, images, labels)
                losses.append(loss)
            bar.set_postfix(loss=f"{float(jnp.mean(jnp.stack(losses))):.4f}")
    return state


@jax.jit(static_argnames="train")
def count_correct(
    params: Params,
    batch_stats: BatchState,
    images: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    train: bool,
) -> jax.Array:
    """Counts the correctly classified images among those where `mask` is True.

    In training mode the new BatchNorm state is discarded: scoring must not
    change the model.
    """
    logits, _ = forward(params, batch_stats, images, train, mask=mask)
    correct = jnp.argmax(logits, axis=-1) == labels
    return jnp.sum(correct & mask)


def accuracy(state: TrainState, data: Split, batch_size: int, train: bool) -> float:
    """The fraction of `data` classified correctly, in batches of `batch_size`.

    The last batch is padded to full size and the padding masked out, so its
    batch statistics (in training mode) are those of its real images and
    every batch reuses one compiled function.
    """
    correct = 0
    for start in range(0, len(data.labels), batch_size):
        images = data.images[start : start + batch_size]
        labels = data.labels[start : start + batch_size]
        pad = batch_size - len(labels)
        mask = np.arange(batch_size) < len(labels)
        images = np.pad(images, ((0, pad), (0, 0), (0, 0), (0, 0)))
        labels = np.pad(labels, (0, pad))
        correct += int(count_correct(state.params, state.batch_stats, images, labels, mask, train))
    return correct / len(data.labels)


def evaluate(state: TrainState, train_data: Split, test_data: Split, batch_size: int) -> Accuracies:
    """Scores both splits with batch statistics and with running statistics."""
    return Accuracies(
        train_batch_stats=accuracy(state, train_data, batch_size, train=True),
        test_batch_stats=accuracy(state, test_data, batch_size, train=True),
        train_running_stats=accuracy(state, train_data, batch_size, train=False),
        test_running_stats=accuracy(state, test_data, batch_size, train=False),
    )


def print_report(result: Accuracies, seconds: float) -> None:
    """Prints the accuracy table and the runtime."""
    print(f"{'BatchNorm mode':<30}{'train acc':>10}{'test acc':>10}")
    rows = (
        ("train=True  (batch stats)", result.train_batch_stats, result.test_batch_stats),
        ("train=False (running stats)", result.train_running_stats, result.test_running_stats),
    )
    for name, train_acc, test_acc in rows:
        print(f"{name:<30}{train_acc:>10.2%}{test_acc:>10.2%}")
    print(f"Total runtime: {seconds:.1f} s")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parses the command line (`sys.argv[1:]` when `argv` is None)."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--epochs", type=int, default=30, help="passes over the training set")
    parser.add_argument("--batch-size", type=int, default=64, help="examples per step")
    parser.add_argument("--seed", type=int, default=0, help="seeds initialization and shuffling")
    parser.add_argument(
        "--learning-rate", type=float, default=1e-2, help="Adam's initial step size (cosine decay)"
    )
    args = parser.parse_args(argv)
    if args.epochs < 0:
        parser.error(f"--epochs must be >= 0, got {args.epochs}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    return args


def main(argv: Sequence[str] | None = None) -> Accuracies:
    """Runs the demo.

    Args:
      argv: command-line arguments without the program name; None reads
        `sys.argv`.

    Returns:
      The four accuracies that were printed.
    """
    start = time.perf_counter()
    args = parse_args(argv)
    train_data, test_data = load_data()
    state = train(train_data, args.epochs, args.batch_size, args.learning_rate, args.seed)
    result = evaluate(state, train_data, test_data, args.batch_size)
    print_report(result, time.perf_counter() - start)
    return result


if __name__ == "__main__":
    main()
