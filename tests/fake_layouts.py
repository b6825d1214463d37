"""Tiny fake copies of zscl's built-in datasets, written in their real on-disk formats.

For tests that need real-format data (dataset readers, end-to-end training and evaluation)::

    from tests.fake_layouts import make_fake_dataset

    fake = make_fake_dataset("DTD", tmp_path)          # writes <tmp_path>/dtd/dtd/...
    ds = build_dataset("DTD", tmp_path, "train")
    assert dataset_labels(ds) == fake.labels["train"]

Images are tiny, with a colour that depends on the class (so a model can learn them).
``fake.labels[split]`` are the expected canonical labels in the order the builder yields them;
for the datasets ZSCL splits 80/20 with seed 42 they come from an independent computation of
that permutation (``fake.pool`` holds the labels before the split).
"""

from __future__ import annotations

import json
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from zscl.datasets import load_classnames

# Raw folder names of the two datasets whose class names ZSCL wrote by hand.
from zscl.datasets.mtil import CALTECH101_FOLDERS, EUROSAT_FOLDERS


@dataclass
class FakeDataset:
    name: str
    root: Path  # the data root to pass to build_dataset
    classes: list[int]  # canonical class indices that have images
    labels: dict[str, list[int]]  # "train" / "test": expected labels in item order
    pool: list[int] | None = None  # seeded-split datasets: all labels, in the reader's order


def class_color(label: int) -> tuple[int, int, int]:
    return ((37 * label + 20) % 256, (91 * label + 80) % 256, (151 * label + 160) % 256)


