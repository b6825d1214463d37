"""Lightning callbacks that average the student CLIP's weights during a task.

Contract with the LightningModule: the student is ``pl_module.clip`` (an open_clip model) and
``pl_module.reference_weights(kind)`` with kind ``"initial"`` or ``"task_start"`` returns fp32
parameter tensors by name. Callbacks average the student's PARAMETERS only: never buffers
(open_clip's text ``attn_mask`` holds −inf; averaging it gives NaN) and never a teacher.

Every callback writes its result into ``pl_module.clip``'s parameters at ``on_train_end``, so
evaluation and export after ``fit`` see it, and saves its running state in Lightning
checkpoints (``state_dict``/``load_state_dict``) so that a resumed run ends bit-identical to an
uninterrupted one. Running averages stay on the parameters' device in fp32; under DDP every
rank holds identical parameters, so averaging locally keeps the ranks identical.

Registered by name in :data:`AVERAGING_CALLBACKS`: ``we``, ``ema``, ``checkpoint_avg``, ``wise``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from zscl.merging.base import merge
from zscl.merging.running import ema_update_, uniform_update_
from zscl.registry import Registry

ReferenceKind = Literal["initial", "task_start"]

__all__ = ["AVERAGING_CALLBACKS", "CheckpointAveraging", "EMA", "UniformAveraging", "WiSEFT"]

AVERAGING_CALLBACKS: Registry[type[Callback]] = Registry("averaging callback")


class _StudentAveraging(Callback):
    """Plumbing shared by the callbacks: the student's parameters, reference weights, write-back."""

    @staticmethod
    def _named_params(pl_module: pl.LightningModule) -> list[tuple[str, torch.nn.Parameter]]:
        return list(pl_module.clip.named_parameters())

    def _params(self, pl_module: pl.LightningModule) -> list[Tensor]:
        return [p.detach() for _, p in self._named_params(pl_module)]

    def _reference(self, pl_module: pl.LightningModule, kind: ReferenceKind) -> list[Tensor]:
        """fp32 copies of the reference weights, on each parameter's device, in parameter order."""
        ref = pl_module.reference_weights(kind)
        named = self._named_params(pl_module)
        missing = [n for n, _ in named if n not in ref]
        if missing:
            raise KeyError(f"reference_weights({kind!r}) lacks parameters of pl_module.clip, e.g. {missing[:3]}")
        return [ref[n].detach().to(p.device, torch.float32, copy=True) for n, p in named]

    @torch.no_grad()
    def _write_back(self, pl_module: pl.LightningModule, tensors: Sequence[Tensor]) -> None:
        for (_, p), t in zip(self._named_params(pl_module), tensors):
            p.copy_(t)

    @staticmethod
    def _to_devices(tensors: Sequence[Tensor], pl_module: pl.LightningModule) -> list[Tensor]:
        return [t.to(p.device) for t, p in zip(tensors, pl_module.clip.parameters())]


class _RunningAverage(_StudentAveraging):
    """A running fp32 average that starts from the task-start weights; subclasses define ``_update``."""

    def __init__(self) -> None:
        self._avg: list[Tensor] | None = None
        self._count = 0  # members in the average (the task-start weights count as one)
        self._last_step = -1  # global step of the last update (guards gradient accumulation)
        self._restored = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._restored and self._avg is not None:  # resumed from a checkpoint: keep its state
            self._avg = self._to_devices(self._avg, pl_module)
        else:
            self._avg, self._count, self._last_step = self._reference(pl_module, "task_start"), 1, -1
        self._restored = False

    def _step_due(self, trainer: pl.Trainer) -> int | None:
        """The global step if an optimizer step happened since the last update, else None."""
        step = trainer.global_step
        return None if step == self._last_step or step == 0 else step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._avg is not None:
            self._write_back(pl_module, self._avg)

    def state_dict(self) -> dict[str, Any]:
        # CPU copies: a checkpoint written asynchronously must not see later in-place updates.
        avg = None if self._avg is None else [t.to("cpu", copy=True) for t in self._avg]
        return {"avg": avg, "count": self._count, "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._avg, self._count, self._last_step = state_dict["avg"], state_dict["count"], state_dict["last_step"]
        self._restored = True


class UniformAveraging(_RunningAverage):
    """ZSCL's weight ensemble (WE): a uniform average of the weights every ``every`` steps.

    The average starts as the task-start weights (one member). After the optimizer step of
    iteration k (0-based, k = global_step − 1) with k % every == 0 the current weights join:
    avg ← avg + (θ − avg)/(n+1). The reference loop runs iterations 0..N (N = max_steps) and
    its iteration N has learning rate 0, so we run N steps and, at train end, add the final
    weights once more if N % every == 0. Closed form:
    avg = mean(θ_start, θ_0, θ_every, θ_2·every, ..., [θ_final if N % every == 0]),
    with θ_k the weights after iteration k.
    """

    def __init__(self, every: int = 100) -> None:
        super().__init__()
        if every < 1:
            raise ValueError(f"every must be ≥ 1 step, got {every}")
        self.every = every

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every=self.every)

    def _add(self, pl_module: pl.LightningModule) -> None:
        uniform_update_(self._avg, self._params(pl_module), self._count)
        self._count += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = self._step_due(trainer)
        if step is not None and (step - 1) % self.every == 0:
            self._add(pl_module)
            self._last_step = step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The reference's lr-0 iteration N (a no-op on the weights) is one more member.
        if self._avg is not None and trainer.global_step > 0 and trainer.global_step % self.every == 0:
            self._add(pl_module)
        super().on_train_end(trainer, pl_module)


