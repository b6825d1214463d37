"""Fisher merging and diagonal Fisher estimation (Matena & Raffel 2022, "Merging models with
Fisher-weighted averaging").

Merge: θ = Σ wi Fi ⊙ θi / Σ wi Fi per entry, with Fi the diagonal Fisher of model i floored at
1e-6 (so entries with no curvature information fall back to the weighted mean, never 0/0).
Tensors that have no Fisher at all (buffers, frozen parameters) get the plain weighted
average Σ wi θi / Σ wi.

Estimate: Fi = E_x E_y [ (∂ log p(y|x) / ∂θ)² ], the mean over examples of the squared
PER-EXAMPLE gradient (not of batch gradients). ``mode="sampled"`` draws y from the model's own
softmax (the true Fisher); ``mode="empirical"`` uses the gold label (the empirical Fisher).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zscl.merging.base import MergeError, StateDict, register_rule, resolve_weights, stream_merge
from zscl.merging.soups import weighted_sum

FISHER_FLOOR = 1e-6
FisherMode = Literal["sampled", "empirical"]
LogitsFn = Callable[[nn.Module, Tensor], Tensor]

__all__ = ["FISHER_FLOOR", "estimate_fisher", "fisher", "zero_shot_logits_fn"]


@register_rule(
    "fisher",
    needs_base=False,
    per_model=("fishers",),
    description="Σ wi Fi θi / Σ wi Fi with diagonal Fishers Fi (floored at 1e-6)",
    paper="Matena & Raffel 2022, Merging models with Fisher-weighted averaging",
)
def fisher(
    base: Mapping[str, Tensor] | None,
    models: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float] | None = None,
    *,
    fishers: Sequence[Mapping[str, Tensor]],
) -> StateDict:
    """Fisher-weighted average; ``fishers[i]`` is model i's diagonal Fisher (same keys/shapes)."""
    if len(fishers) != len(models):
        raise MergeError(f"got {len(fishers)} Fishers for {len(models)} models; give one per model")
    w = resolve_weights(weights, len(models), normalize=True)
    known = set(models[0].keys())
    for j, f in enumerate(fishers):
        extra = sorted(set(f.keys()) - known)
        if extra:
            raise MergeError(f"fishers[{j}] has tensors the models lack: {', '.join(map(repr, extra[:4]))}")

    def combine(key: str, b: Tensor | None, thetas: list[Tensor]) -> Tensor:
        present = [key in f for f in fishers]
        if not any(present):
            return weighted_sum(thetas, w)  # no Fisher for this tensor: plain weighted average
        if not all(present):
            raise MergeError(
                f"tensor {key!r} has a Fisher in fishers[{present.index(True)}] "
                f"but not in fishers[{present.index(False)}]"
            )
        num, den = torch.zeros_like(thetas[0]), torch.zeros_like(thetas[0])
        for j, (theta, wi) in enumerate(zip(thetas, w)):
            fi = fishers[j][key]
            if fi.shape != theta.shape:
                raise MergeError(
                    f"Fisher {key!r} in fishers[{j}] has shape {list(fi.shape)}, the model {list(theta.shape)}"
                )
            fi = fi.to(theta.device, torch.float32).clamp_min(FISHER_FLOOR)
            num.addcmul_(fi, theta, value=wi)
            den.add_(fi, alpha=wi)
        return num.div_(den)

    return stream_merge(None, models, combine)


def zero_shot_logits_fn(text_tokens: Tensor) -> LogitsFn:
    """``logits(model, images) = exp(logit_scale) · norm(encode_image(x)) @ norm(encode_text(t)).T``.

    ``text_tokens`` are the tokenized class prompts; gradients flow through both towers.
    """

    def logits(model: nn.Module, images: Tensor) -> Tensor:
        img = F.normalize(model.encode_image(images), dim=-1)
        txt = F.normalize(model.encode_text(text_tokens.to(images.device)), dim=-1)
        return model.logit_scale.exp() * img @ txt.T

    return logits


def _examples(batches: Iterable, n: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Single (input, label) pairs from a loader of (inputs, labels) batches, at most ``n``."""
    seen = 0
    for batch in batches:
        inputs, labels = batch[0], batch[1]
        for j in range(len(inputs)):
            if seen == n:
                return
            yield inputs[j], torch.as_tensor(labels[j])
            seen += 1


def estimate_fisher(
    model: nn.Module,
    dataloader: Iterable,
    n_examples: int,
    mode: FisherMode = "sampled",
    logits_fn: LogitsFn | None = None,
    *,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Diagonal Fisher: mean over ``n_examples`` of (∂ log p(y|x) / ∂θ)², fp32 on the CPU.

    ``dataloader`` yields ``(inputs, labels)`` batches; ``logits_fn(model, inputs)`` (default
    ``model(inputs)``) gives class logits. Only float parameters with ``requires_grad`` get a
    Fisher; the others are absent (Fisher merging then averages them plainly). The model is
    put in eval mode (no dropout) while estimating; ``seed`` drives the sampled labels.
    """
    if mode not in ("sampled", "empirical"):
        raise ValueError(f"mode must be 'sampled' (true Fisher) or 'empirical' (gold labels), got {mode!r}")
    if n_examples < 1:
        raise ValueError(f"n_examples must be ≥ 1, got {n_examples}")
    logits_fn = logits_fn or (lambda m, x: m(x))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()}
    if not params:
        raise ValueError("the model has no trainable float parameters: nothing to estimate a Fisher for")
    device = next(iter(params.values())).device
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    gen = torch.Generator().manual_seed(seed)
    count, was_training = 0, model.training
    model.eval()
    try:
        for x, y in _examples(dataloader, n_examples):
            log_probs = F.log_softmax(logits_fn(model, x.unsqueeze(0).to(device)).float(), dim=-1)[0]
            if mode == "sampled":  # y ~ p(y|x): the true Fisher
                y = torch.multinomial(log_probs.detach().exp().cpu(), 1, generator=gen)[0]
            grads = torch.autograd.grad(log_probs[int(y)], list(params.values()), allow_unused=True)
            for total, g in zip(sums.values(), grads):
                if g is not None:
                    g = g.float()
                    total.addcmul_(g, g)
            count += 1
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("the dataloader yielded no examples")
    if count < n_examples:
        warnings.warn(f"estimate_fisher: the dataloader ran out after {count} of {n_examples} examples", stacklevel=2)
    return {n: (total / count).cpu() for n, total in sums.items()}