def fake_image(label: int, k: int, size: int = 8, mode: str = "RGB") -> Image.Image:
    """A ``size`` x ``size`` image of the class colour with a little per-image noise."""
    rng = np.random.default_rng(1000 * label + k)
    pixels = np.clip(np.array(class_color(label)) + rng.integers(-12, 13, (size, size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode)


def _save(path: Path, image: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        image.save(path, quality=95)
    else:
        image.save(path)


def _seeded_split(pool: list[int]) -> dict[str, list[int]]:
    """ZSCL's 80/20 split, computed independently of zscl: the first int(0.8 n) of randperm(n; seed 42)."""
    perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(42)).tolist()
    n_train = int(0.8 * len(pool))
    return {"train": [pool[i] for i in perm[:n_train]], "test": [pool[i] for i in perm[n_train:]]}


def _per_split(classes: Sequence[int], per_class: int) -> list[int]:
    """Labels of one split, classes interleaved (c0, c1, c2, c0, ...) so order matters."""
    return [c for _ in range(per_class) for c in classes]


def _raw(name: str) -> list[str]:
    """Raw class names as the dataset's own files spell them (``_`` where ZSCL shows a space)."""
    return [c.replace(" ", "_") for c in load_classnames(name)]


def _aircraft(root: Path, classes: list[int], per_class: int, size: int) -> dict[str, list[int]]:
    data, names = root / "fgvc-aircraft-2013b" / "data", load_classnames("Aircraft")
    data.mkdir(parents=True)
    (data / "variants.txt").write_text("".join(f"{n}\n" for n in names))
    labels, image_id = {}, 1000000
    for split, count in (("train", per_class), ("val", 1), ("test", per_class)):
        labels[split], lines = _per_split(classes, count), []
        for k, c in enumerate(labels[split]):
            image_id += 1
            _save(data / "images" / f"{image_id}.jpg", fake_image(c, k, size))
            lines.append(f"{image_id} {names[c]}\n")
        (data / f"images_variant_{split}.txt").write_text("".join(lines))
    return labels


def _caltech101(root: Path, classes: list[int], per_class: int, size: int) -> list[int]:
    base = root / "caltech101" / "101_ObjectCategories"
    _save(base / "BACKGROUND_Google" / "image_0001.jpg", fake_image(0, 0, size))
    pool = []
    for c in sorted(classes):  # torchvision: sorted folders, image_0001.jpg ... in each
        for k in range(2 * per_class):
            # Some real Caltech101 images are greyscale: the first class's are.
            mode = "L" if c == min(classes) else "RGB"
            _save(base / CALTECH101_FOLDERS[c] / f"image_{k + 1:04d}.jpg", fake_image(c, k, size, mode))
            pool.append(c)
    return pool


def _cifar_pickle(path: Path, labels: list[int], key: str) -> None:
    images = [np.asarray(fake_image(c, k, 32)).transpose(2, 0, 1).reshape(-1) for k, c in enumerate(labels)]
    data = np.stack(images) if images else np.zeros((0, 3072), np.uint8)
    with open(path, "wb") as f:
        pickle.dump({"data": data, key: labels}, f)


def _cifar10(root: Path, classes: list[int], per_class: int, size: int) -> dict[str, list[int]]:
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    labels = {"train": _per_split(classes, per_class), "test": _per_split(classes, per_class)}
    _cifar_pickle(base / "data_batch_1", labels["train"], "labels")
    for i in range(2, 6):
        _cifar_pickle(base / f"data_batch_{i}", [], "labels")
    _cifar_pickle(base / "test_batch", labels["test"], "labels")
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": _raw("CIFAR10")}, f)
    return labels


def _cifar100(root: Path, classes: list[int], per_class: int, size: int) -> dict[str, list[int]]:
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    labels = {"train": _per_split(classes, per_class), "test": _per_split(classes, per_class)}
    for split in ("train", "test"):
        _cifar_pickle(base / split, labels[split], "fine_labels")
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": _raw("CIFAR100")}, f)
    return labels


def _dtd(root: Path, classes: list[int], per_class: int, size: int) -> dict[str, list[int]]:
    data, names = root / "dtd" / "dtd", load_classnames("DTD")
    (data / "labels").mkdir(parents=True)
    # The test split lacks the first class: torchvision then numbers the test classes differently.
    splits = {"train": classes, "val": classes, "test": classes[1:] or classes}
    labels = {}
    for split, present in splits.items():
        labels[split] = _per_split(present, per_class)
        lines = []
        for k, c in enumerate(labels[split]):
            file = f"{names[c]}_{split}_{k:04d}.jpg"
            _save(data / "images" / names[c] / file, fake_image(c, k, size))
            lines.append(f"{names[c]}/{file}\n")
        (data / "labels" / f"{split}1.txt").write_text("".join(lines))
    return {s: labels[s] for s in ("train", "test")}


def _eurosat(root: Path, classes: list[int], per_class: int, size: int) -> list[int]:
    pool = []
    for c in sorted(classes):
        for k in range(2 * per_class):
            folder = EUROSAT_FOLDERS[c]
            _save(root / "eurosat" / "2750" / folder / f"{folder}_{k + 1}.jpg", fake_image(c, k, size))
            pool.append(c)
    return pool


def _flowers(root: Path, classes: list[int], per_class: int, size: int) -> dict[str, list[int]]:
    from scipy.io import savemat

    base = root / "flowers-102"
    splits = {
        "trnid": _per_split(classes, per_class),
        "valid": _per_split(classes, 1),
        "tstid": _per_split(classes, per_class),
    }
    all_labels, ids = [], {}
    for key, labels in splits.items():
        ids[key] = np.arange(len(all_labels) + 1, len(all_labels) + len(labels) + 1)  # 1-based image ids
        all_labels += labels
    for image_id, c in enumerate(all_labels, 1):
        _save(base / "jpg" / f"image_{image_id:05d}.jpg", fake_image(c, image_id, size))
    savemat(base / "imagelabels.mat", {"labels": np.array([all_labels]) + 1})
    savemat(base / "setid.mat", {k: v[None, :] for k, v in ids.items()})
    return {"train": splits["trnid"], "test": splits["tstid"]}


def _food(root: Path, classes: list[int], per_class: int, size: int) -> dict[str, list[int]]:
    base, raw = root / "food-101", _raw("Food")
    (base / "meta").mkdir(parents=True)
    labels = {}
    for split in ("train", "test"):
        meta: dict[str, list[str]] = {}
        for c in reversed(classes):  # key order != sorted order: torchvision sorts the keys
            meta[raw[c]] = [f"{raw[c]}/{split}{k}" for k in range(per_class)]
            for k in range(per_class):
                _save(base / "images" / raw[c] / f"{split}{k}.jpg", fake_image(c, k, size))
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta))
        labels[split] = [c for c in reversed(classes) for _ in range(per_class)]
    return labels


