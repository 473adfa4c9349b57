"""bnjax's normalizers as Flax NNX modules (install the extra `bnjax[flax]`).

`BatchNorm`, `BatchRenorm`, `LayerNorm`, `RMSNorm`, `GroupNorm` and
`InstanceNorm` take the keywords of the matching factory and compute exactly
what the functions compute; `precise_batch_stats` and `weight_decay_mask`
are the tools of the same names for whole NNX models.
"""

from bnjax._src.adapters.nnx import BatchNorm as BatchNorm
from bnjax._src.adapters.nnx import BatchRenorm as BatchRenorm
from bnjax._src.adapters.nnx import GroupNorm as GroupNorm
from bnjax._src.adapters.nnx import InstanceNorm as InstanceNorm
from bnjax._src.adapters.nnx import LayerNorm as LayerNorm
from bnjax._src.adapters.nnx import RMSNorm as RMSNorm
from bnjax._src.adapters.nnx import precise_batch_stats as precise_batch_stats
from bnjax._src.adapters.nnx import weight_decay_mask as weight_decay_mask

__all__ = [
    "BatchNorm",
    "BatchRenorm",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "RMSNorm",
    "precise_batch_stats",
    "weight_decay_mask",
]
