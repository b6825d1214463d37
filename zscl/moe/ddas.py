"""DDAS, MoE-Adapters' test-time selector (Yu et al., CVPR 2024): per-task autoencoders decide
which task's router an image uses, or whether it gets the plain zero-shot CLIP.

* Feature extractor (frozen): by default the CLIP image tower itself with the adapters off,
  features ``sigmoid(sqrt(F) * f / ||f||)`` (every component ~ unit scale before the sigmoid).
  ``torchvision:<name>`` / ``timm:<name>`` build that model from a local weights file
  (``extractor_weights``) instead; their flattened last feature map goes through a sigmoid as in
  the reference (which uses AlexNet ``features[:-2]``).
* One autoencoder per task: ``Linear(F, 100) + ReLU``, ``Linear(100, F) + Sigmoid``, MSE, Adam
  with L2 weight decay (lr 0.01, wd 1e-4).
* Decision: ``e_t(x)`` = reconstruction MSE of task t's autoencoder, over the *trained* tasks
  only; ``t* = argmin_t e_t(x)``; zero-shot CLIP if ``e_t*(x) > tau_t*``, else router ``t*``.

Deviations from the reference, named:

* extractor: the reference's ImageNet AlexNet cannot be downloaded here; the default is the frozen
  CLIP image tower (any torchvision/timm model from a local file is an option);
* decision per image (a batch may mix tasks); ``decision: batch`` is the reference rule
  (batch-mean errors, one decision per batch);
* thresholds ``tau_t``: a quantile of task t's own *training* reconstruction errors (collected in
  the last ``calibration_fraction`` of the task's steps), times ``threshold_scale``, because a
  fixed number does not carry over between extractors; ``threshold`` sets the reference's single
  fixed value instead (0.0655 with AlexNet features);
* no AE0 trained on TinyImageNet: the thresholds alone detect inputs of no trained task;
* autoencoders of untrained tasks never take part (the reference compares random ones too);
* each autoencoder trains jointly with its task's adapters, one step per training step on the
  task's images (the reference trains it in a separate script for 300 iterations), so it is
  checkpointed and resumed with the task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DDASConfig:
    """Settings of the test-time selector (see the module docstring)."""

    enabled: bool = True  # false: no autoencoders are trained; every image takes the latest router (cil/)
    extractor: str = "clip"  # clip | torchvision:<name> | timm:<name>
    extractor_weights: Optional[str] = None  # local weights file for torchvision/timm extractors
    hidden: int = 100
    lr: float = 0.01
    weight_decay: float = 1e-4
    decision: Literal["image", "batch"] = "image"
    threshold: Optional[float] = None  # one fixed threshold for every task (reference: 0.0655, AlexNet)
    threshold_quantile: float = 0.99
    threshold_scale: float = 1.1
    calibration_fraction: float = 0.25
    calibration_size: int = 4096


class AutoEncoder(nn.Module):
    """``Sigmoid(Linear(ReLU(Linear(x))))``: F -> hidden -> F."""

    def __init__(self, features: int, hidden: int) -> None:
        super().__init__()
        self.encoder = nn.Linear(features, hidden)
        self.decoder = nn.Linear(hidden, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(F.relu(self.encoder(x))))

    def errors(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample reconstruction MSE [B]."""
        return ((self(x) - x) ** 2).mean(dim=1)


