"""The dataset registry: name -> :class:`DatasetSpec` (class names, prompt templates, builder).

Built-in entries (the MTIL datasets, CIFAR10, ImageNet, TinyImageNet) and plugins' (:mod:`zscl.plugins`: the synthetic tasks) are registered
on first lookup; user datasets come from config through :func:`zscl.datasets.register_custom`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

from torch.utils.data import Dataset

from zscl.datasets.common import DatasetNotFoundError, dataset_labels
from zscl.datasets.text import check_strings, check_templates, fill_template, load_classnames, load_templates
from zscl.registry import Registry

__all__ = [
    "DATASETS",
    "Builder",
    "DatasetNotFoundError",
    "DatasetSpec",
    "build_dataset",
    "dataset_labels",
    "get_dataset",
    "load_classnames",
    "load_templates",
    "register_dataset",
]

Builder = Callable[[Path, str, Optional[Callable]], Dataset]
"""``builder(data_root, split, transform) -> Dataset`` of ``(transform(RGB image), label)``."""

# Modules holding built-in datasets. Each is imported on first registry use; if it defines
# ``register_datasets()``, that is called (registration reads data files, so it is not done at import).
BUILTIN_MODULES = ("zscl.datasets.mtil", "zscl.datasets.tinyimagenet")


@dataclass(frozen=True)
class DatasetSpec:
    """Everything zscl knows about one classification dataset."""

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    builder: Builder
    layout: str  # expected files under the data root, "<root>" standing for it (used in errors)
    #: per class, the templates that prompt it (replacing ``templates`` for that class); None: every class
    #: uses ``templates``. A label space made of several datasets (X-TAIL's union) prompts each class
    #: with its own dataset's templates.
    class_templates: Optional[tuple[tuple[str, ...], ...]] = None

    def __post_init__(self) -> None:
        if not self.name or not self.name.strip():
            raise ValueError("a DatasetSpec needs a non-empty name")
        where = f"dataset {self.name!r}"
        object.__setattr__(self, "classnames", check_strings(self.classnames, where, "classnames"))
        object.__setattr__(self, "templates", check_templates(self.templates, where))
        if self.class_templates is not None:
            per_class = tuple(check_templates(t, where) for t in self.class_templates)
            if len(per_class) != len(self.classnames):
                raise ValueError(f"{where}: {len(per_class)} class template lists for {len(self.classnames)} classes")
            object.__setattr__(self, "class_templates", per_class)
        if not callable(self.builder):
            raise TypeError(f"{where}: builder must be callable (data_root, split, transform) -> Dataset")

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def train_template(self) -> str:
        """The template ZSCL trains with: the first one."""
        return self.templates[0]

    def templates_of(self, label: int) -> tuple[str, ...]:
        """The templates that prompt class ``label`` (its own, else the dataset's)."""
        return self.class_templates[label] if self.class_templates is not None else self.templates

    def prompts(self, template: str | None = None) -> list[str]:
        """``template`` (default: the training template) filled with every class name, in label order."""
        if template is None and self.class_templates is not None:  # each class's own first template
            return [fill_template(self.class_templates[j][0], c) for j, c in enumerate(self.classnames)]
        template = self.train_template if template is None else template
        return [fill_template(template, c) for c in self.classnames]


def _load_builtins() -> None:
    for module_name in BUILTIN_MODULES:
        module = importlib.import_module(module_name)
        register = getattr(module, "register_datasets", None)
        if callable(register):
            register()
    from zscl.plugins import load_plugins  # plugins' datasets (the synthetic world's tasks, users' packages)

    load_plugins()


DATASETS: Registry[DatasetSpec] = Registry("dataset", loader=_load_builtins)


def register_dataset(spec: DatasetSpec, *, overwrite: bool = False) -> DatasetSpec:
    """Add ``spec`` to :data:`DATASETS` under ``spec.name``."""
    DATASETS.names()  # built-ins first, so a user entry never collides with them later
    return DATASETS.register(spec.name, spec, overwrite=overwrite)


def get_dataset(name: str) -> DatasetSpec:
    """The spec registered as ``name`` (case-insensitive); RegistryError with suggestions otherwise."""
    return DATASETS.get(name)


def build_dataset(
    name: str,
    root: str | Path,
    split: Literal["train", "test"],
    transform: Callable | None = None,
) -> Dataset:
    """The ``split`` of dataset ``name`` found under ``root``; items ``(transform(RGB image), label)``.

    Raises DatasetNotFoundError (a FileNotFoundError) naming the dataset, ``root`` and the
    expected on-disk layout when files are missing.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    spec = get_dataset(name)
    root = Path(root).expanduser()
    try:
        return spec.builder(root, split, transform)
    except DatasetNotFoundError:
        raise
    except FileNotFoundError as err:
        layout = spec.layout.replace("<root>", str(root))
        raise DatasetNotFoundError(f"{spec.name} not found under {root}: expected {layout} ({err})") from err
