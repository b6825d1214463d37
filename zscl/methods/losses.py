"""Losses of continual CLIP fine-tuning and ZSCL (Zheng et al., ICCV 2023).

Notation: ``f`` L2-normalised image features, ``g`` L2-normalised text features, ``s`` the
logit scale (``exp(logit_scale)``, 100 for CLIP; it never trains).

* Task loss: ``CE(s * f_task @ g_class^T, y, label_smoothing)``.
* Distillation, with ``KD(t, s) = CE(s / T, softmax(t / T)) * T^2`` averaged over rows:
  ``t = s * f_teacher(ref) @ g_teacher(texts)^T``, ``u = s * f_student(ref) @ g(texts)^T``;
  image loss ``KD(t, u)`` (a distribution over reference texts per reference image) and
  text loss ``KD(t^T, u^T)`` (a distribution over the batch's reference images per text).
* Weight constraint (WC): ``lambda * sum_p ||p - p_taskstart||^2``, sum reduction.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def kd_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """Hinton distillation ``CE(s/T, softmax(t/T)) * T^2``, mean over rows (the reference's ``distillation``)."""
    target = F.softmax(teacher_logits.float() / temperature, dim=1)
    return F.cross_entropy(student_logits.float() / temperature, target) * temperature**2


def distillation_logits(
    student_feats: torch.Tensor, teacher_feats: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher logits of reference images against reference text embeddings (fp32)."""
    text_emb = text_emb.float()
    return scale * student_feats.float() @ text_emb.t(), scale * teacher_feats.float() @ text_emb.t()


def feature_mse(student_feats: torch.Tensor, teacher_feats: torch.Tensor) -> torch.Tensor:
    """``mean_{i,d} (f_student(ref)_id - f_teacher(ref)_id)^2`` on L2-normalised reference-image features.

    The paper's feature-space ablation (the reference's ``--feature_mse``: ``nn.MSELoss()`` on the
    normalised features, mean over every element) instead of KL on logits.
    """
    return F.mse_loss(student_feats.float(), teacher_feats.float())


def image_image_kd(student_feats: torch.Tensor, teacher_feats: torch.Tensor, scale: torch.Tensor,
                   temperature: float = 2.0) -> torch.Tensor:
    """Image-to-image distillation (the reference's ``--ablation_loss_2``): ``KD(t, u)`` with
    ``u = s * f_student f_student^T`` and ``t = s * f_teacher f_teacher^T`` over the reference images,
    each image's own entry set to -1e4 so that it compares an image only with the others."""
    def masked(f: torch.Tensor) -> torch.Tensor:
        logits = scale * f.float() @ f.float().t()
        return logits - torch.diag(logits.diagonal() + 1e4)

    return kd_loss(masked(teacher_feats), masked(student_feats), temperature)


@torch.no_grad()
def weight_constraint(params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The value ``sum_p ||p - a||^2`` (for logging; the gradient is folded in separately).

    One tensor at a time, so the temporary is one parameter's size, not a copy of the model.
    """
    if not params:
        return torch.zeros(())
    return torch.stack([torch.linalg.vector_norm(p.detach() - a).float() for p, a in zip(params, anchors)]).pow(2).sum()


@torch.no_grad()
def add_weight_constraint_grad_(params: Sequence[torch.nn.Parameter], anchors: Sequence[torch.Tensor], coef: float) -> None:
    """``grad += 2 * coef * (p - a)``: the gradient of ``coef * ||p - a||^2`` folded in after backward.

    Adding the term to the loss would make autograd build and keep a full copy of every
    parameter difference; the gradient is known in closed form, so two in-place foreach passes
    over (grad, p, a) do the same work with no extra memory.
    """
    pairs = [(p, a) for p, a in zip(params, anchors) if p.grad is not None]
    if not pairs:
        return
    grads = [p.grad for p, _ in pairs]
    torch._foreach_add_(grads, [p.detach() for p, _ in pairs], alpha=2.0 * coef)
    torch._foreach_add_(grads, [a for _, a in pairs], alpha=-2.0 * coef)


def cosine_warmup_factor(step: int, base_steps: int, warmup: int) -> float:
    """The reference's schedule as a factor of the base lr, for 0-based iteration ``step``.

    ``(step + 1) / warmup`` during warm-up, then ``0.5 * (1 + cos(pi * (step - warmup) / (N - warmup)))``.
    """
    import math

    if step < warmup:
        return (step + 1) / warmup
    span = max(base_steps - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))
