"""One model, every normalizer: the switch is one factory call.

Trains the same small conv net on scikit-learn's 8x8 digits once per
normalizer. The training loop only ever sees a `bnjax.Normalizer`: its
`init(input_shape)` and `apply(params, state, x, train)`. Stateless
normalizers carry `state = None` through the same code.

    .venv/bin/python examples/normalizers.py [--epochs 10] [--batch-size 64]
"""

import argparse
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from digits import Split, conv3x3, load_data, shuffled_batches

import bnjax

CHANNELS = (32, 64)
NORMALIZERS = {
    "batchnorm": lambda: bnjax.batchnorm(),
    "batchnorm, ghost 16": lambda: bnjax.batchnorm(virtual_batch_size=16),
    "batchrenorm": lambda: bnjax.batchrenorm(),
    "groupnorm, 8 groups": lambda: bnjax.groupnorm(num_groups=8),
    "instancenorm": lambda: bnjax.instancenorm(),
    "layernorm": lambda: bnjax.layernorm(axis=(1, 2, 3)),
    "rmsnorm": lambda: bnjax.rmsnorm(axis=(1, 2, 3)),
}


def init_model(norm: bnjax.Normalizer, key: jax.Array, batch_size: int):
    """Conv kernels, a dense head, and one normalizer per conv block."""
    keys = jax.random.split(key, len(CHANNELS))
    kernels, norm_params, norm_states = [], [], []
    in_channels = 1
    for k, out_channels in zip(keys, CHANNELS, strict=True):
        shape = (3, 3, in_channels, out_channels)
        kernels.append(jax.nn.initializers.he_normal()(k, shape))
        params, state = norm.init((batch_size, 8, 8, out_channels))
        norm_params.append(params)
        norm_states.append(state)
        in_channels = out_channels
    head = jnp.zeros((in_channels, 10))
    return (kernels, norm_params, head), norm_states


def make_forward(norm: bnjax.Normalizer):
    def forward(params, states, images, train):
        kernels, norm_params, head = params
        x, new_states = images, []
        for kernel, p, s in zip(kernels, norm_params, states, strict=True):
            x, s = norm.apply(p, s, conv3x3(x, kernel), train)
            x = jax.nn.relu(x)
            new_states.append(s)
        return jnp.mean(x, axis=(1, 2)) @ head, new_states

    return forward


def train_and_score(norm, train: Split, test: Split, epochs: int, batch_size: int, seed: int):
    """Returns test accuracy in eval mode (`train=False`) after training."""
    forward = make_forward(norm)
    steps = epochs * (len(train.labels) // batch_size)
    optimizer = optax.adam(optax.cosine_decay_schedule(1e-2, steps))
    params, states = init_model(norm, jax.random.key(seed), batch_size)
    opt_state = optimizer.init(params)

    def loss_fn(params, states, images, labels):
        logits, states = forward(params, states, images, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), states

    @jax.jit
    def step(params, states, opt_state, images, labels):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, states), grads = grad_fn(params, states, images, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), states, opt_state, loss

    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        for images, labels in shuffled_batches(train, batch_size, rng):
            params, states, opt_state, loss = step(params, states, opt_state, images, labels)
    logits, _ = jax.jit(forward, static_argnames="train")(params, states, test.images, False)
    return float(jnp.mean(jnp.argmax(logits, -1) == test.labels)), float(loss)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
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
        acc, loss = train_and_score(
            NORMALIZERS[name](), train, test, args.epochs, args.batch_size, args.seed
        )
        seconds = time.perf_counter() - start
        print(f"{name:<22}{loss:>11.4f}{acc:>10.2%}{seconds:>9.1f}", flush=True)
        results[name] = acc
    return results


if __name__ == "__main__":
    main()
