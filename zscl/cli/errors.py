"""One place that turns the package's expected errors into a clear message and an exit code."""

from __future__ import annotations

import os
import re
import sys
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator


@dataclass
class Status:
    code: int = 0


@contextmanager
def report_errors(prog: str) -> Iterator[Status]:
    """Expected failures (bad names, missing files, mismatched checkpoints, NaN loss) print one line
    ``<prog>: <reason>`` on stderr and set the exit code (ZSCL_DEBUG=1 adds the traceback); anything
    else propagates with its traceback."""
    from zscl.methods.guards import NonFiniteLossError
    from zscl.registry import RegistryError
    from zscl.utils.signals import EXIT_INTERRUPTED, Interrupted

    status = Status()
    try:
        yield status
    except Interrupted as err:  # SIGTERM/SIGINT/SIGUSR1: checkpoint written; one line on how to resume
        if err.rank_zero:
            print(f"{prog}: {err}", file=sys.stderr, flush=True)
        status.code = EXIT_INTERRUPTED
    except NonFiniteLossError as err:
        _print(prog, err)
        status.code = 3
    except (RegistryError, OSError, ValueError) as err:
        # OSError: missing files, and unreadable images (zscl.datasets.badimages.UnreadableImageError)
        _print(prog, err)
        status.code = 2
    except (SyntaxError, EOFError, RuntimeError) as err:
        if not _WORKER.match(str(err)):
            raise
        _print(prog, err)  # decode errors of a DataLoader worker (PIL raises SyntaxError for broken PNGs)
        status.code = 2


# torch re-raises a worker's exception as "Caught <Type> in DataLoader worker process <n>.\nOriginal
# Traceback ...", the worker's whole traceback in the message; the user gets its last line.
_WORKER = re.compile(r"Caught \w+ in DataLoader worker process \d+")


def one_line(err: BaseException) -> str:
    """The message of ``err``; for a DataLoader worker's exception, the original exception's message."""
    text = str(err)
    if not _WORKER.match(text):
        return text
    last = [line for line in text.strip().splitlines() if line.strip()][-1].strip()
    return last.split(": ", 1)[1] if re.match(r"^[\w.]+: ", last) else last


def _print(prog: str, err: BaseException) -> None:
    if os.environ.get("ZSCL_DEBUG"):
        traceback.print_exception(err)
    print(f"{prog}: {one_line(err)}", file=sys.stderr)
