"""Where the package's data files live.

The repository's top-level ``data/`` (prompt templates, class names) and ``configs/``
(method, task and benchmark configs) are the single source of truth. A built wheel carries
them as ``zscl/_data`` and ``zscl/_configs``; an editable install or a source checkout reads
them in place.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


@lru_cache(maxsize=None)
def _resource_dir(kind: str) -> Path:
    for candidate in (_PACKAGE / f"_{kind}", _PACKAGE.parent / kind):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"zscl's {kind}/ folder is missing: looked in {_PACKAGE / ('_' + kind)} and {_PACKAGE.parent / kind}. "
        "Reinstall the package (pip install -e . from the repository root)."
    )


def data_dir() -> Path:
    """The folder holding ``templates/`` and ``classnames/``."""
    return _resource_dir("data")


def configs_dir() -> Path:
    """The folder holding ``method/``, ``task/`` and ``benchmark/`` YAML configs."""
    return _resource_dir("configs")
