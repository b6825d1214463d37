"""In-place running averages over lists of tensors (the averaging callbacks' inner loop).

Both use ``torch._foreach_lerp_`` (one fused kernel per device/dtype group, as torch.optim
does): lerp(a, x, t) = a + t (x − a). ``avg`` holds fp32 tensors; ``new`` may be any float
dtype on the same devices and is upcast first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["ema_update_", "uniform_update_"]


def _as_fp32(avg: Sequence[Tensor], new: Sequence[Tensor]) -> list[Tensor]:
    if len(avg) != len(new):
        raise ValueError(f"running average holds {len(avg)} tensors but got {len(new)} new ones")
    return [t.detach().float() for t in new]


@torch.no_grad()
def uniform_update_(avg: list[Tensor], new: Sequence[Tensor], count: int) -> None:
    """Add one member to a uniform average of ``count`` members: avg ← avg + (new − avg)/(count+1)."""
    if count < 0:
        raise ValueError(f"count is the number of members already averaged (≥ 0), got {count}")
    torch._foreach_lerp_(avg, _as_fp32(avg, new), 1.0 / (count + 1))


@torch.no_grad()
def ema_update_(avg: list[Tensor], new: Sequence[Tensor], decay: float) -> None:
    """Exponential moving average: avg ← β avg + (1−β) new, β = ``decay``."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay β must be in [0, 1], got {decay}")
    torch._foreach_lerp_(avg, _as_fp32(avg, new), 1.0 - decay)
