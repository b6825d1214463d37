"""Dataset views: a registered dataset restricted to some classes and/or some training images.

A view is itself a registered dataset (``<base>@<tag>``), so the runner, the DataModule, the
reference sources and evaluation use it like any other: no class-incremental or few-shot
branches anywhere else.

* ``classes``: the base labels kept, in the view's label order. View label ``j`` is base label
  ``classes[j]`` (the remapping is this list, nothing else); its class name is the base's name of
  ``classes[j]``. Class-incremental steps are views with the step's classes (cross-entropy over
  those prompts only) and the seen-so-far classes (evaluation).
* ``train_indices``: positions in the base *train* split kept (few-shot subsets); the test split
  is never subsampled.
* ``templates``: prompt templates replacing the base's (e.g. ZSCL's CIL prompt
  ``"a bad photo of a {c}."``, used for training and evaluation alike).
* ``label_space``: datasets (``base`` among them) whose classes, concatenated in this order, form the
  view's label space (X-TAIL's union of all domains). Dataset ``d`` owns the labels
  ``offset(d) .. offset(d) + C_d``, ``offset(d) = Σ_{e before d} C_e``; the base's image of label ``y``
  gets label ``offset(base) + y``. Each class keeps its own dataset's templates
  (``DatasetSpec.class_templates``), and a name found in two datasets keeps two labels.

The tag hashes the view's content, so two different views never share a name (nor an
evaluation cache entry); evaluation of a view slices the *base* dataset's cache.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from torch.utils.data import Dataset

from zscl.datasets.common import dataset_labels
from zscl.datasets.registry import DATASETS, DatasetSpec, get_dataset, register_dataset


@dataclass(frozen=True)
class DatasetView:
    """What a view keeps of ``base``; see the module docstring."""

    base: str
    classes: Optional[tuple[int, ...]] = None
    train_indices: Optional[tuple[int, ...]] = None
    templates: Optional[tuple[str, ...]] = None
    label_space: Optional[tuple[str, ...]] = None

    def __post_init__(self) -> None:
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(int(c) for c in self.classes))
            if len(set(self.classes)) != len(self.classes):
                raise ValueError(f"view of {self.base}: repeated classes in {list(self.classes)}")
        if self.train_indices is not None:
            object.__setattr__(self, "train_indices", tuple(int(i) for i in self.train_indices))
        if self.templates is not None:
            object.__setattr__(self, "templates", tuple(self.templates))
        if self.label_space is not None:
            self._check_label_space()

    def _check_label_space(self) -> None:
        space = tuple(get_dataset(d).name for d in self.label_space or ())
        object.__setattr__(self, "label_space", space)
        if len(set(space)) != len(space) or get_dataset(self.base).name not in space:
            raise ValueError(f"view of {self.base}: the label space {list(space)} must hold each dataset once, the base among them")
        if self.classes is not None or self.templates is not None:
            raise ValueError(f"view of {self.base}: a label space keeps every class with its own templates "
                             "(no classes/templates)")

    @property
    def offset(self) -> int:
        """The first label of the base's classes in the view (0 without a label space)."""
        if self.label_space is None:
            return 0
        base = get_dataset(self.base).name
        return sum(get_dataset(d).num_classes for d in self.label_space[: self.label_space.index(base)])

    @property
    def name(self) -> str:
        parts = [self.base, self.classes, self.train_indices, self.templates]
        content = json.dumps(parts + ([list(self.label_space)] if self.label_space is not None else []))
        digest = hashlib.sha1(content.encode()).hexdigest()[:10]
        kind = f"c{len(self.classes)}" if self.classes is not None else "all"
        kind = f"u{len(self.label_space)}" if self.label_space is not None else kind
        shots = f"-n{len(self.train_indices)}" if self.train_indices is not None else ""
        return f"{self.base}@{kind}{shots}-{digest}"

    def restrict(self, dataset: Dataset, split: str) -> Dataset:
        """``dataset`` (the base's ``split``) cut to this view, labels remapped to the view's."""
        labels = dataset_labels(dataset)
        positions: Sequence[int] = range(len(labels))
        if split == "train" and self.train_indices is not None:
            bad = [i for i in self.train_indices if not 0 <= i < len(labels)]
            if bad:
                raise ValueError(f"view of {self.base}: train indices {bad[:5]} outside 0..{len(labels) - 1}")
            positions = self.train_indices
        if self.classes is None:
            offset = self.offset  # once: the property walks the label space's registry entries
            return RemappedSubset(dataset, list(positions), [labels[i] + offset for i in positions])
        new_label = {c: j for j, c in enumerate(self.classes)}
        keep = [i for i in positions if labels[i] in new_label]
        return RemappedSubset(dataset, keep, [new_label[labels[i]] for i in keep])


