"""The dataset registry: specs, data files, every built-in reader on a fake tree in its real
format, ZSCL's seeded splits, user datasets from config, and the error messages."""

from __future__ import annotations

import json
import pathlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Subset
from torchvision import datasets as tvd
from torchvision.transforms import ToTensor

from tests.fake_layouts import FAKE_DATASETS, fake_image, make_fake_dataset
from zscl.datasets import (
    DATASETS,
    CustomDataset,
    DatasetNotFoundError,
    DatasetSpec,
    LabeledImages,
    build_dataset,
    dataset_labels,
    get_dataset,
    load_classnames,
    load_custom_datasets,
    load_templates,
    register_custom,
)
from zscl.datasets.common import seeded_split
from zscl.datasets.mtil import CALTECH101_FOLDERS, EUROSAT_FOLDERS, MTIL_ORDER_I, MTIL_ORDER_II
from zscl.registry import RegistryError
from zscl.resources import data_dir

SEEDED_SPLIT = ("Caltech101", "EuroSAT", "SUN397")
# CLIP's ImageNet class names, which ZSCL uses, list these two twice (different synsets).
KNOWN_DUPLICATES = {"ImageNet": {"missile", "sunglasses"}}


@pytest.fixture
def scratch_registry():
    """Undo registrations made by a test, so the global registry stays as the session found it."""
    DATASETS.names()
    items, canonical = dict(DATASETS._items), dict(DATASETS._canonical)
    yield DATASETS
    DATASETS._items, DATASETS._canonical = items, canonical


# --- every registered dataset ------------------------------------------------------------


@pytest.mark.parametrize("name", DATASETS.names())
def test_registered_spec_is_complete(name: str) -> None:
    spec = get_dataset(name.lower())
    assert spec.name == name
    assert "{c}" in spec.templates[0] and spec.train_template == spec.templates[0]
    assert all("{c}" in t for t in spec.templates)
    assert spec.num_classes == len(spec.classnames) > 0 and all(c.strip() for c in spec.classnames)
    duplicates = {c for c in spec.classnames if spec.classnames.count(c) > 1}
    assert duplicates == KNOWN_DUPLICATES.get(name, set())
    assert "<root>" in spec.layout
    prompts = spec.prompts()
    assert len(prompts) == spec.num_classes and "{c}" not in prompts[0]
    assert prompts[0] == spec.templates[0].replace("{c}", spec.classnames[0])


