"""Continual CLIP fine-tuning as one LightningModule: plain fine-tuning, ZSCL and its ablations.

One training iteration (Zheng et al., ICCV 2023; the reference code's ``finetune.py``):

``L = CE(s f_task g_class^T, y; label smoothing) + a KD_img + b KD_txt + lambda sum_p ||p - p_0||^2``

* ``g_class``: the first (training) template filled with each class name, encoded by the
  *current* text tower ("whole" mode trains both towers; ``logit_scale`` never trains);
* ``KD_img``/``KD_txt``: :class:`~zscl.methods.config.Distillation` against a frozen teacher
  on reference images/texts: the *initial* CLIP for ZSCL, the task-start model for LwF/iCaRL;
* ``p_0``: the weights as loaded at the start of the current task (weight constraint, WC);
* the weight ensemble (WE), EMA and other averaging run as callbacks over the student's
  parameters (``averaging`` specs, see :mod:`zscl.merging.callbacks`).

Which ingredients are on is configuration: ``configs/method/*.yaml`` name the paper's methods
and ablations. The student is ``self.clip``; the teacher is kept outside the module's
submodules so that it is neither checkpointed, nor averaged, nor wrapped by DDP.

Deviations from the reference, all without changing the maths: the teacher's text embeddings
of the reference texts are computed once per task (the reference re-encodes them every step);
task and reference images share one student forward (ViT towers only); the WC gradient is
added in closed form after backward; "text" mode trains the text tower against frozen image
features (the reference's "text" mode leaves nothing trainable under the CE loss).
"""

from __future__ import annotations

import copy
from dataclasses import asdict
from typing import Any, Literal, Optional

import lightning as L
import torch
import torch.nn.functional as F

from zscl.datasets.streams import mix_seed
from zscl.evaluation.zeroshot import encode_texts
from zscl.methods.base import CLIPMethod
from zscl.methods.config import Distillation, Speed, resolve_auto
from zscl.methods.losses import add_weight_constraint_grad_, distillation_logits, kd_loss, weight_constraint


