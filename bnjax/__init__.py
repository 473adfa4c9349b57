"""bnjax: functional normalization layers for JAX."""

from importlib.metadata import PackageNotFoundError, version

from bnjax._src.batchnorm import batchnorm_apply as batchnorm_apply
from bnjax._src.batchnorm import batchnorm_init as batchnorm_init
from bnjax._src.batchrenorm import batchrenorm_apply as batchrenorm_apply
from bnjax._src.factories import batchnorm as batchnorm
from bnjax._src.factories import batchrenorm as batchrenorm
from bnjax._src.factories import groupnorm as groupnorm
from bnjax._src.factories import instancenorm as instancenorm
from bnjax._src.factories import layernorm as layernorm
from bnjax._src.factories import rmsnorm as rmsnorm
from bnjax._src.groupnorm import groupnorm_apply as groupnorm_apply
from bnjax._src.groupnorm import groupnorm_init as groupnorm_init
from bnjax._src.groupnorm import instancenorm_apply as instancenorm_apply
from bnjax._src.layernorm import layernorm_apply as layernorm_apply
from bnjax._src.layernorm import layernorm_init as layernorm_init
from bnjax._src.rmsnorm import rmsnorm_apply as rmsnorm_apply
from bnjax._src.rmsnorm import rmsnorm_init as rmsnorm_init
from bnjax._src.types import BatchStats as BatchStats
from bnjax._src.types import Normalizer as Normalizer
from bnjax._src.types import NormParams as NormParams

try:
    __version__ = version("bnjax")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "BatchStats",
    "NormParams",
    "Normalizer",
    "batchnorm",
    "batchnorm_apply",
    "batchnorm_init",
    "batchrenorm",
    "batchrenorm_apply",
    "groupnorm",
    "groupnorm_apply",
    "groupnorm_init",
    "instancenorm",
    "instancenorm_apply",
    "layernorm",
    "layernorm_apply",
    "layernorm_init",
    "rmsnorm",
    "rmsnorm_apply",
    "rmsnorm_init",
]
