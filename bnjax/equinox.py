"""bnjax's normalizers as Equinox modules (install the extra `bnjax[equinox]`).

Called per example, as Equinox's layers are. `BatchNorm` and `BatchRenorm`
keep their running statistics in `equinox.nn.State` (build them with
`equinox.nn.make_with_state`) and pool the batch statistics over the
`jax.vmap` axis named by `axis_name`; `LayerNorm`, `RMSNorm`, `GroupNorm`
and `InstanceNorm` are stateless. Each computes exactly what the matching
bnjax function computes.
"""

from bnjax._src.adapters.equinox import BatchNorm as BatchNorm
from bnjax._src.adapters.equinox import BatchRenorm as BatchRenorm
from bnjax._src.adapters.equinox import GroupNorm as GroupNorm
from bnjax._src.adapters.equinox import InstanceNorm as InstanceNorm
from bnjax._src.adapters.equinox import LayerNorm as LayerNorm
from bnjax._src.adapters.equinox import RMSNorm as RMSNorm

__all__ = ["BatchNorm", "BatchRenorm", "GroupNorm", "InstanceNorm", "LayerNorm", "RMSNorm"]
