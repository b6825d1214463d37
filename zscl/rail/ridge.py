"""RAIL's closed-form ridge heads on frozen CLIP image features (Xu et al., NeurIPS 2024, arXiv 2406.18868).

Both heads read L2-normalised image features ``x̂`` and one-hot targets ``Y`` over the *cumulative*
label space (the classes of every domain seen so far, in union order; a new domain's columns are
appended). Nothing is trained by gradient.

* :class:`PrimalRidge`: a frozen, seeded random ReLU layer ``Φ = ReLU(W_r x̂)`` (width 15,000) and
  ``W = (ΦᵀΦ + λI)⁻¹ ΦᵀY`` with λ = 0.1. The paper updates an inverse recursively (Woodbury); we keep
  the sufficient statistics ``A = ΣΦᵀΦ`` and ``B = ΣΦᵀY`` in float64 and solve once per task, which
  gives the same joint solution however the data are chunked, without the recursion's round-off drift.
* :class:`DualRidge`: RBF kernel ridge regression ``α = (K + λI)⁻¹ Y`` over the stored features of all
  seen samples, ``k(x, x') = exp(-γ‖x - x'‖²)``, γ = 0.1, λ = 0.001; prediction ``k(x, X_mem) α``.
  :func:`check_kernel_memory` refuses a kernel that would not fit a memory budget before any work.

Every quantity a resumed run needs (hidden weights, statistics, memory, head) is a buffer, so
``state_dict`` / ``load_state_dict`` round-trips bit-identically; buffers that grow (classes,
samples) are resized on load.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DualRidge", "KernelMemoryError", "PrimalRidge", "check_kernel_memory", "kernel_bytes", "rbf_kernel"]

DEFAULT_KERNEL_BUDGET = 8 * 1024**3  # bytes; a 16-shot X-TAIL sequence (~17.6k samples) needs ~2.5 GB


class _GrowingBuffers(nn.Module):
    """Buffers whose shapes grow (new classes, new samples) are resized to the incoming state on load,
    so a fresh module restores any saved one; dtype and device stay the module's own."""

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for name, buf in list(self._buffers.items()):
            saved = state_dict.get(prefix + name)
            if buf is not None and saved is not None and saved.shape != buf.shape:
                self._buffers[name] = torch.empty(saved.shape, dtype=buf.dtype, device=buf.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Float64 one-hot targets; refuses labels outside the current label space (grow it first)."""
    labels = labels.long().view(-1)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}) (the classes seen so far); "
                         f"got [{int(labels.min())}, {int(labels.max())}]: call grow() for a new domain first")
    return F.one_hot(labels, num_classes).double()


def _spd_solve(a: torch.Tensor, b: torch.Tensor, lam: float) -> torch.Tensor:
    """``(a + λI)⁻¹ b`` in float64. ``a`` is a Gram matrix, so ``a + λI`` is symmetric positive
    definite (λ > 0): a Cholesky solve is cheaper and more stable than an explicit inverse."""
    shifted = a.double().clone()  # one copy (1.8 GB at width 15,000), no identity matrix
    shifted.diagonal().add_(lam)
    factor = torch.linalg.cholesky(shifted)
    del shifted
    return torch.cholesky_solve(b.double(), factor)


class PrimalRidge(_GrowingBuffers):
    """RAIL-Primal: ``W = (ΣΦᵀΦ + λI)⁻¹ ΣΦᵀY``, ``Φ = ReLU(W_r x̂)`` (Xu et al. 2024, primal form).

    ``W_r`` [width, in_dim] is drawn once from ``seed`` as U(±1/√in_dim), the default init of the
    reference's ``nn.Linear``, and never trained. Call :meth:`grow` when a domain arrives,
    :meth:`accumulate` on its (features, union labels) in any chunks, then :meth:`solve` once.
    """

    def __init__(self, in_dim: int, width: int = 15000, lam: float = 0.1, seed: int = 42, num_classes: int = 0) -> None:
        super().__init__()
        if lam <= 0:
            raise ValueError(f"the ridge penalty λ must be > 0, got {lam}")
        self.lam = float(lam)
        gen = torch.Generator().manual_seed(int(seed))
        bound = 1.0 / math.sqrt(in_dim)
        self.register_buffer("hidden", torch.empty(width, in_dim).uniform_(-bound, bound, generator=gen))
        self.register_buffer("gram", torch.zeros(width, width, dtype=torch.float64))  # ΣΦᵀΦ
        self.register_buffer("cross", torch.zeros(width, num_classes, dtype=torch.float64))  # ΣΦᵀY
        self.register_buffer("head", torch.zeros(width, num_classes, dtype=torch.float64))  # W
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))  # samples accumulated

    @property
    def num_classes(self) -> int:
        return self.cross.shape[1]

    def grow(self, num_classes: int) -> None:
        """Extend the label space to ``num_classes`` columns; new columns start at zero (no samples yet)."""
        extra = num_classes - self.num_classes
        if extra < 0:
            raise ValueError(f"the label space only grows: {self.num_classes} -> {num_classes}")
        pad = lambda t: torch.cat([t, t.new_zeros(t.shape[0], extra)], dim=1)  # noqa: E731
        self.cross, self.head = pad(self.cross), pad(self.head)

    def expand(self, features: torch.Tensor) -> torch.Tensor:
        """``Φ = ReLU(W_r x̂)`` in float64, so statistics do not depend on how samples are batched."""
        x = F.normalize(features.double(), dim=-1)
        return torch.relu(x @ self.hidden.double().t())

    @torch.no_grad()
    def accumulate(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Add ``ΦᵀΦ`` and ``ΦᵀY`` of one chunk (labels are union indices < :attr:`num_classes`)."""
        phi = self.expand(features.to(self.gram.device))
        self.gram += phi.t() @ phi
        self.cross += phi.t() @ _one_hot(labels.to(phi.device), self.num_classes)
        self.seen += phi.shape[0]

    @torch.no_grad()
    def solve(self) -> torch.Tensor:
        """``W = (A + λI)⁻¹ B`` in float64, the joint ridge solution on every sample seen so far."""
        self.head = _spd_solve(self.gram, self.cross, self.lam)
        return self.head

    @torch.no_grad()
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Raw ridge scores ``Φ(x) W`` [N, num_classes], float32 (not softmaxed, as RAIL fuses them)."""
        return (self.expand(features) @ self.head).float()


def rbf_kernel(a: torch.Tensor, b: torch.Tensor, gamma: float) -> torch.Tensor:
    """``k(a_i, b_j) = exp(-γ‖a_i - b_j‖²)`` in float64 (clamped at 0 against round-off)."""
    a, b = a.double(), b.double()
    sq = (a * a).sum(1, keepdim=True) + (b * b).sum(1) - 2.0 * a @ b.t()
    return torch.exp(-gamma * sq.clamp_min(0.0))


def kernel_bytes(num_samples: int) -> int:
    """Bytes of the float64 N×N kernel matrix of ``num_samples`` stored samples."""
    return 8 * int(num_samples) ** 2


class KernelMemoryError(MemoryError):
    """The dual form's kernel matrix would exceed the memory budget."""


def _gib(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB"


def check_kernel_memory(num_samples: int, budget_bytes: int = DEFAULT_KERNEL_BUDGET) -> None:
    """Refuse, before any work, a dual solve whose kernel matrix would exceed ``budget_bytes``.

    The message is one line naming the size needed, so a full-shot run fails at once, not hours in.
    """
    need = kernel_bytes(num_samples)
    if need > budget_bytes:
        raise KernelMemoryError(
            f"dual RAIL: the kernel matrix of {num_samples:,} stored samples needs {_gib(need)} in float64, "
            f"over the budget of {_gib(budget_bytes)}; use the primal form or raise the kernel memory budget")


class DualRidge(_GrowingBuffers):
    """RAIL-Dual: kernel ridge regression ``α = (K + λI)⁻¹ Y`` over all stored features (Xu et al. 2024).

    Prediction ``ŷ(x) = k(x, X_mem) α``. The memory keeps normalised features and union labels of every
    sample seen; :meth:`solve` recomputes α from scratch, which equals the paper's incremental update.
    """

    def __init__(self, in_dim: int, gamma: float = 0.1, lam: float = 1e-3, num_classes: int = 0,
                 budget_bytes: int = DEFAULT_KERNEL_BUDGET) -> None:
        super().__init__()
        self.gamma, self.lam, self.budget_bytes = float(gamma), float(lam), int(budget_bytes)
        # normalised features in float64: K + λI with λ = 0.001 is ill-conditioned, and float32
        # storage round-off would move α by far more than the solve's own error
        self.register_buffer("memory", torch.zeros(0, in_dim, dtype=torch.float64))
        self.register_buffer("labels", torch.zeros(0, dtype=torch.long))  # union indices
        self.register_buffer("alpha", torch.zeros(0, num_classes, dtype=torch.float64))
        self.register_buffer("classes", torch.tensor(num_classes, dtype=torch.long))

    @property
    def num_classes(self) -> int:
        return int(self.classes)

    def grow(self, num_classes: int) -> None:
        """Extend the label space; old samples' targets are zero in the new columns (as in the paper)."""
        if num_classes < self.num_classes:
            raise ValueError(f"the label space only grows: {self.num_classes} -> {num_classes}")
        self.classes.fill_(num_classes)

    def check_room(self, extra_samples: int = 0) -> None:
        """Refuse up front when the memory plus ``extra_samples`` would need a kernel over the budget."""
        check_kernel_memory(self.memory.shape[0] + extra_samples, self.budget_bytes)

    @torch.no_grad()
    def add(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Store one chunk's normalised features and labels (checked against the label space)."""
        _one_hot(labels, self.num_classes)  # validates the labels
        self.check_room(features.shape[0])
        x = F.normalize(features.double(), dim=-1).to(self.memory.device)
        self.memory = torch.cat([self.memory, x])
        self.labels = torch.cat([self.labels, labels.long().view(-1).to(self.labels.device)])

    @torch.no_grad()
    def solve(self) -> torch.Tensor:
        """``α = (K + λI)⁻¹ Y`` in float64 over every stored sample."""
        self.check_room()
        kernel = rbf_kernel(self.memory, self.memory, self.gamma)
        self.alpha = _spd_solve(kernel, _one_hot(self.labels, self.num_classes), self.lam)
        return self.alpha

    @torch.no_grad()
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Raw scores ``k(x̂, X_mem) α`` [N, num_classes], float32; columns added after the last solve are 0."""
        if self.alpha.shape[0] != self.memory.shape[0]:  # α belongs to an older memory: scores would be wrong
            raise RuntimeError(f"the dual head holds {self.memory.shape[0]} samples but α was solved on "
                               f"{self.alpha.shape[0]}; call solve() after add()")
        x = F.normalize(features.double(), dim=-1).to(self.memory.device)
        scores = rbf_kernel(x, self.memory, self.gamma) @ self.alpha
        pad = self.num_classes - scores.shape[1]
        return F.pad(scores, (0, pad)).float()
