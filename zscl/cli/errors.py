"""One place that turns the package's expected errors into a clear message and an exit code."""

from __future__ import annotations

import os
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

    status = Status()
    try:
        yield status
    except NonFiniteLossError as err:
        _print(prog, err)
        status.code = 3
    except (RegistryError, FileNotFoundError, ValueError) as err:
        _print(prog, err)
        status.code = 2


def _print(prog: str, err: BaseException) -> None:
    if os.environ.get("ZSCL_DEBUG"):
        traceback.print_exception(err)
    print(f"{prog}: {err}", file=sys.stderr)