class ContinualCLIP(CLIPMethod):
    """Fine-tunes an open_clip CLIP on one task of a continual sequence (finetune / ZSCL / ablations).

    Args:
        train_mode: which tower trains: ``whole`` (paper), ``image`` or ``text``.
        distill: ZSCL distillation (off by default: plain fine-tuning).
        weight_constraint: lambda of WC (reference ``--l2 1``); 0 = off.
        averaging: averaging callbacks by name, e.g. ``[{"name": "we", "every": 100}]`` (ZSCL's WE).
        **kwargs: :class:`~zscl.methods.base.CLIPMethod`'s arguments. The reference's values: AdamW lr 1e-5
            (5e-5 for Aircraft/MNIST), wd 0, betas (0.9, 0.999); 100 warm-up steps; label smoothing 0.2.
            ``pretrained`` is ZSCL's teacher (the *initial* weights).
    """

    def __init__(
        self,
        train_mode: Literal["whole", "image", "text"] = "whole",
        distill: Optional[Distillation] = None,
        weight_constraint: float = 0.0,
        averaging: Optional[list[dict[str, Any]]] = None,
        **kwargs: Any,
    ) -> None:
        from zscl.models import select_trainable

        self.distill = distill or Distillation()
        self.averaging = list(averaging or [])
        self._check_averaging_specs()
        super().__init__(**kwargs)
        # Plain dicts in hparams keep Lightning checkpoints loadable with torch.load(weights_only=True).
        self.hparams["distill"], self.hparams["speed"] = asdict(self.distill), asdict(self.speed)
        if self.distill.active and self.distill.teacher == "task_start":
            self._set_teacher()  # after init_from is loaded: the previous task's final model
        elif not self.distill.active:
            object.__setattr__(self, "teacher", None)
        self.trainable = select_trainable(self.clip, train_mode)
        # Task-start weights: WC's anchor and the averaging callbacks' first member.
        self.anchors = [p.detach().clone() for _, p in self.trainable]
        self.ref_text_emb: Optional[torch.Tensor] = None
        self.ref_text_tokens: Optional[torch.Tensor] = None
        self.class_tokens: Optional[torch.Tensor] = None
        self.class_emb_frozen: Optional[torch.Tensor] = None

    def on_initial_clip(self) -> None:
        # A random initialisation cannot be rebuilt from a name: keep it (the "initial" reference weights).
        self._initial_cpu = (None if self.hparams.pretrained is not None
                             else {k: v.detach().clone() for k, v in self.clip.named_parameters()})
        if self.distill.active and self.distill.teacher == "initial":
            self._set_teacher()  # before init_from is loaded: the initial CLIP

    @classmethod
    def requires_reference(cls, model_cfg: dict[str, Any]) -> bool:
        distill = (model_cfg or {}).get("distill")
        return distill is not None and Distillation(**dict(distill)).active

    @classmethod
    def evaluation_overrides(cls) -> dict[str, Any]:
        return {"distill": None, "averaging": None}  # no teacher and no averaging needed to evaluate

    # ----------------------------------------------------------------- configuration
    def _set_teacher(self) -> None:
        """A frozen copy of the student as it is now, kept outside the submodule tree
        (object.__setattr__ skips registration: no checkpointing, averaging or DDP wrapping)."""
        object.__setattr__(self, "teacher", copy.deepcopy(self.clip).eval().requires_grad_(False))

    def _check_averaging_specs(self) -> None:
        from zscl.merging.callbacks import AVERAGING_CALLBACKS

        for spec in self.averaging:
            if "name" not in spec:
                raise ValueError(f"an averaging spec needs a 'name' (one of {AVERAGING_CALLBACKS.names()}), got {spec}")
            AVERAGING_CALLBACKS.get(spec["name"])  # unknown names fail here, before any training

    def method_callbacks(self) -> list[L.Callback]:
        from zscl.merging.callbacks import AVERAGING_CALLBACKS

        return [AVERAGING_CALLBACKS.get(spec["name"])(**{k: v for k, v in spec.items() if k != "name"})
                for spec in self.averaging]

    @property
    def needs_reference(self) -> bool:
        return self.distill.active

    def analytic_step_profile(self) -> Optional[dict[str, Any]]:
        return {"distill": self.distill, "train_mode": self.hparams.train_mode}

    # ----------------------------------------------------------------- set-up per task
    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.anchors = [a.to(self.device) for a in self.anchors]
        dm = self.trainer.datamodule
        if self.hparams.train_mode == "image":
            with torch.no_grad():  # the text tower is frozen: its class embeddings are constant
                self.class_emb_frozen = encode_texts(self.clip, self.class_tokens)
        if self.distill.active:
            self._prepare_teacher(dm)
        if resolve_auto(self.speed.compile, self.on_cuda):
            # In place (state-dict keys unchanged). The class-text tower trains too in "whole" mode.
            self.clip.visual.compile()
            self.clip.transformer.compile()
            if self.teacher is not None:
                self.teacher.visual.compile()

    def _prepare_teacher(self, dm) -> None:
        dtype = {"auto": torch.bfloat16 if self.on_cuda else torch.float32, "fp32": torch.float32,
                 "bf16": torch.bfloat16, "fp16": torch.float16}[self.speed.teacher_dtype]
        self.teacher.to(self.device, dtype=dtype)
        tokens = dm.reference_tokens(self.bundle.tokenizer).to(self.device)
        with torch.inference_mode():
            emb = encode_texts(self.teacher, tokens)
        self.ref_text_emb = emb.clone()  # a normal tensor: inference tensors cannot be saved for backward
        self.ref_text_tokens = tokens if self.distill.text_mode == "paper" else None

    # ----------------------------------------------------------------- training
    def _image_features(self, images: torch.Tensor, ref: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        grad = torch.enable_grad() if self.hparams.train_mode != "text" else torch.no_grad()
        with grad:
            if ref is not None and self.speed.concat_forward and not _has_batchnorm(self.clip.visual):
                feats = F.normalize(self.clip.encode_image(torch.cat([images, ref])), dim=-1)
                return feats[: len(images)], feats[len(images):]
            task = F.normalize(self.clip.encode_image(images), dim=-1)
            return task, (F.normalize(self.clip.encode_image(ref), dim=-1) if ref is not None else None)

    def class_features(self) -> torch.Tensor:
        if self.class_emb_frozen is not None:
            return self.class_emb_frozen
        return super().class_features()

    def _teacher_features(self, ref: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            feats = F.normalize(self.teacher.encode_image(ref.to(next(self.teacher.parameters()).dtype)).float(), dim=-1)
        return feats.clone()

    def _distillation(self, student_ref: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
        from zscl.methods.distributed import gather_features

        teacher_ref = gather_features(self._teacher_features(ref), with_grad=False)
        student_ref = gather_features(student_ref, with_grad=True)
        student, teacher = distillation_logits(student_ref, teacher_ref, self.ref_text_emb, scale)
        parts: dict[str, torch.Tensor] = {}
        d = self.distill
        if d.image > 0:
            parts["kd_image"] = kd_loss(teacher, student, d.temperature)
        if d.text > 0 and d.text_mode == "coded":
            parts["kd_text"] = kd_loss(teacher.t(), student.t(), d.temperature)
        elif d.text > 0:
            parts["kd_text"] = self._paper_text_loss(student_ref, teacher_ref, scale)
        return parts

    def _paper_text_loss(self, student_ref: torch.Tensor, teacher_ref: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Text-side KD with the student's own text embeddings (the paper's description)."""
        idx = None
        n = len(self.ref_text_tokens)
        if self.distill.text_batch is not None and self.distill.text_batch < n:
            # Seeded by the step, not the global RNG, so that a resumed run draws the same texts;
            # drawn on the device, so no blocking host-to-device copy per step.
            g = torch.Generator(device=self.device).manual_seed(mix_seed(17, self.global_step))
            idx = torch.randperm(n, generator=g, device=self.device)[: self.distill.text_batch]
        tokens = self.ref_text_tokens if idx is None else self.ref_text_tokens[idx]
        teacher_txt = self.ref_text_emb if idx is None else self.ref_text_emb[idx]
        student_txt = F.normalize(self.clip.encode_text(tokens), dim=-1)
        student = scale * student_ref.float() @ student_txt.float().t()
        teacher = scale * teacher_ref.float() @ teacher_txt.float().t()
        return kd_loss(teacher.t(), student.t(), self.distill.temperature)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        images, labels = batch["task"]
        images = self.normalized(images)  # loaders ship uint8
        ref = batch.get("ref")
        ref = self.normalized(ref) if ref is not None else None
        task_feats, ref_feats = self._image_features(images, ref if self.distill.active else None)
        scale = self.clip.logit_scale.exp().detach().float()
        logits = scale * task_feats.float() @ self.class_features().float().t()
        parts = {"ce": F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)}
        if self.distill.active:
            parts.update(self._distillation(ref_feats, ref, scale))
        loss = parts["ce"] + self.distill.image * parts.get("kd_image", 0.0) + self.distill.text * parts.get("kd_text", 0.0)
        if self.hparams.weight_constraint > 0 and not self._fold_wc():
            loss = loss + self.hparams.weight_constraint * _wc_autograd([p for _, p in self.trainable], self.anchors)
        self._nonfinite |= ~torch.isfinite(loss.detach())
        self.log_parts(loss, parts)
        return loss

    def _fold_wc(self) -> bool:
        # Under fp16 loss scaling the gradients seen after backward are scaled: keep WC in the loss.
        return self.speed.fold_weight_constraint and str(self.trainer.precision) not in {"16-mixed", "16"}

    def on_after_backward(self) -> None:
        lam = self.hparams.weight_constraint
        if lam > 0 and self._fold_wc():
            accumulate = max(int(self.trainer.accumulate_grad_batches), 1)
            add_weight_constraint_grad_([p for _, p in self.trainable], self.anchors, lam / accumulate)

    def log_parts(self, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        lam = self.hparams.weight_constraint
        if lam > 0 and (self.global_step + 1) % max(int(self.trainer.log_every_n_steps), 1) == 0:
            parts = {**parts, "wc": lam * weight_constraint([p for _, p in self.trainable], self.anchors)}
            if self._fold_wc():  # the folded WC term is not in the returned loss: add it for the log
                loss = loss + parts["wc"]
        super().log_parts(loss, parts)

    # ----------------------------------------------------------------- weights for callbacks / export
    def reference_weights(self, kind: Literal["initial", "task_start"]) -> dict[str, torch.Tensor]:
        """fp32 parameters of the initial CLIP or of this task's starting point, by open_clip name."""
        if kind == "task_start":
            start = dict(zip(self.trainable_names, self.anchors))
            return {n: start.get(n, p.detach()).float() for n, p in self.clip.named_parameters()}
        if kind != "initial":
            raise ValueError(f"reference_weights: kind must be 'initial' or 'task_start', got {kind!r}")
        if self._initial_cpu is None:
            from zscl.models import load_clip

            model = load_clip(self.hparams.clip, self.hparams.pretrained).model
            self._initial_cpu = {k: v.detach() for k, v in model.named_parameters()}
        return {k: v.to(self.device).float() for k, v in self._initial_cpu.items()}


def _has_batchnorm(module: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())


def _wc_autograd(params: list[torch.nn.Parameter], anchors: list[torch.Tensor]) -> torch.Tensor:
    """WC inside the autograd graph (the plain path; used under fp16 loss scaling)."""
    return sum(((p - a) ** 2).sum() for p, a in zip(params, anchors)) if params else torch.zeros(())


__all__ = ["ContinualCLIP", "Distillation", "Speed"]
