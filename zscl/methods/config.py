"""Typed configuration blocks of the continual-learning LightningModule (LightningCLI schema)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union


@dataclass
class Distillation:
    """Feature-space distillation on reference data against a frozen teacher CLIP.

    ``image``/``text`` weight the image-side and text-side KD terms (0 switches a term off);
    ``temperature`` is T of ``KD(t, s) = CE(s/T, softmax(t/T)) * T^2``.

    ``teacher`` picks the frozen model:

    * ``"initial"`` (ZSCL, iCaRL): the initial pretrained CLIP, on every task (the reference's
      iCaRL never sets a previous-task model, so its teacher is the zero-shot CLIP);
    * ``"task_start"`` (LwF, LwF-VR): the weights this task starts from, i.e. the previous
      task's final model (the initial CLIP on the first task) — the reference code's
      ``--ref-model <previous task>.pth``;
    * ``"ref_wise"`` (the paper's ablation, the reference's ``--ref-wise``): the WiSE blend
      ``(1 - ref_wise_alpha) * theta_initial + ref_wise_alpha * theta_task_start`` (alpha 0.8).

    Ablation terms (the reference's flags; 0 = off): ``feature_mse`` weights the MSE between the
    student's and the teacher's normalised reference-image features (``--feature_mse``), and
    ``image_image`` the image-to-image KD over the reference batch (``--ablation_loss_2``)
    (:mod:`zscl.methods.losses`).

    ``text_mode`` picks the text-side term:

    * ``"coded"`` (default; the reference code, which produced the published numbers): the
      image-side logit matrix transposed, ``KD(t^T, u^T)`` with ``u = s * f_student(ref) @
      g_teacher(texts)^T``. Both terms use the *teacher's* cached text embeddings, so only the
      student's image encoder receives gradients from distillation.
    * ``"paper"`` (the paper's description): the student side uses the *student's* own text
      embeddings of the reference texts, ``u' = s * f_student(ref) @ g_student(texts)^T``, so
      gradients also flow through the student text encoder. Encoding all reference texts
      every step is costly; ``text_batch`` samples that many texts per step (None = all).
    """

    image: float = 0.0
    text: float = 0.0
    teacher: Literal["initial", "task_start", "ref_wise"] = "initial"
    ref_wise_alpha: float = 0.8
    feature_mse: float = 0.0
    image_image: float = 0.0
    text_mode: Literal["coded", "paper"] = "coded"
    temperature: float = 2.0
    text_batch: Optional[int] = None

    @property
    def active(self) -> bool:
        return self.image > 0 or self.text > 0 or self.feature_mse > 0 or self.image_image > 0


@dataclass
class Speed:
    """Fast-path switches. ``"auto"`` means on for CUDA, off on CPU (where they do not pay).

    * ``compile``: ``torch.compile`` the student image encoder in place (keys unchanged).
    * ``fused_adamw``: the fused AdamW kernel ("auto": on for CUDA and CPU, which both have one).
    * ``teacher_dtype``: the frozen teacher's weights in bf16 under inference mode.
    * ``concat_forward``: one student image forward over task + reference images (skipped
      automatically for towers with BatchNorm, where it would change the statistics).
    * ``fold_weight_constraint``: add WC's closed-form gradient after backward instead of
      building it in the autograd graph (off automatically under fp16 loss scaling).
    """

    compile: Union[bool, Literal["auto"]] = "auto"
    fused_adamw: Union[bool, Literal["auto"]] = "auto"
    teacher_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    concat_forward: bool = True
    fold_weight_constraint: bool = True


def resolve_auto(value: Union[bool, str], on_cuda: bool) -> bool:
    return on_cuda if value == "auto" else bool(value)
