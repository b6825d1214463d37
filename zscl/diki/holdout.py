"""DIKI's model selection: a seeded, per-class hold-out of the training split, scored every epoch.

DIKI keeps, per task, the epoch whose weights score best on a validation split (reloaded before
evaluation); for datasets without one it holds out 20 % of the training split, per class
(CoOp's ``split_trainval``: ``round(0.2 n_c)`` images of each class ``c``). zscl's datasets have
no validation split, so every task is treated that way:

* :func:`holdout_positions`: the held-out positions of a training split, a pure function of its
  labels, the fraction and the seed (the same on every machine and rank, resumable);
* :class:`BestEpoch`: the best score so far, the step it was reached at and a copy of the task's
  parameters then; plain tensors and integers that a checkpoint stores, so a run killed in the
  middle of an epoch resumes with the same best epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from zscl.datasets.views import ranked_by_class


def holdout_positions(labels: Sequence[int], fraction: float, seed: int) -> list[int]:
    """Positions held out: per class ``c`` with ``n_c`` images, ``round(fraction * n_c)`` of them (at
    least one when ``n_c >= 2`` and ``fraction > 0``, never all), ranked by ``blake2b(seed, c, position)``.
    Ascending."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the hold-out fraction must be in [0, 1), got {fraction}")
    held: list[int] = []
    for items in ranked_by_class(labels, f"holdout,{seed},").values():
        n = min(max(round(fraction * len(items)), int(fraction > 0)), len(items) - 1)
        held += items[:n]
    return sorted(held)


@dataclass
class BestEpoch:
    """The best hold-out score of the current task so far (``correct`` of ``total`` images at ``step``)."""

    correct: int = -1
    total: int = 0
    step: int = -1
    scored: int = -1  # the last step whose weights were scored
    params: list[torch.Tensor] = field(default_factory=list)  # the task's parameters at ``step``

    def offer(self, step: int, correct: int, total: int, params: Sequence[torch.Tensor]) -> bool:
        """Record the score of the weights after ``step`` steps; keep them if strictly better (ties: the earlier)."""
        self.scored = step
        if correct <= self.correct:
            return False
        self.correct, self.total, self.step = correct, total, step
        self.params = [p.detach().clone() for p in params]
        return True

    def state(self) -> dict[str, Any]:
        return {"correct": self.correct, "total": self.total, "step": self.step, "scored": self.scored,
                "params": [p.cpu() for p in self.params]}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> "BestEpoch":
        return cls(state["correct"], state["total"], state["step"], state["scored"],
                   [p.to(device) for p in state["params"]])


def due(step: int, every: int, last: int) -> bool:
    """Whether the weights after ``step`` steps are scored: every ``every`` steps and at the last step ``last``."""
    return step > 0 and (step % every == 0 or step == last)


__all__ = ["BestEpoch", "due", "holdout_positions"]
