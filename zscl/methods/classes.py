"""Which LightningModule a method config trains: the top-level ``model_class`` key.

``model_class`` names a registered class (``continual_clip``, the default, for finetune / ZSCL /
ablations / merging; ``moe_adapters`` for MoE-Adapters, ``diki`` for DIKI, ``rail`` for RAIL) or a dotted path ``package.module.Class``.
The CLIs build their ``model:`` schema from that class, so every config without the key (and
every ``--model.*`` override) keeps working exactly as before. Because the schema depends on the
class, the key is read from the command line and the ``--config`` files *before* parsing
(:func:`model_class_from_args`); the last occurrence wins, as in jsonargparse.
"""

from __future__ import annotations

import importlib
from typing import Any, Optional

import yaml

from zscl.plugins import load_plugins
from zscl.registry import Registry

DEFAULT = "continual_clip"
MODEL_CLASSES: Registry[str] = Registry("model class", loader=load_plugins)  # + plugins' methods
MODEL_CLASSES.register("continual_clip", "zscl.methods.module.ContinualCLIP")
MODEL_CLASSES.register("moe_adapters", "zscl.moe.module.MoEAdapterCLIP")
MODEL_CLASSES.register("diki", "zscl.diki.module.DIKICLIP")
MODEL_CLASSES.register("rail", "zscl.rail.module.RAILCLIP")


def model_class(name: str = DEFAULT) -> type:
    """The LightningModule class of a registered name or a dotted path."""
    path = MODEL_CLASSES.get(name) if "." not in name else name
    module, _, attr = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"model_class {name!r}: cannot import {path} ({err}); a method from your own package "
                         "must be importable (installed, or on PYTHONPATH)") from err
    from zscl.methods.base import CLIPMethod

    if not (isinstance(cls, type) and issubclass(cls, CLIPMethod)):
        raise ValueError(f"model_class {name!r}: {path} is not a zscl.methods.CLIPMethod subclass "
                         "(see docs/ADDING_A_METHOD.md)")
    return cls


def model_class_from_args(argv: list[str]) -> str:
    """The ``model_class`` chosen by ``--config`` files (read in order) and ``--model_class`` flags."""
    name, i = DEFAULT, 0
    flags = ("--config", "-c", "--model_class")
    while i < len(argv):
        key, value = argv[i], None
        if key.startswith("--") and "=" in key:
            key, value = key.split("=", 1)
            i += 1
        elif key in flags and i + 1 < len(argv):
            value = argv[i + 1]
            i += 2
        else:
            i += 1
        if value is None:
            continue
        if key in ("--config", "-c"):
            name = _from_config(value) or name
        elif key == "--model_class":
            name = value
    return name


def _from_config(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError:
        return None  # the parser reports missing files itself
    return data.get("model_class") if isinstance(data, dict) else None


def method_of_export(path: str) -> type:
    """The class that wrote an export: its metadata, else a registered class whose sidecar lies beside it,
    else the plain fine-tuning class (any open_clip checkpoint)."""
    from pathlib import Path

    from zscl.methods.base import METHOD_KEY, export_metadata

    named = export_metadata(path).get(METHOD_KEY)
    if named:
        return model_class(named)
    stem = str(path)[: -len(".safetensors")] if str(path).endswith(".safetensors") else None
    for name in MODEL_CLASSES.names():
        cls = model_class(name)
        if stem and any(Path(stem + s).exists() for s in cls.sidecar_suffixes):
            return cls
    return model_class(DEFAULT)


def load_export(path: str, clip: Optional[str] = None) -> Any:
    """Any method's model rebuilt from its export (``zscl eval``), in eval mode."""
    return method_of_export(path).load_export(path, clip=clip)
