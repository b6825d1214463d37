"""Weight-space averages: model soups (uniform, weighted, greedy), WiSE-FT, sparse model soups.

- ``average``: θ = Σ wi θi / Σ wi (Wortsman et al. 2022, "Model soups"); FedAvg is the same with
  wi ∝ the clients' sample counts (McMahan et al. 2017).
- ``greedy_soup``: models in decreasing order of their own held-out score; each joins the soup
  only if the soup's score does not drop (Wortsman et al. 2022).
- ``wise``: θ = (1−α) θ0 + α θft (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models").
- ``sparse_soup``: the average of models pruned with one shared mask; zeros stay exactly zero
  (Zimmer et al. 2024, "Sparse model soups").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from zscl.merging.base import (
    MergeError,
    StateDict,
    check_inputs,
    input_label,
    register_rule,
    resolve_weights,
    stream_merge,
)

__all__ = ["average", "greedy_soup", "sparse_soup", "weighted_sum", "wise", "wise_last"]


def weighted_sum(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Σ wi ti as a new tensor (callers pass fp32 tensors)."""
    out = torch.zeros_like(tensors[0])
    for t, w in zip(tensors, weights):
        out.add_(t, alpha=w)
    return out


@register_rule(
    "average",
    needs_base=False,
    description="weighted or uniform soup Σ wiθi / Σ wi (FedAvg: wi ∝ sample counts)",
    paper="Wortsman et al. 2022, Model soups; McMahan et al. 2017, FedAvg",
)
def average(
    base: Mapping[str, Tensor] | None, models: Sequence[Mapping[str, Tensor]], weights: Sequence[float] | None = None
) -> StateDict:
    """Σ wi θi / Σ wi (uniform without ``weights``); ``base`` is ignored."""
    w = resolve_weights(weights, len(models), normalize=True)
    return stream_merge(None, models, lambda key, b, ts: weighted_sum(ts, w))


@register_rule(
    "greedy_soup",
    needs_base=False,
    description="add models best-first, keep each only if the soup's score does not drop",
    paper="Wortsman et al. 2022, Model soups",
)
def greedy_soup(
    base: Mapping[str, Tensor] | None,
    models: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float] | None = None,
    *,
    score: Callable[[StateDict], float],
) -> StateDict:
    """Greedy soup under ``score`` (higher is better); ``weights`` weight the kept members."""
    w = resolve_weights(weights, len(models), normalize=False)
    check_inputs(None, models)  # errors name the caller's model indices, not a sub-soup's

    def soup(members: list[int]) -> StateDict:
        return average(None, [models[i] for i in members], [w[i] for i in members])

    own = [float(score(soup([i]))) for i in range(len(models))]
    if not all(math.isfinite(s) for s in own):
        raise MergeError(f"greedy_soup: score returned a non-finite value for a model: {own}")
    order = sorted(range(len(models)), key=lambda i: -own[i])  # stable: equal scores keep input order
    members, best = [order[0]], own[order[0]]
    current = soup(members)
    for i in order[1:]:
        candidate = soup(members + [i])
        value = float(score(candidate))
        if value >= best:  # "does not drop": an equal score still joins
            members, best, current = members + [i], value, candidate
    return current


@register_rule(
    "wise",
    needs_base=True,
    uses_weights=False,
    exact_models=1,
    description="WiSE-FT interpolation (1−α)θ0 + αθft; base = θ0, one model = θft",
    paper="Wortsman et al. 2022, Robust fine-tuning of zero-shot models (WiSE-FT)",
)
def wise(
    base: Mapping[str, Tensor] | None,
    models: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float] | None = None,
    *,
    alpha: float = 0.5,
) -> StateDict:
    """(1−α) θ0 + α θft; α = 0 returns the base and α = 1 the fine-tuned model, exactly."""
    if base is None or len(models) != 1:
        got = f"{len(models)} models" + ("" if base is not None else " and no base")
        raise MergeError(f"wise interpolates a base θ0 and ONE fine-tuned model; got {got}")
    if weights is not None:
        raise MergeError("wise interpolates two models and takes no per-model weights; use alpha")
    if not math.isfinite(alpha):
        raise MergeError(f"wise: alpha must be a finite number, got {alpha}")
    # torch.lerp is exact at both endpoints (it computes end − (end−start)(1−α) for α ≥ 0.5).
    return stream_merge(base, models, lambda key, b, ts: torch.lerp(b, ts[0], alpha))


@register_rule(
    "wise_last",
    needs_base=True,
    uses_weights=False,
    description="evaluation-time WiSE-FT of the latest model: (1−α)θ0 + αθ_last; base = θ0, models = θ1..θt",
    paper="the ZSCL reference's eval-time --wise-ft --alpha (Wortsman et al. 2022)",
)
def wise_last(
    base: Mapping[str, Tensor] | None,
    models: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float] | None = None,
    *,
    alpha: float = 0.5,
) -> StateDict:
    """(1−α) θ0 + α θ_t with θ_t the last of ``models``: after each task the model evaluated is the WiSE blend
    of the latest trained model with the initial one, while training continues from the trained model
    (the reference evaluates ``merge(zero-shot, checkpoint, alpha)`` and never trains from it)."""
    if not models:
        raise MergeError("wise_last interpolates a base θ0 and the last of the models; got no models")
    return wise(base, list(models)[-1:], weights, alpha=alpha)  # only the last model is read


@register_rule(
    "sparse_soup",
    needs_base=False,
    description="average of models sharing one pruning mask; masked entries stay exactly zero",
    paper="Zimmer et al. 2024, Sparse model soups",
)
def sparse_soup(
    base: Mapping[str, Tensor] | None, models: Sequence[Mapping[str, Tensor]], weights: Sequence[float] | None = None
) -> StateDict:
    """Σ wi θi / Σ wi where every model has the same zero pattern (checked per tensor)."""
    w = resolve_weights(weights, len(models), normalize=True)

    def combine(key: str, b: Tensor | None, ts: list[Tensor]) -> Tensor:
        mask = ts[0] != 0
        for i in range(1, len(ts)):
            differ = int(((ts[i] != 0) ^ mask).sum())
            if differ:
                raise MergeError(
                    f"sparse_soup: tensor {key!r} of {input_label(models, i)} has another sparsity mask than "
                    f"{input_label(models, 0)} ({differ} entries differ); sparse soups need one shared mask"
                )
        return torch.where(mask, weighted_sum(ts, w), 0.0)

    return stream_merge(None, models, combine)