@pytest.mark.parametrize("name", DATASETS.names())
def test_missing_dataset_names_its_layout_and_touches_nothing(name: str, tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as err:
        build_dataset(name, root, "train")
    message = str(err.value)
    assert message.startswith(f"{name} not found under {root}: expected ")
    assert get_dataset(name).layout.replace("<root>", str(root)) in message
    assert not root.exists()  # builders check before reading (torchvision's Caltech101 would mkdir)


def test_builtins_are_the_thirteen_datasets_and_mtil_orders_use_them() -> None:
    builtin = {"Aircraft", "Caltech101", "CIFAR10", "CIFAR100", "DTD", "EuroSAT", "Flowers", "Food", "ImageNet",
               "MNIST", "OxfordPet", "StanfordCars", "SUN397", "TinyImageNet"}  # fmt: skip
    assert builtin <= set(DATASETS.names())
    assert set(FAKE_DATASETS) == builtin  # a new built-in needs a fake layout (tests/fake_layouts.py)
    assert sorted(MTIL_ORDER_I) == sorted(MTIL_ORDER_II) == sorted(builtin - {"CIFAR10", "ImageNet", "TinyImageNet"})


# --- data files ------------------------------------------------------------------------------


def test_every_classnames_file_has_a_templates_file() -> None:
    names = {p.stem for p in (data_dir() / "classnames").glob("*.json")}
    assert names == {p.stem for p in (data_dir() / "templates").glob("*.json")}
    for name in names:
        assert load_classnames(name) and load_templates(name)


@pytest.mark.parametrize("name", ["Food", "DTD"])
def test_classnames_follow_torchvision_sorting(name: str) -> None:
    # torchvision sorts these class names in their raw form ("cheese_plate" < "cheesecake").
    names = list(load_classnames(name))
    assert names == sorted(names, key=lambda c: c.replace(" ", "_"))


def test_templates_of_imagenet_start_with_zscl_training_template() -> None:
    templates = load_templates("ImageNet")
    assert templates[0] == "a photo of a {c}." and len(set(templates)) == len(templates)


def test_hand_written_class_lists_align_with_their_folders() -> None:
    assert len(CALTECH101_FOLDERS) == len(load_classnames("Caltech101"))
    assert list(CALTECH101_FOLDERS) == sorted(CALTECH101_FOLDERS)  # torchvision's category order
    assert {"Faces", "Faces_easy", "Motorbikes", "airplanes"} <= set(CALTECH101_FOLDERS)
    assert len(EUROSAT_FOLDERS) == len(load_classnames("EuroSAT")) and list(EUROSAT_FOLDERS) == sorted(EUROSAT_FOLDERS)


def test_bad_data_is_rejected_with_a_clear_message() -> None:
    build = get_dataset("DTD").builder
    with pytest.raises(ValueError, match=r"\{c\} placeholder"):
        DatasetSpec("Bad", ("a",), ("a photo",), build, "<root>/x")
    with pytest.raises(ValueError, match="classnames must not be empty"):
        DatasetSpec("Bad", (), ("a {c}",), build, "<root>/x")
    with pytest.raises(FileNotFoundError, match="no templates file for 'NoSuchSet'"):
        load_templates("NoSuchSet")


# --- built-in readers on fake trees --------------------------------------------------------


@pytest.mark.parametrize("name", FAKE_DATASETS)
def test_builtin_reader_on_fake_tree(name: str, tmp_path: Path) -> None:
    fake = make_fake_dataset(name, tmp_path)
    for split in ("train", "test"):
        ds = build_dataset(name, tmp_path, split)
        assert len(ds) == len(fake.labels[split]) > 0
        assert dataset_labels(ds) == fake.labels[split]
        image, label = ds[len(ds) - 1]
        assert isinstance(image, Image.Image) and image.mode == "RGB" and label == fake.labels[split][-1]
    tensor, _ = build_dataset(name, tmp_path, "train", transform=ToTensor())[0]
    assert tensor.shape[0] == 3


def test_caltech101_greyscale_images_come_out_rgb(tmp_path: Path) -> None:
    fake = make_fake_dataset("Caltech101", tmp_path, classes=[0, 1])  # class 0 is written greyscale
    ds = ConcatDataset([build_dataset("Caltech101", tmp_path, s) for s in ("train", "test")])
    grey = [i for i, y in enumerate(dataset_labels(ds)) if y == 0]
    assert grey and all(ds[i][0].mode == "RGB" for i in grey)
    assert Image.open(tmp_path / "caltech101/101_ObjectCategories/Faces/image_0001.jpg").mode == "L"
    assert len(fake.pool) == 8


def _torchvision_class_names(name: str, root: Path) -> list[str]:
    readers = {
        "Aircraft": lambda: tvd.FGVCAircraft(root, split="train").classes,
        "Caltech101": lambda: tvd.Caltech101(root).categories,
        "DTD": lambda: tvd.DTD(root, split="train").classes,
        "EuroSAT": lambda: tvd.EuroSAT(root).classes,
        "Food": lambda: tvd.Food101(root, split="train").classes,
        "MNIST": lambda: tvd.MNIST(root).classes,
        "OxfordPet": lambda: tvd.OxfordIIITPet(root).classes,
        "StanfordCars": lambda: tvd.StanfordCars(root).classes,
        "SUN397": lambda: tvd.SUN397(root).classes,
    }
    return list(readers[name]())


NAMED_BY_TORCHVISION = (
    "Aircraft", "DTD", "Food", "MNIST", "OxfordPet", "StanfordCars", "SUN397", "Caltech101", "EuroSAT",
)  # fmt: skip


@pytest.mark.parametrize("name", NAMED_BY_TORCHVISION)
def test_full_fake_tree_class_order_matches_data_file(name: str, tmp_path: Path) -> None:
    n = len(load_classnames(name))
    fake = make_fake_dataset(name, tmp_path, classes=range(n), per_class=1)
    raw = _torchvision_class_names(name, tmp_path)
    if name == "Caltech101":
        assert raw == list(CALTECH101_FOLDERS)
    elif name == "EuroSAT":
        assert raw == list(EUROSAT_FOLDERS)
    else:  # ZSCL's names: torchvision's .classes with "_" -> " "
        assert [c.replace("_", " ") for c in raw] == list(load_classnames(name))
    train, test = (dataset_labels(build_dataset(name, tmp_path, s)) for s in ("train", "test"))
    assert sorted(set(train + test)) == list(range(n))
    assert test == fake.labels["test"]


def test_imagenet_prefers_val_in_folder_and_needs_all_class_folders(tmp_path: Path) -> None:
    make_fake_dataset("ImageNet", tmp_path, classes=[0, 999], per_class=1)
    assert dataset_labels(build_dataset("ImageNet", tmp_path, "test")) == [0, 999]
    val = tmp_path / "ImageNet" / "val_in_folder"
    for wnid in sorted(p.name for p in (tmp_path / "ImageNet" / "val").iterdir()):
        (val / wnid).mkdir(parents=True)
    fake_image(7, 0).save(val / "n00000007" / "x.JPEG")
    assert dataset_labels(build_dataset("ImageNet", tmp_path, "test")) == [7]
    (val / "n00000007" / "x.JPEG").unlink()
    (val / "n00000007").rmdir()
    with pytest.raises(DatasetNotFoundError, match="has 999 class folders, expected 1000"):
        build_dataset("ImageNet", tmp_path, "test")


# --- ZSCL's seeded 80/20 split --------------------------------------------------------------


@pytest.mark.parametrize("name", SEEDED_SPLIT)
def test_seeded_split_is_zscl_permutation(name: str, tmp_path: Path) -> None:
    fake = make_fake_dataset(name, tmp_path, per_class=3)
    n = len(fake.pool)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(42)).tolist()
    train, test = (build_dataset(name, tmp_path, s) for s in ("train", "test"))
    assert isinstance(train, Subset) and train.indices == perm[: n * 4 // 5] and test.indices == perm[n * 4 // 5 :]
    assert sorted(train.indices + test.indices) == list(range(n))


@pytest.mark.parametrize("n", [8677, 27000, 108754])  # Caltech101, EuroSAT, SUN397 sizes
def test_seeded_split_sizes_round_like_the_reference(n: int) -> None:
    train, test = seeded_split(range(n), "train"), seeded_split(range(n), "test")
    assert len(train) == n * 4 // 5 and len(test) == n - n * 4 // 5


def test_sun397_order_does_not_depend_on_filesystem_order(tmp_path: Path, monkeypatch) -> None:
    make_fake_dataset("SUN397", tmp_path, per_class=3)
    reference = [build_dataset("SUN397", tmp_path, "train")[i][0].tobytes() for i in range(6)]
    rglob = pathlib.Path.rglob
    monkeypatch.setattr(pathlib.Path, "rglob", lambda self, pattern: reversed(list(rglob(self, pattern))))
    shuffled = [build_dataset("SUN397", tmp_path, "train")[i][0].tobytes() for i in range(6)]
    assert shuffled == reference


# --- labels without decoding ---------------------------------------------------------------


def test_dataset_labels_reads_no_image() -> None:
    class Untouchable:
        def __getitem__(self, i):
            raise AssertionError("an image was read")

    ds = LabeledImages(Untouchable(), [3, 1, 2, 0])
    assert dataset_labels(ds) == [3, 1, 2, 0]
    assert dataset_labels(Subset(ds, [2, 0])) == [2, 3]
    assert dataset_labels(ConcatDataset([ds, Subset(ds, [1])])) == [3, 1, 2, 0, 1]


# --- user datasets from config -------------------------------------------------------------


def _image_tree(base: Path, split_classes: dict[str, list[str]]) -> None:
    for split, classes in split_classes.items():
        for k, c in enumerate(classes):
            (base / split / c).mkdir(parents=True, exist_ok=True)
            fake_image(k, k).save(base / split / c / f"{split}{k}.png")


def test_custom_imagefolder(tmp_path: Path, scratch_registry) -> None:
    _image_tree(tmp_path / "pets", {"train": ["dog", "cat", "bird"], "test": ["dog"]})
    spec = register_custom(CustomDataset(name="MyPets", kind="imagefolder", path="pets"), data_root=tmp_path)
    assert spec.classnames == ("bird", "cat", "dog") and spec.templates == ("a photo of a {c}.",)
    assert dataset_labels(build_dataset("mypets", tmp_path, "train")) == [0, 1, 2]
    assert dataset_labels(build_dataset("MyPets", tmp_path, "test")) == [2]
    image, label = build_dataset("MyPets", tmp_path, "test")[0]
    assert image.mode == "RGB" and label == 2
    # Absolute path, display names given: their count must match the folders.
    cfg = CustomDataset(name="MyPets", kind="imagefolder", path=str(tmp_path / "pets"), classnames=["a bird", "a cat"])
    register_custom(cfg)
    with pytest.raises(ValueError, match="has 3 class folders but 2 class names"):
        build_dataset("MyPets", "/unused", "train")


def test_custom_imagefolder_unknown_test_class_is_an_error(tmp_path: Path, scratch_registry) -> None:
    _image_tree(tmp_path / "set", {"train": ["a", "b"], "test": ["c"]})
    cfg = CustomDataset(name="Odd", kind="imagefolder", path="set", templates=["{c} pic"])
    register_custom(cfg, data_root=tmp_path)
    with pytest.raises(ValueError, match=r"class folder\(s\) \['c'\]"):
        build_dataset("Odd", tmp_path, "test")


def test_custom_csv_with_names_and_tsv_with_indices(tmp_path: Path, scratch_registry) -> None:
    folder = tmp_path / "lists"
    (folder / "img").mkdir(parents=True)
    for k in range(4):
        fake_image(k, k).save(folder / "img" / f"{k}.png")
    (folder / "train.csv").write_text("file,kind\nimg/0.png,zebra\nimg/1.png,ant\nimg/2.png,zebra\n")
    (folder / "test.tsv").write_text("file\tkind\nimg/3.png\tant\n")
    cfg = CustomDataset(name="Lists", kind="csv", path="lists", path_column="file", label_column="kind")
    spec = register_custom(cfg, data_root=tmp_path)
    assert spec.classnames == ("ant", "zebra")
    assert dataset_labels(build_dataset("Lists", tmp_path, "train")) == [1, 0, 1]
    image, label = build_dataset("Lists", tmp_path, "test")[0]
    assert label == 0 and image.mode == "RGB"
    # Integer labels need class names; paths relative to image_root under the data root.
    (folder / "train.csv").write_text("path,label\n0.png,1\n1.png,0\n")
    cfg = CustomDataset(name="Lists", kind="csv", path="lists", classnames=["x", "y"], image_root="lists/img")
    register_custom(cfg)
    ds = build_dataset("Lists", tmp_path, "train")
    assert dataset_labels(ds) == [1, 0] and ds[0][0].size == (8, 8)
    with pytest.raises(ValueError, match="class names must be given"):
        register_custom(CustomDataset(name="NoNames", kind="csv", path="lists"), data_root=tmp_path)


def test_custom_csv_errors_name_the_problem(tmp_path: Path, scratch_registry) -> None:
    (tmp_path / "t.csv").write_text("path,label\na.png,cat\n")
    register_custom(CustomDataset(name="Few", kind="csv", path=".", train="t", test="t", classnames=["dog"]))
    with pytest.raises(ValueError, match=r"label\(s\) \['cat'\] are not among the class names"):
        build_dataset("Few", tmp_path, "train")
    cfg = CustomDataset(name="Few", kind="csv", path=".", train="t", test="t", classnames=["dog"], label_column="y")
    register_custom(cfg)
    with pytest.raises(ValueError, match=r"column\(s\) \['y'\] not found; header is \['path', 'label'\]"):
        build_dataset("Few", tmp_path, "train")
    with pytest.raises(DatasetNotFoundError, match="Few not found under"):
        build_dataset("Few", tmp_path / "elsewhere", "train")
    with pytest.raises(ValueError, match="give classnames, an absolute path, or data_root"):
        register_custom(CustomDataset(name="Few", kind="imagefolder", path="rel"))


def test_load_custom_datasets_from_yaml_and_list(tmp_path: Path, scratch_registry) -> None:
    _image_tree(tmp_path / "a", {"train": ["x", "y"], "test": ["y"]})
    config = tmp_path / "custom.yaml"
    config.write_text("datasets:\n  - name: FromYaml\n    kind: imagefolder\n    path: a\n    templates: ['{c} here']\n")
    (spec,) = load_custom_datasets(config, data_root=tmp_path)
    assert (spec.name, spec.classnames, spec.train_template) == ("FromYaml", ("x", "y"), "{c} here")
    assert dataset_labels(build_dataset("FromYaml", tmp_path, "test")) == [1]
    specs = load_custom_datasets([{"name": "FromList", "kind": "imagefolder", "path": "a", "classnames": ["p", "q"]}])
    assert specs[0].classnames == ("p", "q") and "FromList" in DATASETS
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['folder'\]"):
        load_custom_datasets([{"name": "Bad", "kind": "csv", "folder": "a"}])


# --- errors -------------------------------------------------------------------------------


def test_missing_dataset_message_names_layout(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as err:
        build_dataset("DTD", tmp_path, "train")
    assert str(err.value).startswith(
        f"DTD not found under {tmp_path}: expected {tmp_path}/dtd/dtd/images/<class>/*.jpg and "
        f"{tmp_path}/dtd/dtd/labels/{{train1,test1}}.txt"
    )
    assert isinstance(err.value, FileNotFoundError)
    (tmp_path / "dtd" / "dtd" / "images").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match=r"missing .*labels/test1\.txt"):
        build_dataset("dtd", tmp_path, "test")


def test_unknown_name_and_bad_split() -> None:
    with pytest.raises(RegistryError, match=r"unknown dataset 'Cifar1000'\. Did you mean CIFAR100") as err:
        get_dataset("Cifar1000")
    assert "Available: Aircraft" in str(err.value)
    with pytest.raises(ValueError, match="split must be 'train' or 'test', got 'val'"):
        build_dataset("DTD", "/tmp", "val")  # type: ignore[arg-type]


def test_data_files_are_plain_json_lists() -> None:
    for kind in ("classnames", "templates"):
        for path in (data_dir() / kind).glob("*.json"):
            values = json.loads(path.read_text(encoding="utf-8"))
            assert isinstance(values, list) and all(isinstance(v, str) for v in values), path


def test_small_images_are_decoded_once_and_served_unchanged(tmp_path):
    """LabeledImages keeps small decoded images: the second read gives the same pixels without opening the
    file (here: the file is gone), each read is a fresh copy, and large images are not kept."""
    import numpy as np
    from PIL import Image

    from zscl.datasets.common import SMALL_IMAGE_PIXELS, LabeledImages

    rng = np.random.default_rng(0)
    small, large = tmp_path / "s.png", tmp_path / "l.png"
    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(small)
    side = int(SMALL_IMAGE_PIXELS ** 0.5) + 1
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(large)
    ds = LabeledImages([small, large], [0, 1])
    first = ds[0][0]
    first.putpixel((0, 0), (1, 2, 3))  # a caller altering its copy must not reach the kept image
    small.unlink()
    assert np.array_equal(np.asarray(ds[0][0]), pixels)
    ds[1]
    large.unlink()
    with pytest.raises(FileNotFoundError):
        ds[1]
