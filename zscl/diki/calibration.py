"""DIKI's distribution-aware calibration: one Gaussian per task on frozen CLIP image features.

Fit (before training task ``t``): on the L2-normalised frozen image features ``f`` of its
training images, ``mu_t = mean(f)`` and ``Sigma_t = cov(f) + 1e-7 I`` (unbiased covariance,
``N - 1`` in the denominator).

Test (per image, no task id given): over the learned tasks only,

    l_t = log N(f; mu_t, Sigma_t) = -1/2 [D log(2 pi) + log|Sigma_t| + (f - mu_t)^T Sigma_t^-1 (f - mu_t)]
    t*  = argmax_t l_t
    w   = sigmoid(l_{t*} / D - 1)

with ``D`` the feature dimension (512 for ViT-B/16, where it equals the reference's hard-coded 512;
other architectures use their own ``D``). An image unlike every learned task has a very negative
``l``, so ``w ~ 0`` and the model falls back to the zero-shot CLIP. The text tower's weight is
the batch mean of ``w``.

**Batch voting** (``voting=True``, the reference's default): the whole test batch uses the
majority ``t*`` (ties: the lowest task index); each image keeps its own ``w``. This is
*transductive*: it assumes a test batch comes from one task (the reference evaluates one dataset
per loader, 256 images a batch), and an image's prediction depends on the other images in its
batch. ``voting=False`` decides per image.

The Gaussians are buffers (``means``, ``covariances``, ``fitted``), so they travel in the state
dict (export, resume); the Cholesky factors are derived, non-persistent buffers, recomputed on
fit and on load. Everything is float64: with few images per task (``N < D``) the covariance is
nearly singular and ``1e-7 I`` is below float32's resolution of its diagonal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

RIDGE = 1e-7  # added to every covariance's diagonal (the reference's value)


@dataclass
class Selection:
    """The calibration's decision for a batch of images."""

    tasks: torch.Tensor  # LongTensor [B]: the task whose prefixes each image uses (after voting)
    weights: torch.Tensor  # [B]: w = sigmoid(l_{t*} / D - 1) per image
    own_tasks: torch.Tensor  # LongTensor [B]: each image's own argmax t* (before voting)
    log_density: torch.Tensor  # [B, T]: l_t, -inf for tasks not fitted yet

    @property
    def text_weight(self) -> float:
        """The text tower's weight: the batch mean of ``w``."""
        return float(self.weights.mean())


class TaskGaussians(nn.Module):
    """``num_tasks`` full-covariance Gaussians over ``dim``-dimensional normalised image features."""

    def __init__(self, num_tasks: int, dim: int) -> None:
        super().__init__()
        self.num_tasks, self.dim = num_tasks, dim
        eye = torch.eye(dim, dtype=torch.float64).expand(num_tasks, dim, dim)
        self.register_buffer("means", torch.zeros(num_tasks, dim, dtype=torch.float64))
        self.register_buffer("covariances", eye.clone())
        self.register_buffer("fitted", torch.zeros(num_tasks, dtype=torch.bool))
        self.register_buffer("scale_tril", eye.clone(), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _keys: module._refresh_cholesky())

    def fit(self, task: int, features: torch.Tensor) -> None:
        """Fit task ``task``'s Gaussian on ``features`` ``[N, D]`` (raw frozen CLIP features; normalised here)."""
        if features.dim() != 2 or features.shape[1] != self.dim or features.shape[0] < 2:
            raise ValueError(f"need [N >= 2, {self.dim}] features to fit a Gaussian, got {tuple(features.shape)}")
        f = F.normalize(features.to(self.means.device, torch.float64), dim=-1)
        self.means[task] = f.mean(0)
        eye = torch.eye(self.dim, dtype=torch.float64, device=f.device)
        self.covariances[task] = torch.cov(f.T, correction=1) + RIDGE * eye
        self.fitted[task] = True
        self._refresh_cholesky()

    def _refresh_cholesky(self) -> None:
        # Unfitted slots hold the identity, so the batched factorisation always succeeds.
        self.scale_tril.copy_(torch.linalg.cholesky(self.covariances))

    def log_density(self, features: torch.Tensor) -> torch.Tensor:
        """``l[b, t] = log N(normalise(features[b]); mu_t, Sigma_t)``, ``-inf`` for unfitted tasks. ``[B, T]``."""
        f = F.normalize(features.to(self.means.device, torch.float64), dim=-1)
        diff = f[None] - self.means[:, None]  # [T, B, D]
        # ||L^-1 (f - mu)||^2 = Mahalanobis distance, with Sigma = L L^T
        z = torch.linalg.solve_triangular(self.scale_tril, diff.transpose(1, 2), upper=False)  # [T, D, B]
        maha = z.square().sum(1)  # [T, B]
        logdet = 2 * torch.diagonal(self.scale_tril, dim1=1, dim2=2).log().sum(1)  # [T]
        ll = -0.5 * (self.dim * math.log(2 * math.pi) + logdet[:, None] + maha)
        return ll.T.masked_fill(~self.fitted[None], float("-inf"))

    def select(self, features: torch.Tensor, voting: bool = True) -> Selection:
        """Each image's task and weight (module docstring); ``voting``: one task for the whole batch."""
        if not bool(self.fitted.any()):
            raise RuntimeError("no task Gaussian has been fitted yet: fit one before selecting")
        ll = self.log_density(features)
        best, own = ll.max(1)
        weights = torch.sigmoid(best / self.dim - 1).to(torch.float32)
        tasks = torch.full_like(own, int(majority(own))) if voting else own
        return Selection(tasks=tasks, weights=weights, own_tasks=own, log_density=ll)


def majority(tasks: torch.Tensor) -> torch.Tensor:
    """The most frequent entry of ``tasks`` (a 0-dim LongTensor); ties go to the lowest task index."""
    return torch.bincount(tasks).argmax()
