"""A cache of preprocessed evaluation images.

The test transform is deterministic (resize + centre crop) and MTIL evaluates every test set
12 times, so the decoded, resized, cropped pixels are stored once as uint8 in a ``.npy``
memory map. Scaling and normalisation run on the device, batched:
``(x / 255 - mean) / std`` in float32 is bit-identical to ``ToTensor()`` + ``Normalize()``.

Layout: ``<cache_dir>/<Dataset>-<split>-<key>.npy`` (N x 3 x H x W uint8) with
``...labels.npy`` and ``...excluded.json`` (unreadable images left out) beside it; ``key``
hashes the data root, the geometric transform, the format version and the (path, size, mtime)
of every source file, so a changed transform, data folder or file never reuses stale pixels.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from zscl.utils.io import atomic_path, write_json_atomic

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("ZSCL_CACHE", Path.home() / ".cache" / "zscl")) / "eval"


def split_normalize(transform: Callable) -> tuple[T.Compose, tuple[float, ...], tuple[float, ...]]:
    """Split ``Compose([..., ToTensor(), Normalize(mean, std)])`` into a uint8 part and (mean, std).

    The uint8 part keeps every geometric step and ends in ``PILToTensor()``.
    """
    steps = list(getattr(transform, "transforms", []))
    if len(steps) < 2 or not isinstance(steps[-1], T.Normalize) or not isinstance(steps[-2], T.ToTensor):
        raise ValueError(
            "the evaluation cache needs a test transform ending in ToTensor() + Normalize(), "
            f"got {transform!r}; run without the cache (--no-cache / eval_cache: false)"
        )
    norm = steps[-1]
    return T.Compose(steps[:-2] + [T.PILToTensor()]), tuple(map(float, norm.mean)), tuple(map(float, norm.std))


class CachedImages(Dataset):
    """uint8 images and int labels from the cache; ``get_batch(range)`` slices without copying twice."""

    def __init__(self, images_path: Path, labels_path: Path, excluded: Sequence[tuple[str, str]] = ()) -> None:
        self.images = np.load(images_path, mmap_mode="r")
        self.labels = torch.from_numpy(np.load(labels_path)).long()
        self.excluded = list(excluded)  # (path, reason) of the unreadable images left out

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(np.array(self.images[i])), int(self.labels[i])

    def get_batch(self, r: range) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(np.array(self.images[r.start:r.stop])), self.labels[r.start:r.stop]


def cache_key(*parts: object) -> str:
    text = "|".join([str(CACHE_VERSION), *map(str, parts)])
    return hashlib.sha1(text.encode()).hexdigest()[:12]


class _WithLabel(Dataset):
    """Items ``x`` of an unlabelled dataset as ``(x, 0)`` (so one cache format serves both)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        item = self.dataset[i]
        return item if isinstance(item, tuple) else (item, 0)


class _Tolerant(Dataset):
    """Items ``(image, label, "")``, or ``(zeros, -1, "path\treason")`` for an unreadable image."""

    def __init__(self, dataset: Dataset, shape: tuple[int, ...]) -> None:
        from zscl.datasets.badimages import SafeImages

        self.dataset, self.shape = SafeImages(_WithLabel(dataset)), shape

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        from zscl.datasets.badimages import UnreadableImageError

        try:
            image, label = self.dataset[i]
            return image, label, ""
        except UnreadableImageError as err:
            return torch.zeros(self.shape, dtype=torch.uint8), -1, f"{err.path}\t{err.reason}"


def _fill(dataset: Dataset, out: np.ndarray, labels: np.ndarray, num_workers: int, progress: bool,
          desc: str) -> list[tuple[int, str, str]]:
    """Write every item into ``out``/``labels``; returns ``(row, path, reason)`` of the unreadable ones."""
    from tqdm.auto import tqdm

    from zscl.utils.testing import kill_point

    loader = DataLoader(_Tolerant(dataset, out.shape[1:]), batch_size=64, num_workers=num_workers, shuffle=False)
    pos, bad = 0, []
    for images, ys, notes in tqdm(loader, desc=desc, disable=not progress, leave=False):
        out[pos:pos + len(ys)] = images.numpy()
        labels[pos:pos + len(ys)] = ys.numpy()
        bad += [(pos + k, *note.split("\t", 1)) for k, note in enumerate(notes) if note]
        pos += len(ys)
        kill_point("eval-cache-fill")  # crash-safety tests: SIGKILL half-way through a build
    if pos != len(labels):
        raise RuntimeError(f"{desc}: the dataset yielded {pos} images but reports {len(labels)}")
    return bad


