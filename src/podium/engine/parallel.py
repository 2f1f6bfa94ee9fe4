"""Helpers for code that runs the same on one process and under DDP: the world size, gathers
with and without gradients, and the plain module under Fabric's / DDP's wrappers.

Used by tasks whose steps need the whole global batch (MoCo's shuffled BN and queue, SimCLR's
NT-Xent over every rank's views) and by anything that must reach the model's own attributes.

    from podium.engine.parallel import concat_all_gather, unwrap
    keys = concat_all_gather(local_keys)      # (world * N, D), rank order; a no-op on one process
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


@torch.no_grad()
def concat_all_gather(tensor: Tensor) -> Tensor:
    """Concatenate `tensor` from every rank along dim 0 (rank order); no gradient; a no-op
    without torch.distributed. Every rank must pass the same shape."""
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradients of every rank's copy (all_reduce, which gloo
    supports, unlike the reduce_scatter / all_to_all of torch.distributed.nn)."""

    @staticmethod
    def forward(ctx, tensor):
        parts = [torch.empty_like(tensor) for _ in range(world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        n = grad.shape[0] // world_size()
        return grad[rank() * n:(rank() + 1) * n]


def gather_with_grad(tensor: Tensor) -> Tensor:
    """`concat_all_gather` that lets gradients flow back to every rank's own part."""
    return tensor if world_size() == 1 else _GatherWithGrad.apply(tensor)


def unwrap(module: nn.Module) -> nn.Module:
    """The plain nn.Module under Fabric's and DDP's wrappers (an AveragedModel is kept whole)."""
    while hasattr(module, "module") and not isinstance(module, torch.optim.swa_utils.AveragedModel):
        module = module.module
    return module
