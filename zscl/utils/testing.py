"""Test hooks compiled into the package: deterministic crash points for the crash-safety tests.

``ZSCL_KILL_AT`` makes the process SIGKILL itself, as a crash would (no exception handler,
``finally`` block or checkpoint write runs), at a chosen place instead of after a guessed delay:

* ``ZSCL_KILL_AT=T:K`` (two integers): ``zscl sequence`` dies right after the optimizer step that
  brings task ``T`` (0-based, the ``NN`` of ``tasks/NN-<Dataset>``) to global step ``K``
  (:func:`kill_callback`, attached by the runner only when the variable is set);
* ``ZSCL_KILL_AT=<name>``: :func:`kill_point` ``<name>`` dies there (``eval-cache-fill``: half-way
  through building the evaluation cache).

``ZSCL_PAUSE_AT=T:K`` (the signal tests) stops right after that step instead, touches
``$ZSCL_PAUSE_FILE.<rank>`` and waits until the process receives a signal (:mod:`zscl.utils.signals`
records it; at most 10 minutes), so that a test can send SIGTERM / SIGINT, or have SLURM send SIGUSR1,
at a known step instead of after a guessed delay.

Unset, nothing happens.
"""

from __future__ import annotations

import os
import re
import signal
from typing import Optional

from lightning.pytorch.callbacks import Callback

ENV = "ZSCL_KILL_AT"


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_point(name: str) -> None:
    """SIGKILL this process here if ``$ZSCL_KILL_AT`` is ``name`` (a no-op otherwise)."""
    if os.environ.get(ENV) == name:
        _die()


class KillAt(Callback):
    """SIGKILL this process at the end of the training batch that reaches global step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            _die()


class PauseAt(Callback):
    """At the end of the training batch that reaches global step ``step``: wait for a signal."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import time

        from zscl.utils import signals

        if trainer.global_step != self.step:
            return
        signals.install()
        marker = f"{os.environ.get('ZSCL_PAUSE_FILE', 'zscl-paused')}.{trainer.global_rank}"
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        deadline = time.monotonic() + 600
        while signals.received() is None and time.monotonic() < deadline:
            time.sleep(0.05)


def pause_callback(task: int) -> Optional[PauseAt]:
    """The PauseAt callback for task ``task`` if ``ZSCL_PAUSE_AT=T:K`` names it, else None."""
    match = re.fullmatch(r"(\d+):(\d+)", os.environ.get("ZSCL_PAUSE_AT", ""))
    return PauseAt(int(match[2])) if match and int(match[1]) == task else None


def kill_callback(task: int) -> Optional[KillAt]:
    """The KillAt callback for task ``task`` if ``ZSCL_KILL_AT=T:K`` names it, else None."""
    match = re.fullmatch(r"(\d+):(\d+)", os.environ.get(ENV, ""))
    return KillAt(int(match[2])) if match and int(match[1]) == task else None