def _idx(path: Path, array: np.ndarray) -> None:
    """The MNIST idx format: big-endian magic (0x08 = ubyte, ndim), the dims, then the bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _mnist(root: Path, classes: list[int], per_class: int, size: int) -> dict[str, list[int]]:
    labels = {"train": _per_split(classes, per_class), "test": _per_split(classes, per_class)}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = [np.asarray(fake_image(c, k, 28, "L")) for k, c in enumerate(labels[split])]
        _idx(root / "MNIST" / "raw" / f"{prefix}-images-idx3-ubyte", np.stack(images))
        _idx(root / "MNIST" / "raw" / f"{prefix}-labels-idx1-ubyte", np.array(labels[split]))
    return labels


def _oxford_pet(root: Path, classes: list[int], per_class: int, size: int) -> dict[str, list[int]]:
    base, raw = root / "oxford-iiit-pet", _raw("OxfordPet")
    (base / "annotations").mkdir(parents=True)
    labels = {"train": _per_split(classes, per_class), "test": _per_split(classes, per_class)}
    for split, file in (("train", "trainval"), ("test", "test")):
        lines = []
        for k, c in enumerate(labels[split]):
            image_id = f"{raw[c]}_{split}{k}"
            _save(base / "images" / f"{image_id}.jpg", fake_image(c, k, size))
            lines.append(f"{image_id} {c + 1} 1 1\n")  # image, class id (1-based), species, breed id
        (base / "annotations" / f"{file}.txt").write_text("".join(lines))
    return labels


def _stanford_cars(root: Path, classes: list[int], per_class: int, size: int) -> dict[str, list[int]]:
    from scipy.io import savemat

    base, names = root / "stanford_cars", load_classnames("StanfordCars")
    (base / "devkit").mkdir(parents=True)
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array([list(names)], dtype=object)})
    labels = {"train": _per_split(classes, per_class), "test": _per_split(classes, per_class)}
    fields = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
    mats = {"train": base / "devkit" / "cars_train_annos.mat", "test": base / "cars_test_annos_withlabels.mat"}
    for split, mat in mats.items():
        annos = np.zeros((1, len(labels[split])), dtype=[(f, object) for f in fields])
        for k, c in enumerate(labels[split]):
            _save(base / f"cars_{split}" / f"{k + 1:05d}.jpg", fake_image(c, k, size))
            annos[0, k] = (1, 1, size, size, c + 1, f"{k + 1:05d}.jpg")
        savemat(mat, {"annotations": annos})
    return labels


def _sun397(root: Path, classes: list[int], per_class: int, size: int) -> list[int]:
    base, raw = root / "SUN397", _raw("SUN397")
    base.mkdir(parents=True)
    (base / "ClassName.txt").write_text("".join(f"/{r[0]}/{r}\n" for r in raw))
    rng = np.random.default_rng(0)
    files = []
    for c in classes:
        for k in range(2 * per_class):
            # Random file names, so creation order, class order and path order all differ.
            relative = f"{raw[c][0]}/{raw[c]}/sun_{rng.integers(16**8):08x}.jpg"
            _save(base / relative, fake_image(c, k, size))
            files.append((relative, c))
    return [c for _, c in sorted(files)]  # the builder sorts by relative path


def _imagenet(root: Path, classes: list[int], per_class: int, size: int) -> dict[str, list[int]]:
    wnids = [f"n{i:08d}" for i in range(len(load_classnames("ImageNet")))]  # sorted = canonical order
    labels = {}
    for split, folder in (("train", "train"), ("test", "val")):
        for wnid in wnids:  # every class folder exists (the builder requires 1000), most empty
            (root / "ImageNet" / folder / wnid).mkdir(parents=True)
        for c in sorted(classes):
            for k in range(per_class):
                _save(root / "ImageNet" / folder / wnids[c] / f"{wnids[c]}_{k}.JPEG", fake_image(c, k, size))
        labels[split] = [c for c in sorted(classes) for _ in range(per_class)]
    return labels


def _tinyimagenet(root: Path, classes: list[int], per_class: int, size: int) -> dict[str, list[int]]:
    from zscl.datasets.tinyimagenet import wnids

    ids, base = wnids(), root / "tiny-imagenet-200"
    by_label = sorted(classes)  # the builder visits train folders in wnids.txt (label) order
    for c in sorted(classes, key=lambda c: ids[c]):  # written in another order: the disk order must not matter
        for k in range(per_class):
            _save(base / "train" / ids[c] / "images" / f"{ids[c]}_{k}.JPEG", fake_image(c, k, size))
    val = _per_split(classes, per_class)  # val_0, val_1, ...: classes interleaved
    rows = [f"val_{n}.JPEG\t{ids[c]}\t0\t0\t{size}\t{size}" for n, c in enumerate(val)]
    for n, c in enumerate(val):
        _save(base / "val" / "images" / f"val_{n}.JPEG", fake_image(c, 100 + n, size))
    (base / "val" / "val_annotations.txt").write_text("\n".join(reversed(rows)) + "\n")  # any row order
    order = sorted(range(len(val)), key=lambda n: f"val_{n}.JPEG")  # the builder sorts by file name
    return {"train": [c for c in by_label for _ in range(per_class)], "test": [val[n] for n in order]}


Writer = Callable[[Path, list, int, int], "dict[str, list[int]] | list[int]"]
WRITERS: dict[str, Writer] = {
    "Aircraft": _aircraft,
    "Caltech101": _caltech101,
    "CIFAR10": _cifar10,
    "CIFAR100": _cifar100,
    "DTD": _dtd,
    "EuroSAT": _eurosat,
    "Flowers": _flowers,
    "Food": _food,
    "ImageNet": _imagenet,
    "MNIST": _mnist,
    "OxfordPet": _oxford_pet,
    "StanfordCars": _stanford_cars,
    "SUN397": _sun397,
    "TinyImageNet": _tinyimagenet,
}
FAKE_DATASETS = tuple(WRITERS)


def default_classes(name: str) -> list[int]:
    """First, middle and last class: three classes spread over the label range."""
    n = len(load_classnames(name))
    return sorted({0, n // 2, n - 1})


def make_fake_dataset(
    name: str,
    root: str | Path,
    *,
    classes: Sequence[int] | None = None,
    per_class: int = 2,
    image_size: int = 8,
) -> FakeDataset:
    """Write a tiny copy of built-in dataset ``name`` under ``root`` in its real layout.

    ``classes``: canonical class indices to populate (default: first, middle, last).
    ``per_class``: images per class in each official split (twice that in the single pool of
    the 80/20-split datasets). CIFAR images are always 32 px and MNIST 28 px, as in the real files.
    """
    if name not in WRITERS:
        raise KeyError(f"no fake layout for {name!r}; known: {', '.join(FAKE_DATASETS)}")
    root = Path(root)
    chosen = list(classes) if classes is not None else default_classes(name)
    result = WRITERS[name](root, chosen, per_class, image_size)
    if isinstance(result, list):  # a pool that the builder splits 80/20
        return FakeDataset(name, root, chosen, _seeded_split(result), pool=result)
    return FakeDataset(name, root, chosen, result)
