"""Feature gathering across DDP ranks for ZSCL's distillation.

The coded text loss is a softmax over the *batch's reference images*; with the batch split over
ranks, each rank would see a different, smaller distribution. Gathering the reference features
makes every rank compute the global loss. ``torch.distributed.nn.functional.all_gather`` sums
the gradient of each gathered shard back to its owner, so after DDP averages gradients over W
ranks the update equals the single-process gradient (each rank's copy contributes 1/W).
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
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(x), dim=0)
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)
