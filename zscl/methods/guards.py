"""Stops a run on a non-finite loss without a per-step host sync, keeping the last good checkpoint."""

from __future__ import annotations

import lightning as L


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class FiniteLossGuard(L.Callback):
    """Checks the module's ``_nonfinite`` flag every ``every`` steps and at the end of training.

    The flag is OR-ed on the device every step (no sync); reading it costs one host sync, so it
    is read only every ``every`` steps. Lightning runs checkpoint callbacks after all others, so a
    check on a checkpointing step happens before the checkpoint is written: a NaN model is never
    saved over the last good checkpoint.
    """

    def __init__(self, every: int = 50) -> None:
        self.every = max(int(every), 1)

    def _check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if bool(pl_module._nonfinite):
            raise NonFiniteLossError(
                f"the training loss became NaN/inf before step {trainer.global_step}; stopping. "
                "The last good checkpoint is kept; lower the learning rate or check the data."
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:
            self._check(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._check(trainer, pl_module)
