"""Class names against the datasets' own metadata files, independently of our class-name JSON.

``fake_layouts.py`` writes metadata from ``data/classnames/*.json``, so a wrong name there would be
written, read back and agree with itself. Here each test writes the metadata file in its real format
with a few entries copied from the real dataset (spelling, underscores, slashes and capitals as the
dataset ships them), and checks that the loader gives every image the canonical label whose name in
``data/classnames`` is the name written by hand below. Where the real file's full order is known
(its first and last entries), the canonical index is checked too.

Each class's images get a distinct size, so an item's true class is read off the image itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zscl.datasets import build_dataset, load_classnames


def _image(path: Path, k: int) -> None:
    """A tiny JPEG whose width (4 + 2k) says which class (k) it belongs to."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4 + 2 * k, 4), (10 * k, 50, 90)).save(path)


def _check(name: str, root: Path, split: str, expected: list[tuple[str, int | None]]) -> None:
    """Every item's label names the class of its image; ``expected[k] = (our name, canonical index or None)``."""
    names = load_classnames(name)
    dataset = build_dataset(name, root, split, None)
    seen = set()
    for i in range(len(dataset)):
        image, label = dataset[i]
        k = (image.size[0] - 4) // 2
        ours, index = expected[k]
        assert names[label] == ours, f"{name}: an image of {ours!r} got label {label} ({names[label]!r})"
        assert index is None or label == index
        seen.add(k)
    assert seen == set(range(len(expected))), f"{name}: not every class was read"


def test_aircraft_variants_txt(tmp_path: Path) -> None:
    # fgvc-aircraft-2013b/data/variants.txt: one variant per line, first "707-320", last "Yak-42".
    variants = [("707-320", 0), ("F-16A/B", None), ("Yak-42", 99)]
    data = tmp_path / "fgvc-aircraft-2013b" / "data"
    data.mkdir(parents=True)
    (data / "variants.txt").write_text("".join(f"{v}\n" for v, _ in variants))
    for split, first_id in (("train", 1025794), ("test", 1514522)):
        lines = []
        for k, (variant, _) in enumerate(variants):
            _image(data / "images" / f"{first_id + k:07d}.jpg", k)
            lines.append(f"{first_id + k:07d} {variant}\n")  # "<image id> <variant>", the variant may hold spaces
        (data / f"images_variant_{split}.txt").write_text("".join(lines))
    for split in ("train", "test"):
        _check("Aircraft", tmp_path, split, variants)


def test_sun397_classname_txt(tmp_path: Path) -> None:
    # SUN397/ClassName.txt: "/<letter>/<class>[/<subclass>]", first "/a/abbey", last "/y/youth_hostel".
    lines = ["/a/abbey", "/a/apartment_building/outdoor", "/b/bakery/shop", "/y/youth_hostel"]
    expected = [("abbey", 0), ("apartment building/outdoor", None), ("bakery/shop", None), ("youth hostel", 396)]
    base = tmp_path / "SUN397"
    base.mkdir()
    (base / "ClassName.txt").write_text("".join(f"{line}\n" for line in lines))
    for k, line in enumerate(lines):
        for j in range(3):
            _image(base / line.lstrip("/") / f"sun_{k}{j}abcdefgh.jpg", k)
    _check("SUN397", tmp_path, "train", expected)


def test_stanford_cars_cars_meta(tmp_path: Path) -> None:
    from scipy.io import savemat

    # devkit/cars_meta.mat: "class_names", a 1 x N cell of strings; annotations hold 1-based indices into it.
    cars = [("AM General Hummer SUV 2000", 0), ("Ram C/V Cargo Van Minivan 2012", None),
            ("smart fortwo Convertible 2012", 195)]
    base = tmp_path / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array([[c for c, _ in cars]], dtype=object)})
    fields = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
    mats = {"train": base / "devkit" / "cars_train_annos.mat", "test": base / "cars_test_annos_withlabels.mat"}
    for split, mat in mats.items():
        annos = np.zeros((1, len(cars)), dtype=[(f, object) for f in fields])
        for k in range(len(cars)):
            _image(base / f"cars_{split}" / f"{k + 1:05d}.jpg", k)
            annos[0, k] = (1, 1, 4, 4, k + 1, f"{k + 1:05d}.jpg")
        savemat(mat, {"annotations": annos})
    for split in ("train", "test"):
        _check("StanfordCars", tmp_path, split, cars)


def test_food_meta_classes(tmp_path: Path) -> None:
    # food-101/meta/classes.txt lists the classes (first "apple_pie", last "waffles");
    # meta/{train,test}.json map each class to "<class>/<image id>" entries.
    classes = ["apple_pie", "hot_and_sour_soup", "waffles"]
    expected = [("apple pie", 0), ("hot and sour soup", None), ("waffles", 100)]
    base = tmp_path / "food-101"
    (base / "meta").mkdir(parents=True)
    (base / "meta" / "classes.txt").write_text("".join(f"{c}\n" for c in classes))
    for split, first in (("train", 1005649), ("test", 1011328)):
        meta = {c: [f"{c}/{first + k}"] for k, c in enumerate(classes)}
        for k, c in enumerate(classes):
            _image(base / "images" / c / f"{first + k}.jpg", k)
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta))
        _check("Food", tmp_path, split, expected)


def test_oxford_pet_annotations(tmp_path: Path) -> None:
    # annotations/{trainval,test}.txt: "<Image> <CLASS-ID 1..37> <SPECIES> <BREED ID>"; cats are capitalised.
    rows = ["Abyssinian_100 1 1 1", "american_pit_bull_terrier_1 3 2 2", "yorkshire_terrier_99 37 2 25"]
    expected = [("Abyssinian", 0), ("American Pit Bull Terrier", 2), ("Yorkshire Terrier", 36)]
    base = tmp_path / "oxford-iiit-pet"
    (base / "annotations").mkdir(parents=True)
    for k, row in enumerate(rows):
        _image(base / "images" / f"{row.split()[0]}.jpg", k)
    for file in ("trainval", "test"):
        (base / "annotations" / f"{file}.txt").write_text("".join(f"{r}\n" for r in rows))
    for split in ("train", "test"):
        _check("OxfordPet", tmp_path, split, expected)


def test_dtd_folders(tmp_path: Path) -> None:
    # dtd/dtd/images/<class>/<class>_<n>.jpg and labels/{train,test}1.txt "<class>/<file>"; 47 classes,
    # first "banded", last "zigzagged".
    classes = ["banded", "honeycombed", "zigzagged"]
    expected = [("banded", 0), ("honeycombed", None), ("zigzagged", 46)]
    data = tmp_path / "dtd" / "dtd"
    (data / "labels").mkdir(parents=True)
    for split, n in (("train", 2), ("val", 50), ("test", 99)):
        lines = []
        for k, c in enumerate(classes):
            _image(data / "images" / c / f"{c}_{n:04d}.jpg", k)
            lines.append(f"{c}/{c}_{n:04d}.jpg\n")
        (data / "labels" / f"{split}1.txt").write_text("".join(lines))
    for split in ("train", "test"):
        _check("DTD", tmp_path, split, expected)


@pytest.mark.parametrize("name", ["Aircraft", "SUN397", "StanfordCars", "Food", "OxfordPet", "DTD"])
def test_class_lists_have_the_real_datasets_class_counts(name: str) -> None:
    counts = {"Aircraft": 100, "SUN397": 397, "StanfordCars": 196, "Food": 101, "OxfordPet": 37, "DTD": 47}
    names = load_classnames(name)
    assert len(names) == counts[name] == len(set(names))
