"""Class names and prompt templates, stored as data under the top-level ``data/`` folder.

Formats (UTF-8 JSON, one list of strings per file):

* ``data/classnames/<Dataset>.json`` -- class ``i`` of the dataset's labels is entry ``i``;
* ``data/templates/<Dataset>.json`` -- prompt templates with a ``{c}`` placeholder for the
  class name, e.g. ``"a photo of a {c}."``. The first template is the one ZSCL trains with;
  zero-shot evaluation averages over all of them.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from zscl.resources import data_dir

PLACEHOLDER = "{c}"


def fill_template(template: str, classname: str) -> str:
    """``template`` with every ``{c}`` replaced by ``classname`` (no str.format: names may hold braces)."""
    return template.replace(PLACEHOLDER, classname)


def check_templates(templates: Sequence[str], where: str) -> tuple[str, ...]:
    """Validate a template list (non-empty strings, each with ``{c}``) and return it as a tuple."""
    templates = check_strings(templates, where, "templates")
    bad = [t for t in templates if PLACEHOLDER not in t]
    if bad:
        raise ValueError(f"{where}: every template needs the {PLACEHOLDER} placeholder for the class name; got {bad!r}")
    return templates


def check_strings(values: Sequence[str], where: str, what: str) -> tuple[str, ...]:
    """Validate a non-empty list of non-empty strings and return it as a tuple."""
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise ValueError(f"{where}: {what} must be a list of strings, got {type(values).__name__}")
    if not values:
        raise ValueError(f"{where}: {what} must not be empty")
    bad = [v for v in values if not isinstance(v, str) or not v.strip()]
    if bad:
        raise ValueError(f"{where}: {what} must be non-empty strings; got {bad[:5]!r}")
    return tuple(values)


def _data_file(kind: str, name: str) -> Path:
    folder = data_dir() / kind
    path = folder / f"{name}.json"
    if path.is_file():
        return path
    # Tolerate case differences ("dtd" for DTD.json); the canonical spelling is the file's.
    matches = [p for p in folder.glob("*.json") if p.stem.lower() == name.lower()]
    if len(matches) == 1:
        return matches[0]
    available = ", ".join(sorted(p.stem for p in folder.glob("*.json")))
    raise FileNotFoundError(f"no {kind} file for {name!r}: expected {path}. Available: {available}")


@lru_cache(maxsize=None)
def _load(kind: str, name: str) -> tuple[str, ...]:
    path = _data_file(kind, name)
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); expected a list of strings") from err
    if kind == "templates":
        return check_templates(values, str(path))
    return check_strings(values, str(path), kind)


def load_templates(name: str) -> tuple[str, ...]:
    """Prompt templates of dataset ``name`` from ``data/templates/<name>.json``."""
    return _load("templates", name)


def load_classnames(name: str) -> tuple[str, ...]:
    """Class names of dataset ``name`` from ``data/classnames/<name>.json``, in label order."""
    return _load("classnames", name)
