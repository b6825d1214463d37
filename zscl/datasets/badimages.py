"""Unreadable images: named, counted, and (in training) replaced deterministically.

Real image folders hold truncated downloads, empty files and text saved as ``.jpg``. A data
stream that is a pure function of ``(seed, step, rank)`` would hit the same file again after a
resume, so an unreadable image must never stop training:

* :class:`SafeImages` wraps a map-style dataset; a decode failure becomes an
  :class:`UnreadableImageError` naming the file;
* :class:`~zscl.datasets.streams.StepBatchStream` (``skip_unreadable=True``) replaces it by the
  next readable sample of the same stream, which depends only on the data, so a resumed run
  still equals an uninterrupted one;
* the streams hand ``(path, reason)`` records over with each batch (:class:`ReportUnreadable`,
  inside the DataLoader workers); :class:`ReportingLoader` strips them off in the main process
  into a :class:`BadImageLog`, which Lightning checkpoints, so the count survives a resume.
"""

from __future__ import annotations

import os
import struct
import sys
import zlib
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Iterator, Optional, Sequence

from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

# What decoding a broken file raises: PIL's UnidentifiedImageError and "image file is truncated"
# are OSErrors (as are missing files and permission errors); broken PNG chunks raise SyntaxError.
UNREADABLE: tuple[type[BaseException], ...] = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error,
                                                Image.DecompressionBombError)
SHOW_FIRST = 5  # unreadable paths printed as they are met; the rest are only counted


