"""The method contract: one LightningModule base class that every continual method subclasses.

:class:`CLIPMethod` owns what all methods share, so that a method is one class and one YAML:

* the CLIP (open_clip name or OpenAI JIT file, ``pretrained`` weights) and ``init_from``;
* the optimiser: AdamW (:meth:`make_optimizer`) over :meth:`param_groups` with a per-iteration
  schedule per group (:meth:`lr_factor`: linear warm-up then cosine to 0, or constant),
  ``trainer.max_steps`` iterations;
* zero-shot evaluation with top-1/top-5 and per-class counts, summed over ranks
  (:meth:`eval_logits` is the one hook a method with its own inference overrides);
* :meth:`export` (CLIP weights in open_clip layout + :meth:`export_sidecars`) and
  :meth:`load_export`, so that ``zscl eval`` rebuilds any method's model from its export;
* what the runner, ``zscl eval``, ``zscl bench`` and ``zscl compare`` need to know about a method,
  as class methods (:meth:`requires_reference`, :meth:`evaluation_overrides`).

A subclass sets ``self.trainable`` (``(name, parameter)`` pairs) in its ``__init__`` and writes
``training_step``. Everything else is optional.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Optional

import lightning as L
import torch
import torch.nn.functional as F

from zscl.datasets.pixels import normalize_images
from zscl.evaluation.zeroshot import Accuracy, image_logits, spec_classifier, topk_correct
from zscl.methods.config import Speed, resolve_auto
from zscl.methods.losses import cosine_warmup_factor

#: safetensors metadata key naming the method class that wrote an export (see :func:`zscl.methods.classes.method_of_export`)
METHOD_KEY = "zscl_method"


class CLIPMethod(L.LightningModule):
    """Base of every continual CLIP method (see the module docstring).

    Args:
        clip: open_clip architecture name (or an OpenAI JIT file).
        pretrained: the *initial* weights: open_clip tag or local file.
        init_from: weights to start this task from (the previous task's export); default: ``pretrained``.
        lr, weight_decay, betas: AdamW of the default parameter group.
        warmup_steps: linear warm-up, then cosine to 0 at ``trainer.max_steps``, stepped per iteration.
        label_smoothing: of the task cross-entropy.
        speed: fast-path switches.
        export_path: write the final weights here as safetensors after training.
        nan_check_every: check for a non-finite loss every N steps (a host sync; not every step).
    """

    #: files written beside an export by :meth:`export_sidecars` (suffixes replacing ``.safetensors``)
    sidecar_suffixes: ClassVar[tuple[str, ...]] = ()
    #: True when evaluation is the CLIP's own zero-shot head (``zscl eval`` then takes the plain fast path);
    #: a method that overrides :meth:`eval_logits` sets False
    plain_clip_evaluation: ClassVar[bool] = True

    def __init__(
        self,
        clip: str = "ViT-B-16",
        pretrained: Optional[str] = "openai",
        init_from: Optional[str] = None,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 100,
        label_smoothing: float = 0.2,
        speed: Optional[Speed] = None,
        export_path: Optional[str] = None,
        nan_check_every: int = 50,
    ) -> None:
        super().__init__()
        from zscl.models import load_clip, load_weights

        self.save_hyperparameters()
        self.speed = speed or Speed()
        bundle = load_clip(clip, pretrained)
        self.bundle = bundle
        self.clip = bundle.model.train()  # load_clip returns eval mode; Lightning switches for evaluation
        self.on_initial_clip()
        if init_from:
            load_weights(self.clip, init_from, arch=bundle.name)
        self.trainable: list[tuple[str, torch.nn.Parameter]] = []
        self.eval_results: dict[str, Accuracy] = {}
        self.eval_per_class: dict[str, list[list[int]]] = {}
        self.register_buffer("_nonfinite", torch.zeros((), dtype=torch.bool), persistent=False)

    # ----------------------------------------------------------------- what the harness asks a method
    @classmethod
    def requires_reference(cls, model_cfg: dict[str, Any]) -> bool:
        """Whether a run with these ``model:`` settings reads reference data (checked before any run)."""
        return False

    @classmethod
    def evaluation_overrides(cls) -> dict[str, Any]:
        """``model:`` settings that an evaluation-only instance switches off (e.g. a teacher it does not need)."""
        return {}

    @property
    def needs_reference(self) -> bool:
        """Whether training batches carry reference images (``batch["ref"]``)."""
        return False

    @property
    def trainable_names(self) -> list[str]:
        return [n for n, _ in self.trainable]

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    def on_initial_clip(self) -> None:
        """Called in ``__init__`` while ``self.clip`` holds the initial weights, before ``init_from`` is loaded."""

    def training_dataset(self, name: str, data_root: str) -> str:
        """The registered dataset the task's training stream reads, for the task's dataset ``name``
        (default: ``name`` itself). A method that keeps part of the training split for its own use
        (e.g. a hold-out for model selection) returns a view without it (:mod:`zscl.datasets.views`)."""
        return name

    # ----------------------------------------------------------------- optimisation
    def param_groups(self) -> list[dict[str, Any]]:
        """Parameter groups of :meth:`make_optimizer`; ``schedule`` names the group's :meth:`lr_factor`
        (``"cosine"``: warm-up + cosine, the default; ``"constant"``)."""
        h = self.hparams
        return [{"params": [p for _, p in self.trainable], "lr": h.lr, "weight_decay": h.weight_decay}]

    def configure_optimizers(self) -> dict[str, Any]:
        steps = self.trainer.max_steps
        if steps is None or steps <= 0:
            raise ValueError("training is measured in iterations: set trainer.max_steps (e.g. --trainer.max_steps 1000)")
        groups = self.param_groups()
        schedules = [g.pop("schedule", "cosine") for g in groups]
        opt = self.make_optimizer(groups)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, [self.lr_factor(s, steps) for s in schedules])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def make_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """The optimiser over :meth:`param_groups` (their ``schedule`` keys removed): AdamW."""
        # The fused kernel exists for CUDA and CPU (on CPU it is ~10x faster than the per-tensor loop).
        fused = resolve_auto(self.speed.fused_adamw, self.device.type in ("cuda", "cpu"))
        return torch.optim.AdamW(groups, betas=tuple(self.hparams.betas), fused=fused or None)

    def lr_factor(self, schedule: str, steps: int) -> Callable[[int], float]:
        """``k -> lr_k / lr`` of a group's ``schedule``: ``"cosine"`` (linear warm-up over ``warmup_steps``,
        then cosine to 0 at ``steps``) or ``"constant"``. A method adds its own names by overriding this."""
        if schedule == "cosine":
            warmup = self.hparams.warmup_steps
            return lambda k: cosine_warmup_factor(k, steps, warmup)
        if schedule == "constant":
            return lambda k: 1.0
        raise ValueError(f"unknown lr schedule {schedule!r} (cosine, constant)")

    def configure_callbacks(self) -> list[L.Callback]:
        from zscl.methods.guards import FiniteLossGuard

        if self._trainer is not None and self.trainer.state.fn != "fit":
            return []  # validate/test after fit: the fit's callbacks are already attached
        return [FiniteLossGuard(self.hparams.nan_check_every), *self.method_callbacks()]

    def method_callbacks(self) -> list[L.Callback]:
        """Callbacks the method trains with (e.g. weight averaging); the NaN guard is always there."""
        return []

    # ----------------------------------------------------------------- training
    def on_fit_start(self) -> None:
        # The task's class prompts (first template), encoded by the current text tower at each step.
        self.class_tokens = self.bundle.tokenizer(self.trainer.datamodule.spec.prompts()).to(self.device)

    def class_features(self) -> torch.Tensor:
        """Normalised text embeddings of the task's class prompts (gradients flow into the text tower)."""
        return F.normalize(self.clip.encode_text(self.class_tokens), dim=-1)

    def class_logits(self, image_features: torch.Tensor) -> torch.Tensor:
        """``s f g^T`` with CLIP's (frozen) temperature ``s``, normalised image features ``f``, class features ``g``."""
        scale = self.clip.logit_scale.exp().detach().float()
        return scale * image_features.float() @ self.class_features().float().t()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Plain fine-tuning: ``CE(s f(x) g^T, y; label smoothing)`` over the task's classes."""
        images, labels = batch["task"]
        feats = F.normalize(self.clip.encode_image(self.normalized(images)), dim=-1)
        loss = F.cross_entropy(self.class_logits(feats), labels, label_smoothing=self.hparams.label_smoothing)
        self._nonfinite |= ~torch.isfinite(loss.detach())
        self.log_parts(loss, {"ce": loss})
        return loss

    def log_parts(self, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        """Loss parts to the loggers (``train/<part>``) and, under short names, the progress bar.

        Only every ``log_every_n_steps``: reading a logged tensor is a host sync.
        """
        every = max(int(self.trainer.log_every_n_steps), 1)
        if (self.global_step + 1) % every != 0:  # the steps on which Lightning writes to its loggers
            return
        logged = {"loss": loss.detach(), **{k: v.detach() for k, v in parts.items()}}
        self.log_dict({f"train/{k}": v for k, v in logged.items()}, on_step=True, on_epoch=False, batch_size=1)
        self.log_dict(logged, prog_bar=True, logger=False, on_step=True, on_epoch=False, batch_size=1)

    def normalized(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 loader batches -> the CLIP's normalised float input."""
        return normalize_images(images, self.bundle.mean, self.bundle.std)

    # ----------------------------------------------------------------- export
    def export(self, path: str) -> None:
        """The CLIP's open_clip state dict as safetensors (loadable by ``open_clip.create_model``),
        the class that wrote it in the metadata, and the method's sidecar files beside it."""
        from zscl.models import save_state_dict

        self.before_export()
        if self._trainer is None or self._trainer.is_global_zero:
            meta = {"clip": str(self.hparams.clip), "pretrained": str(self.hparams.pretrained),
                    METHOD_KEY: f"{type(self).__module__}.{type(self).__qualname__}"}
            save_state_dict(self.clip.state_dict(), path, metadata=meta)
            self.export_sidecars(path)

    export_weights = export  # the name used before the method contract

    def before_export(self) -> None:
        """Called on every rank before :meth:`export` writes (e.g. to finish end-of-task state)."""

    def export_sidecars(self, path: str) -> None:
        """Write the method's own state beside the CLIP weights at ``path`` (rank 0 only)."""

    @classmethod
    def load_export(cls, path: str, clip: Optional[str] = None, **overrides: Any) -> "CLIPMethod":
        """The method's model rebuilt from an export, in eval mode (``clip``: the architecture, default from its metadata)."""
        arch = clip or export_metadata(path).get("clip")
        if not arch:
            raise ValueError(f"{path} does not name its architecture: pass the open_clip model name (--model)")
        return cls(clip=arch, pretrained=path, **overrides).eval()

    def on_train_end(self) -> None:
        # Callbacks' on_train_end (averaging) has already run: this exports the final weights.
        if self.hparams.export_path:
            self.export(self.hparams.export_path)

    # ----------------------------------------------------------------- zero-shot evaluation
    def start_evaluation(self, names: list[str]) -> None:
        """Reset the counters of :meth:`validation_step` for ``names`` (dataloader i = ``names[i]``)."""
        from zscl.datasets import get_dataset

        self._eval_names, self._specs = list(names), [get_dataset(n) for n in names]
        self.prepare_evaluation()
        self._counts = torch.zeros(len(names), 3, dtype=torch.long, device=self.device)
        # Per class: [top-1 correct, images] (class-incremental results report per-class accuracy).
        self._class_counts = [torch.zeros(s.num_classes, 2, dtype=torch.long, device=self.device) for s in self._specs]

    def prepare_evaluation(self) -> None:
        """Build what :meth:`eval_logits` needs for ``self._specs`` (default: one zero-shot head per dataset)."""
        amp = torch.bfloat16 if self.on_cuda and torch.cuda.is_bf16_supported() else None
        self._classifiers = [spec_classifier(self.clip, self.bundle.tokenizer, s, device=self.device, amp_dtype=amp)
                             for s in self._specs]

    def eval_logits(self, images: torch.Tensor, dataset: int) -> torch.Tensor:
        """Logits of normalised ``images`` over the classes of evaluation dataset number ``dataset``."""
        return image_logits(self.clip, images, self._classifiers[dataset])

    def on_validation_epoch_start(self) -> None:
        self.start_evaluation(list(self.trainer.datamodule.eval_names))

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels = batch
        logits = self.eval_logits(self.normalized(images), dataloader_idx)
        self._counts[dataloader_idx, :2] += topk_correct(logits, labels)
        self._counts[dataloader_idx, 2] += len(labels)
        per_class = self._class_counts[dataloader_idx]
        per_class[:, 0].index_add_(0, labels, (logits.argmax(dim=1) == labels).long())
        per_class[:, 1].index_add_(0, labels, torch.ones_like(labels))

    def _summed(self, counts: torch.Tensor) -> torch.Tensor:
        if self._trainer is not None and self.trainer.world_size > 1:
            return self.trainer.strategy.reduce(counts, reduce_op="sum")
        return counts

    def on_validation_epoch_end(self) -> None:
        counts = self._summed(self._counts).tolist()
        self.eval_results = {n: Accuracy(*c) for n, c in zip(self._eval_names, counts)}
        per_class = [self._summed(c) for c in self._class_counts]
        self.eval_per_class = {n: c.tolist() for n, c in zip(self._eval_names, per_class)}  # [[correct, n], ...]
        for name, acc in self.eval_results.items():
            # Already the all-ranks value (the counts are summed over ranks above): sync_dist=True declares it
            # reduced, and with rank_zero_only Lightning runs no further collective on it.
            self.log(f"val/{name}/top1", acc.top1, rank_zero_only=True, sync_dist=True, add_dataloader_idx=False)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.validation_step(batch, batch_idx, dataloader_idx)

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()

    def analytic_step_profile(self) -> Optional[dict[str, Any]]:
        """What ``zscl bench step``'s analytic FLOP count needs (``{"distill": Distillation}``), or None when the
        count (full fine-tuning of the CLIP) does not describe this method's training step."""
        return None

    def describe(self) -> str:
        """One line on what this model is (printed by ``zscl eval``)."""
        return type(self).__name__

    def evaluation_extras(self, dataset: int) -> dict[str, Any]:
        """Method-specific facts about the last evaluation of dataset number ``dataset`` (e.g. routing)."""
        return {}


def export_metadata(path: str) -> dict[str, str]:
    """The safetensors metadata of an export (empty for other checkpoint formats)."""
    if not str(path).endswith(".safetensors"):
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


__all__ = ["CLIPMethod", "METHOD_KEY", "export_metadata"]
