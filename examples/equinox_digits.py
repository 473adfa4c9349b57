"""Equinox's BatchNorm or bnjax's, switched by one line: a small CNN on the 8x8 digits.

Written the way Equinox's own CNN and stateful-layer examples write it: an
`eqx.Module` CNN of `eqx.nn.Conv2d`, BatchNorm, relu, `eqx.nn.AvgPool2d` and
`eqx.nn.Linear` layers (in an `eqx.nn.Sequential`, which threads the
BatchNorms' `state` through), built with `eqx.nn.make_with_state(CNN)(key)`,
called per example and mapped over the batch with `jax.vmap(model,
axis_name="batch", in_axes=(0, None), out_axes=(0, None))`, an
`eqx.filter_jit` step with `eqx.filter_value_and_grad(..., has_aux=True)` and
optax on `eqx.filter(model, eqx.is_inexact_array)`. The CNN's BatchNorms are
`BatchNorm(C, axis_name="batch", momentum=MOMENTUM)`, and `BatchNorm` is the
one line that differs:

    BatchNorm = functools.partial(eqx.nn.BatchNorm, mode="batch")   # Equinox's
    from bnjax.equinox import BatchNorm                               # bnjax's

It is not a bare import because Equinox's BatchNorm warns unless it is told
its `mode`, a keyword bnjax's has no use for. `mode="batch"` is the usual
BatchNorm, which bnjax's is: batch statistics in training, running ones in
inference, `running = momentum * running + (1 - momentum) * batch`
(Equinox divides by `1 - momentum ** steps` on reading them, which after a
few dozen steps changes nothing). `--equinox-mode ema` picks Equinox's older
variant instead, which in training normalizes with the running statistics
just updated by the batch's, not with the batch's own. Both take the same
momentum, 0.9 (Equinox's default is 0.99, bnjax's 0.9), start from the same
weights (the norms draw no keys) and see the same batches; the only other
difference is the weight decay mask, which bnjax builds for you (see
`make_optimizer`).

    conv3x3(32) -> BatchNorm -> relu -> avg_pool 2x2     (8x8 -> 4x4)
    conv3x3(64) -> BatchNorm -> relu -> avg_pool 2x2     (4x4 -> 2x2)
    flatten (256) -> dense(128) -> relu -> dense(10)

    .venv/bin/python examples/equinox_digits.py [--norm equinox bnjax] [--steps 300] [--seed 0]
                                                [--equinox-mode {batch,ema}]

Trains once per norm (default both, one after the other; about 30 s in all
on 2 CPU cores, compilation included) and prints the test accuracy over the
360 held-out digits in train mode (each norm uses the test batch's own
statistics) and in eval mode (`eqx.nn.inference_mode(model)`: the running
statistics), as a markdown table with the seconds each run took.
"""

import argparse
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from digits import Split
from norm_swap import MOMENTUM, batch_indices, compare, parser
from tqdm import tqdm

import bnjax

NORMS = ("equinox", "bnjax")
LEARNING_RATE = 5e-3
B1 = 0.9
WEIGHT_DECAY = 1e-4


def import_batch_norm(name: str, equinox_mode: str = "batch") -> Callable[..., eqx.Module]:
    """The `BatchNorm` class the CNN uses: the one line that switches the norm."""
    if name == "equinox":
        BatchNorm = functools.partial(eqx.nn.BatchNorm, mode=equinox_mode)
    else:
        from bnjax.equinox import BatchNorm
    return BatchNorm


class CNN(eqx.Module):
    """Two conv blocks and a two-layer head; `BatchNorm` after each conv."""

    layers: eqx.nn.Sequential

    def __init__(self, BatchNorm: Callable[..., eqx.Module], key: jax.Array):
        key1, key2, key3, key4 = jax.random.split(key, 4)
        self.layers = eqx.nn.Sequential(
            [
                eqx.nn.Conv2d(1, 32, kernel_size=3, padding=1, key=key1),
                BatchNorm(32, axis_name="batch", momentum=MOMENTUM),
                eqx.nn.Lambda(jax.nn.relu),
                eqx.nn.AvgPool2d(kernel_size=2, stride=2),
                eqx.nn.Conv2d(32, 64, kernel_size=3, padding=1, key=key2),
                BatchNorm(64, axis_name="batch", momentum=MOMENTUM),
                eqx.nn.Lambda(jax.nn.relu),
                eqx.nn.AvgPool2d(kernel_size=2, stride=2),
                eqx.nn.Lambda(jnp.ravel),
                eqx.nn.Linear(2 * 2 * 64, 128, key=key3),
                eqx.nn.Lambda(jax.nn.relu),
                eqx.nn.Linear(128, 10, key=key4),
            ]
        )

    def __call__(self, x: jax.Array, state: eqx.nn.State) -> tuple[jax.Array, eqx.nn.State]:
        """One example `(1, 8, 8)` -> its logits `(10,)` and the new state."""
        return self.layers(x, state)