def _item_shape(dataset: Dataset, desc: str) -> tuple[int, ...]:
    """The shape of the first readable item (every item has it: the transform is deterministic)."""
    from zscl.datasets.badimages import SafeImages, UnreadableImageError

    safe = SafeImages(_WithLabel(dataset))
    for i in range(len(safe)):
        try:
            return tuple(safe[i][0].shape)
        except UnreadableImageError as err:
            last = err
    raise ValueError(f"{desc}: none of the {len(safe)} images is readable (the last: {last})" if len(safe)
                     else f"{desc}: the dataset is empty")


def _compact(tmp: Path, out: np.ndarray, keep: np.ndarray) -> None:
    """Rewrite the image file ``tmp`` (open as ``out``) with only the rows ``keep``."""
    with atomic_path(tmp) as small_tmp:
        small = np.lib.format.open_memmap(small_tmp, mode="w+", dtype=np.uint8, shape=(len(keep), *out.shape[1:]))
        for s in range(0, len(keep), 1024):
            small[s:s + 1024] = out[keep[s:s + 1024]]
        small.flush()
        del small


def materialize(dataset_fn: Callable[[], Dataset], stem: Path, num_workers: int = 0, progress: bool = True,
                desc: str = "caching") -> CachedImages:
    """Write every readable item of a deterministic uint8 dataset once to ``<stem>.npy`` (+ labels); open it.

    ``dataset_fn`` is only called when the cache is missing. Unreadable images are left out and
    listed in ``<stem>.excluded.json`` (the cache's ``excluded``: what to do with them is the
    caller's policy). Every file is written atomically and the images file last, so a build
    killed half-way leaves no cache that looks complete.
    """
    images_path, labels_path = Path(f"{stem}.npy"), Path(f"{stem}.labels.npy")
    excluded_path = Path(f"{stem}.excluded.json")
    excluded = _read_excluded(excluded_path)
    if not (images_path.exists() and labels_path.exists()) or _readable_again(excluded):
        images_path.unlink(missing_ok=True)  # a repaired file: the old images must not meet the new labels
        dataset = dataset_fn()
        shape = _item_shape(dataset, desc)
        labels = np.zeros(len(dataset), dtype=np.int64)  # type: ignore[arg-type]
        with atomic_path(images_path) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(labels), *shape))
            bad = _fill(dataset, out, labels, num_workers, progress, desc)
            out.flush()
            if bad:
                keep = np.setdiff1d(np.arange(len(labels)), [row for row, _, _ in bad])
                _compact(tmp, out, keep)
                labels = labels[keep]
            del out
            excluded = [(path, reason) for _, path, reason in bad]
            write_json_atomic(excluded_path, excluded)
            with atomic_path(labels_path) as ltmp:
                with open(ltmp, "wb") as f:  # np.save on a path would append ".npy"
                    np.save(f, labels)
    return CachedImages(images_path, labels_path, excluded)


def _read_excluded(path: Path) -> list[tuple[str, str]]:
    if not path.exists():
        return []
    return [tuple(item) for item in json.loads(path.read_text(encoding="utf-8"))]  # type: ignore[misc]


def _readable_again(excluded: list[tuple[str, str]]) -> bool:
    """Whether a file the cache left out has been repaired since (then the cache is rebuilt)."""
    from zscl.datasets.badimages import decode

    return any(os.path.exists(path) and decode(path)[1] is not None for path, _ in excluded)


def cached_dataset(
    name: str,
    split: str,
    data_root: str | Path,
    test_transform: Callable,
    cache_dir: str | Path | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> tuple[CachedImages, tuple[float, ...], tuple[float, ...]]:
    """Build (once) and open the uint8 cache of ``name``'s ``split``; returns it with (mean, std)."""
    from zscl.datasets import build_dataset

    from zscl.datasets.common import source_fingerprint

    uint8_tf, mean, std = split_normalize(test_transform)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    # Listing the files is cheap next to decoding them, and their (size, mtime) in the key means a
    # dataset regenerated or replaced in the same folder never reads the old pixels.
    dataset = build_dataset(name, data_root, split, uint8_tf)
    key = cache_key(name, split, Path(data_root).resolve(), repr(uint8_tf), source_fingerprint(dataset))
    images = materialize(lambda: dataset, cache_dir / f"{name}-{split}-{key}", num_workers, progress,
                         f"caching {name}/{split}")
    return images, mean, std
