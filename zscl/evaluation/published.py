"""The published results shipped with zscl (``data/published/<benchmark>.json``) and how runs are matched to them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from zscl.evaluation.metrics import AccuracyMatrix


class CompareError(ValueError):
    """Runs that cannot be compared, or a run/published table that cannot be read."""


class Delta(float):
    """A float printed with its sign (ours − published)."""


def published_names() -> list[str]:
    from zscl.resources import data_dir

    return sorted(p.stem for p in (data_dir() / "published").glob("*.json"))


def load_published(name: str) -> dict[str, Any]:
    """A shipped published table by benchmark name, or a JSON file of the same format."""
    from zscl.resources import data_dir

    path = Path(name) if name.endswith(".json") else data_dir() / "published" / f"{name}.json"
    if not path.is_file():
        raise CompareError(f"no published table {name!r}; shipped: {', '.join(published_names())}, or a JSON file")
    return json.loads(path.read_text(encoding="utf-8"))


def published_row(table: dict[str, Any], label: str, config: Optional[dict[str, Any]] = None,
                  check_recipe: bool = False) -> Optional[dict[str, Any]]:
    """The published entry whose config name or method name matches ``label`` (case-insensitive).

    With ``check_recipe``, an entry that names a ``recipe`` (dotted config keys -> values, e.g. MoE-Adapters'
    own class-incremental set-up) matches only a run whose resolved ``config`` has every one of them.
    """
    key = label.lower()
    for entry in table["results"]:
        if key in (str(entry.get("config", "")).lower(), str(entry["method"]).lower()):
            if check_recipe and recipe_mismatches(entry, config):
                return None
            return entry
    return None


def recipe_mismatches(entry: dict[str, Any], config: Optional[dict[str, Any]]) -> list[str]:
    """``key = ours (published: theirs)`` for every recipe key of ``entry`` the run's config does not share."""
    out = []
    for dotted, expected in (entry.get("recipe") or {}).items():
        value: Any = config or {}
        for part in dotted.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value != expected:
            out.append(f"{dotted} = {value} (published: {expected})")
    return out


def entry_notes(entry: Optional[dict[str, Any]]) -> list[str]:
    """A published entry's footnote, printed wherever the row is shown: its ``note`` (a row at chance, other
    test splits) and ``source``."""
    parts = [p for p in ((entry or {}).get("note"), (entry or {}).get("source") and f"source: {entry['source']}") if p]
    return [f"{entry['method']}: " + "; ".join(parts)] if parts else []


def published_matrix(entry: dict[str, Any], table: dict[str, Any]) -> Optional[AccuracyMatrix]:
    if entry.get("accuracy") is None:
        return None
    zs = table.get("zero_shot_clip")
    return AccuracyMatrix(entry["datasets"], entry["accuracy"], zs)
