"""Pieces every dataset builder shares: the item wrapper, labels without decoding, the seeded
80/20 split, image-folder scanning, and the "dataset not found" error."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset, Subset

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is missing or misplaced under the data root; the message names the expected layout."""


def require_paths(*paths: Path) -> None:
    """Raise FileNotFoundError naming the first missing path (checked before any reader runs,
    so readers that create folders as a side effect, like torchvision's Caltech101, never do)."""
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"missing {path}")


def load_rgb(item: Any) -> Image.Image:
    """A PIL RGB image from a PIL image, a path, or an ``(image, target)`` pair."""
    if isinstance(item, tuple):
        item = item[0]
    if isinstance(item, (str, os.PathLike)):
        with Image.open(item) as img:
            return img.convert("RGB")
    if not isinstance(item, Image.Image):
        raise TypeError(f"expected a PIL image or an image path, got {type(item).__name__}")
    # Caltech101 and MNIST give greyscale images; CLIP's transforms expect RGB.
    return item if item.mode == "RGB" else item.convert("RGB")


SMALL_IMAGE_PIXELS = 64 * 64  # decoded images this small are kept in memory (see LabeledImages)
SMALL_IMAGE_BUDGET = 256 * 2**20  # bytes of decoded small images kept per dataset


class LabeledImages(Dataset):
    """Items ``(transform(RGB image), label)``; labels are known up front, without decoding images.

    ``source[index[i]]`` is item ``i``'s image: a PIL image, a path, or a pair whose first element
    is one (a torchvision dataset built without a transform).

    Small images read from files (at most ``SMALL_IMAGE_PIXELS``, e.g. the synthetic world's 32 px
    PNGs) are decoded once and kept, up to ``SMALL_IMAGE_BUDGET`` bytes: opening and decoding a tiny
    file costs more than training on it. The random transforms still run on every read.
    """

    def __init__(
        self,
        source: Sequence[Any],
        labels: Sequence[int],
        transform: Callable | None = None,
        index: Sequence[int] | None = None,
    ) -> None:
        self.index = list(range(len(labels))) if index is None else list(index)
        if len(self.index) != len(labels):
            raise ValueError(f"{len(labels)} labels for {len(self.index)} items")
        self.source = source
        self.labels = [int(y) for y in labels]
        self.transform = transform
        self._decoded: dict[int, Image.Image] = {}
        self._decoded_bytes = 0

    def __len__(self) -> int:
        return len(self.labels)

    def _image(self, j: int) -> Image.Image:
        if j in self._decoded:
            return self._decoded[j].copy()  # transforms never see (or could alter) the kept image
        item = self.source[j]
        image = load_rgb(item)
        size = image.width * image.height
        if isinstance(item, (str, os.PathLike)) and size <= SMALL_IMAGE_PIXELS \
                and self._decoded_bytes + 3 * size <= SMALL_IMAGE_BUDGET:
            self._decoded[j] = image.copy()
            self._decoded_bytes += 3 * size
        return image

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image = self._image(self.index[i])
        return (self.transform(image) if self.transform is not None else image), self.labels[i]


def dataset_labels(ds: Dataset) -> list[int]:
    """The labels of a built dataset, in item order, without decoding any image."""
    if isinstance(ds, LabeledImages):
        return list(ds.labels)
    if isinstance(ds, Subset):
        base = dataset_labels(ds.dataset)
        return [base[i] for i in ds.indices]
    if isinstance(ds, ConcatDataset):
        return [y for part in ds.datasets for y in dataset_labels(part)]
    for attr in ("labels", "targets", "_labels", "y"):
        values = getattr(ds, attr, None)
        if values is not None and not callable(values):
            return [int(y) for y in (values.tolist() if torch.is_tensor(values) else values)]
    # Unknown dataset type: fall back to reading every item (decodes images).
    return [int(ds[i][1]) for i in range(len(ds))]  # type: ignore[arg-type]


def seeded_split(ds: Dataset, split: str, ratio: float = 0.8, seed: int = 42) -> Subset:
    """ZSCL's split of datasets without an official one (Caltech101, EuroSAT, SUN397).

    ``random_split(ds, [int(ratio*n), n - int(ratio*n)], generator=Generator().manual_seed(42))``,
    with the train size rounded exactly as the reference does (float product, then ``int``).
    """
    n = len(ds)  # type: ignore[arg-type]
    n_train = int(ratio * n)
    train, test = torch.utils.data.random_split(
        ds, [n_train, n - n_train], generator=torch.Generator().manual_seed(seed)
    )
    return train if split == "train" else test


