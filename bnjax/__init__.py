"""bnjax: functional normalization layers for JAX."""

from importlib.metadata import PackageNotFoundError, version

from bnjax._src.batchnorm import batchnorm_apply as batchnorm_apply
from bnjax._src.batchnorm import batchnorm_init as batchnorm_init
from bnjax._src.layernorm import layernorm_apply as layernorm_apply
from bnjax._src.layernorm import layernorm_init as layernorm_init
from bnjax._src.types import BatchStats as BatchStats
from bnjax._src.types import NormParams as NormParams

try:
    __version__ = version("bnjax")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "BatchStats",
    "NormParams",
    "batchnorm_apply",
    "batchnorm_init",
    "layernorm_apply",
    "layernorm_init",
]
