"""What the engine needs to know of sharded (FSDP2, DTensor) parameters, in one place.

The paths run on a DTensor's local shard, and sum a hyper-gradient's partial dot products over
the mesh dimensions a parameter is sharded on; checkpoints lay state out like its parameter.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

try:  # FSDP2 parameters are DTensors
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # pragma: no cover - torch built without distributed
    _DTensor = None


def is_dtensor(t) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 parameter or its state); False without torch.distributed."""
    return _DTensor is not None and isinstance(t, _DTensor)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (sharing its storage), or the tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def shard_key(p: Tensor | None):
    """(mesh, sharded mesh dims) of a sharded DTensor parameter, None for anything else."""
    if p is None or not is_dtensor(p):
        return None
    if any(pl.is_partial() for pl in p.placements):
        raise ValueError(f"metaopt: a parameter has a Partial placement {p.placements}; expected Shard or Replicate")
    dims = tuple(i for i, pl in enumerate(p.placements) if pl.is_shard())
    return (p.device_mesh, dims) if dims else None