def labels_by_name(
    raw_labels: Sequence[int], raw_classes: Sequence[str], lookup: Mapping[str, int], what: str
) -> list[int]:
    """Translate a reader's labels (indices into its own ``raw_classes``) to canonical indices.

    Readers such as torchvision's DTD number only the classes present in one split; going
    through the class *name* keeps every split (and a partial copy) on the canonical numbering.
    """
    unknown = sorted({c for c in raw_classes if c not in lookup})
    if unknown:
        known = len(set(lookup.values()))
        raise ValueError(f"{what}: class(es) {unknown[:10]} are not among the {known} known classes")
    table = [lookup[c] for c in raw_classes]
    return [table[int(y)] for y in raw_labels]


def check_label_range(labels: Sequence[int], num_classes: int, what: str) -> list[int]:
    """Labels as ints, each checked to lie in ``[0, num_classes)``."""
    labels = [int(y) for y in labels]
    bad = sorted({y for y in labels if not 0 <= y < num_classes})
    if bad:
        raise ValueError(f"{what}: labels {bad[:10]} are outside 0..{num_classes - 1}")
    return labels


def class_folders(folder: Path) -> list[str]:
    """Sorted names of the sub-folders of ``folder`` (the ImageFolder class order)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"missing {folder}")
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith("."))


def scan_image_folder(folder: Path, classes: Sequence[str]) -> tuple[list[str], list[int]]:
    """Images ``folder/<class>/**/<image>`` of the given classes, labelled by position in ``classes``.

    Files are sorted within each class, so the order never depends on the filesystem. Every
    class folder found must be in ``classes``. Paths are strings: lighter than Path objects
    for a million ImageNet files held in every data-loader worker.
    """
    lookup = {name: i for i, name in enumerate(classes)}
    found = class_folders(folder)
    unknown = [c for c in found if c not in lookup]
    if unknown:
        raise ValueError(f"{folder}: class folder(s) {unknown[:10]} are not among the {len(classes)} expected classes")
    paths: list[str] = []
    labels: list[int] = []
    for name in found:
        images = sorted(
            os.path.join(dirpath, file)
            for dirpath, _, files in os.walk(folder / name, followlinks=True)
            for file in files
            if file.lower().endswith(IMAGE_SUFFIXES)
        )
        paths += images
        labels += [lookup[name]] * len(images)
    return paths, labels


_FILE_LISTS = ("samples", "imgs", "_samples", "_image_files", "_images", "files", "_files")
_WRAPPED = ("dataset", "source")


def _file_list(ds: Any) -> list | None:
    for attr in _FILE_LISTS:
        items = getattr(ds, attr, None)
        if isinstance(items, (list, tuple)) and items:
            return [i[0] if isinstance(i, (list, tuple)) else i for i in items]
    if isinstance(ds, (list, tuple)) and ds and isinstance(ds[0], (str, Path)):
        return list(ds)
    return None


def source_fingerprint(ds: Any) -> str:
    """A short hash of what a dataset reads: (path, size, mtime) of its image files, or the bytes of an
    in-memory array (CIFAR, MNIST). Caches keyed on it never serve pixels of files that were replaced
    in place (a regenerated or re-extracted dataset under the same folder). "" when nothing is found."""
    import hashlib
    import os

    h = hashlib.sha1()
    for _ in range(8):  # unwrap Subset / LabeledImages / label droppers down to the files
        files = _file_list(ds)
        if files is not None:
            for f in files:
                try:
                    st = os.stat(f)
                    h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
                except OSError:
                    h.update(f"{f}|missing\n".encode())
            return h.hexdigest()[:12]
        data = getattr(ds, "data", None)
        if hasattr(data, "tobytes") or hasattr(data, "numpy"):
            arr = data.numpy() if hasattr(data, "numpy") else data
            h.update(str(arr.shape).encode() + arr.tobytes())
            return h.hexdigest()[:12]
        inner = next((getattr(ds, a) for a in _WRAPPED if getattr(ds, a, None) is not None), None)
        if inner is None:
            return ""
        ds = inner
    return ""


class DropLabels(Dataset):
    """A labelled dataset seen as images only."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.excluded = getattr(dataset, "excluded", [])  # a cached pool's unreadable images, left out

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        return self.dataset[i][0]
