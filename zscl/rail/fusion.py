"""RAIL's training-free fusion of the ridge head with zero-shot CLIP (Xu et al., NeurIPS 2024, §fusion).

Per image, with ``p = softmax(100·cos(x̂, T))`` over the offered label space and ``r`` the raw ridge
scores over the ``L`` learned classes (zero-padded to the offered label space):

    out = (1 − β)·p + β·r    if argmax p < L   (CLIP's top class is in an already-learned domain)
    out = p                  otherwise         (CLIP alone)

with β = 0.8 (so 0.2·CLIP + 0.8·ridge). CLIP's own top class is the in-/out-of-domain selector, so no
domain id is used; an image that CLIP sends to an unseen domain keeps CLIP's answer exactly, which is
why RAIL's Transfer equals zero-shot CLIP's (confirmed by the reference's maintainer). The CLIP side is
a probability, the ridge side is not softmaxed, as in the reference code.

MTIL gives the domain, and the offered label space is the evaluated dataset's classes only:
:func:`fuse_known_domain` restricts the ridge head to that dataset's columns of the union and fuses
when the dataset has been learned. The reference has no MTIL script; this restriction is our choice.
"""

from __future__ import annotations

import torch

__all__ = ["fuse", "fuse_columns", "fuse_known_domain", "restrict_to_domain"]


def fuse_columns(clip_logits: torch.Tensor, ridge_scores: torch.Tensor, columns: torch.Tensor,
                 beta: float = 0.8) -> torch.Tensor:
    """Fused scores [N, C] over an offered label space whose classes map to head columns (equation in the
    module docstring).

    ``columns`` [C]: the ridge head's column of each offered class, or -1 for a class not learned
    (its ridge score is 0); CLIP's top class is "in a learned domain" when its column is >= 0.
    With β = 0 the output is ``softmax(clip_logits)`` exactly.
    """
    probs = clip_logits.float().softmax(dim=1)
    columns = columns.to(probs.device).long()
    learned = columns >= 0
    if not bool(learned.any()):
        return probs
    if int(columns.max()) >= ridge_scores.shape[1]:
        raise ValueError(f"column {int(columns.max())} is outside the head's {ridge_scores.shape[1]}")
    ridge = ridge_scores.to(probs)[:, columns.clamp_min(0)] * learned.to(probs)  # unseen classes: ridge says 0
    in_learned = learned[probs.argmax(dim=1)].unsqueeze(1)
    return torch.where(in_learned, (1.0 - beta) * probs + beta * ridge, probs)


def fuse(clip_logits: torch.Tensor, ridge_scores: torch.Tensor, num_learned: int, beta: float = 0.8) -> torch.Tensor:
    """:func:`fuse_columns` when the first ``num_learned`` offered classes are the head's columns in order
    (domains arrive in union order); ``ridge_scores`` [N, num_learned]."""
    if ridge_scores.shape[1] != num_learned:
        raise ValueError(f"the ridge head has {ridge_scores.shape[1]} columns but {num_learned} classes are learned")
    if not 0 <= num_learned <= clip_logits.shape[1]:
        raise ValueError(f"{num_learned} learned classes in a label space of {clip_logits.shape[1]}")
    columns = torch.arange(clip_logits.shape[1])
    return fuse_columns(clip_logits, ridge_scores, torch.where(columns < num_learned, columns, -1), beta)


def restrict_to_domain(ridge_scores: torch.Tensor, offset: int, size: int) -> torch.Tensor:
    """The ridge head restricted to one domain's union columns ``offset .. offset + size``.

    The head stays the joint solution over all learned classes; we read only the evaluated
    domain's columns (no per-domain head, no renormalisation), so MTIL and X-TAIL share one head.
    """
    if offset < 0 or offset + size > ridge_scores.shape[1]:
        raise ValueError(f"columns {offset}..{offset + size} are outside the head's {ridge_scores.shape[1]}")
    return ridge_scores[:, offset:offset + size]


def fuse_known_domain(clip_logits: torch.Tensor, ridge_scores: torch.Tensor | None, offset: int,
                      learned: bool, beta: float = 0.8) -> torch.Tensor:
    """MTIL: fused scores over the evaluated dataset's classes only (the domain is given).

    ``clip_logits`` [N, C_d] over the dataset's classes; ``ridge_scores`` over the union's learned
    classes (None before the first task). Every class offered belongs to one domain, so CLIP's top
    class is in a learned domain exactly when the dataset is learned: then every image fuses with the
    dataset's slice of the head; otherwise the output is CLIP alone.
    """
    size = clip_logits.shape[1]
    if not learned or ridge_scores is None:
        return fuse(clip_logits, clip_logits.new_zeros(len(clip_logits), 0), 0, beta)
    return fuse(clip_logits, restrict_to_domain(ridge_scores, offset, size), size, beta)
