"""User datasets added from config (YAML), no code: an image folder tree or CSV/TSV file lists.

Image folder::

    <data_root>/<path>/<train>/<class>/<image>      (and the same under <test>)

Class ``i`` is the ``i``-th class folder of the *train* folder in sorted order; test folders are
matched by name. CSV/TSV (delimiter sniffed) with a header row::

    path,label
    images/0001.jpg,dog          # a class name, or a 0-based class index

Image paths are relative to ``image_root`` (itself relative to the data root) or, by default,
to the CSV's folder.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

from torch.utils.data import Dataset

from zscl.datasets.common import LabeledImages, check_label_range, class_folders, scan_image_folder
from zscl.datasets.registry import Builder, DatasetSpec, register_dataset
from zscl.datasets.text import check_strings

DEFAULT_TEMPLATES = ("a photo of a {c}.",)


def imagefolder_builder(
    subdir: str, train: str = "train", test: str = "test", classnames: Sequence[str] | None = None
) -> Builder:
    """Builder for ``<data_root>/<subdir>/<train|test>/<class>/<image>`` (``subdir`` may be absolute).

    If ``classnames`` is given, the train folder must hold exactly that many class folders.
    """

    def build(root: Path, split: str, transform: Callable | None) -> Dataset:
        base = root / Path(subdir).expanduser()
        folders = class_folders(base / train)
        if classnames is not None and len(classnames) != len(folders):
            raise ValueError(
                f"{base / train} has {len(folders)} class folders but {len(classnames)} class names were given; "
                "class i is the i-th folder in sorted order, so the counts must match"
            )
        paths, labels = scan_image_folder(base / (train if split == "train" else test), folders)
        return LabeledImages(paths, labels, transform)

    return build


def csv_builder(
    train_csv: str,
    test_csv: str,
    path_column: str = "path",
    label_column: str = "label",
    image_root: str | None = None,
    classnames: Sequence[str] | None = None,
) -> Builder:
    """Builder for CSV/TSV image lists (paths relative to the data root, or absolute).

    Labels are class names or 0-based indices. Names are looked up in ``classnames``; without
    it, the classes are the sorted distinct names of the train file.
    """

    def build(root: Path, split: str, transform: Callable | None) -> Dataset:
        table = resolve_table(root / Path(train_csv if split == "train" else test_csv).expanduser())
        paths, raw = read_table(table, path_column, label_column)
        names = classnames
        if names is None:
            names = csv_classnames(resolve_table(root / Path(train_csv).expanduser()), path_column, label_column)
        labels = _parse_labels(raw, names, str(table))
        base = root / image_root if image_root is not None else table.parent
        return LabeledImages([base / p for p in paths], labels, transform)

    return build


def resolve_table(path: Path) -> Path:
    """``path``, or ``path.csv`` / ``path.tsv`` when ``path`` has no suffix and is not a file."""
    if path.is_file() or path.suffix:
        return path
    for suffix in (".csv", ".tsv"):
        if path.with_name(path.name + suffix).is_file():
            return path.with_name(path.name + suffix)
    return path


def read_table(path: Path, path_column: str, label_column: str) -> tuple[list[str], list[str]]:
    """The ``(paths, labels)`` columns of a CSV/TSV file with a header row (delimiter sniffed)."""
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}")
    with open(path, newline="", encoding="utf-8") as f:
        sample = f.read(8192)
        f.seek(0)
        try:
            dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(sample, delimiters=",\t;|")
        except csv.Error:  # e.g. a single column: fall back on the suffix
            dialect = csv.excel_tab if path.suffix.lower() == ".tsv" else csv.excel
        rows = list(csv.DictReader(f, dialect=dialect))
    header = list(rows[0].keys()) if rows else []
    missing = [c for c in (path_column, label_column) if c not in header]
    if missing:
        raise ValueError(f"{path}: column(s) {missing} not found; header is {header}")
    return [r[path_column] for r in rows], [r[label_column].strip() for r in rows]


def csv_classnames(path: Path, path_column: str = "path", label_column: str = "label") -> tuple[str, ...]:
    """Sorted distinct class names of a CSV whose labels are names (not indices)."""
    _, raw = read_table(path, path_column, label_column)
    if raw and all(v.lstrip("-").isdigit() for v in raw):
        raise ValueError(f"{path}: labels are class indices, so the class names must be given (classnames: [...])")
    return tuple(sorted(set(raw)))


def _parse_labels(raw: Sequence[str], classnames: Sequence[str], where: str) -> list[int]:
    if raw and all(v.lstrip("-").isdigit() for v in raw):
        return check_label_range([int(v) for v in raw], len(classnames), where)
    lookup = {c: i for i, c in enumerate(classnames)}
    unknown = sorted({v for v in raw if v not in lookup})
    if unknown:
        raise ValueError(f"{where}: label(s) {unknown[:10]} are not among the class names {list(classnames)[:10]}...")
    return [lookup[v] for v in raw]


@dataclass
class CustomDataset:
    """A user dataset declared in config (YAML), registered with :func:`register_custom`."""

    name: str
    kind: Literal["imagefolder", "csv"]
    path: str  # imagefolder: folder under the data root (or absolute); csv: folder holding the CSVs
    train: str = "train"  # sub-folder, or CSV/TSV file name (".csv" / ".tsv" may be left out)
    test: str = "test"
    classnames: list[str] | None = None  # default: folder names (imagefolder) / label names (csv)
    templates: list[str] | None = None  # default: ["a photo of a {c}."]
    path_column: str = "path"
    label_column: str = "label"
    image_root: str | None = None  # csv: image paths are relative to this (under the data root); default: CSV folder


def _default_classnames(cfg: CustomDataset, data_root: Path | None) -> tuple[str, ...]:
    """Class names read from disk: the train class folders, or the train CSV's label names."""
    folder = Path(cfg.path).expanduser()
    if not folder.is_absolute():
        if data_root is None:
            raise ValueError(
                f"custom dataset {cfg.name!r}: give classnames, an absolute path, or data_root "
                f"(the class names are read from {cfg.path!r}, which is relative to the data root)"
            )
        folder = Path(data_root).expanduser() / folder
    if cfg.kind == "imagefolder":
        return tuple(class_folders(folder / cfg.train))
    return csv_classnames(resolve_table(folder / cfg.train), cfg.path_column, cfg.label_column)