def batched(model: CNN) -> Callable[..., tuple[jax.Array, eqx.nn.State]]:
    """`model` over a batch: the BatchNorms pool their statistics over the axis "batch"."""
    return jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))


def make_optimizer(name: str) -> optax.GradientTransformation:
    """AdamW; with bnjax, no weight decay on the norms.

    Decaying a BatchNorm's scale and bias toward zero is rarely wanted, but
    Equinox's are plain arrays like every kernel, and Equinox has no helper
    that tells them apart: with its BatchNorm every parameter decays (unless
    you write the mask yourself). bnjax's layers keep theirs in a
    `bnjax.NormParams`, which `bnjax.weight_decay_mask` finds by type: False
    on every norm parameter, True elsewhere, in the structure of the
    parameters optax sees (`eqx.filter(model, eqx.is_inexact_array)`).
    """
    mask = bnjax.weight_decay_mask if name == "bnjax" else None
    return optax.adamw(LEARNING_RATE, B1, weight_decay=WEIGHT_DECAY, mask=mask)


def loss_fn(
    model: CNN, state: eqx.nn.State, x: jax.Array, y: jax.Array
) -> tuple[jax.Array, eqx.nn.State]:
    logits, state = batched(model)(x, state)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), state


@eqx.filter_jit
def train_step(
    model: CNN,
    state: eqx.nn.State,
    opt_state: optax.OptState,
    x: jax.Array,
    y: jax.Array,
    optim: optax.GradientTransformation,
) -> tuple[CNN, eqx.nn.State, optax.OptState, jax.Array]:
    """One AdamW step on `(x, y)`; returns the new running statistics in `state`."""
    (loss, state), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model, state, x, y)
    updates, opt_state = optim.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
    model = eqx.apply_updates(model, updates)
    return model, state, opt_state, loss


@eqx.filter_jit
def accuracy(model: CNN, state: eqx.nn.State, x: jax.Array, y: jax.Array) -> jax.Array:
    """The fraction of `(x, y)` classified right, in whatever mode `model` is.

    In training mode the new state is dropped: nothing is updated.
    """
    logits, _ = batched(model)(x, state)
    return jnp.mean(jnp.argmax(logits, axis=-1) == y)


def channels_first(images: np.ndarray) -> jax.Array:
    """`(N, 8, 8, 1)` -> `(N, 1, 8, 8)`, the `(C, H, W)` examples Equinox's convs take."""
    return jnp.asarray(images.transpose(0, 3, 1, 2))


def train_and_score(
    name: str, train: Split, test: Split, args: argparse.Namespace
) -> dict[str, float]:
    """Trains the CNN with `name`'s BatchNorm; returns its test accuracies and loss."""
    BatchNorm = import_batch_norm(name, args.equinox_mode)
    model, state = eqx.nn.make_with_state(CNN)(BatchNorm, jax.random.key(args.seed))
    optim = make_optimizer(name)
    opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))
    images, labels = channels_first(train.images), jnp.asarray(train.labels)
    losses = []
    start = time.perf_counter()
    with tqdm(batch_indices(len(labels), args.steps, args.seed), desc=f"{name:>7}") as bar:
        for i, idx in enumerate(bar):
            model, state, opt_state, loss = train_step(
                model, state, opt_state, images[idx], labels[idx], optim
            )
            if i == 0:
                first_step = time.perf_counter() - start  # mostly compilation
            losses.append(loss)
            if (i + 1) % 50 == 0 or i + 1 == args.steps:
                bar.set_postfix(loss=f"{float(jnp.mean(jnp.stack(losses))):.3f}")
                losses = []

    x, y = channels_first(test.images), jnp.asarray(test.labels)
    eval_mode = float(accuracy(eqx.nn.inference_mode(model), state, x, y))  # running statistics
    train_mode = float(accuracy(model, state, x, y))  # the test batch's statistics
    return dict(
        train_mode_accuracy=train_mode,
        eval_mode_accuracy=eval_mode,
        final_train_loss=float(loss),
        first_step_seconds=first_step,
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The shared command line plus `--equinox-mode`."""
    command_line = parser(__doc__.splitlines()[0], NORMS)
    command_line.add_argument(
        "--equinox-mode",
        choices=("batch", "ema"),
        default="batch",
        help="the `mode` of Equinox's BatchNorm (default batch, the usual BatchNorm)",
    )
    return command_line.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Trains with each chosen norm from the same seed and prints the table."""
    args = parse_args(argv)
    result = compare(args, train_and_score, f', Equinox mode="{args.equinox_mode}"')
    return {**result, "equinox_mode": args.equinox_mode}


if __name__ == "__main__":
    main()