class RemappedSubset(Dataset):
    """Items ``(dataset[indices[i]][0], labels[i])``; ``labels`` are known without decoding."""

    def __init__(self, dataset: Dataset, indices: list[int], labels: list[int]) -> None:
        self.dataset, self.indices, self.labels = dataset, indices, labels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.dataset[self.indices[i]][0], self.labels[i]


@dataclass(frozen=True)
class ViewSpec(DatasetSpec):
    """The registry entry of a view (a :class:`DatasetSpec` that remembers its view)."""

    view: Optional[DatasetView] = None


def _builder(view: DatasetView) -> Callable[[Path, str, Optional[Callable]], Dataset]:
    def build(root: Path, split: str, transform: Optional[Callable]) -> Dataset:
        from zscl.datasets.registry import build_dataset

        return view.restrict(build_dataset(view.base, root, split, transform), split)

    return build


def register_view(view: DatasetView) -> str:
    """Register ``view`` (idempotent) and return its dataset name."""
    name = view.name
    if name not in DATASETS:
        base = get_dataset(view.base)
        names = base.classnames if view.classes is None else tuple(base.classnames[c] for c in view.classes)
        per_class = None
        if view.label_space is not None:
            specs = [get_dataset(d) for d in view.label_space]
            names = tuple(c for s in specs for c in s.classnames)
            per_class = tuple(s.templates for s in specs for _ in s.classnames)
        register_dataset(ViewSpec(name, names, view.templates or base.templates, _builder(view), base.layout,
                                  class_templates=per_class, view=view))
    return name


def class_sources(name: str) -> list[tuple[str, int]]:
    """For each label of dataset ``name``, the ``(dataset, label)`` of an ordinary dataset it is.

    An ordinary dataset's label ``y`` is ``(name, y)``; a class view's label ``j`` is ``(base, classes[j])``;
    a label-space view's label ``offset(d) + y`` is ``(d, y)``. A method that keeps state per class
    (RAIL's ridge head) finds a class again under any view this way.
    """
    spec = get_dataset(name)
    view = getattr(spec, "view", None)
    if view is None:
        return [(spec.name, y) for y in range(spec.num_classes)]
    if view.label_space is not None:
        return [(d, y) for d in view.label_space for y in range(get_dataset(d).num_classes)]
    base = get_dataset(view.base).name
    classes = view.classes if view.classes is not None else range(get_dataset(base).num_classes)
    return [(base, int(c)) for c in classes]


def view_of(name: str) -> Optional[DatasetView]:
    """The view behind dataset ``name``, or None for an ordinary dataset."""
    return getattr(get_dataset(name), "view", None)


def load_class_order(order: "str | Sequence[int]", num_classes: int) -> list[int]:
    """A class order: a list, or the name of ``data/class_orders/<name>.json``; checked to be a
    permutation of ``0..num_classes-1``."""
    from zscl.resources import data_dir

    if isinstance(order, str):
        path = data_dir() / "class_orders" / f"{order}.json"
        if not path.is_file():
            shipped = sorted(p.stem for p in path.parent.glob("*.json"))
            raise FileNotFoundError(f"no class order {order!r}; shipped: {', '.join(shipped)}")
        order = json.loads(path.read_text(encoding="utf-8"))
    values = [int(c) for c in order]
    if sorted(values) != list(range(num_classes)):
        raise ValueError(f"a class order must be a permutation of 0..{num_classes - 1}; got {len(values)} entries "
                         f"({len(set(values))} distinct)")
    return values


def few_shot_indices(labels: Sequence[int], shots: int, seed: int) -> list[int]:
    """``shots`` positions per class (all of a class's positions if it has fewer), ascending.

    Within a class, positions are ranked by ``blake2b(seed, label, position)``: a pure function
    of the labels and the seed, the same on every machine, Python, torch version and DDP rank.
    """
    if shots < 1:
        raise ValueError(f"few-shot needs shots >= 1, got {shots}")
    return sorted(i for items in ranked_by_class(labels, f"{seed},").values() for i in items[:shots])


def ranked_by_class(labels: Sequence[int], salt: str) -> dict[int, list[int]]:
    """Each class's positions, ranked by ``blake2b(salt + "label,position")``: a seeded per-class order that is a
    pure function of the labels and the salt (the same on every machine, Python, torch version and rank).
    Few-shot draws (:func:`few_shot_indices`) and DIKI's hold-out take a prefix of each class's ranking."""
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)

    def rank(y: int, i: int) -> bytes:
        return hashlib.blake2b(f"{salt}{y},{i}".encode(), digest_size=8).digest()

    return {y: sorted(items, key=lambda i: rank(y, i)) for y, items in by_class.items()}
