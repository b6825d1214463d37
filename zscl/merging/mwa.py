"""Metrics-weighted averaging (MWA, 2025): a soup whose weights come from training metrics.

The paper's exact equation could not be recovered; this is OUR formulation, with one penalty
factor p ≥ 0:

- from losses m_i > 0 (lower is better):  w_i ∝ m_i^(−p);
- from steps s_i ≥ 0 (later is better):   w_i ∝ s_i^p;

normalised to Σ w_i = 1, then θ = Σ w_i θ_i. p = 0 gives the uniform soup; larger p concentrates
the weight on the best (or latest) checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

from torch import Tensor

from zscl.merging.base import MergeError, StateDict, register_rule, resolve_weights
from zscl.merging.soups import average

MetricKind = Literal["loss", "step"]

__all__ = ["MetricKind", "mwa", "mwa_weights"]


def mwa_weights(metrics: Sequence[float], kind: MetricKind = "loss", penalty: float = 1.0) -> list[float]:
    """w_i ∝ m_i^(−p) for ``kind="loss"``, w_i ∝ s_i^p for ``kind="step"``; they sum to 1."""
    values = [float(m) for m in metrics]
    if not values or not all(math.isfinite(v) for v in values):
        raise MergeError(f"MWA needs one finite metric per model, got {list(metrics)}")
    if not (math.isfinite(penalty) and penalty >= 0):
        raise MergeError(f"MWA's penalty factor p must be a finite number ≥ 0, got {penalty}")
    if kind == "loss":
        if min(values) <= 0:
            raise MergeError(f"MWA loss weighting needs positive losses, got {values}")
        logs = [-penalty * math.log(v) for v in values]
    elif kind == "step":
        if min(values) < 0:
            raise MergeError(f"MWA step weighting needs steps ≥ 0, got {values}")
        # 0^p is 0 for p > 0 and 1 for p = 0 (uniform).
        logs = [penalty * math.log(v) if v > 0 else (0.0 if penalty == 0 else -math.inf) for v in values]
    else:
        raise MergeError(f"MWA metric kind must be 'loss' or 'step', got {kind!r}")
    top = max(logs)
    if top == -math.inf:
        raise MergeError(f"MWA step weighting with penalty {penalty} > 0 needs a step > 0, got {values}")
    raw = [math.exp(x - top) for x in logs]  # shift by the max: no overflow for large p
    total = sum(raw)
    return [x / total for x in raw]


@register_rule(
    "mwa",
    needs_base=False,
    per_model=("metrics",),
    description="soup weighted by training metrics: wi ∝ loss^(−p) or step^p (our formulation)",
    paper="Metrics-weighted averaging, 2025 (equation ours: see README)",
)
def mwa(
    base: Mapping[str, Tensor] | None,
    models: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float] | None = None,
    *,
    metrics: Sequence[float],
    metric_kind: MetricKind = "loss",
    penalty: float = 1.0,
) -> StateDict:
    """Σ w_i θ_i with :func:`mwa_weights`; extra ``weights`` multiply them (then renormalised)."""
    if len(metrics) != len(models):
        raise MergeError(f"got {len(metrics)} metrics for {len(models)} models; give one per model")
    w = mwa_weights(metrics, metric_kind, penalty)
    prior = resolve_weights(weights, len(models), normalize=True)
    return average(None, models, [a * b for a, b in zip(w, prior)])
