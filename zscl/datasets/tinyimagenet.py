"""TinyImageNet-200 (Le & Yang, 2015), the class-incremental benchmark of ZSCL's ``cil/`` code.

Layout (the official zip, unpacked)::

    <root>/tiny-imagenet-200/train/<wnid>/images/<wnid>_<n>.JPEG
    <root>/tiny-imagenet-200/val/images/val_<n>.JPEG
    <root>/tiny-imagenet-200/val/val_annotations.txt   (file <TAB> wnid <TAB> box...)

``train`` is the train folder and ``test`` the labelled val folder (the official test split has no
labels). Label ``i`` is the ``i``-th WordNet id of ``data/wnids/TinyImageNet.json`` -- the order of
the reference's class-name list (``cil/dataset_reqs/tinyimagenet_classes.txt``) -- and its name is
``data/classnames/TinyImageNet.json[i]``. That list equals the official ``wnids.txt`` row by row, and
``continuum`` (v1.1.8 on, the version a ZSCL install gets) numbers TinyImageNet's classes in that same
``wnids.txt`` order (not sorted), so label ``i`` here is label ``i`` in the reference and the class order
file (``data/class_orders/TinyImageNet.json``, the reference's YAML) indexes the same classes.

The train split lists its images class by class in that label order (file names sorted within a
class), as the reference's loader does: the first N images of a class-incremental step, from which
iCaRL herds its exemplars (``candidates``: 10,000 in CIL), are then the reference's first N.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from torch.utils.data import Dataset

from zscl.datasets.common import IMAGE_SUFFIXES, LabeledImages, require_paths
from zscl.datasets.registry import DATASETS, DatasetSpec, register_dataset
from zscl.datasets.text import load_classnames, load_templates
from zscl.resources import data_dir

NAME = "TinyImageNet"
LAYOUT = ("<root>/tiny-imagenet-200/train/<wnid>/images/*.JPEG, <root>/tiny-imagenet-200/val/images/*.JPEG and "
          "<root>/tiny-imagenet-200/val/val_annotations.txt (the official tiny-imagenet-200.zip, unpacked)")


def wnids() -> list[str]:
    """The 200 WordNet ids in label order."""
    with open(data_dir() / "wnids" / f"{NAME}.json", encoding="utf-8") as f:
        return json.load(f)


def _images(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.name.lower().endswith(IMAGE_SUFFIXES))


def _train(base: Path, lookup: dict[str, int]) -> tuple[list[str], list[int]]:
    folder = base / "train"
    found = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    unknown = [w for w in found if w not in lookup]
    if unknown:
        raise ValueError(f"{folder}: class folder(s) {unknown[:5]} are not TinyImageNet WordNet ids")
    paths, labels = [], []
    for wnid in sorted(found, key=lookup.__getitem__):  # wnids.txt (label) order, not sorted folder names
        images = folder / wnid / "images"
        require_paths(images)
        files = _images(images)
        paths += [str(images / f) for f in files]
        labels += [lookup[wnid]] * len(files)
    return paths, labels


def _val(base: Path, lookup: dict[str, int]) -> tuple[list[str], list[int]]:
    annotations, images = base / "val" / "val_annotations.txt", base / "val" / "images"
    require_paths(annotations, images)
    rows = [line.split("\t") for line in annotations.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows.sort(key=lambda r: r[0])
    unknown = sorted({r[1] for r in rows if len(r) < 2 or r[1] not in lookup})
    if unknown:
        raise ValueError(f"{annotations}: WordNet id(s) {unknown[:5]} are not TinyImageNet classes")
    return [str(images / r[0]) for r in rows], [lookup[r[1]] for r in rows]


def build(root: Path, split: str, transform: Callable | None) -> Dataset:
    base = root / "tiny-imagenet-200"
    require_paths(base / "train", base / "val")
    lookup = {w: i for i, w in enumerate(wnids())}
    paths, labels = (_train if split == "train" else _val)(base, lookup)
    return LabeledImages(paths, labels, transform)


def register_datasets() -> None:
    if NAME not in DATASETS:
        register_dataset(DatasetSpec(NAME, load_classnames(NAME), load_templates(NAME), build, LAYOUT))
