"""Collection mode: BatchNorm reports raw batch moments for precise statistics.

`precise_batch_stats` traces the user's forward pass inside `collecting()`
and feeds it states whose `count` is `MARK`. A training-mode BatchNorm traced
in this mode returns, for such a state, this batch's mean, biased variance and
the number of contributing entries `n`, encoded as `count = encode(n)` (always
`<= -2`), instead of its running update. The choice between the two is made on
the data (`count == MARK`), so a trace made in this mode and reused later for
ordinary training (a user's `jax.jit` cached first here) still updates the
running statistics; and a trace made outside this mode returns a `count` that
is not encoded, which `precise_batch_stats` detects.
"""

import contextlib
import contextvars
from collections.abc import Iterator

import jax
import jax.numpy as jnp

# The `count` that asks a BatchNorm for its raw moments.
MARK = -1
_COLLECTING = contextvars.ContextVar("bnjax_collecting", default=False)


def is_collecting() -> bool:
    """Whether BatchNorm is being traced in collection mode."""
    return _COLLECTING.get()


@contextlib.contextmanager
def collecting() -> Iterator[None]:
    """Traces BatchNorm in collection mode for the duration of the block."""
    token = _COLLECTING.set(True)
    try:
        yield
    finally:
        _COLLECTING.reset(token)


def encode(n: jax.Array) -> jax.Array:
    """The `count` reporting `n >= 0` contributing entries: `-2 - n`."""
    return jnp.int32(-2) - jnp.round(n).astype(jnp.int32)


def decode(count):
    """`n` from an encoded `count` (host numpy values); `< 0` if not encoded."""
    return -2 - count
