"""bnjax: functional normalization layers for JAX."""

from importlib.metadata import PackageNotFoundError, version

from bnjax import convert as convert
from bnjax._src.batchnorm import batchnorm_apply as batchnorm_apply
from bnjax._src.batchnorm import batchnorm_init as batchnorm_init
from bnjax._src.batchrenorm import batchrenorm_apply as batchrenorm_apply
from bnjax._src.factories import batchnorm as batchnorm
from bnjax._src.factories import batchrenorm as batchrenorm
from bnjax._src.factories import groupnorm as groupnorm
from bnjax._src.factories import instancenorm as instancenorm
from bnjax._src.factories import layernorm as layernorm
from bnjax._src.factories import rmsnorm as rmsnorm
from bnjax._src.folding import fold_batchnorm_after as fold_batchnorm_after
from bnjax._src.folding import fold_batchnorm_before_dense as fold_batchnorm_before_dense
from bnjax._src.groupnorm import groupnorm_apply as groupnorm_apply
from bnjax._src.groupnorm import groupnorm_init as groupnorm_init
from bnjax._src.groupnorm import instancenorm_apply as instancenorm_apply
from bnjax._src.layernorm import layernorm_apply as layernorm_apply
from bnjax._src.layernorm import layernorm_init as layernorm_init
from bnjax._src.precise import precise_batch_stats as precise_batch_stats
from bnjax._src.rmsnorm import rmsnorm_apply as rmsnorm_apply
from bnjax._src.rmsnorm import rmsnorm_init as rmsnorm_init
from bnjax._src.spectralnorm import spectralnorm_apply as spectralnorm_apply
from bnjax._src.spectralnorm import spectralnorm_init as spectralnorm_init
from bnjax._src.types import BatchStats as BatchStats
from bnjax._src.types import CollectedStats as CollectedStats
from bnjax._src.types import Normalizer as Normalizer
from bnjax._src.types import NormParams as NormParams
from bnjax._src.types import SpectralState as SpectralState
from bnjax._src.types import WeightNormalizer as WeightNormalizer
from bnjax._src.weight_decay import weight_decay_mask as weight_decay_mask
from bnjax._src.weight_factories import spectralnorm as spectralnorm
from bnjax._src.weight_factories import weightnorm as weightnorm
from bnjax._src.weight_standardization import weight_standardize as weight_standardize
from bnjax._src.weightnorm import weightnorm_apply as weightnorm_apply
from bnjax._src.weightnorm import weightnorm_init as weightnorm_init

try:
    __version__ = version("bnjax")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "BatchStats",
    "CollectedStats",
    "NormParams",
    "Normalizer",
    "SpectralState",
    "WeightNormalizer",
    "batchnorm",
    "batchnorm_apply",
    "batchnorm_init",
    "batchrenorm",
    "batchrenorm_apply",
    "convert",
    "fold_batchnorm_after",
    "fold_batchnorm_before_dense",
    "groupnorm",
    "groupnorm_apply",
    "groupnorm_init",
    "instancenorm",
    "instancenorm_apply",
    "layernorm",
    "layernorm_apply",
    "layernorm_init",
    "precise_batch_stats",
    "rmsnorm",
    "rmsnorm_apply",
    "rmsnorm_init",
    "spectralnorm",
    "spectralnorm_apply",
    "spectralnorm_init",
    "weight_decay_mask",
    "weight_standardize",
    "weightnorm",
    "weightnorm_apply",
    "weightnorm_init",
]
