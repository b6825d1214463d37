"""Generalized task arithmetic: task arithmetic, TIES and DARE as configurations of one function.

With θ0 the base, θi the fine-tuned models and τi = θi − θ0 their task vectors:

1. sparsify each τi: none | ``magnitude`` (keep its top-``density`` fraction by |τ|, per tensor
   or across all tensors of the model; TIES, Yadav et al. 2023) | ``dare`` (drop each entry
   with probability p, rescale the kept ones by 1/(1−p); DARE, Yu et al. 2024);
2. combine: ``none`` τ = Σ wi τ̂i | ``ties`` elect γ = sign(Σ wi τ̂i) and take the disjoint
   weighted mean τ = Σ_{i: sign τ̂i = γ} wi τ̂i / Σ_{i: sign τ̂i = γ} wi (entries nobody agrees
   with stay 0) | ``max_magnitude`` per entry the τ̂i of largest |·|, ties to the later model
   (MagMax, Marczak et al. 2024);
3. θ = θ0 + λ τ (task arithmetic, Ilharco et al. 2023).

The registered rules (``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``, and
``magmax`` in :mod:`zscl.merging.magmax`) are thin wrappers around
:func:`generalized_task_arithmetic`, the same design as mergekit's.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from zscl.merging.base import MergeError, StateDict, iter_inputs, register_rule, resolve_weights, stream_merge
from zscl.merging.soups import weighted_sum

Sparsifier = Literal["none", "magnitude", "dare"]
Consensus = Literal["none", "ties", "max_magnitude"]
TrimScope = Literal["tensor", "global"]

__all__ = [
    "dare_linear",
    "dare_ties",
    "generalized_task_arithmetic",
    "global_thresholds",
    "keep_count",
    "task_arithmetic",
    "task_vector",
    "ties",
]

# Global magnitude trimming finds each model's threshold by multi-way bisection on counts:
# every pass over the inputs histograms |τ| into _BINS buckets inside the interval known to hold
# the k-th largest value, until at most _GATHER_LIMIT candidates remain; those are gathered
# and ranked exactly. Memory stays one tensor plus the candidates, never all of |τ|.
_BINS = 1024
_GATHER_LIMIT = 1 << 20
_MAX_PASSES = 8


def task_vector(base: Tensor, model: Tensor) -> Tensor:
    """τ = θ − θ0 in fp32 (the one place it is computed, so thresholds and merges agree bit for bit)."""
    return model.float() - base.float()


def keep_count(density: float, n: int) -> int:
    """How many of n entries magnitude trimming keeps: density·n rounded half up."""
    return min(n, math.floor(density * n + 0.5))


def _magnitude_trim(tau: Tensor, density: float) -> Tensor:
    """Keep the keep_count(density, n) entries of largest |τ| (exactly that many), zero the rest."""
    k = keep_count(density, tau.numel())
    if k >= tau.numel():
        return tau
    keep = torch.zeros(tau.numel(), dtype=torch.bool, device=tau.device)
    if k > 0:
        keep[tau.abs().flatten().topk(k, sorted=False).indices] = True
    return tau * keep.view_as(tau)


def _dare_drop(tau: Tensor, drop_rate: float, seed: int, model_index: int, key: str) -> Tensor:
    """Drop each entry with probability p and rescale the survivors by 1/(1−p), so E[τ̂] = τ."""
    if drop_rate == 0.0:
        return tau
    # A seed per (seed, model, tensor) makes the result independent of the order keys are read in.
    digest = hashlib.blake2b(f"{seed}/{model_index}/{key}".encode(), digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    keep = torch.rand(tau.shape, generator=gen) >= drop_rate
    return tau * keep.to(tau.device) / (1.0 - drop_rate)


def _ties_consensus(taus: list[Tensor], w: list[float]) -> Tensor:
    gamma = torch.sign(weighted_sum(taus, w))
    num, den = torch.zeros_like(taus[0]), torch.zeros_like(taus[0])
    for tau, wi in zip(taus, w):
        # Where γ = 0 only zero entries "agree": they add 0 to num, so the result there is 0.
        agree = (torch.sign(tau) == gamma).to(tau.dtype)
        num.addcmul_(tau, agree, value=wi)
        den.add_(agree, alpha=wi)
    # den = 0 only where no model with a positive weight agrees, and num is 0 there as well.
    return num.div_(den.clamp_min_(torch.finfo(den.dtype).tiny))


def _max_magnitude(taus: list[Tensor], w: list[float]) -> Tensor:
    best = taus[0].clone()
    for tau in taus[1:]:
        later_wins = tau.abs() >= best.abs()  # >=: ties go to the later model
        best = torch.where(later_wins, tau, best)
    return best


_CONSENSUS: dict[str, Callable[[list[Tensor], list[float]], Tensor]] = {
    "none": weighted_sum,
    "ties": _ties_consensus,
    "max_magnitude": _max_magnitude,
}


def generalized_task_arithmetic(
    base: Mapping[str, Tensor],
    models: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float] | None = None,
    *,
    sparsify: Sparsifier = "none",
    density: float = 1.0,
    trim_scope: TrimScope = "tensor",
    drop_rate: float = 0.0,
    seed: int = 0,
    consensus: Consensus = "none",
    scale: float = 1.0,
) -> StateDict:
    """θ0 + λ · consensus(sparsify(τ1), ..., sparsify(τn)) (module docstring)."""
    _check_options(sparsify, density, trim_scope, drop_rate, consensus, scale)
    if base is None:
        raise MergeError("task arithmetic needs a base model θ0 to form task vectors τi = θi − θ0")
    w = resolve_weights(weights, len(models), normalize=False)
    if consensus == "ties" and any(x < 0 for x in w):
        raise MergeError(f"TIES sign election needs non-negative weights, got {w}")
    thresholds = None
    if sparsify == "magnitude" and trim_scope == "global":
        thresholds = global_thresholds(base, models, density)
    combine_taus = _CONSENSUS[consensus]

    def combine(key: str, b: Tensor, thetas: list[Tensor]) -> Tensor:
        taus = []
        for i, theta in enumerate(thetas):
            tau = task_vector(b, theta)
            if sparsify == "magnitude":
                tau = _magnitude_trim(tau, density) if thresholds is None else tau * (tau.abs() >= thresholds[i])
            elif sparsify == "dare":
                tau = _dare_drop(tau, drop_rate, seed, i, key)
            taus.append(tau)
        return b.add(combine_taus(taus, w), alpha=scale)

    return stream_merge(base, models, combine)


def _check_options(sparsify: str, density: float, trim_scope: str, drop_rate: float, consensus: str, scale: float):
    choices = {"sparsify": (sparsify, ("none", "magnitude", "dare")), "trim_scope": (trim_scope, ("tensor", "global"))}
    choices["consensus"] = (consensus, tuple(_CONSENSUS))
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise MergeError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    if not 0.0 <= density <= 1.0:
        raise MergeError(f"density is the fraction of each task vector kept, in [0, 1]; got {density}")
    if not 0.0 <= drop_rate < 1.0:
        raise MergeError(f"drop_rate is DARE's drop probability, in [0, 1); got {drop_rate}")
    if not math.isfinite(scale):
        raise MergeError(f"scale (λ) must be a finite number, got {scale}")


def _magnitudes(base: Mapping[str, Tensor], models: Sequence[Mapping[str, Tensor]]) -> Iterator[tuple[int, Tensor]]:
    """(model index, |τ| flattened, fp32) for every float tensor, one key at a time."""
    for _key, b, tensors in iter_inputs(base, models):
        if b is not None and b.is_floating_point():
            for i in range(len(tensors)):
                yield i, task_vector(b, tensors[i]).abs_().flatten()
        del b, tensors  # hold one key's inputs at a time


def _next_float32(x: float) -> float:
    return float(torch.nextafter(torch.tensor(x, dtype=torch.float32), torch.tensor(math.inf)))


class _KthLargest:
    """Streaming search for the k-th largest of many non-negative float32 values.

    Invariant: the k-th largest lies in [lo, hi) and ``above`` values are ≥ hi. Each pass over
    the data either histograms [lo, hi) into _BINS buckets and narrows to the bucket holding
    the k-th largest (bisection on counts), or, once at most _GATHER_LIMIT candidates remain,
    gathers them and ranks them exactly. Bounds are float32 values, so comparisons are exact.
    """

    def __init__(self, k: int, top: float, total: int) -> None:
        self.k, self.lo, self.hi = k, 0.0, _next_float32(top)
        self.above, self.candidates, self.result = 0, total, None
        self._start_pass()

    def _start_pass(self) -> None:
        self._gather = self.candidates <= _GATHER_LIMIT
        self._picked: list[Tensor] = []
        self._edges = torch.linspace(self.lo, self.hi, _BINS + 1, dtype=torch.float64).float()
        self._counts = torch.zeros(_BINS + 2, dtype=torch.int64)

    def observe(self, mag: Tensor) -> None:
        if self._gather:
            self._picked.append(mag[(mag >= self.lo) & (mag < self.hi)])
        else:  # bucket index = number of edges ≤ value: 0 below lo, _BINS + 1 at or above hi
            self._counts += torch.bincount(torch.bucketize(mag, self._edges, right=True), minlength=_BINS + 2)

    def end_pass(self) -> None:
        if self._gather:
            self.result = float(torch.cat(self._picked).topk(self.k - self.above).values.min())
            return
        in_range = self._counts[1:-1].tolist()  # bucket j covers [edges[j], edges[j+1])
        for j in range(len(in_range) - 1, -1, -1):
            if self.above + in_range[j] >= self.k:
                self.lo, self.hi = float(self._edges[j]), float(self._edges[j + 1])
                self.candidates = in_range[j]
                break
            self.above += in_range[j]
        self._start_pass()

    def threshold(self) -> float:
        # Without a result (passes exhausted: masses of equal |τ|), keep all ≥ lo: ≥ k entries.
        return self.lo if self.result is None else self.result


def global_thresholds(
    base: Mapping[str, Tensor], models: Sequence[Mapping[str, Tensor]], density: float
) -> list[float]:
    """Per model, the k-th largest |τ| over all its float tensors, k = keep_count(density, n).

    Keeping |τ| ≥ threshold keeps exactly k entries (more only if |τ| ties at the threshold).
    Streams over the inputs a few times (bisection on counts) instead of concatenating τ.
    """
    total, top = 0, [0.0] * len(models)
    for i, mag in _magnitudes(base, models):
        total += mag.numel() if i == 0 else 0
        top[i] = max(top[i], float(mag.max())) if mag.numel() else top[i]
    k = keep_count(density, total)
    if k == 0 or k >= total:
        return [math.inf if k == 0 else 0.0] * len(models)
    searches = [_KthLargest(k, t, total) for t in top]
    for _ in range(_MAX_PASSES):
        if all(s.result is not None for s in searches):
            break
        for i, mag in _magnitudes(base, models):
            if searches[i].result is None:
                searches[i].observe(mag)
        for s in searches:
            if s.result is None:
                s.end_pass()
    return [s.threshold() for s in searches]


@register_rule(
    "task_arithmetic",
    needs_base=True,
    description="θ0 + λ Σ wi τi with task vectors τi = θi − θ0",
    paper="Ilharco et al. 2023, Editing models with task arithmetic",
)
def task_arithmetic(
    base: Mapping[str, Tensor],
    models: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float] | None = None,
    *,
    scale: float = 1.0,
) -> StateDict:
    """θ0 + λ Σ wi (θi − θ0)."""
    return generalized_task_arithmetic(base, models, weights, scale=scale)


@register_rule(
    "ties",
    needs_base=True,
    description="trim τi to the top-density fraction, elect signs, disjoint mean, θ0 + λτ",
    paper="Yadav et al. 2023, TIES-Merging",
)
def ties(
    base: Mapping[str, Tensor],
    models: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float] | None = None,
    *,
    density: float = 0.2,
    scale: float = 1.0,
    trim_scope: TrimScope = "tensor",
) -> StateDict:
    """TIES-Merging: magnitude trim (per tensor or global) + sign election + disjoint mean."""
    return generalized_task_arithmetic(
        base, models, weights, sparsify="magnitude", density=density, trim_scope=trim_scope, consensus="ties",
        scale=scale,
    )


def _dare_rule(consensus: Consensus) -> Callable[..., StateDict]:
    """DARE sparsification followed by ``consensus`` ("none": task arithmetic, "ties": TIES)."""

    def rule(
        base: Mapping[str, Tensor],
        models: Sequence[Mapping[str, Tensor]],
        weights: Sequence[float] | None = None,
        *,
        drop_rate: float = 0.9,
        seed: int = 0,
        scale: float = 1.0,
    ) -> StateDict:
        return generalized_task_arithmetic(
            base, models, weights, sparsify="dare", drop_rate=drop_rate, seed=seed, consensus=consensus, scale=scale
        )

    rule.__doc__ = f"DARE (drop rate p, rescale 1/(1−p), seeded) then consensus {consensus!r}; θ0 + λτ."
    return rule


dare_linear = register_rule(
    "dare_linear",
    needs_base=True,
    description="DARE random drop (rate p, rescale 1/(1−p)) then task arithmetic",
    paper="Yu et al. 2024, Language models are Super Mario (DARE)",
)(_dare_rule("none"))

dare_ties = register_rule(
    "dare_ties",
    needs_base=True,
    description="DARE random drop (rate p, rescale 1/(1−p)) then TIES sign election and disjoint mean",
    paper="Yu et al. 2024 (DARE); Yadav et al. 2023 (TIES)",
)(_dare_rule("ties"))
