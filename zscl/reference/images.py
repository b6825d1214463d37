"""Unlabeled reference images for ZSCL's distillation.

The paper streams ImageNet train images with the *test* transform (no augmentation), one
reference batch per task batch. Sources:

* ``dataset``: a registered dataset's split (default ``ImageNet`` train); labels are dropped;
* ``folder``: every image under a folder, recursively, in sorted order (an ImageFolder or
  ImageNet-style tree, or a flat folder);
* ``csv``: a CSV/TSV whose ``column`` holds image paths (the Conceptual Captions validation
  file: tab-separated, ``filepath`` and ``title``), relative to the file's folder;
* ``wds``: webdataset shards (brace patterns allowed), resampled into an endless stream per DDP
  rank and loader worker that resumes exactly (:mod:`zscl.reference.wds`);
* ``task``: the current task's own training split (LwF, LwF-VR: the reference code's
  ``--ref-dataset <current task>``); the data module resolves it to ``dataset``;
* ``memory``: iCaRL's exemplar memory file (``path``), written by the sequence runner after
  each task (:mod:`zscl.reference.memory`).

Relative paths resolve against the data root.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch
from PIL import Image
from torch.utils.data import Dataset

from zscl.datasets.common import DropLabels

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm"}


@dataclass
class ReferenceImages:
    """Where ZSCL's reference images come from (default: ImageNet train, as in the paper)."""

    source: Literal["dataset", "folder", "csv", "wds", "task", "memory"] = "dataset"
    path: str = "ImageNet"  # dataset name | folder | CSV/TSV file | shard pattern | memory JSON
    split: Literal["train", "test"] = "train"  # for source=dataset
    column: str = "filepath"  # for source=csv
    limit: Optional[int] = None  # keep only the first N images (after sorting)
    cache: bool = False  # decode + test-transform every image once into a uint8 cache (small pools)


def for_task(cfg: ReferenceImages, dataset: str) -> ReferenceImages:
    """``source: task`` made concrete: the training split of the current task's ``dataset``."""
    return replace(cfg, source="dataset", path=dataset, split="train") if cfg.source == "task" else cfg


def resolve(path: str, data_root: str | Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(data_root) / p


class ImageFiles(Dataset):
    """Images from a list of files, RGB-converted, transformed; items are tensors (no label)."""

    def __init__(self, files: list[Path], transform: Callable | None) -> None:
        if not files:
            raise FileNotFoundError("no reference images found")
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Any:
        with Image.open(self.files[i]) as img:
            img = img.convert("RGB")
        return self.transform(img) if self.transform is not None else img


def list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"reference image folder {folder} does not exist")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def read_table(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV or TSV file with a header (the delimiter is sniffed: tab or comma)."""
    if not path.is_file():
        raise FileNotFoundError(f"reference file {path} does not exist")
    with open(path, newline="", encoding="utf-8") as f:
        head = f.readline()
        f.seek(0)
        delimiter = "\t" if "\t" in head else ","
        return list(csv.DictReader(f, delimiter=delimiter))


def csv_images(path: Path, column: str) -> list[Path]:
    rows = read_table(path)
    if rows and column not in rows[0]:
        raise ValueError(f"{path} has no column {column!r}; columns: {', '.join(rows[0])}")
    return [path.parent / row[column] for row in rows]


def reference_image_dataset(cfg: ReferenceImages, data_root: str | Path, transform: Callable | None,
                            cache_dir: str | Path | None = None) -> Dataset:
    """A map-style dataset of reference images for the ``dataset``, ``folder`` and ``csv`` sources.

    With ``cfg.cache`` the (deterministic, uint8) transformed images are written once to a
    memory-mapped cache, as for evaluation: worthwhile when the pool fits on disk comfortably
    and is read every step of every task (the synthetic benchmark's pool, ImageNet subsets).
    """
    dataset = reference_files(cfg, data_root, transform)
    if not cfg.cache or cfg.source == "memory":  # a memory changes every task: nothing to cache
        return dataset
    from zscl.datasets.cache import cache_key, default_cache_dir, materialize

    where = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    from zscl.datasets.common import source_fingerprint

    key = cache_key(cfg.source, resolve(cfg.path, data_root).resolve(), cfg.split, cfg.column, cfg.limit,
                    len(dataset), repr(transform), source_fingerprint(dataset))
    return DropLabels(materialize(lambda: dataset, where / f"reference-{key}", desc="caching reference images"))


def reference_files(cfg: ReferenceImages, data_root: str | Path, transform: Callable | None) -> Dataset:
    if cfg.source == "dataset":
        from zscl.datasets import build_dataset

        dataset: Dataset = DropLabels(build_dataset(cfg.path, data_root, cfg.split, transform))
    elif cfg.source == "folder":
        dataset = ImageFiles(list_images(resolve(cfg.path, data_root)), transform)
    elif cfg.source == "csv":
        dataset = ImageFiles(csv_images(resolve(cfg.path, data_root), cfg.column), transform)
    elif cfg.source == "memory":
        from zscl.reference.memory import memory_dataset, read_memory

        dataset = memory_dataset(read_memory(resolve(cfg.path, data_root)), data_root, transform)
    elif cfg.source == "task":
        raise ValueError("source 'task' means the current task's train split; resolve it with for_task(cfg, dataset)")
    else:
        raise ValueError(f"source {cfg.source!r} is streamed; use reference_wds_stream")
    if cfg.limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(cfg.limit, len(dataset))))  # type: ignore[arg-type]
    return dataset


def reference_wds_stream(cfg: ReferenceImages, data_root: str | Path, transform: Callable | None,
                         batch_size: int, seed: int = 0, start_step: int = 0, rank: int = 0, world_size: int = 1,
                         records: Optional[list] = None, skip_unreadable: bool = True):
    """An endless, resumable stream of reference-image batches from webdataset shards (brace patterns
    allowed): batch k is the same after a resume at step k (see :mod:`zscl.reference.wds`). Corrupt
    samples and shards that cannot be read are skipped and recorded in ``records`` as ``(where, reason)``."""
    from webdataset.shardlists import expand_urls

    from zscl.reference.wds import WdsBatchStream

    records = [] if records is None else records
    pattern = cfg.path if "://" in cfg.path else str(resolve(cfg.path, data_root))
    return WdsBatchStream(expand_urls(pattern), transform, batch_size, seed=seed, start_step=start_step,
                          rank=rank, world_size=world_size, records=records, skip_unreadable=skip_unreadable)
