"""A test hook: die by SIGKILL at a chosen step of a chosen task, as a crash would.

``ZSCL_TEST_KILL_AT="T:K"`` makes ``zscl sequence`` kill itself with SIGKILL right after the
optimizer step that brings task ``T`` (0-based, the ``NN`` of ``tasks/NN-<Dataset>``) to global
step ``K``: no exception handler, ``finally`` block or checkpoint write runs. The resume tests use
it to stop a run at an exact point instead of on a timer. Unset, nothing is attached.
"""

from __future__ import annotations

import os
import signal
from typing import Optional

from lightning.pytorch.callbacks import Callback

ENV = "ZSCL_TEST_KILL_AT"


class KillAt(Callback):
    """SIGKILL this process at the end of the training batch that reaches global step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def kill_callback(task: int) -> Optional[KillAt]:
    """The KillAt callback for task ``task`` if ``ZSCL_TEST_KILL_AT`` names it, else None."""
    value = os.environ.get(ENV)
    if not value:
        return None
    try:
        t, k = (int(part) for part in value.split(":"))
    except ValueError:
        raise ValueError(f"{ENV} must be 'TASK:STEP' (two integers), got {value!r}") from None
    return KillAt(k) if t == task else None
