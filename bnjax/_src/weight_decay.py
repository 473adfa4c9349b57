"""A weight-decay mask that spares the normalization parameters."""

from typing import Any

import jax

from bnjax._src.types import NormParams


def weight_decay_mask(params: Any) -> Any:
    """True for the parameters to decay, False for every normalization parameter.

    Decaying a normalizer's `scale` and `bias` towards 0 fights the
    normalization rather than regularizing the model, so they are commonly
    excluded. Normalization parameters are found by type: every leaf inside
    a `NormParams` node is False, whatever its shape (layers stacked for
    `lax.scan` keep working), and every other leaf is True.

    Args:
      params: any pytree of parameters, e.g. a dict with `NormParams` values.

    Returns:
      A pytree of Python bools of `params`' structure (`None` fields of
      `NormParams` stay None), as optax's `mask=` expects. Pass either the
      mask or the function itself:
      `optax.adamw(1e-3, weight_decay=1e-4, mask=bnjax.weight_decay_mask)`.

    Examples:
      >>> params = {"w": jnp.ones((3, 4)), "bn": bnjax.batchnorm_init(4)[0]}
      >>> bnjax.weight_decay_mask(params)
      {'bn': NormParams(scale=False, bias=False), 'w': True}
    """

    def mask(node: Any) -> Any:
        if isinstance(node, NormParams):
            return jax.tree.map(lambda _: False, node)
        return True

    return jax.tree.map(mask, params, is_leaf=lambda node: isinstance(node, NormParams))
