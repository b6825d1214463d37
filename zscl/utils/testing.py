"""Test hooks compiled into the package: named points where a crash-safety test kills the process.

``ZSCL_KILL_AT=<name>`` makes :func:`kill_point` ``<name>`` send SIGKILL to its own process, so a
test interrupts a build or a run at a chosen place rather than after a guessed delay.
"""

from __future__ import annotations

import os
import signal


def kill_point(name: str) -> None:
    """SIGKILL this process here if ``$ZSCL_KILL_AT`` is ``name`` (a no-op otherwise)."""
    if os.environ.get("ZSCL_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
