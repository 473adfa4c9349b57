"""Training and scoring the examples' conv nets, one compiled call per run.

A whole training run is one pure function of a `jax.random` key: it
initializes the model, and for each epoch shuffles the training set and
steps through it with `lax.scan`, so a batch of 2 costs one small step of
compiled code rather than a Python round trip. A seed is a new key for the
same compiled run.

The optimizer is SGD with momentum 0.9, as in the normalization papers'
ImageNet runs. Its step size rises linearly from zero over the first tenth
of the steps (the warmup of Goyal et al. 2017, which makes the linear
scaling rule work at large batches), then decays to zero on a cosine.
"""

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from digits import Net, Split, States
from jax import lax

import bnjax

MOMENTUM = 0.9
# SGD's step size at batch size 64; other batch sizes scale it linearly.
LEARNING_RATE_AT_64 = 0.4
WARMUP_FRACTION = 0.1


class Schedule(NamedTuple):
    """How one run trains.

    Attributes:
      batch_size: examples per step; the remainder of each epoch is dropped.
      epochs: passes over the training set.
      learning_rate: the peak step size, reached after the warmup.
    """

    batch_size: int
    epochs: int
    learning_rate: float


class Trained(NamedTuple):
    """The result of one run.

    Attributes:
      params: the final parameters.
      states: the normalizers' final running states.
      losses: the training loss of every step, `(epochs, steps_per_epoch)`.
    """

    params: Any
    states: States
    losses: jax.Array


def scaled_learning_rate(batch_size: int, at_64: float = LEARNING_RATE_AT_64) -> float:
    """The linear scaling rule: the step size in proportion to the batch size."""
    return at_64 * batch_size / 64


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches per epoch: the remainder is dropped, a different one each epoch."""
    if not 1 <= batch_size <= num_examples:
        raise ValueError(f"`batch_size` must be in [1, {num_examples}], got {batch_size}.")
    return num_examples // batch_size


# The loop state of one step: parameters, running states, optimizer state.
Carry = tuple[Any, States, optax.OptState]


def make_step(
    net: Net, optimizer: optax.GradientTransformation
) -> Callable[[Carry, jax.Array, jax.Array], tuple[Carry, jax.Array]]:
    """Builds one training step: the loss in training mode, its gradient, an update.

    Args:
      net: the model, its normalizer bound (e.g. `digits.make_net(norm)`).
      optimizer: any optax optimizer.

    Returns:
      `step((params, states, opt_state), images, labels) -> (new_carry, loss)`
      for a batch of images `(B, H, W, 1)` with labels `(B,)`; pure, so it
      can be jitted or scanned.
    """

    def loss_fn(
        params: Any, states: States, images: jax.Array, labels: jax.Array
    ) -> tuple[jax.Array, States]:
        logits, states = net.forward(params, states, images, True)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, states

    def step(carry: Carry, images: jax.Array, labels: jax.Array) -> tuple[Carry, jax.Array]:
        params, states, opt_state = carry
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, states), grads = grad_fn(params, states, images, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), states, opt_state), loss

    return step


def make_train(
    net: Net, schedule: Schedule, num_examples: int
) -> Callable[[jax.Array, jax.Array, jax.Array], Trained]:
    """Builds a whole training run as one pure, jittable function.

    Args:
      net: the model, its normalizer bound.
      schedule: batch size, epochs and learning rate.
      num_examples: the size of the training set the run will be given.

    Returns:
      `run(key, images, labels) -> Trained`, with `images` `(num_examples, H,
      W, 1)` and `labels` `(num_examples,)`. The key seeds the initialization
      and the order of the examples.
    """
    steps = steps_per_epoch(num_examples, schedule.batch_size)
    total = steps * schedule.epochs
    learning_rate = optax.warmup_cosine_decay_schedule(
        0.0, schedule.learning_rate, round(WARMUP_FRACTION * total), total
    )
    optimizer = optax.sgd(learning_rate, momentum=MOMENTUM)
    step = make_step(net, optimizer)

    def run(key: jax.Array, images: jax.Array, labels: jax.Array) -> Trained:
        init_key, order_key = jax.random.split(key)
        params, states = net.init(init_key, schedule.batch_size)

        def epoch(carry: Carry, epoch_key: jax.Array) -> tuple[Carry, jax.Array]:
            order = jax.random.permutation(epoch_key, num_examples)
            batches = order[: steps * schedule.batch_size].reshape(steps, schedule.batch_size)
            return lax.scan(lambda c, index: step(c, images[index], labels[index]), carry, batches)

        carry = (params, states, optimizer.init(params))
        epoch_keys = jax.random.split(order_key, schedule.epochs)
        (params, states, _), losses = lax.scan(epoch, carry, epoch_keys)
        return Trained(params, states, losses)

    return run


def error_rate(
    net: Net, params: Any, states: States, images: jax.Array, labels: jax.Array
) -> jax.Array:
    """The fraction of `images` misclassified in evaluation mode, a float32 scalar.

    Evaluation mode uses the running statistics (BatchNorm family); every
    other normalizer computes the same thing in both modes.
    """
    logits, _ = net.forward(params, states, images, False)
    return jnp.mean(jnp.argmax(logits, axis=-1) != labels)


def has_batch_stats(states: States) -> bool:
    """Whether any running state is a `BatchStats` (the BatchNorm family)."""
    leaves = jax.tree.leaves(states, is_leaf=lambda s: isinstance(s, bnjax.BatchStats))
    return any(isinstance(leaf, bnjax.BatchStats) for leaf in leaves)


def training_batches(data: Split, batch_size: int) -> Iterator[np.ndarray]:
    """The training images in order, as full batches `(batch_size, H, W, 1)`."""
    for start in range(0, len(data.labels) - batch_size + 1, batch_size):
        yield data.images[start : start + batch_size]


def precise_states(net: Net, params: Any, states: States, data: Split, batch_size: int) -> States:
    """Re-estimates the running statistics exactly over the training set.

    Needs `bnjax.precise_batch_stats`. The statistics are those the
    training-mode network sees: batches of the training batch size.

    Args:
      net: the model, its normalizer (of the BatchNorm family) bound.
      params: trained parameters, for one seed.
      states: the running states they were trained with.
      data: the training split.
      batch_size: the training batch size.

    Returns:
      `states` with every running mean and variance replaced by the
      population statistics over `data`'s full batches (the remainder,
      fewer than `batch_size` examples, is left out).
    """

    # Not jitted here: `precise_batch_stats` traces it itself, with BatchNorm collecting.
    def stats_fn(states: States, images: jax.Array) -> States:
        return net.forward(params, states, images, True)[1]

    return bnjax.precise_batch_stats(stats_fn, states, training_batches(data, batch_size))
