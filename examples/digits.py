"""The data and the model of bnjax's examples: scikit-learn's digits and a small conv net.

The digits (1,797 grayscale images of 8x8 pixels, ten classes) ship inside
scikit-learn, so nothing is downloaded. The conv net is generic over the
normalizer: it only ever calls a `bnjax.Normalizer`'s `init(input_shape)` and
`apply(params, state, x, train)`, so switching from BatchNorm to GroupNorm is
one factory call. Stateless normalizers carry `state = None` through the same
code.

    conv3x3 -> normalizer -> relu -> conv3x3 -> normalizer -> relu
            -> global average pool -> dense (10 classes)
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import bnjax

NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)
CHANNELS = (32, 64)

# One running state per normalizer layer (`None` for stateless normalizers).
States = tuple[Any, ...]


class Split(NamedTuple):
    """Images `(N, 8, 8, 1)` float32 in [0, 1] and their int32 labels `(N,)`."""

    images: np.ndarray
    labels: np.ndarray


class Net(NamedTuple):
    """A model with its normalizer bound, as the training loop sees it.

    Attributes:
      init: `init(key, batch_size) -> (params, states)`.
      forward: `forward(params, states, images, train) -> (logits, new_states)`.
    """

    init: Callable[[jax.Array, int], tuple[Any, States]]
    forward: Callable[[Any, States, jax.Array, bool], tuple[jax.Array, States]]


class Params(NamedTuple):
    """All learnable parameters of the conv net.

    Attributes:
      kernels: one `(3, 3, in_channels, out_channels)` (HWIO) kernel per conv
        layer, input side first. The convolutions have no bias of their own:
        the normalizer's bias replaces it.
      norms: each conv layer's normalizer parameters, e.g. `NormParams`.
      head_kernel: the dense layer, `(CHANNELS[-1], 10)`.
      head_bias: its bias, `(10,)`.
    """

    kernels: tuple[jax.Array, ...]
    norms: tuple[Any, ...]
    head_kernel: jax.Array
    head_bias: jax.Array


def load_data() -> tuple[Split, Split]:
    """Loads the digits, scaled to [0, 1], as a fixed stratified 80/20 split.

    Returns:
      `(train, test)`: 1,437 and 360 examples, the same split on every call.
    """
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    labels = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.2, stratify=labels, random_state=0
    )
    return Split(x_train, y_train), Split(x_test, y_test)


def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A stride-1 3x3 convolution with 'SAME' padding: `(N, H, W, I) -> (N, H, W, O)`.

    `kernel` is `(3, 3, I, O)` (HWIO), as for `lax.conv_general_dilated`, and
    the result is the same. It is written as one matrix product over the nine
    shifted copies of `x` because XLA's CPU convolution is up to 50 times
    slower inside `lax.scan` than outside it; a matrix product is not.
    """
    _, height, width, in_channels = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    shifted = [padded[:, i : i + height, j : j + width, :] for i in range(3) for j in range(3)]
    patches = jnp.concatenate(shifted, axis=-1)  # (N, H, W, 9 * I), in the kernel's (h, w, i) order
    return patches @ kernel.reshape(9 * in_channels, -1)


def init_model(
    norm: bnjax.Normalizer,
    key: jax.Array,
    batch_size: int,
    channels: Sequence[int] = CHANNELS,
    *,
    sizes: Sequence[int] | None = None,
) -> tuple[Params, States]:
    """Creates the conv net's parameters and its normalizers' running states.

    Args:
      norm: the normalizer of every conv layer.
      key: a `jax.random` key for the kernels.
      batch_size: the batch size `norm.init` sees (only its shape matters).
      channels: output channels of each conv layer.
      sizes: the side of each layer's square maps; default 8 for every
        layer (this net does not pool; `mnist.py`'s does).

    Returns:
      `(params, states)`: He-initialized kernels, the normalizer's initial
      parameters and states, and a zero head (every class starts equally
      likely).
    """
    keys = jax.random.split(key, len(channels))
    kernels, norms, states = [], [], []
    in_channels = IMAGE_SHAPE[-1]
    sizes = [IMAGE_SHAPE[0]] * len(channels) if sizes is None else sizes
    for layer_key, out_channels, size in zip(keys, channels, sizes, strict=True):
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
    pool: Callable[[jax.Array], jax.Array] | None = None,
) -> tuple[jax.Array, States]:
    """Computes class logits.

    Args:
      norm: the normalizer the parameters were made for.
      params: the conv net's parameters.
      states: the normalizers' running states, one per conv layer.
      images: `(N, 8, 8, 1)` float images.
      train: Python bool: training mode (batch statistics, state updated) or
        evaluation mode (running statistics, state unchanged).
      standardize: convolve with `bnjax.weight_standardize(kernel)` instead
        of the kernel (Weight Standardization; gradients flow through it).
      pool: applied after every layer but the last (none here; `mnist.py`
        halves its maps).

    Returns:
      `(logits, new_states)`: `(N, 10)` logits and the normalizers' new states.
    """
    x = images
    new_states = []
    last = len(params.kernels) - 1
    layers = zip(params.kernels, params.norms, states, strict=True)
    for i, (kernel, norm_params, state) in enumerate(layers):
        kernel = bnjax.weight_standardize(kernel) if standardize else kernel
        x, state = norm.apply(norm_params, state, conv3x3(x, kernel), train)
        x = jax.nn.relu(x)
        x = pool(x) if pool is not None and i < last else x
        new_states.append(state)
    pooled = jnp.mean(x, axis=(1, 2))
    # Broadcast explicitly: the tests run with jax_numpy_rank_promotion='raise'.
    logits = pooled @ params.head_kernel + params.head_bias[None, :]
    return logits, tuple(new_states)


def make_net(
    norm: bnjax.Normalizer,
    *,
    standardize: bool = False,
    channels: Sequence[int] = CHANNELS,
    sizes: Sequence[int] | None = None,
    pool: Callable[[jax.Array], jax.Array] | None = None,
) -> Net:
    """This conv net with `norm` after every convolution, as a `Net`.

    Args:
      norm: the normalizer of every conv layer.
      standardize: Weight Standardization of every conv kernel (see `forward`).
      channels, sizes: as in `init_model`.
      pool: as in `forward`.
    """

    def init(key: jax.Array, batch_size: int) -> tuple[Params, States]:
        return init_model(norm, key, batch_size, channels, sizes=sizes)

    def apply(
        params: Params, states: States, images: jax.Array, train: bool
    ) -> tuple[jax.Array, States]:
        return forward(norm, params, states, images, train, standardize=standardize, pool=pool)

    return Net(init, apply)
