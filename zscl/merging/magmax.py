"""MagMax: merge the checkpoints of sequential fine-tuning by maximum-magnitude selection.

Sequential fine-tuning on tasks 1..T gives cumulative task vectors τt = θt − θ0. Per entry,
MagMax keeps the τt of largest |τt| (ties go to the LATER task) and returns θ0 + λτ, λ = 0.5
by default (Marczak et al. 2024, "MagMax: Leveraging model merging for seamless continual
learning"). A configuration of :func:`~zscl.merging.task_arithmetic.generalized_task_arithmetic`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from zscl.merging.base import MergeError, StateDict, register_rule
from zscl.merging.task_arithmetic import generalized_task_arithmetic

__all__ = ["magmax"]


@register_rule(
    "magmax",
    needs_base=True,
    uses_weights=False,
    description="per entry the cumulative task vector of largest magnitude (ties: later task), θ0 + λτ",
    paper="Marczak et al. 2024, MagMax",
)
def magmax(
    base: Mapping[str, Tensor],
    models: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float] | None = None,
    *,
    scale: float = 0.5,
) -> StateDict:
    """θ0 + λ · maxabs_t(θt − θ0); ``models`` in task order (the order decides ties)."""
    if weights is not None:
        raise MergeError("magmax selects entries by magnitude and takes no per-model weights")
    return generalized_task_arithmetic(base, models, consensus="max_magnitude", scale=scale)