class UnreadableImageError(OSError):
    """An image file that cannot be decoded. ``str(err)`` is ``unreadable image PATH (reason)``.

    Constructible from its message alone, so a DataLoader worker re-raises it with its own type.
    """

    def __init__(self, message: str, path: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.path, self.reason = path, reason

    @classmethod
    def of(cls, path: Optional[str], err: BaseException) -> "UnreadableImageError":
        reason = describe(err, path)
        return cls(f"unreadable image {path or '<unknown file>'} ({reason})", str(path), reason)

    def __reduce__(self):  # keep path and reason through pickling (DataLoader workers)
        return type(self), (str(self), self.path, self.reason)


def describe(err: BaseException, path: Optional[str] = None) -> str:
    """A short reason: the exception's message, without the file name PIL repeats in it."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror  # "No such file or directory", "Permission denied"
    text = str(err).split(" @ ")[0]
    if path:
        text = text.replace(f" {path!r}", "").replace(f" {path}", "")
    return text.strip() or type(err).__name__


def image_path(dataset: Any, i: int) -> Optional[str]:
    """The file item ``i`` of a built dataset is decoded from, or None (in-memory images)."""
    while True:
        if isinstance(dataset, Subset):
            dataset, i = dataset.dataset, int(dataset.indices[i])
        elif hasattr(dataset, "source") and hasattr(dataset, "index"):  # LabeledImages
            dataset, i = dataset.source, dataset.index[i]
        elif hasattr(dataset, "files"):  # reference ImageFiles
            return str(dataset.files[i])
        elif hasattr(dataset, "dataset"):  # SafeImages, DropLabels, ...
            dataset = dataset.dataset
        else:
            return _source_path(dataset, i)


def _source_path(source: Any, j: int) -> Optional[str]:
    if isinstance(source, (list, tuple)):
        item = source[j]
        return str(item) if isinstance(item, (str, os.PathLike)) else None
    for attr in ("_image_files", "_images"):  # torchvision: Aircraft, DTD, Flowers, Food, SUN397, OxfordPet
        files = getattr(source, attr, None)
        if isinstance(files, list):
            return str(files[j])
    for attr in ("samples", "_samples"):  # ImageFolder (EuroSAT), StanfordCars
        samples = getattr(source, attr, None)
        if isinstance(samples, list):
            return str(samples[j][0])
    if type(source).__name__ == "Caltech101":  # builds the path inside __getitem__
        return os.path.join(source.root, "101_ObjectCategories", source.categories[source.y[j]],
                            f"image_{source.index[j]:04d}.jpg")
    return None


class SafeImages(Dataset):
    """``dataset[i]``, with a decode failure raised as :class:`UnreadableImageError` naming the file."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        try:
            return self.dataset[i]
        except UnreadableImageError:
            raise
        except UNREADABLE as err:
            raise UnreadableImageError.of(image_path(self.dataset, i), err) from err


class ReportUnreadable(IterableDataset):
    """Yields ``(batch, records)``: each batch of ``stream`` with the ``(path, reason)`` records
    that ``stream`` appended to ``records`` while making it (the list is drained each time)."""

    def __init__(self, stream: IterableDataset, records: list[tuple[str, str]]) -> None:
        super().__init__()
        self.stream, self.records = stream, records

    def __iter__(self) -> Iterator[tuple[Any, list[tuple[str, str]]]]:
        for batch in self.stream:
            drained = list(self.records)
            self.records.clear()
            yield batch, drained


class BadImageLog:
    """Unreadable images met by one task's streams (main process): path -> reason, first seen first.

    A set of paths, so the batches a resume reads twice are not counted twice.
    """

    def __init__(self) -> None:
        self.paths: dict[str, str] = {}

    def add(self, records: Sequence[tuple[str, str]], stream: str) -> None:
        for path, reason in records:
            if path in self.paths:
                continue
            self.paths[path] = reason
            if len(self.paths) <= SHOW_FIRST:
                print(f"zscl: warning: unreadable {stream} image {path} ({reason}); "
                      "using the next readable sample of the stream instead", file=sys.stderr, flush=True)

    def merge(self, other: dict[str, str]) -> None:
        for path, reason in other.items():
            self.paths.setdefault(path, reason)

    def summary(self, task: str) -> Optional[str]:
        """The warning line printed at the end of a task, or None when every image was readable."""
        if not self.paths:
            return None
        shown = ", ".join(list(self.paths)[:SHOW_FIRST]) + (", ..." if len(self.paths) > SHOW_FIRST else "")
        return (f"zscl: warning: {task}: {len(self.paths)} unreadable image(s) replaced by readable ones: {shown} "
                "(data.on_bad_image: error stops at the first one instead)")


class ReportingLoader:
    """A DataLoader over :class:`ReportUnreadable`, seen by Lightning as a plain batch iterable.

    It files the records into ``log`` and yields the batches. ``state_dict``/``load_state_dict``
    make Lightning treat the loader as resumable, which it is by construction: the stream starts
    at ``trainer.global_step`` (restored before the loader is built), so the only state worth
    saving is the log of unreadable images met so far. (A webdataset reference stream restarts
    its seeded shard sampling instead: resumable, but not bit-identical to an uninterrupted run.)
    """

    def __init__(self, loader: DataLoader, log: BadImageLog, stream: str) -> None:
        self.loader, self.log, self.stream = loader, log, stream

    def __iter__(self) -> Iterator[Any]:
        for batch, records in self.loader:
            if records:
                self.log.add(records, self.stream)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"unreadable": dict(self.log.paths)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log.merge(state.get("unreadable", {}))


class UnreadableTestImagesError(ValueError):
    """Evaluation sets with unreadable images: all of them, in one message.

    A test set's size is part of a benchmark's protocol, so evaluation never skips silently.
    """

    def __init__(self, found: dict[str, Sequence[tuple[str, str]]]) -> None:
        self.found = {name: list(items) for name, items in found.items() if items}
        n = sum(map(len, self.found.values()))
        listing = "; ".join(f"{name}: " + ", ".join(f"{path} ({reason})" for path, reason in items)
                            for name, items in self.found.items())
        super().__init__(f"{n} unreadable test image(s), so the run did not start: {listing}. Repair or remove "
                         "them, or pass --allow-bad-test-images to leave them out (they are counted in the results)")


def find_unreadable(dataset: Dataset, num_workers: int = 1, progress: bool = False,
                    desc: str = "checking images") -> list[tuple[int, str, str]]:
    """``(index, path, reason)`` of the items of ``dataset`` whose image file does not decode."""
    paths = [(i, image_path(dataset, i)) for i in range(len(dataset))]  # type: ignore[arg-type]
    files = [(i, p) for i, p in paths if p is not None]
    results = decode_all([p for _, p in files], num_workers, progress, desc)
    return [(i, path, reason) for (i, _), (path, mode, reason) in zip(files, results) if mode is None]


def decode(path: str) -> tuple[str, Optional[str], str]:
    """``(path, mode, "")`` if the file decodes to RGB as the readers decode it, else ``(path, None, reason)``."""
    try:
        with Image.open(path) as img:
            mode = img.mode
            img.convert("RGB")  # a full decode, as torchvision's pil_loader and zscl's load_rgb do
        return path, mode, ""
    except UNREADABLE as err:
        return path, None, describe(err, path)


def decode_all(paths: Sequence[str], workers: int = 1, progress: bool = True,
               desc: str = "decoding") -> list[tuple[str, Optional[str], str]]:
    """:func:`decode` of every path, in ``workers`` processes, with a progress bar."""
    from tqdm.auto import tqdm

    bar = dict(total=len(paths), desc=desc, disable=not progress, leave=False, unit="img")
    if workers <= 1 or len(paths) < 64:
        return [decode(p) for p in tqdm(paths, **bar)]
    chunk = max(1, min(256, len(paths) // (workers * 8)))
    with ProcessPoolExecutor(workers) as pool:
        return list(tqdm(pool.map(decode, paths, chunksize=chunk), **bar))
