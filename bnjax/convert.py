"""Converters between bnjax and PyTorch, Flax linen, Haiku and Keras layers.

See `bnjax._src.convert` for the conventions: stored values are copied as
they are, so round trips are exact.
"""

from bnjax._src.convert.flax_linen import from_flax_batchnorm as from_flax_batchnorm
from bnjax._src.convert.flax_linen import to_flax_batchnorm as to_flax_batchnorm
from bnjax._src.convert.haiku import from_haiku_batchnorm as from_haiku_batchnorm
from bnjax._src.convert.haiku import to_haiku_batchnorm as to_haiku_batchnorm
from bnjax._src.convert.keras import from_keras_batchnorm as from_keras_batchnorm
from bnjax._src.convert.keras import to_keras_batchnorm as to_keras_batchnorm
from bnjax._src.convert.pytorch import from_torch_batchnorm as from_torch_batchnorm
from bnjax._src.convert.pytorch import from_torch_groupnorm as from_torch_groupnorm
from bnjax._src.convert.pytorch import from_torch_layernorm as from_torch_layernorm
from bnjax._src.convert.pytorch import from_torch_momentum as from_torch_momentum
from bnjax._src.convert.pytorch import from_torch_rmsnorm as from_torch_rmsnorm
from bnjax._src.convert.pytorch import to_torch_batchnorm as to_torch_batchnorm
from bnjax._src.convert.pytorch import to_torch_groupnorm as to_torch_groupnorm
from bnjax._src.convert.pytorch import to_torch_layernorm as to_torch_layernorm
from bnjax._src.convert.pytorch import to_torch_momentum as to_torch_momentum
from bnjax._src.convert.pytorch import to_torch_rmsnorm as to_torch_rmsnorm
from bnjax._src.convert.pytorch_parametrizations import (
    from_torch_spectralnorm as from_torch_spectralnorm,
)
from bnjax._src.convert.pytorch_parametrizations import (
    from_torch_weightnorm as from_torch_weightnorm,
)
from bnjax._src.convert.pytorch_parametrizations import (
    to_torch_spectralnorm as to_torch_spectralnorm,
)
from bnjax._src.convert.pytorch_parametrizations import to_torch_weightnorm as to_torch_weightnorm

__all__ = [
    "from_flax_batchnorm",
    "from_haiku_batchnorm",
    "from_keras_batchnorm",
    "from_torch_batchnorm",
    "from_torch_groupnorm",
    "from_torch_layernorm",
    "from_torch_momentum",
    "from_torch_rmsnorm",
    "from_torch_spectralnorm",
    "from_torch_weightnorm",
    "to_flax_batchnorm",
    "to_haiku_batchnorm",
    "to_keras_batchnorm",
    "to_torch_batchnorm",
    "to_torch_groupnorm",
    "to_torch_layernorm",
    "to_torch_momentum",
    "to_torch_rmsnorm",
    "to_torch_spectralnorm",
    "to_torch_weightnorm",
]
