"""Distributed training under ``torchrun``: joining (and at exit leaving) the process group, the check that a
loader shards its data with a ``DistributedSampler``, and the averaging of buffers (BatchNorm statistics) that
DDP leaves to each rank."""
from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data.distributed import DistributedSampler

from .errors import FxlopError


def init_distributed() -> tuple[int, int]:
    """``(rank, world size)``; under ``torchrun`` this first joins the process group (nccl on CUDA,
    gloo on CPU), which is left again at exit.  Call it before building a ``DistributedSampler``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    atexit.register(_leave_group)
    return dist.get_rank(), dist.get_world_size()


def _leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _average_buffers(model: nn.Module, world: int) -> None:
    """Give every rank the same buffers (BatchNorm statistics): DDP keeps parameters in step, but
    each rank updates its statistics on its own shard; floating buffers are averaged over ranks."""
    for buffer in model.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer.div_(world)
        else:
            dist.broadcast(buffer, src=0)


def _require_distributed_sampler(loader, name: str) -> None:
    if not isinstance(getattr(loader, "sampler", None), DistributedSampler):
        raise FxlopError(f"under torchrun, {name} must use a DistributedSampler "
                         f"(fxlop.data.make_loader(..., distributed=True))")
