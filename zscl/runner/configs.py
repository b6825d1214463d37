"""Configs as data: method, task and benchmark YAML files, found by name or path.

``configs/method/*.yaml``, ``configs/task/*.yaml`` and ``configs/benchmark/*.yaml`` are the
registries of methods, tasks and benchmarks (the way open_clip's JSON model configs are its
model registry). A ``--config`` value may be a path, or a name such as ``method/zscl`` or
``configs/method/zscl.yaml`` that resolves inside the installed package's configs folder, so
the README's commands work from any directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from zscl.registry import Registry
from zscl.resources import configs_dir
from zscl.settings.cil import ClassSteps
from zscl.settings.few_shot import FewShot
from zscl.settings.xtail import XTail

KINDS = ("method", "task", "benchmark")


def _scan(kind: str) -> Registry[Path]:
    reg: Registry[Path] = Registry(f"{kind} config")
    for path in sorted((configs_dir() / kind).glob("*.yaml")):
        reg.register(path.stem, path)
    return reg


def config_registry(kind: str) -> Registry[Path]:
    """Name -> YAML path for one kind of config (``method``, ``task`` or ``benchmark``)."""
    if kind not in KINDS:
        raise ValueError(f"config kind must be one of {KINDS}, got {kind!r}")
    return _scan(kind)


def resolve_config_path(value: str) -> str:
    """A config path as given if it exists, else the packaged config it names."""
    path = Path(value).expanduser()
    if path.exists():
        return str(path)
    rel = Path(*path.parts[1:]) if path.parts[:1] == ("configs",) else path
    for candidate in (configs_dir() / rel, (configs_dir() / rel).with_suffix(".yaml")):
        if candidate.is_file():
            return str(candidate)
    if len(rel.parts) == 2 and rel.parts[0] in KINDS:  # e.g. method/zsc -> suggestions
        config_registry(rel.parts[0]).get(rel.stem)
    raise FileNotFoundError(f"config {value!r} not found (neither a file nor one of {configs_dir()}/<kind>/<name>.yaml)")


def _config_values(argv: list[str]) -> list[tuple[int, str]]:
    """``(position of the value, value)`` of every ``--config``/``-c`` in an already resolved argv."""
    out = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            out.append((i + 1, argv[i + 1]))
        elif arg.startswith("--config="):
            out.append((i, arg.split("=", 1)[1]))
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    return data if isinstance(data, dict) else {}


def method_name(path: Union[str, Path]) -> Optional[str]:
    """The ``name:`` a method config declares (configs without one: None)."""
    name = _read_yaml(Path(path)).get("name")
    return str(name) if name else None


def with_method_overrides(argv: list[str]) -> list[str]:
    """Insert the benchmark's ``method_overrides`` for the run's method right after its method config.

    Why here (and not in the runner): as a config of its own, placed after the method's config,
    the overlay beats the method's defaults (ZSCL's KD weight 1 becomes 5 in class-incremental benchmarks) while any later
    ``--config`` or command-line key still beats the overlay, as users expect. The method is the
    last config that declares a top-level ``name:`` (every method config does, so a user's copy of
    ``zscl.yaml`` anywhere on disk keeps the benchmark's settings for ``zscl``).
    """
    configs = _config_values(argv)
    overrides: dict[str, Any] = {}
    for _, value in configs:
        bench = _read_yaml(Path(value)).get("benchmark")
        overrides.update((bench or {}).get("method_overrides") or {})
    methods = [(pos, method_name(v)) for pos, v in configs if method_name(v)]
    if not methods or methods[-1][1] not in overrides:
        return list(argv)
    pos = methods[-1][0] + 1
    return argv[:pos] + ["--config", yaml.safe_dump(overrides[methods[-1][1]], sort_keys=False)] + argv[pos:]


def resolve_config_args(argv: list[str]) -> list[str]:
    """Rewrite every ``--config X`` / ``--config=X`` / ``-c X`` so that X is an existing file."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "-c") and i + 1 < len(argv):
            out += [arg, resolve_config_path(argv[i + 1])]
            i += 2
            continue
        if arg.startswith("--config="):
            arg = "--config=" + resolve_config_path(arg.split("=", 1)[1])
        out.append(arg)
        i += 1
    return out


@dataclass
class Benchmark:
    """A continual sequence: tasks in order, and the datasets evaluated after each task.

    ``tasks`` entries are task-config names (``configs/task/<name>.yaml``) or inline overlays
    such as ``{dataset: SynthShape, lr: 1.0e-4, steps: 200}``.

    * ``setting``: the protocol (:data:`zscl.settings.SETTINGS`); default: the one whose section is set
      (``classes``, ``few_shot``: see each setting's ``config_key``), else ``mtil``;
    * ``classes``: a class-incremental benchmark instead (tasks are generated, one per step);
    * ``few_shot``: train every task on a per-class subset of its training images;
    * ``xtail``: X-TAIL (few- or full-shot training, every domain classified among all domains' classes);
    * ``method_overrides``: per method ``name:``, settings the benchmark imposes on that method
      (e.g. ZSCL's KD weights and WE period in class-incremental learning); they apply right after
      the method's own config, before any later config or command-line key
      (:func:`with_method_overrides`).
    """

    name: str = "custom"
    setting: Optional[str] = None
    tasks: list[Union[str, dict[str, Any]]] = field(default_factory=list)
    eval_datasets: Optional[list[str]] = None
    classes: Optional[ClassSteps] = None
    few_shot: Optional[FewShot] = None
    xtail: Optional[XTail] = None
    method_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)


def task_overlay(task: Union[str, dict[str, Any]]) -> dict[str, Any]:
    """The config overlay of one task: ``{"data": {...}, "model": {...}, "trainer": {...}}``."""
    if isinstance(task, str):
        with open(config_registry("task").get(task), encoding="utf-8") as f:
            return yaml.safe_load(f) or {}
    inline = dict(task)
    if "dataset" not in inline:
        raise ValueError(f"an inline task needs a 'dataset', got {task}")
    overlay: dict[str, Any] = {"data": {"dataset": inline.pop("dataset")}}
    if "lr" in inline:
        overlay["model"] = {"lr": float(inline.pop("lr"))}
    if "steps" in inline:
        overlay["trainer"] = {"max_steps": int(inline.pop("steps"))}
    if inline:
        raise ValueError(f"unknown keys in inline task {task}: {sorted(inline)} (allowed: dataset, lr, steps)")
    return overlay


def task_dataset(task: Union[str, dict[str, Any]]) -> str:
    data = task_overlay(task).get("data", {})
    if "dataset" not in data:
        raise ValueError(f"task {task!r} does not set data.dataset")
    return data["dataset"]
