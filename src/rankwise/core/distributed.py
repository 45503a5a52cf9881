"""Adapted models under ``torch.distributed``: DDP wrappers and FSDP2-sharded (DTensor) tensors.

* ``DistributedDataParallel`` / ``DataParallel`` wrap the model: :func:`unwrap` returns the model
  inside, where rankwise keeps its adapter records (``rw.save``, ``rw.merge``, ``rw.rank_step``
  accept the wrapper).
* FSDP2 (``torch.distributed.fsdp.fully_shard``) keeps the model object and turns its parameters
  into ``DTensor`` shards. :func:`full` gathers one (a collective: every process must call the code
  that calls it — ``rw.save`` of a sharded model runs on every rank, and only rank 0 writes, so the
  saved adapter is complete, never the local shard or empty).
"""

from __future__ import annotations

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside ``DistributedDataParallel`` / ``DataParallel`` wrappers."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def is_sharded(t) -> bool:
    """Whether ``t`` is a ``DTensor`` (an FSDP2 / tensor-parallel shard)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole: a ``DTensor`` is all-gathered (collective), any other tensor returned as is."""
    return t.full_tensor() if is_sharded(t) else t


def rank() -> int:
    """This process's rank (0 without ``torch.distributed``)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
