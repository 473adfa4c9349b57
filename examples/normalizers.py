"""One model, every normalizer: the switch is one factory call.

Trains the same small conv net (`digits.py`) on scikit-learn's 8x8 digits
once per normalizer. The model and the training loop only ever see a
`bnjax.Normalizer`: its `init(input_shape)` and `apply(params, state, x,
train)`. Stateless normalizers carry `state = None` through the same code.
`study.py` does the same at many batch sizes and seeds, with plots.

    .venv/bin/python examples/normalizers.py [--epochs 10] [--batch-size 64]
"""

import argparse
import time
from collections.abc import Sequence

import jax
import numpy as np
import optax
from digits import Split, load_data, make_net
from training import error_rate, make_step, steps_per_epoch

import bnjax

NORMALIZERS = {
    "batchnorm": lambda: bnjax.batchnorm(),
    "batchnorm, ghost 16": lambda: bnjax.batchnorm(virtual_batch_size=16),
    "batchrenorm": lambda: bnjax.batchrenorm(),
    "groupnorm, 8 groups": lambda: bnjax.groupnorm(num_groups=8),
    "instancenorm": lambda: bnjax.instancenorm(),
    "layernorm": lambda: bnjax.layernorm(axis=(1, 2, 3)),
    "rmsnorm": lambda: bnjax.rmsnorm(axis=(1, 2, 3)),
}


def train_and_score(
    norm: bnjax.Normalizer, train: Split, test: Split, epochs: int, batch_size: int, seed: int
) -> tuple[float, float]:
    """Trains with Adam, one jitted step per batch; returns the last loss and test accuracy.

    The accuracy is in evaluation mode (`train=False`: running statistics).
    """
    steps = steps_per_epoch(len(train.labels), batch_size)
    optimizer = optax.adam(optax.cosine_decay_schedule(1e-2, epochs * steps))
    net = make_net(norm)
    step = jax.jit(make_step(net, optimizer))
    params, states = net.init(jax.random.key(seed), batch_size)
    carry = (params, states, optimizer.init(params))
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(train.labels))[: steps * batch_size]
        for index in order.reshape(steps, batch_size):
            carry, loss = step(carry, train.images[index], train.labels[index])
    params, states, _ = carry
    error = jax.jit(lambda params, states: error_rate(net, params, states, *test))
    return float(loss), 1.0 - float(error(params, states))


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Trains once per normalizer; returns each one's test accuracy in eval mode."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", choices=sorted(NORMALIZERS), default=None)
    args = parser.parse_args(argv)
    train, test = load_data()
    print(f"{'normalizer':<22}{'final loss':>11}{'test acc':>10}{'seconds':>9}")
    results = {}
    for name in args.only or NORMALIZERS:
        start = time.perf_counter()
        loss, accuracy = train_and_score(
            NORMALIZERS[name](), train, test, args.epochs, args.batch_size, args.seed
        )
        seconds = time.perf_counter() - start
        print(f"{name:<22}{loss:>11.4f}{accuracy:>10.2%}{seconds:>9.1f}", flush=True)
        results[name] = accuracy
    return results


if __name__ == "__main__":
    main()
