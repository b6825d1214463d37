"""A cache of preprocessed evaluation images.

The test transform is deterministic (resize + centre crop) and MTIL evaluates every test set
12 times, so the decoded, resized, cropped pixels are stored once as uint8 in a ``.npy``
memory map. Scaling and normalisation run on the device, batched:
``(x / 255 - mean) / std`` in float32 is bit-identical to ``ToTensor()`` + ``Normalize()``.

Layout: ``<cache_dir>/<Dataset>-<split>-<key>.npy`` (N x 3 x H x W uint8) with
``...labels.npy`` beside it; ``key`` hashes the data root, the geometric transform and the
format version, so a changed transform or data folder never reuses stale pixels.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from zscl.utils.io import atomic_path

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


@lru_cache(maxsize=16)
def _channel_stats(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Built once per device: a fresh torch.tensor(..., device=cuda) is a blocking copy every call.
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1).to(device)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1).to(device)
    return m, s


def normalize_images(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [B,3,H,W] -> normalised float32, on the images' device; float input passes through."""
    if images.dtype != torch.uint8:
        return images
    m, s = _channel_stats(tuple(mean), tuple(std), images.device)
    return images.to(torch.float32).div(255).sub(m).div(s)


class CachedImages(Dataset):
    """uint8 images and int labels from the cache; ``get_batch(range)`` slices without copying twice."""

    def __init__(self, images_path: Path, labels_path: Path) -> None:
        self.images = np.load(images_path, mmap_mode="r")
        self.labels = torch.from_numpy(np.load(labels_path)).long()

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


def _fill(dataset: Dataset, out: np.ndarray, labels: np.ndarray, num_workers: int, progress: bool, desc: str) -> None:
    from tqdm.auto import tqdm

    loader = DataLoader(_WithLabel(dataset), batch_size=64, num_workers=num_workers, shuffle=False)
    pos = 0
    for images, ys in tqdm(loader, desc=desc, disable=not progress, leave=False):
        out[pos:pos + len(ys)] = images.numpy()
        labels[pos:pos + len(ys)] = ys.numpy()
        pos += len(ys)
    if pos != len(labels):
        raise RuntimeError(f"{desc}: the dataset yielded {pos} images but reports {len(labels)}")


def materialize(dataset_fn: Callable[[], Dataset], stem: Path, num_workers: int = 0, progress: bool = True,
                desc: str = "caching") -> CachedImages:
    """Write every item of a deterministic uint8 dataset once to ``<stem>.npy`` (+ labels); open it.

    ``dataset_fn`` is only called when the cache is missing. Both files are written atomically.
    """
    images_path, labels_path = Path(f"{stem}.npy"), Path(f"{stem}.labels.npy")
    if not (images_path.exists() and labels_path.exists()):
        dataset = dataset_fn()
        first = dataset[0]
        c, h, w = (first[0] if isinstance(first, tuple) else first).shape
        labels = np.zeros(len(dataset), dtype=np.int64)
        with atomic_path(images_path) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(dataset), c, h, w))
            _fill(dataset, out, labels, num_workers, progress, desc)
            out.flush()
            del out
            with atomic_path(labels_path) as ltmp:
                with open(ltmp, "wb") as f:  # np.save on a path would append ".npy"
                    np.save(f, labels)
    return CachedImages(images_path, labels_path)


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

    uint8_tf, mean, std = split_normalize(test_transform)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    stem = cache_dir / f"{name}-{split}-{cache_key(name, split, Path(data_root).resolve(), repr(uint8_tf))}"
    images = materialize(lambda: build_dataset(name, data_root, split, uint8_tf), stem, num_workers, progress,
                         f"caching {name}/{split}")
    return images, mean, std
