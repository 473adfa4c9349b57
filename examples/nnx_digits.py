"""Flax NNX's BatchNorm or bnjax's, switched by one import: a small CNN on the 8x8 digits.

The model, the optimizer and the training step are written the way Flax's own
NNX MNIST tutorial writes them: an `nnx.Module` CNN (`nnx.Conv`, BatchNorm,
relu, average pooling, `nnx.Linear`), `nnx.Optimizer(model, optax.adamw(...),
wrt=nnx.Param)`, an `@nnx.jit` train step with `nnx.value_and_grad`, and
`nnx.MultiMetric` for the running loss and accuracy. The CNN's BatchNorms are
`norms.BatchNorm(C, momentum=MOMENTUM, rngs=rngs)`, and `norms` is the one
line that differs:

    from flax import nnx as norms    # Flax's nnx.BatchNorm
    from bnjax import nnx as norms   # bnjax's, the numbers of bnjax.batchnorm_apply

Both keep `running = momentum * running + (1 - momentum) * batch`; Flax's
default momentum is 0.99 and bnjax's 0.9, so the model passes 0.9 to both.
Both models start from the same weights (the conv and dense layers draw
their keys before the norms do) and see the same batches; the only other
difference is the weight decay mask, which bnjax builds for you
(see `make_optimizer`).

    conv3x3(32) -> BatchNorm -> relu -> avg_pool 2x2     (8x8 -> 4x4)
    conv3x3(64) -> BatchNorm -> relu -> avg_pool 2x2     (4x4 -> 2x2)
    flatten (256) -> dense(128) -> relu -> dense(10)

    .venv/bin/python examples/nnx_digits.py [--norm flax bnjax] [--steps 300] [--seed 0]

Trains once per norm (default both, one after the other; about 30 s in all
on 2 CPU cores, compilation included) and prints the test accuracy over the 360
held-out digits in train mode (`model.train()`: each norm uses the test
batch's own statistics) and in eval mode (`model.eval()`: the running
statistics), as a markdown table with the seconds each run took.
"""

import argparse
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import optax
from digits import Split
from flax import nnx
from norm_swap import MOMENTUM, batch_indices, compare, parser
from tqdm import tqdm

NORMS = ("flax", "bnjax")
LEARNING_RATE = 5e-3
B1 = 0.9  # the tutorial's `momentum` of adamw
WEIGHT_DECAY = 1e-4


def import_norms(name: str) -> Any:
    """The module whose `BatchNorm` the CNN uses: the one line that switches the norm."""
    if name == "flax":
        from flax import nnx as norms
    else:
        from bnjax import nnx as norms
    return norms


class CNN(nnx.Module):
    """The tutorial's CNN, shrunk to 8x8 images; `norms.BatchNorm` after each conv."""

    def __init__(self, norms: Any, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 32, kernel_size=(3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
        self.linear1 = nnx.Linear(2 * 2 * 64, 128, rngs=rngs)
        self.linear2 = nnx.Linear(128, 10, rngs=rngs)
        # Last, so that Flax's BatchNorm, which draws two keys from `rngs` for
        # its constant initializers, leaves the weights above as bnjax's gets them.
        self.batch_norm1 = norms.BatchNorm(32, momentum=MOMENTUM, rngs=rngs)
        self.batch_norm2 = norms.BatchNorm(64, momentum=MOMENTUM, rngs=rngs)
        self.avg_pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.avg_pool(nnx.relu(self.batch_norm1(self.conv1(x))))
        x = self.avg_pool(nnx.relu(self.batch_norm2(self.conv2(x))))
        x = x.reshape(x.shape[0], -1)  # flatten
        x = nnx.relu(self.linear1(x))
        return self.linear2(x)


def make_optimizer(model: CNN, norms: Any) -> nnx.Optimizer:
    """AdamW on the model's `nnx.Param`s; with bnjax, no weight decay on the norms.

    Decaying a BatchNorm's scale and bias toward zero is rarely wanted, but
    they are `nnx.Param`s like every kernel, and nothing in Flax tells them
    apart from the rest: its `nnx` module has no helper to build the mask, so
    with Flax's BatchNorm every parameter decays, as in Flax's tutorial
    (unless you write the mask yourself). bnjax's layers know their own type:
    `bnjax.nnx.weight_decay_mask(model)` is False on every bnjax layer's
    parameters and True elsewhere, in the structure optax's `mask=` expects
    inside `nnx.Optimizer`.
    """
    mask = None if norms is nnx else norms.weight_decay_mask(model)
    tx = optax.adamw(LEARNING_RATE, B1, weight_decay=WEIGHT_DECAY, mask=mask)
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


def loss_fn(model: CNN, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    logits = model(batch["image"])
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits=logits, labels=batch["label"]
    ).mean()
    return loss, logits


@nnx.jit
def train_step(
    model: CNN, optimizer: nnx.Optimizer, metrics: nnx.MultiMetric, batch: dict[str, jax.Array]
) -> None:
    """One AdamW step on `batch`; the BatchNorms update their running statistics in place."""
    grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
    (loss, logits), grads = grad_fn(model, batch)
    metrics.update(loss=loss, logits=logits, labels=batch["label"])
    optimizer.update(model, grads)


@nnx.jit
def accuracy(model: CNN, batch: dict[str, jax.Array]) -> jax.Array:
    """The fraction of `batch` classified right, in whatever mode `model` is."""
    return jnp.mean(jnp.argmax(model(batch["image"]), axis=-1) == batch["label"])


def train_and_score(
    name: str, train: Split, test: Split, args: argparse.Namespace
) -> dict[str, float]:
    """Trains the CNN with `name`'s BatchNorm; returns its test accuracies and loss."""
    norms = import_norms(name)
    model = CNN(norms, rngs=nnx.Rngs(args.seed))
    optimizer = make_optimizer(model, norms)
    metrics = nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(), loss=nnx.metrics.Average("loss"))
    images, labels = jnp.asarray(train.images), jnp.asarray(train.labels)
    model.train()
    start = time.perf_counter()
    with tqdm(batch_indices(len(labels), args.steps, args.seed), desc=f"{name:>5}") as bar:
        for i, idx in enumerate(bar):
            train_step(model, optimizer, metrics, {"image": images[idx], "label": labels[idx]})
            if i == 0:
                first_step = time.perf_counter() - start  # mostly compilation
            if (i + 1) % 50 == 0 or i + 1 == args.steps:
                logged = metrics.compute()
                bar.set_postfix(loss=f"{logged['loss']:.3f}", acc=f"{logged['accuracy']:.3f}")
                metrics.reset()

    test_batch = {"image": jnp.asarray(test.images), "label": jnp.asarray(test.labels)}
    model.eval()  # running statistics; nothing is updated
    eval_mode = float(accuracy(model, test_batch))
    # Train mode normalizes with the test batch's statistics and updates the
    # running ones, so it runs on a copy that is thrown away.
    copy = nnx.clone(model)
    copy.train()
    train_mode = float(accuracy(copy, test_batch))
    return dict(
        train_mode_accuracy=train_mode,
        eval_mode_accuracy=eval_mode,
        final_train_loss=float(logged["loss"]),
        first_step_seconds=first_step,
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The shared command line: `--norm`, `--steps`, `--seed`."""
    return parser(__doc__.splitlines()[0], NORMS).parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Trains with each chosen norm from the same seed and prints the table."""
    return compare(parse_args(argv), train_and_score)


if __name__ == "__main__":
    main()