class EMA(_RunningAverage):
    """Exponential moving average θ_ema ← β θ_ema + (1−β) θ after every ``every``-th optimizer step
    (global_step % every == 0), starting from the task-start weights."""

    def __init__(self, decay: float = 0.999, every: int = 1) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0 or every < 1:
            raise ValueError(f"EMA needs 0 ≤ decay ≤ 1 and every ≥ 1, got decay={decay}, every={every}")
        self.decay, self.every = decay, every

    @property
    def state_key(self) -> str:
        return self._generate_state_key(decay=self.decay, every=self.every)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = self._step_due(trainer)
        if step is not None and step % self.every == 0:
            ema_update_(self._avg, self._params(pl_module), self.decay)
            self._count += 1
            self._last_step = step


class CheckpointAveraging(_StudentAveraging):
    """Average of snapshots taken every ``every`` optimizer steps (the last ``last_k`` kept).

    Snapshots are CPU copies of the parameters, each with its step and its batch's training
    loss (read with ``.item()`` at snapshot time only). At train end they are averaged
    uniformly, or with metrics-weighted averaging (:func:`zscl.merging.mwa.mwa_weights`):
    ``weighting="loss"`` gives wi ∝ loss_i^(−p), ``"step"`` gives wi ∝ step_i^p, p = ``penalty``.
    """

    def __init__(
        self,
        every: int,
        last_k: int | None = None,
        weighting: Literal["uniform", "loss", "step"] = "uniform",
        penalty: float = 1.0,
    ) -> None:
        if every < 1 or (last_k is not None and last_k < 1):
            raise ValueError(f"CheckpointAveraging needs every ≥ 1 and last_k ≥ 1 (or None), got {every}, {last_k}")
        if weighting not in ("uniform", "loss", "step"):
            raise ValueError(f"weighting must be 'uniform', 'loss' or 'step', got {weighting!r}")
        self.every, self.last_k, self.weighting, self.penalty = every, last_k, weighting, penalty
        self._snapshots: list[dict[str, Any]] = []
        self._restored = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every=self.every, last_k=self.last_k, weighting=self.weighting)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._restored:
            self._snapshots = []
        self._restored = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        taken = self._snapshots[-1]["step"] if self._snapshots else 0
        if step == 0 or step == taken or step % self.every:
            return
        weights = [p.to("cpu", copy=True) for p in self._params(pl_module)]
        self._snapshots.append({"step": step, "loss": _loss_value(outputs), "weights": weights})
        if self.last_k is not None:
            del self._snapshots[: -self.last_k]

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._snapshots:
            warnings.warn(f"CheckpointAveraging: no snapshot in {trainer.global_step} steps (every={self.every}); "
                          "the weights are left as trained", stacklevel=2)
            return
        names = [n for n, _ in self._named_params(pl_module)]
        members = [dict(zip(names, s["weights"])) for s in self._snapshots]
        if self.weighting == "uniform":
            merged = merge("average", None, members)
        else:
            metrics = [s[self.weighting] for s in self._snapshots]
            if not all(math.isfinite(m) for m in metrics):
                raise ValueError(f"CheckpointAveraging(weighting={self.weighting!r}) needs a finite training loss "
                                 f"per snapshot (the training step must return the loss), got {metrics}")
            merged = merge("mwa", None, members, metrics=metrics, metric_kind=self.weighting, penalty=self.penalty)
        self._write_back(pl_module, [merged[n] for n in names])

    def state_dict(self) -> dict[str, Any]:
        return {"snapshots": list(self._snapshots)}  # a copy: later snapshots must not leak into it

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._snapshots = list(state_dict["snapshots"])
        self._restored = True


def _loss_value(outputs: Any) -> float:
    """The training loss from ``training_step``'s output (a tensor or a dict with ``"loss"``)."""
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    return float(loss.detach().item()) if isinstance(loss, Tensor) else math.nan


class WiSEFT(_StudentAveraging):
    """At train end, θ ← (1−α) θ_ref + α θ (WiSE-FT, Wortsman et al. 2022), θ_ref the initial
    pretrained weights (``reference="initial"``) or the task-start weights."""

    def __init__(self, alpha: float = 0.5, reference: ReferenceKind = "initial") -> None:
        if reference not in ("initial", "task_start"):
            raise ValueError(f"reference must be 'initial' or 'task_start', got {reference!r}")
        self.alpha, self.reference = alpha, reference

    @property
    def state_key(self) -> str:
        return self._generate_state_key(alpha=self.alpha, reference=self.reference)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        names = [n for n, _ in self._named_params(pl_module)]
        ref = dict(zip(names, self._reference(pl_module, self.reference)))
        merged = merge("wise", ref, [dict(zip(names, self._params(pl_module)))], alpha=self.alpha)
        self._write_back(pl_module, [merged[n] for n in names])


AVERAGING_CALLBACKS.register("we", UniformAveraging)
AVERAGING_CALLBACKS.register("ema", EMA)
AVERAGING_CALLBACKS.register("checkpoint_avg", CheckpointAveraging)
AVERAGING_CALLBACKS.register("wise", WiSEFT)
