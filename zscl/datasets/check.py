"""Decode every image a run would read, before the run (the logic of ``zscl check-data``).

A split is built exactly as training or evaluation builds it, its files are listed through the
dataset (:func:`~zscl.datasets.badimages.image_path`) and each one is opened and converted to
RGB as the readers do, in parallel. Reported per split: the files found, the unreadable ones
(path and reason), the non-RGB modes that reading converts, the classes without any image (a
missing class folder), or why the dataset could not be built at all. Reference pools larger
than ``sample`` images are checked on a seeded sample, and webdataset shards on their first
samples; the report says so.
"""

from __future__ import annotations

import io
import math
import tarfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from PIL import Image

from zscl.datasets.badimages import UNREADABLE, decode, decode_all, describe, image_path  # noqa: F401  (decode: API)

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")


@dataclass
class SplitReport:
    """What checking one split (or one reference source) found."""

    dataset: str
    split: str  # train | test | reference
    files: int = 0
    checked: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    converted: dict[str, int] = field(default_factory=dict)  # non-RGB mode -> images converted to RGB
    missing_classes: list[str] = field(default_factory=list)  # classes without any image in any split
    missing: Optional[str] = None  # the split could not be built (missing files, bad layout)
    note: str = ""  # e.g. "checked a sample of 10000 of 1281167 images"

    @property
    def problems(self) -> int:
        return len(self.unreadable) + len(self.missing_classes) + (self.missing is not None)


def tally(report: SplitReport, results: Iterable[tuple[str, Optional[str], str]]) -> SplitReport:
    modes: Counter = Counter()
    for path, mode, reason in results:
        report.checked += 1
        if mode is None:
            report.unreadable.append((path, reason))
        elif mode != "RGB":
            modes[mode] += 1
    report.converted = dict(sorted(modes.items()))
    return report


def check_split(name: str, data_root: str | Path, split: str, workers: int = 1, progress: bool = True) -> SplitReport:
    """Check one split of a registered dataset (missing classes are filled in by :func:`check_datasets`)."""
    from zscl.datasets import build_dataset, get_dataset

    spec = get_dataset(name)
    report = SplitReport(spec.name, split)
    try:
        dataset = build_dataset(spec.name, data_root, split)
    except (OSError, ValueError) as err:
        report.missing = str(err)
        return report
    report.files = len(dataset)  # type: ignore[arg-type]
    paths = [image_path(dataset, i) for i in range(report.files)]
    files = [p for p in paths if p is not None]
    if len(files) < len(paths):
        report.note = "images stored in arrays, not files: nothing to decode"
    return tally(report, decode_all(files, workers, progress, f"{spec.name}/{split}"))


def _classes_seen(name: str, data_root: str | Path, split: str) -> set[int]:
    from zscl.datasets import build_dataset, dataset_labels

    try:
        return set(dataset_labels(build_dataset(name, data_root, split)))
    except (OSError, ValueError):
        return set()


def check_datasets(train: Sequence[str], test: Sequence[str], data_root: str | Path, workers: int = 1,
                   progress: bool = True) -> list[SplitReport]:
    """Check the train split of every ``train`` dataset and the test split of every ``test`` one."""
    from zscl.datasets import get_dataset

    reports = []
    names = list(dict.fromkeys(get_dataset(n).name for n in [*train, *test]))
    for name in names:
        splits = [s for s, group in (("train", train), ("test", test)) if name in {get_dataset(n).name for n in group}]
        found = [check_split(name, data_root, s, workers, progress) for s in splits]
        if all(r.missing is None for r in found):
            spec = get_dataset(name)
            seen = set().union(*(_classes_seen(name, data_root, s) for s in ("train", "test")))
            found[0].missing_classes = [c for i, c in enumerate(spec.classnames) if i not in seen]
        reports += found
    return reports


def check_shards(report: SplitReport, pattern: str, sample: int, progress: bool = True) -> SplitReport:
    """Open every webdataset shard of ``pattern``; decode its first ``sample / shards`` images."""
    from braceexpand import braceexpand
    from tqdm.auto import tqdm

    shards = list(braceexpand(pattern))
    per_shard = math.ceil(sample / len(shards)) if sample else None
    modes: Counter = Counter()
    for shard in tqdm(shards, desc="reference shards", disable=not progress, leave=False):
        try:
            _check_shard(report, shard, per_shard, modes)
        except (OSError, tarfile.TarError, EOFError) as err:
            report.unreadable.append((f"shard {shard}", describe(err, shard)))
    report.converted = dict(sorted(modes.items()))
    if per_shard is not None:
        report.note = f"checked the first {per_shard} samples of each of {len(shards)} shards (--sample)"
    return report


def _check_shard(report: SplitReport, shard: str, limit: Optional[int], modes: Counter) -> None:
    seen = 0
    with tarfile.open(shard, mode="r|*") as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            if ext.lower() not in IMAGE_FIELDS or not member.isreg():
                continue
            if limit is not None and seen >= limit:
                break
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            seen += 1
            report.files += 1
            report.checked += 1
            try:
                with Image.open(io.BytesIO(data)) as img:
                    modes[img.mode] += img.mode != "RGB"
                    img.convert("RGB")
            except UNREADABLE as err:
                report.unreadable.append((f"{shard}#{key}", describe(err)))


def format_report(reports: Sequence[SplitReport]) -> list[str]:
    """One line per split (plus one per unreadable file), then the verdict line."""
    lines = []
    for r in reports:
        head = f"{r.dataset} {r.split}" if r.split != "reference" else r.dataset
        if r.missing is not None:
            lines.append(f"{head}: NOT FOUND: {r.missing}")
            continue
        parts = [f"{r.files} images", f"{len(r.unreadable)} unreadable"]
        if r.converted:
            parts.append("non-RGB converted: " + ", ".join(f"{m} {n}" for m, n in r.converted.items()))
        if r.missing_classes:
            parts.append(f"classes without images (missing class folders): {', '.join(r.missing_classes)}")
        lines.append(f"{head}: " + "; ".join(parts) + (f" [{r.note}]" if r.note else ""))
        lines += [f"  unreadable: {path} ({reason})" for path, reason in r.unreadable]
    lines.append(verdict(reports))
    return lines


def verdict(reports: Sequence[SplitReport]) -> str:
    bad = sum(len(r.unreadable) for r in reports)
    classes = sum(len(r.missing_classes) for r in reports)
    missing = sum(r.missing is not None for r in reports)
    checked = sum(r.checked for r in reports)
    if bad + classes + missing == 0:
        return f"check-data: OK: {checked} images decoded in {len(reports)} splits, none unreadable"
    return (f"check-data: PROBLEMS: {bad} unreadable image(s), {classes} class(es) without images, "
            f"{missing} split(s) not found ({checked} images decoded in {len(reports)} splits)")


def report_json(reports: Sequence[SplitReport]) -> dict[str, Any]:
    return {"ok": all(r.problems == 0 for r in reports), "verdict": verdict(reports),
            "splits": [asdict(r) for r in reports]}


__all__: list[str] = ["SplitReport", "check_datasets", "check_shards", "check_split", "decode", "decode_all",
                      "format_report", "report_json", "tally", "verdict"]