def register_custom(cfg: CustomDataset, *, overwrite: bool = True, data_root: str | Path | None = None) -> DatasetSpec:
    """Register a :class:`CustomDataset` in the dataset registry and return its spec.

    Without ``cfg.classnames`` the class names are read now, from ``cfg.path`` (absolute, or
    under ``data_root``); the images themselves are only read when the dataset is built.
    """
    if cfg.kind not in ("imagefolder", "csv"):
        raise ValueError(f"custom dataset {cfg.name!r}: kind must be 'imagefolder' or 'csv', got {cfg.kind!r}")
    where = f"custom dataset {cfg.name!r}"
    if cfg.classnames is not None:
        names = check_strings(cfg.classnames, where, "classnames")
    else:
        names = _default_classnames(cfg, Path(data_root) if data_root is not None else None)
    templates = tuple(cfg.templates) if cfg.templates is not None else DEFAULT_TEMPLATES
    where_files = cfg.path if Path(cfg.path).is_absolute() else f"<root>/{cfg.path}"
    if cfg.kind == "imagefolder":
        builder = imagefolder_builder(cfg.path, cfg.train, cfg.test, classnames=names)
        layout = f"{where_files}/{{{cfg.train},{cfg.test}}}/<class>/<image> ({len(names)} class folders)"
    else:
        train, test = (str(Path(cfg.path) / t) for t in (cfg.train, cfg.test))
        builder = csv_builder(train, test, cfg.path_column, cfg.label_column, cfg.image_root, classnames=names)
        columns = f"columns {cfg.path_column!r}, {cfg.label_column!r}"
        layout = f"{where_files}/{{{cfg.train},{cfg.test}}} (.csv or .tsv) with {columns}"
    return register_dataset(DatasetSpec(cfg.name, names, templates, builder, layout), overwrite=overwrite)


def load_custom_datasets(
    source: str | Path | Sequence[CustomDataset | Mapping[str, Any]], *, data_root: str | Path | None = None
) -> list[DatasetSpec]:
    """Register user datasets from a YAML/JSON file or a list of mappings / :class:`CustomDataset`.

    A file holds a list of CustomDataset mappings, or a mapping whose ``datasets`` key holds it.
    ``data_root`` is needed only to read class names that the config does not list.
    """
    entries: Any = _read_config(Path(source)) if isinstance(source, (str, Path)) else source
    if isinstance(entries, Mapping) and "datasets" in entries:
        entries = entries["datasets"]
    if isinstance(entries, (str, bytes)) or not isinstance(entries, Sequence):
        raise ValueError(f"custom datasets: expected a list of dataset entries, got {type(entries).__name__}")
    fields = [f.name for f in dataclasses.fields(CustomDataset)]
    specs = []
    for entry in entries:
        if isinstance(entry, Mapping):
            unknown = sorted(set(entry) - set(fields))
            if unknown:
                raise ValueError(f"custom dataset {dict(entry)!r}: unknown field(s) {unknown}; fields are {fields}")
            entry = CustomDataset(**entry)
        specs.append(register_custom(entry, data_root=data_root))
    return specs


def _read_config(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"custom datasets file {path} not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        return json.loads(text)
    import yaml  # YAML is a superset of JSON; imported only when a file is read

    return yaml.safe_load(text)
