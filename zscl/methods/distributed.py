"""Feature gathering across DDP ranks for ZSCL's distillation.

The coded text loss is a softmax over the *batch's reference images*; with the batch split over
ranks, each rank would see a different, smaller distribution. Gathering the reference features
makes every rank compute the global loss. The autograd all-gather sums the gradient of each
gathered shard back to its owner (a reduce-scatter), so after DDP averages gradients over W ranks
the update equals the single-process gradient (each rank's copy of the loss contributes 1/W).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_features(x: torch.Tensor, with_grad: bool) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0 (rank order); identity on one process."""
    if world_size() == 1:
        return x
    if with_grad:
        from torch.distributed import _functional_collectives as fc

        gather = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd
        return gather(x.contiguous(), gather_dim=0, group=dist.group.WORLD)
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)
