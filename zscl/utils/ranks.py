"""Which process this is in a distributed run, and rank-0-only printing."""

from __future__ import annotations

import os

import torch.distributed as dist


def is_rank_zero() -> bool:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", os.environ.get("SLURM_PROCID", "0")))) == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def say(text: str) -> None:
    if is_rank_zero():
        print(text, flush=True)
