"""The 13 built-in datasets: ZSCL's MTIL benchmark (11 datasets), CIFAR10 and ImageNet.

Readers are torchvision's (``download=False``) on their standard layouts; splits follow the
ZSCL reference code (``mtil/src/datasets/collections.py`` and ``imagenet.py``):

* Caltech101, EuroSAT, SUN397: seeded 80/20 ``random_split`` (seed 42) of the whole set;
  SUN397's file list is sorted first, since torchvision's ``rglob`` order is the filesystem's;
* Aircraft: ``train`` / ``test`` at variant level; DTD: ``train`` / ``test`` of partition 1
  (``val`` unused); OxfordPet: ``trainval`` / ``test``; the rest: the official train / test.

Labels index ``data/classnames/<Name>.json``. Where torchvision names the classes, the label
goes through the name (``_`` -> space, as ZSCL does), so every split -- and a partial copy --
shares the canonical numbering.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Callable, Sequence

from torch.utils.data import Dataset
from torchvision import datasets as tvd

from zscl.datasets.common import (
    LabeledImages,
    check_label_range,
    class_folders,
    labels_by_name,
    require_paths,
    scan_image_folder,
    seeded_split,
)
from zscl.datasets.registry import DATASETS, Builder, DatasetSpec, register_dataset
from zscl.datasets.text import load_classnames, load_templates

MTIL_ORDER_I = (
    "Aircraft", "Caltech101", "CIFAR100", "DTD", "EuroSAT", "Flowers",
    "Food", "MNIST", "OxfordPet", "StanfordCars", "SUN397",
)  # fmt: skip
MTIL_ORDER_II = (
    "StanfordCars", "Food", "MNIST", "OxfordPet", "Flowers", "SUN397",
    "Aircraft", "Caltech101", "DTD", "EuroSAT", "CIFAR100",
)  # fmt: skip

# Folder names of Caltech101's 101 categories (torchvision's sorted order, BACKGROUND_Google
# dropped), aligned with ZSCL's hand-written names in data/classnames/Caltech101.json.
CALTECH101_FOLDERS = (
    "Faces", "Faces_easy", "Leopards", "Motorbikes", "accordion", "airplanes", "anchor", "ant", "barrel", "bass",
    "beaver", "binocular", "bonsai", "brain", "brontosaurus", "buddha", "butterfly", "camera", "cannon", "car_side",
    "ceiling_fan", "cellphone", "chair", "chandelier", "cougar_body", "cougar_face", "crab", "crayfish", "crocodile",
    "crocodile_head", "cup", "dalmatian", "dollar_bill", "dolphin", "dragonfly", "electric_guitar", "elephant", "emu",
    "euphonium", "ewer", "ferry", "flamingo", "flamingo_head", "garfield", "gerenuk", "gramophone", "grand_piano",
    "hawksbill", "headphone", "hedgehog", "helicopter", "ibis", "inline_skate", "joshua_tree", "kangaroo", "ketch",
    "lamp", "laptop", "llama", "lobster", "lotus", "mandolin", "mayfly", "menorah", "metronome", "minaret",
    "nautilus", "octopus", "okapi", "pagoda", "panda", "pigeon", "pizza", "platypus", "pyramid", "revolver", "rhino",
    "rooster", "saxophone", "schooner", "scissors", "scorpion", "sea_horse", "snoopy", "soccer_ball", "stapler",
    "starfish", "stegosaurus", "stop_sign", "strawberry", "sunflower", "tick", "trilobite", "umbrella", "watch",
    "water_lilly", "wheelchair", "wild_cat", "windsor_chair", "wrench", "yin_yang",
)  # fmt: skip
# EuroSAT's class folders (sorted, the ImageFolder order), aligned with ZSCL's names.
EUROSAT_FOLDERS = (
    "AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial",
    "Pasture", "PermanentCrop", "Residential", "River", "SeaLake",
)  # fmt: skip
IMAGENET_NUM_CLASSES = 1000


class _NoChecksumCIFAR:
    """torchvision's CIFAR readers check MD5 sums, which rejects re-packed copies and test
    fixtures; check that the files exist instead and read the class names directly."""

    def _check_integrity(self) -> bool:
        folder = Path(self.root, self.base_folder)  # type: ignore[attr-defined]
        files = self.train_list + self.test_list  # type: ignore[attr-defined]
        return all((folder / name).is_file() for name, _ in files)

    def _load_meta(self) -> None:
        path = Path(self.root, self.base_folder, self.meta["filename"])  # type: ignore[attr-defined]
        with open(path, "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]  # type: ignore[attr-defined]


class _CIFAR10(_NoChecksumCIFAR, tvd.CIFAR10):
    pass


class _CIFAR100(_NoChecksumCIFAR, tvd.CIFAR100):
    pass


class _Flowers102(tvd.Flowers102):
    """Flowers102 with an existence check in place of the MD5 check of its .mat files."""

    def _check_integrity(self) -> bool:
        mats = (self._base_folder / f for f in ("imagelabels.mat", "setid.mat"))
        return self._images_folder.is_dir() and all(m.is_file() for m in mats)


def _underscore_to_space(name: str) -> str:
    return name.replace("_", " ")


def _named(
    name: str,
    root: Path,
    source: Dataset,
    raw_labels: Sequence[int],
    raw_classes: Sequence[str],
    transform: Callable | None,
    folders: Sequence[str] | None = None,
) -> LabeledImages:
    """Wrap a torchvision dataset whose labels index its own ``raw_classes``.

    A raw class is found by its ZSCL name (``_`` -> space) in the class-name file, or, for the
    datasets whose names ZSCL wrote by hand, by its position in ``folders``.
    """
    if folders is None:
        lookup = {c: i for i, c in enumerate(load_classnames(name))}
        raw_classes = [_underscore_to_space(c) for c in raw_classes]
    else:
        lookup = {f: i for i, f in enumerate(folders)}
    labels = labels_by_name(raw_labels, raw_classes, lookup, f"{name} under {root}")
    return LabeledImages(source, labels, transform)


def _positional(
    name: str, root: Path, source: Dataset, labels: Sequence[int], transform: Callable | None
) -> LabeledImages:
    """Wrap a torchvision dataset whose labels are already the official 0-based class ids."""
    labels = check_label_range(labels, len(load_classnames(name)), f"{name} under {root}")
    return LabeledImages(source, labels, transform)


def _aircraft(root: Path, split: str, transform: Callable | None) -> Dataset:
    data = root / "fgvc-aircraft-2013b" / "data"
    require_paths(data / "images", data / "variants.txt", data / f"images_variant_{split}.txt")
    tv = tvd.FGVCAircraft(root, split=split, annotation_level="variant")
    return _named("Aircraft", root, tv, tv._labels, tv.classes, transform)


def _caltech101(root: Path, split: str, transform: Callable | None) -> Dataset:
    require_paths(root / "caltech101" / "101_ObjectCategories" / "BACKGROUND_Google")
    tv = tvd.Caltech101(root, target_type="category")
    return seeded_split(_named("Caltech101", root, tv, tv.y, tv.categories, transform, CALTECH101_FOLDERS), split)


def _cifar(name: str, reader: type) -> Builder:
    def build(root: Path, split: str, transform: Callable | None) -> Dataset:
        require_paths(root / reader.base_folder)
        tv = reader(root, train=split == "train")
        return _named(name, root, tv, tv.targets, tv.classes, transform)

    return build


def _dtd(root: Path, split: str, transform: Callable | None) -> Dataset:
    data = root / "dtd" / "dtd"
    require_paths(data / "images", data / "labels" / f"{split}1.txt")
    tv = tvd.DTD(root, split=split, partition=1)
    return _named("DTD", root, tv, tv._labels, tv.classes, transform)


def _eurosat(root: Path, split: str, transform: Callable | None) -> Dataset:
    require_paths(root / "eurosat" / "2750")
    tv = tvd.EuroSAT(root)
    return seeded_split(_named("EuroSAT", root, tv, tv.targets, tv.classes, transform, EUROSAT_FOLDERS), split)


def _flowers(root: Path, split: str, transform: Callable | None) -> Dataset:
    base = root / "flowers-102"
    require_paths(base / "jpg", base / "imagelabels.mat", base / "setid.mat")
    tv = _Flowers102(root, split=split)
    return _positional("Flowers", root, tv, tv._labels, transform)


def _food(root: Path, split: str, transform: Callable | None) -> Dataset:
    base = root / "food-101"
    require_paths(base / "images", base / "meta" / f"{split}.json")
    tv = tvd.Food101(root, split=split)
    return _named("Food", root, tv, tv._labels, tv.classes, transform)


def _mnist(root: Path, split: str, transform: Callable | None) -> Dataset:
    raw = root / "MNIST" / "raw"
    prefix = "train" if split == "train" else "t10k"
    require_paths(raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte")
    tv = tvd.MNIST(root, train=split == "train")
    return _named("MNIST", root, tv, tv.targets.tolist(), tv.classes, transform)


def _oxford_pet(root: Path, split: str, transform: Callable | None) -> Dataset:
    base = root / "oxford-iiit-pet"
    name = "trainval" if split == "train" else "test"
    require_paths(base / "images", base / "annotations" / f"{name}.txt")
    tv = tvd.OxfordIIITPet(root, split=name, target_types="category")
    return _positional("OxfordPet", root, tv, tv._labels, transform)


def _stanford_cars(root: Path, split: str, transform: Callable | None) -> Dataset:
    base = root / "stanford_cars"
    if split == "train":
        annos, images = base / "devkit" / "cars_train_annos.mat", base / "cars_train"
    else:
        annos, images = base / "cars_test_annos_withlabels.mat", base / "cars_test"
    require_paths(base / "devkit" / "cars_meta.mat", annos, images)
    tv = tvd.StanfordCars(root, split=split)  # never download=True: its download() always raises
    return _named("StanfordCars", root, tv, [y for _, y in tv._samples], tv.classes, transform)


def _sun397(root: Path, split: str, transform: Callable | None) -> Dataset:
    base = root / "SUN397"
    require_paths(base / "ClassName.txt")
    tv = tvd.SUN397(root)
    full = _named("SUN397", root, tv, tv._labels, tv.classes, transform)
    # Sort by relative path so that the seeded split is the same on every filesystem.
    order = sorted(range(len(full)), key=lambda i: tv._image_files[i].relative_to(base).as_posix())
    return seeded_split(LabeledImages(tv, [full.labels[i] for i in order], transform, index=order), split)


def _imagenet(root: Path, split: str, transform: Callable | None) -> Dataset:
    base = root / "ImageNet"
    folder = base / "train" if split == "train" else base / "val_in_folder"
    if split == "test" and not folder.is_dir():  # ZSCL reads val_in_folder/ if present, else val/
        folder = base / "val"
    classes = class_folders(folder)
    if len(classes) != IMAGENET_NUM_CLASSES:
        raise FileNotFoundError(
            f"{folder} has {len(classes)} class folders, expected {IMAGENET_NUM_CLASSES} (one per WordNet id)"
        )
    paths, labels = scan_image_folder(folder, classes)
    return LabeledImages(paths, labels, transform)


_LAYOUTS = {
    "Aircraft": "<root>/fgvc-aircraft-2013b/data/"
    "{variants.txt,images_variant_train.txt,images_variant_test.txt,images/<id>.jpg}",
    "Caltech101": "<root>/caltech101/101_ObjectCategories/<category>/image_0001.jpg... "
    "(101 category folders plus BACKGROUND_Google)",
    "CIFAR10": "<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} (CIFAR-10 python version)",
    "CIFAR100": "<root>/cifar-100-python/{train,test,meta} (CIFAR-100 python version)",
    "DTD": "<root>/dtd/dtd/images/<class>/*.jpg and <root>/dtd/dtd/labels/{train1,test1}.txt",
    "EuroSAT": "<root>/eurosat/2750/<ClassFolder>/*.jpg (10 class folders, RGB version)",
    "Flowers": "<root>/flowers-102/{jpg/image_00001.jpg...,imagelabels.mat,setid.mat}",
    "Food": "<root>/food-101/images/<class>/<id>.jpg and <root>/food-101/meta/{train,test}.json",
    "ImageNet": "<root>/ImageNet/train/<wnid>/*.JPEG and <root>/ImageNet/val/<wnid>/*.JPEG "
    "(or val_in_folder/), 1000 class folders each",
    "MNIST": "<root>/MNIST/raw/{train,t10k}-images-idx3-ubyte and {train,t10k}-labels-idx1-ubyte (uncompressed)",
    "OxfordPet": "<root>/oxford-iiit-pet/images/<Breed>_<n>.jpg and "
    "<root>/oxford-iiit-pet/annotations/{trainval,test}.txt",
    "StanfordCars": "<root>/stanford_cars/{devkit/cars_meta.mat,devkit/cars_train_annos.mat,"
    "cars_train/,cars_test/,cars_test_annos_withlabels.mat}",
    "SUN397": "<root>/SUN397/ClassName.txt and <root>/SUN397/<letter>/<class>[/<subclass>]/sun_*.jpg",
}
_BUILDERS: dict[str, Builder] = {
    "Aircraft": _aircraft,
    "Caltech101": _caltech101,
    "CIFAR10": _cifar("CIFAR10", _CIFAR10),
    "CIFAR100": _cifar("CIFAR100", _CIFAR100),
    "DTD": _dtd,
    "EuroSAT": _eurosat,
    "Flowers": _flowers,
    "Food": _food,
    "ImageNet": _imagenet,
    "MNIST": _mnist,
    "OxfordPet": _oxford_pet,
    "StanfordCars": _stanford_cars,
    "SUN397": _sun397,
}


def register_datasets() -> None:
    """Register the built-in datasets (called by the registry's loader; idempotent)."""
    for name, builder in _BUILDERS.items():
        if name not in DATASETS:
            spec = DatasetSpec(name, load_classnames(name), load_templates(name), builder, _LAYOUTS[name])
            register_dataset(spec)
