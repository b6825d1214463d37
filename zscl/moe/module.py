"""MoE-Adapters (Yu et al., CVPR 2024) on the method contract (:class:`~zscl.methods.base.CLIPMethod`):
the shared data, optimiser, evaluation counters, checkpoints and runner.

One task t trains only task t's routers and noise matrices, the experts not frozen by earlier
tasks (:mod:`zscl.moe.adapters`) and task t's DDAS autoencoder (:mod:`zscl.moe.ddas`):

``L = CE(s f_t(x) g_t(classes)^T, y; label smoothing 0.2) + MSE(AE_t(phi(x)), phi(x)) + wd/2 ||AE_t||^2``

with the CLIP frozen (``f_t``/``g_t``: both towers with task t's router). The AE term has its own
parameter group (Adam, constant lr ``ddas.lr``); the adapters follow the warm-up + cosine schedule.
After the task the most-used experts are frozen and task t's DDAS threshold is set. Evaluation
routes every image with DDAS: task t*'s router in both towers, or the zero-shot CLIP.

Chaining tasks: ``init_from`` is the previous task's CLIP export; its adapters are read from the
``.moe.safetensors`` file beside it (:func:`zscl.moe.export.moe_path`), which this module writes
in :meth:`export_sidecars`. Everything (routers, frozen sets, usage counts, autoencoders,
calibration errors) is module state, so Lightning checkpoints resume bit-identically.

Deviations (besides those of :mod:`zscl.moe.adapters` and :mod:`zscl.moe.ddas`): ``torch.compile``
is off (the block hooks keep Python-side state); no distillation, weight constraint or averaging
(nothing of the CLIP trains).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F

from zscl.datasets.streams import mix_seed
from zscl.evaluation.zeroshot import spec_classifier
from zscl.methods.base import CLIPMethod
from zscl.moe.adapters import MoEAdapters, MoEConfig
from zscl.moe.ddas import AutoEncoderBank, DDASConfig, build_extractor, clip_features, select_routes
from zscl.moe.export import SUFFIX, export_meta, find_export, load_moe, moe_path, read_moe, save_moe


class MoEAdapterCLIP(CLIPMethod):
    """MoE-Adapters with DDAS on a frozen open_clip CLIP (see the module docstring).

    Args:
        moe: the adapters (experts, top-k, bottleneck, activate-freeze).
        ddas: the test-time selector (extractor, autoencoders, thresholds, per-image/per-batch).
        **kwargs: :class:`~zscl.methods.base.CLIPMethod`'s arguments (``clip``, ``pretrained``,
            ``init_from``, ``lr``, ``warmup_steps``, ``label_smoothing``, ``export_path``...).
    """

    sidecar_suffixes = (SUFFIX,)
    plain_clip_evaluation = False

    def __init__(self, moe: Union[MoEConfig, dict, None] = None, ddas: Union[DDASConfig, dict, None] = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.moe_cfg = MoEConfig(**moe) if isinstance(moe, dict) else (moe or MoEConfig())
        self.ddas_cfg = DDASConfig(**ddas) if isinstance(ddas, dict) else (ddas or DDASConfig())
        self.moe_cfg.towers = tuple(self.moe_cfg.towers)
        self._check_supported()
        self.speed.compile = False
        self.hparams["moe"], self.hparams["ddas"] = asdict(self.moe_cfg), asdict(self.ddas_cfg)
        self.hparams["speed"] = asdict(self.speed)
        # the previous task's adapters; an export given as `pretrained` (no init_from) also carries them
        prior = find_export(self.hparams.init_from) or (None if self.hparams.init_from else find_export(self.hparams.pretrained))
        state, done = read_moe(prior)[:2] if prior else ({}, 0)
        self.task = done  # this module trains task `done` (0-based)
        # the router this task trains and evaluates with: its own, or the one shared by all (cil/ recipe)
        self.route = 0 if self.moe_cfg.shared_router else done
        self.clip.requires_grad_(False)
        self.moe = MoEAdapters(self.clip, self.moe_cfg, self.route + 1)
        object.__setattr__(self, "extractor", build_extractor(self.ddas_cfg))
        self.ddas = AutoEncoderBank(self._feature_dim(), self.ddas_cfg, done + 1)
        if state:
            load_moe(state, self.moe, self.ddas)
        self.register_buffer("tasks_done", torch.tensor(done))
        self.trainable = [(f"moe.{n}", p) for n, p in self.moe.set_trainable(self.route)]
        self.ddas.requires_grad_(False)  # earlier tasks' autoencoders are final
        if self.ddas_cfg.enabled:
            self.trainable += [(f"ddas.autoencoders.{done}.{n}", p.requires_grad_(True))
                               for n, p in self.ddas.autoencoders[done].named_parameters()]
        self._finished = False
        self.route_stats: dict[str, list[float]] = {}

    def _check_supported(self) -> None:
        if self.hparams.weight_decay > 0 and self.moe_cfg.freeze_top > 0:
            raise ValueError("moe_adapters: model.weight_decay must be 0 (the reference's value): decoupled decay "
                             "would move the frozen experts")

    def _feature_dim(self) -> int:
        size = self.bundle.image_size
        with torch.no_grad():
            return int(self._ddas_features(torch.zeros(1, 3, size, size)).shape[1])

    # ----------------------------------------------------------------- training
    def param_groups(self) -> list[dict[str, Any]]:
        # AdamW with weight decay 0 is Adam: the autoencoder's L2 term is in its loss, as in the reference;
        # the autoencoder keeps a constant lr, the adapters follow the warm-up + cosine schedule.
        h = self.hparams
        groups = [{"params": [p for n, p in self.trainable if n.startswith("moe.")], "lr": h.lr,
                   "weight_decay": h.weight_decay, "schedule": "cosine"}]
        autoencoder = [p for n, p in self.trainable if n.startswith("ddas.")]
        if autoencoder:  # DDAS on
            groups.append({"params": autoencoder, "lr": self.ddas_cfg.lr, "weight_decay": 0.0, "schedule": "constant"})
        return groups

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.extractor is not None:
            self.extractor.to(self.device)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        # Noise and dropout from a generator seeded by the step: a resumed run draws the same numbers.
        self.moe.seed_step(mix_seed(29, self.task, self.global_step, self.global_rank), self.device)
        self.moe.recording = True
        with self.moe.routing(self.route):
            loss = super().training_step(batch, batch_idx)
        self.moe.recording = False
        if not self.ddas_cfg.enabled:
            return loss
        feats = self._ddas_features(self.normalized(batch["task"][0]))
        steps = self.trainer.max_steps
        calibrate = self.global_step >= min(int((1 - self.ddas_cfg.calibration_fraction) * steps), steps - 1)
        ae = self.ddas.training_loss(feats, self.task, calibrate)
        every = max(int(self.trainer.log_every_n_steps), 1)
        if (self.global_step + 1) % every == 0:
            self.log("train/ae", ae.detach(), on_step=True, on_epoch=False, batch_size=1)
        return loss + ae

    @torch.no_grad()
    def _ddas_features(self, images: torch.Tensor) -> torch.Tensor:
        if self.extractor is not None:
            return self.extractor(images)
        with self.moe.routing(None):  # the frozen CLIP's own features: adapters off
            return clip_features(self.clip.encode_image(images))

    # ----------------------------------------------------------------- end of task and export
    def on_train_end(self) -> None:
        self._finish_task()
        super().on_train_end()

    def _finish_task(self) -> None:
        """Activate-freeze and DDAS threshold of this task (once, after training; all ranks agree)."""
        if self._finished or self._trainer is None or self.trainer.global_step == 0:
            return
        distributed = self.trainer.world_size > 1
        for block in self.moe.blocks:
            if distributed:
                block.usage.copy_(self.trainer.strategy.reduce(block.usage, reduce_op="sum"))
        errors = self.ddas.calibrated_values()
        if distributed:
            errors = self.all_gather(errors).flatten()
        self.moe.freeze_most_used()
        self.ddas.set_threshold(self.task, errors)
        self.tasks_done.fill_(self.task + 1)
        self._finished = True

    def before_export(self) -> None:
        self._finish_task()

    def export_sidecars(self, path: str) -> None:
        """The adapters + autoencoders beside the (unchanged) CLIP weights at ``path``."""
        meta = export_meta(dict(self.hparams), self.moe_cfg, self.ddas_cfg)
        save_moe(moe_path(path), self.moe, self.ddas, int(self.tasks_done), meta)

    @classmethod
    def load_export(cls, path: str, clip: Optional[str] = None, **overrides: Any) -> "MoEAdapterCLIP":
        """CLIP ``path`` + the adapters and autoencoders beside it, with the MoE/DDAS settings of the export."""
        _, _, meta = read_moe(moe_path(path))
        overrides = {"moe": meta.get("moe"), "ddas": meta.get("ddas"), **overrides}
        return super().load_export(path, clip=clip or meta.get("clip"), **overrides)

    # ----------------------------------------------------------------- evaluation with DDAS
    def routes_for(self, images: torch.Tensor) -> torch.Tensor:
        """DDAS: per image the trained task whose router to use, or -1 (zero-shot CLIP).

        Without DDAS every image takes the latest trained task's router (the shared one: 0)."""
        tasks = int(self.tasks_done)
        if tasks == 0 or not self.ddas_cfg.enabled:
            route = -1 if tasks == 0 else (0 if self.moe_cfg.shared_router else tasks - 1)
            return torch.full((len(images),), route, dtype=torch.long, device=images.device)
        errors = self.ddas.errors(self._ddas_features(images), tasks)
        return select_routes(errors, self.ddas.thresholds[:tasks], self.ddas_cfg.decision)

    def prepare_evaluation(self) -> None:
        self._classifiers: dict[tuple[int, int], torch.Tensor] = {}
        self._routed = torch.zeros(len(self._specs), int(self.tasks_done) + 1, dtype=torch.long, device=self.device)
        if self.extractor is not None:
            self.extractor.to(self.device)

    def _classifier(self, dataset: int, route: int) -> torch.Tensor:
        """Zero-shot head of an evaluation dataset through task ``route``'s router (-1: plain CLIP), cached."""
        key = (dataset, route)
        if key not in self._classifiers:
            spec = self._specs[dataset]
            amp = torch.bfloat16 if self.on_cuda and torch.cuda.is_bf16_supported() else None
            with self.moe.routing(None if route < 0 else route):
                self._classifiers[key] = spec_classifier(self.clip, self.bundle.tokenizer, spec, device=self.device,
                                                         amp_dtype=amp)
        return self._classifiers[key]

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.moe_cfg.eval_gate_noise:  # the reference's quirk, made reproducible: noise seeded per batch
            self.moe.seed_step(mix_seed(31, dataloader_idx, batch_idx, self.global_rank), self.device)
        super().validation_step(batch, batch_idx, dataloader_idx)

    def eval_logits(self, images: torch.Tensor, dataset: int) -> torch.Tensor:
        """DDAS routes each image: task t*'s router in both towers, or the zero-shot CLIP (route -1)."""
        routes = self.routes_for(images)
        with self.moe.routing(routes):
            feats = F.normalize(self.clip.encode_image(images).float(), dim=-1)
        logits = torch.empty(len(images), self._specs[dataset].num_classes, device=feats.device)
        for route in routes.unique().tolist():
            chosen = routes == route
            logits[chosen] = 100.0 * feats[chosen] @ self._classifier(dataset, int(route))
        self._routed[dataset] += torch.bincount(routes + 1, minlength=self._routed.shape[1])
        return logits

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        routed = self._summed(self._routed)
        # fractions of each dataset's images sent to [zero-shot, task 0, task 1, ...]
        self.route_stats = {n: (row / max(int(row.sum()), 1)).tolist() for n, row in zip(self._eval_names, routed)}

    def describe(self) -> str:
        return f"MoE-Adapters + DDAS over {int(self.tasks_done)} trained task(s)"

    def evaluation_extras(self, dataset: int) -> dict[str, Any]:
        row = self._routed[dataset]
        return {"routed": (row / max(int(row.sum()), 1)).tolist()}


__all__ = ["MoEAdapterCLIP", "MoEConfig", "DDASConfig"]
