"""DIKI (Tang et al., ECCV 2024) on the method contract (:class:`~zscl.methods.base.CLIPMethod`).

The CLIP is frozen; task ``t`` trains only its prefixes (:class:`~zscl.diki.prefix.DIKIPrefixes`).

* **Before training** task ``t``: its Gaussian ``N(mu_t, Sigma_t)`` is fitted on the normalised frozen
  features of its training images (one pass, fp32; :class:`~zscl.diki.calibration.TaskGaussians`).
* **Training** with the true task and ``w = 1`` in both towers:
  ``L = CE(exp(s) cos(f_t(x), g_t(c)), y)`` over the task's classes, one prompt per class (the first
  template); SGD (``sgd``: lr 5.0, no momentum, weight decay 0), per iteration
  ``lr_k = lr (r + (1 - r)(1 + cos(pi k / K)) / 2)`` with ``r = min_lr_ratio`` = 1e-3, ``K = trainer.max_steps``
  (the reference's ``build_cosine_scheduler``). The SGD settings have their own key (``model.sgd``) because
  benchmarks set ``model.lr`` per task for the full fine-tuning methods (and a task's setting beats a
  method's); DIKI's rate is the same on every task.
* **Model selection**: a seeded per-class ``holdout`` (20 %) of the training split is never trained on;
  the weights are scored on it every epoch (one pass over the kept images, or ``select_every`` steps)
  and at the last step, and the best are kept (:mod:`zscl.diki.holdout`). ``epochs`` ends a task after
  that many epochs (the reference's 10) when it comes before ``trainer.max_steps``.
* **Evaluation** without task ids: the calibration picks each image's task and weight
  ``w = sigmoid(l_t* / D - 1)``, with batch voting (``voting``, transductive) by default
  (:func:`~zscl.diki.forward.calibrated_logits`); with no task trained yet, the zero-shot CLIP.
  Class prompts: the first template, as the reference (``eval_templates: first``), or every
  template of the dataset averaged (``all``).
* **Export**: prefixes and Gaussians beside the CLIP weights (:mod:`zscl.diki.export`), which is also
  how the next task finds them. Everything else (best epoch, task names) is in the Lightning
  checkpoint, so a killed run resumes exactly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Literal, Optional, Union

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from zscl.diki.calibration import TaskGaussians
from zscl.diki.export import SUFFIX, diki_path, find_export, load_diki, read_diki, save_diki
from zscl.diki.forward import calibrated_logits, frozen_image_features, select_tasks, zero_shot_logits
from zscl.diki.holdout import BestEpoch, due, holdout_positions
from zscl.diki.prefix import DIKIPrefixes, PrefixConfig, Route
from zscl.methods.base import CLIPMethod


@dataclass
class SGDConfig:
    """DIKI's optimiser (the reference's MTIL configs): plain SGD, cosine from ``lr`` to ``lr * min_lr_ratio``."""

    lr: float = 5.0
    momentum: float = 0.0
    weight_decay: float = 0.0
    min_lr_ratio: float = 1.0e-3


def cosine_floor_factor(step: int, steps: int, floor: float) -> float:
    """``lr_k / lr = r + (1 - r) (1 + cos(pi k / K)) / 2`` with ``r = floor``, ``K = steps`` (``k >= K``: ``r``)."""
    progress = min(step / max(steps, 1), 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class DIKICLIP(CLIPMethod):
    """DIKI on a frozen open_clip ViT CLIP (module docstring).

    Args:
        prefix: the prefixes (depth per tower, ``length`` L, key initialisation).
        sgd: the optimiser of the prefixes (``model.lr`` / ``warmup_steps`` / ``betas`` are not used).
        voting: one task per evaluation batch by majority (the reference's default; transductive).
        eval_templates: ``first`` (the reference) or ``all`` of a dataset's templates for evaluation prompts.
        holdout: fraction of each class's training images held out for model selection (0: keep the last step).
        holdout_seed: seed of the hold-out.
        select_every: score the hold-out every this many steps (default: one epoch over the kept images).
        epochs: end the task after this many epochs over the kept images (the reference: 10), or at
            ``trainer.max_steps`` if that comes first; None: ``trainer.max_steps`` (as every method).
        **kwargs: :class:`~zscl.methods.base.CLIPMethod`'s arguments.
    """

    sidecar_suffixes = (SUFFIX,)
    plain_clip_evaluation = False

    def __init__(self, prefix: Union[PrefixConfig, dict, None] = None, sgd: Union[SGDConfig, dict, None] = None,
                 voting: bool = True, eval_templates: Literal["first", "all"] = "first", holdout: float = 0.2,
                 holdout_seed: int = 42, select_every: Optional[int] = None, epochs: Optional[int] = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.prefix_cfg = PrefixConfig(**prefix) if isinstance(prefix, dict) else (prefix or PrefixConfig())
        self.sgd = SGDConfig(**sgd) if isinstance(sgd, dict) else (sgd or SGDConfig())
        self.hparams["prefix"], self.hparams["sgd"] = asdict(self.prefix_cfg), asdict(self.sgd)
        self.clip.requires_grad_(False)
        prior = find_export(self.hparams.init_from) or (None if self.hparams.init_from else find_export(self.hparams.pretrained))
        state, names = read_diki(prior)[:2] if prior else ({}, [])
        self.task = len(names)  # this module trains task `len(names)` (0-based)
        self.task_names: list[str] = list(names)
        self.prefixes = DIKIPrefixes(self.clip, self.prefix_cfg, self.task + 1)
        self.gaussians = TaskGaussians(self.task + 1, self._feature_dim())
        if state:
            load_diki(state, self.prefixes, self.gaussians)
        self.register_buffer("tasks_done", torch.tensor(self.task))
        self.trainable = [(f"prefixes.{n}", p) for n, p in self.prefixes.task_parameters(self.task)]
        self.best = BestEpoch()
        self._split: Optional[tuple[str, list[int], list[int]]] = None  # (training view, kept, held out)
        self._finished = False

    def _feature_dim(self) -> int:
        size = self.bundle.image_size
        with torch.no_grad(), self.prefixes.routing():
            return int(self.clip.encode_image(torch.zeros(1, 3, size, size)).shape[1])

    # ----------------------------------------------------------------- data: hold-out and Gaussian
    def training_dataset(self, name: str, data_root: str) -> str:
        """The task's training split without the hold-out (a dataset view)."""
        return self._holdout_split(name, data_root)[0]

    def _holdout_split(self, name: str, data_root: str) -> tuple[str, list[int], list[int]]:
        """(training view name, kept positions, held-out positions) of ``name``'s training split (computed once)."""
        from zscl.datasets import build_dataset, dataset_labels
        from zscl.datasets.views import DatasetView, register_view

        if self._split is None:
            labels = dataset_labels(build_dataset(name, data_root, "train"))
            held = holdout_positions(labels, self.hparams.holdout, self.hparams.holdout_seed)
            kept = sorted(set(range(len(labels))) - set(held))
            view = register_view(DatasetView(name, train_indices=tuple(kept))) if held else name
            self._split = (view, kept, held)
        return self._split

    def _images(self, name: str, positions: Optional[list[int]] = None) -> DataLoader:
        """Batches of ``name``'s training images (CLIP's test transform, no augmentation), in order."""
        from zscl.datasets import build_dataset

        dm = self.trainer.datamodule
        ds: Dataset = build_dataset(name, dm.data_root, "train", self.bundle.test_transform)
        ds = Subset(ds, positions) if positions is not None else ds
        return DataLoader(ds, batch_size=dm.eval_batch_size, num_workers=dm.num_workers, shuffle=False)

    @property
    def _has_images(self) -> bool:
        """False under ``zscl bench step``, whose random batches have no image files (no Gaussian, no hold-out)."""
        return isinstance(getattr(self.trainer.datamodule, "data_root", None), str)

    @torch.no_grad()
    def _frozen_features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen-CLIP image features in fp32 whatever the autocast (fit and test see the same numbers)."""
        with torch.autocast(self.device.type, enabled=False):
            return frozen_image_features(self.clip, self.prefixes, images.to(self.device, torch.float32))

    def _fit_gaussian(self) -> None:
        """Task ``t``'s Gaussian on its kept training images (skipped when restored from a checkpoint)."""
        if bool(self.gaussians.fitted[self.task]) or not self._has_images:
            return
        dm = self.trainer.datamodule
        view = self._holdout_split(dm.spec.name, dm.data_root)[0]
        feats = torch.cat([self._frozen_features(x) for x, _ in self._images(view)])
        self.gaussians.fit(self.task, feats)

    # ----------------------------------------------------------------- training
    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [p for _, p in self.trainable], "lr": self.sgd.lr, "weight_decay": self.sgd.weight_decay,
                 "schedule": "cosine_floor"}]

    def make_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        return torch.optim.SGD(groups, momentum=self.sgd.momentum)

    def lr_factor(self, schedule: str, steps: int) -> Callable[[int], float]:
        if schedule == "cosine_floor":
            last = self._last_step()
            return lambda k: cosine_floor_factor(k, last, self.sgd.min_lr_ratio)
        return super().lr_factor(schedule, steps)

    def _last_step(self) -> int:
        """The task's length: ``trainer.max_steps``, or ``epochs`` epochs over the kept images if shorter."""
        steps = int(self.trainer.max_steps)
        if self.hparams.epochs and self._has_images:
            steps = min(steps, int(self.hparams.epochs) * self._epoch_steps())
        return steps

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Optional[int]:
        """Stop (-1) at a task's end reached before ``trainer.max_steps`` (``epochs``), also on resume."""
        if self.trainer.global_step >= self._last_step():  # resumed from a checkpoint at the task's last step
            self.trainer.should_stop = True
            return -1
        return None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.trainer.global_step >= self._last_step():
            self.trainer.should_stop = True  # `epochs` epochs done before trainer.max_steps

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._train_name = self.trainer.datamodule.spec.name
        self._fit_gaussian()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """The base's cross-entropy step with task ``t``'s prefixes at ``w = 1`` in both towers."""
        self._score_if_due(self.trainer.global_step)  # the weights after global_step steps, before the next
        with self.prefixes.routing(image=Route(self.task), text=Route(self.task)):
            return super().training_step(batch, batch_idx)

    # ----------------------------------------------------------------- model selection
    def _epoch_steps(self) -> int:
        """Steps between hold-out scores: ``select_every``, else one epoch, ``ceil(kept / (batch * ranks))``."""
        if self.hparams.select_every:
            return int(self.hparams.select_every)
        dm = self.trainer.datamodule
        kept = len(self._holdout_split(dm.spec.name, dm.data_root)[1])
        return max(1, math.ceil(kept / (dm.batch_size * self.trainer.world_size)))

    def _score_if_due(self, step: int) -> None:
        """Score the weights after ``step`` steps if that step ends an epoch or the task (once per step)."""
        if self.hparams.holdout <= 0 or not self._has_images or step == self.best.scored:
            return
        if due(step, self._epoch_steps(), self._last_step()):
            self._score(step)

    @torch.no_grad()
    def _score(self, step: int) -> None:
        """Top-1 on the hold-out with the true task (``w = 1``); every rank scores all of it (same result)."""
        dm = self.trainer.datamodule
        name, _, held = self._holdout_split(dm.spec.name, dm.data_root)
        correct = total = 0
        with self.prefixes.routing(image=Route(self.task), text=Route(self.task)):
            text = self.class_features()
            for x, y in self._images(dm.spec.name, held):
                feats = torch.nn.functional.normalize(self.clip.encode_image(x.to(self.device)), dim=-1)
                correct += int((feats.float() @ text.float().t()).argmax(1).eq(y.to(self.device)).sum())
                total += len(y)
        self.best.offer(step, correct, total, [p for _, p in self.trainable])

    def _finish_task(self) -> None:
        """After training (once): score the last step, restore the best epoch's prefixes, count the task done."""
        if self._finished or self._trainer is None or self.trainer.global_step == 0:
            return
        self._score_if_due(int(self.trainer.global_step))
        if self.best.params and self.best.step != self.trainer.global_step:
            with torch.no_grad():
                for (_, p), kept in zip(self.trainable, self.best.params):
                    p.copy_(kept)
        self.task_names.append(self._train_name)
        self.tasks_done.fill_(self.task + 1)
        self._finished = True

    def on_train_end(self) -> None:
        self._finish_task()
        super().on_train_end()

    def before_export(self) -> None:
        self._finish_task()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["diki"] = {"task_names": list(self.task_names), "best": self.best.state()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("diki")
        if state:
            self.task_names = list(state["task_names"])
            self.best = BestEpoch.from_state(state["best"], self.device)

    # ----------------------------------------------------------------- evaluation
    def prepare_evaluation(self) -> None:
        from zscl.datasets.text import fill_template

        self._eval_tokens, self._eval_templates = [], []
        for spec in self._specs:
            templates = [spec.train_template] if self.hparams.eval_templates == "first" else list(spec.templates)
            prompts = [fill_template(t, c) for c in spec.classnames for t in templates]
            self._eval_tokens.append(self.bundle.tokenizer(prompts).to(self.device))
            self._eval_templates.append(len(templates))
        done = int(self.tasks_done)
        self._chosen = torch.zeros(len(self._specs), max(done, 1), dtype=torch.long, device=self.device)
        self._weights = torch.zeros(len(self._specs), 2, dtype=torch.float64, device=self.device)  # [sum w, images]

    def eval_logits(self, images: torch.Tensor, dataset: int) -> torch.Tensor:
        """Calibrated logits (module docstring); the zero-shot CLIP before any task is trained."""
        tokens, templates = self._eval_tokens[dataset], self._eval_templates[dataset]
        if int(self.tasks_done) == 0:
            return zero_shot_logits(self.clip, self.prefixes, images, tokens, templates)
        with torch.autocast(self.device.type, enabled=False):
            sel = select_tasks(self.clip, self.prefixes, self.gaussians, images.float(), self.hparams.voting)
        self._chosen[dataset] += torch.bincount(sel.tasks, minlength=self._chosen.shape[1])[: self._chosen.shape[1]]
        self._weights[dataset] += torch.stack([sel.weights.double().sum(), torch.tensor(float(len(images)), device=self.device)])
        return calibrated_logits(self.clip, self.prefixes, self.gaussians, images, tokens, templates=templates, selection=sel)

    def evaluation_extras(self, dataset: int) -> dict[str, Any]:
        row, (w, n) = self._chosen[dataset], self._weights[dataset].tolist()
        return {"selected": (row / max(int(row.sum()), 1)).tolist(), "mean_w": w / n if n else None}

    def describe(self) -> str:
        mode = "batch voting" if self.hparams.voting else "per image"
        return f"DIKI prefixes + task Gaussians of {int(self.tasks_done)} task(s) ({mode}): {', '.join(self.task_names)}"

    # ----------------------------------------------------------------- export
    def export_sidecars(self, path: str) -> None:
        meta = {"clip": str(self.hparams.clip), "prefix": asdict(self.prefix_cfg), "voting": bool(self.hparams.voting),
                "eval_templates": self.hparams.eval_templates}
        save_diki(diki_path(path), self.prefixes, self.gaussians, self.task_names[: int(self.tasks_done)], meta)

    @classmethod
    def load_export(cls, path: str, clip: Optional[str] = None, **overrides: Any) -> "DIKICLIP":
        """CLIP ``path`` + the prefixes and Gaussians beside it, with the settings of the export."""
        _, _, meta = read_diki(diki_path(path))
        kept = {k: meta[k] for k in ("prefix", "voting", "eval_templates") if k in meta}
        return super().load_export(path, clip=clip or meta.get("clip"), **{**kept, **overrides})


__all__ = ["DIKICLIP", "SGDConfig", "cosine_floor_factor"]