class AutoEncoderBank(nn.Module):
    """One autoencoder per task, their thresholds, and the current task's calibration errors."""

    def __init__(self, features: int, cfg: DDASConfig, num_tasks: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.autoencoders = nn.ModuleList(AutoEncoder(features, cfg.hidden) for _ in range(num_tasks))
        self.register_buffer("thresholds", torch.zeros(num_tasks))  # set when each task ends
        self.register_buffer("calibration", torch.zeros(cfg.calibration_size))
        self.register_buffer("calibration_seen", torch.zeros((), dtype=torch.long))

    def errors(self, feats: torch.Tensor, tasks: int) -> torch.Tensor:
        """Reconstruction errors [B, tasks] of the first ``tasks`` autoencoders."""
        return torch.stack([ae.errors(feats) for ae in self.autoencoders[:tasks]], dim=1)

    def training_loss(self, feats: torch.Tensor, task: int, calibrate: bool) -> torch.Tensor:
        """MSE of task ``task``'s autoencoder plus Adam's L2 term ``wd/2 ||theta||^2``; records errors if ``calibrate``."""
        ae = self.autoencoders[task]
        per_sample = ae.errors(feats)
        if calibrate:
            self._record(per_sample.detach())
        l2 = sum((p ** 2).sum() for p in ae.parameters())
        return per_sample.mean() + 0.5 * self.cfg.weight_decay * l2

    def _record(self, errors: torch.Tensor) -> None:
        """Ring buffer of the latest training errors (no host sync: index arithmetic on the device)."""
        n = self.calibration.numel()
        pos = (self.calibration_seen + torch.arange(len(errors), device=errors.device)) % n
        self.calibration[pos] = errors.float()
        self.calibration_seen += len(errors)

    def calibrated_values(self) -> torch.Tensor:
        return self.calibration[: int(min(int(self.calibration_seen), self.calibration.numel()))]

    def set_threshold(self, task: int, errors: torch.Tensor) -> None:
        if self.cfg.threshold is not None:
            value = float(self.cfg.threshold)
        elif errors.numel() == 0:
            value = float(torch.finfo(torch.float32).max)  # no calibration data (a task of 0 steps): never reject
        else:
            value = float(torch.quantile(errors.float(), self.cfg.threshold_quantile)) * self.cfg.threshold_scale
        self.thresholds[task] = value
        self.calibration.zero_()
        self.calibration_seen.zero_()


def select_routes(errors: torch.Tensor, thresholds: torch.Tensor, decision: str = "image") -> torch.Tensor:
    """DDAS decision: per sample the task whose autoencoder reconstructs best, or -1 (zero-shot)
    when that error exceeds the task's threshold. ``decision="batch"`` uses batch-mean errors."""
    if errors.shape[1] == 0:
        return torch.full((errors.shape[0],), -1, dtype=torch.long, device=errors.device)
    if decision == "batch":
        mean = errors.mean(dim=0, keepdim=True)
        return select_routes(mean, thresholds).expand(errors.shape[0]).clone()
    best, task = errors.min(dim=1)
    return torch.where(best > thresholds[task], torch.full_like(task, -1), task)


# ---------------------------------------------------------------------------- feature extractors
def clip_features(features: torch.Tensor) -> torch.Tensor:
    """``sigmoid(sqrt(F) * f / ||f||)``: normalised CLIP image features mapped into (0, 1)."""
    return torch.sigmoid(math.sqrt(features.shape[1]) * F.normalize(features.float(), dim=-1))


def build_extractor(cfg: DDASConfig) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """A frozen external extractor (images normalised as for CLIP -> [B, F] in (0, 1)); None for ``clip``."""
    if cfg.extractor == "clip":
        return None
    kind, _, name = cfg.extractor.partition(":")
    if kind not in ("torchvision", "timm") or not name:
        raise ValueError(f"ddas.extractor must be 'clip', 'torchvision:<name>' or 'timm:<name>', got {cfg.extractor!r}")
    if not cfg.extractor_weights:
        raise ValueError(f"ddas.extractor {cfg.extractor!r} needs ddas.extractor_weights (a local weights file; "
                         "nothing is downloaded)")
    model = _torchvision_trunk(name) if kind == "torchvision" else _timm_trunk(name)
    state = torch.load(cfg.extractor_weights, map_location="cpu", weights_only=True)
    missing = model.load_state_dict(state, strict=False).missing_keys  # heads dropped from the trunk are ignored
    if missing:
        raise ValueError(f"ddas.extractor_weights {cfg.extractor_weights} does not hold the {cfg.extractor} trunk: "
                         f"{len(missing)} missing tensors, e.g. {missing[:3]}")
    model.eval().requires_grad_(False)
    return _Extractor(model)


def _torchvision_trunk(name: str) -> nn.Module:
    import torchvision

    model = torchvision.models.get_model(name, weights=None)
    if name == "alexnet":  # the reference: features[:-2], the last conv before its ReLU and max-pool
        model.features = model.features[:-2]
        model.avgpool, model.classifier = nn.Identity(), nn.Identity()
        return _Features(model.features)
    for head in ("fc", "classifier", "heads", "head"):
        if hasattr(model, head):
            setattr(model, head, nn.Identity())
    return model


def _timm_trunk(name: str) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, num_classes=0)


class _Features(nn.Module):
    def __init__(self, features: nn.Module) -> None:
        super().__init__()
        self.features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class _Extractor:
    """Frozen model -> flattened features through a sigmoid (kept outside the module tree)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def to(self, device: torch.device) -> "_Extractor":
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(images).flatten(1).float())
