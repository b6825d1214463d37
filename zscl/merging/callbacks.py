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

Registered by name in :data:`AVERAGING_CALLBACKS`: ``we``, ``ema``, ``checkpoint_avg``, ``wise``, and the
paper's ablations ``we_wise`` and ``moving_avg``.
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

__all__ = ["AVERAGING_CALLBACKS", "CheckpointAveraging", "EMA", "MovingAverage", "UniformAveraging", "WeWiSE", "WiSEFT"]

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


class WeWiSE(UniformAveraging):
    """The weight ensemble blended with the task-start weights at every member (the paper's WE-WiSE
    ablation; the reference's ``--we_wise``, ``--we_wise_alpha`` 0.98): when θ joins,

    ``avg ← α · (avg + (θ − avg)/(n+1)) + (1 − α) · θ_start``,

    on the same steps as :class:`UniformAveraging`; the result is written into the student at the end.
    """

    def __init__(self, every: int = 100, alpha: float = 0.98) -> None:
        super().__init__(every)
        self.alpha = alpha

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every=self.every, alpha=self.alpha)

    def _add(self, pl_module: pl.LightningModule) -> None:
        super()._add(pl_module)
        start = self._reference(pl_module, "task_start")  # the module's anchors: also there after a resume
        torch._foreach_lerp_(self._avg, start, 1.0 - self.alpha)


class MovingAverage(_StudentAveraging):
    """The student pulled toward another model every ``every`` iterations (the paper's moving-average
    ablation; the reference's ``--moving_avg``, not an EMA kept beside the student):

    ``θ ← decay · θ + (1 − decay) · θ_target``, after the optimizer step of iteration k with k % every == 0
    (and once more at the end if N % every == 0, the reference's lr-0 iteration N), where θ_target is
    the task-start weights (``toward: task_start``, the reference's ``n``), the initial CLIP
    (``initial``, its ``zeroshot``) or the student's weights just before the previous pull (``previous``,
    its ``t``; the task-start weights before the first pull).
    """

    def __init__(self, decay: float = 0.999, every: int = 100,
                 toward: Literal["task_start", "initial", "previous"] = "task_start") -> None:
        if toward not in ("task_start", "initial", "previous") or every < 1:
            raise ValueError(f"moving_avg needs toward in task_start|initial|previous and every ≥ 1, got {toward!r}, {every}")
        self.decay, self.every, self.toward = decay, every, toward
        self._target: list[Tensor] | None = None
        self._last_step = -1

    @property
    def state_key(self) -> str:
        return self._generate_state_key(decay=self.decay, every=self.every, toward=self.toward)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._target is None:  # else restored from a checkpoint
            self._target = self._reference(pl_module, "initial" if self.toward == "initial" else "task_start")
        self._target = self._to_devices(self._target, pl_module)

    @torch.no_grad()
    def _pull(self, pl_module: pl.LightningModule) -> None:
        params = self._params(pl_module)
        before = [p.float().clone() for p in params] if self.toward == "previous" else None
        for p, t in zip(params, self._target):
            p.copy_(torch.lerp(p.float(), t, 1.0 - self.decay))
        if before is not None:
            self._target = before

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step != self._last_step and step > 0 and (step - 1) % self.every == 0:
            self._pull(pl_module)
            self._last_step = step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step > 0 and trainer.global_step % self.every == 0:
            self._pull(pl_module)
        self._target = None

    def state_dict(self) -> dict[str, Any]:
        target = None if self._target is None else [t.to("cpu", copy=True) for t in self._target]
        return {"target": target, "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._target, self._last_step = state_dict["target"], state_dict["last_step"]


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
AVERAGING_CALLBACKS.register("we_wise", WeWiSE)
AVERAGING_CALLBACKS.register("moving_avg", MovingAverage)
