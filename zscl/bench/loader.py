"""``zscl bench loader``: training-loader throughput from JPEG files on disk.

``decode=cpu`` times what training runs: :class:`~zscl.datasets.streams.StepBatchStream` over
photo-like ~500x375 JPEGs (:mod:`zscl.bench.jpegs`) with the real train transform
(``RandomResizedCrop(size, scale=(0.9, 1))`` bicubic + normalise, from
:func:`zscl.models.build_transforms`), in a DataLoader with ``num_workers`` workers, pinned
memory and a non-blocking copy to the GPU when there is one.

``decode=gpu`` keeps only file reading in the workers: the main process decodes each batch's
JPEG bytes with nvJPEG (``torchvision.io.decode_jpeg(device="cuda")``), then crops, resizes
(bicubic, antialiased) and normalises on the GPU, with the same crop distribution.

With ``step_ms`` (from ``zscl bench step``) the result says whether the loader keeps up:
training consumes ``(batch + ref_batch) / step_ms`` images per ms (task and reference
streams decode alike), so ``keeps_up = img_s >= 1000 (batch + ref_batch) / step_ms``. Give
``num_workers`` the total number of workers of both streams. ``loader_ms_per_step`` is the
loader time one training step needs: CPU workers run beside the GPU, but with ``decode=gpu``
it is GPU time that adds to the step unless it overlaps (a side stream).
"""

from __future__ import annotations

import functools
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from zscl.bench import device_info, resolve_device, synchronize


@dataclass
class LoaderBench:
    """Settings of ``zscl bench loader``."""

    images: int = field(default=2000, metadata={"help": "JPEG files to stream from (cycled)"})
    classes: int = field(default=100, metadata={"help": "class folders"})
    batch: int = field(default=64, metadata={"help": "images per batch"})
    ref_batch: int = field(default=64, metadata={"help": "reference images per step (for keeps_up only)"})
    num_workers: int = field(default=8, metadata={"help": "DataLoader workers"})
    batches: int = field(default=50, metadata={"help": "timed batches"})
    warmup_batches: int = field(default=5, metadata={"help": "untimed batches (worker start-up)"})
    image_size: int = field(default=224, metadata={"help": "crop size"})
    decode: Literal["cpu", "gpu"] = field(default="cpu", metadata={"help": "cpu: PIL in workers; gpu: nvJPEG + GPU crop"})
    step_ms: Optional[float] = field(default=None, metadata={"help": "training step time (ms) to compare with"})
    device: str = field(default="auto", metadata={"help": "where batches go: auto | cpu | cuda | cuda:N"})
    workdir: Optional[str] = field(default=None, metadata={"help": "keep the JPEGs here (default: a temporary folder)"})
    seed: int = field(default=0, metadata={"help": "seed of the JPEGs and the stream"})


class FileBytes(Dataset):
    """Items ``(raw file bytes as a uint8 tensor, label)``: the worker side of GPU decoding."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int]) -> None:
        self.paths, self.labels = list(paths), list(labels)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        data = bytearray(Path(self.paths[i]).read_bytes())
        return torch.frombuffer(data, dtype=torch.uint8), self.labels[i]


def collate_bytes(items: list[tuple[torch.Tensor, int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """File bytes differ in length: keep them as a list, stack the labels."""
    return [data for data, _ in items], torch.tensor([label for _, label in items])


def decode_random_resized_crop(
    datas: list[torch.Tensor], size: int, mean: Sequence[float], std: Sequence[float], device: torch.device,
    scale: tuple[float, float] = (0.9, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """Decode JPEG bytes on ``device`` and apply RandomResizedCrop + normalisation there.

    One batched nvJPEG call on CUDA; each image is then cropped with torchvision's crop
    distribution and resized bicubically with antialiasing (like PIL), clamped to [0, 255]
    as PIL's uint8 output is, and normalised: ``(x / 255 - mean) / std``.
    """
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms import RandomResizedCrop

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of TorchCodec
        warnings.simplefilter("ignore")
        images = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
    crops = []
    for image in images:
        top, left, h, w = RandomResizedCrop.get_params(image, list(scale), list(ratio))
        crop = image[None, :, top:top + h, left:left + w].float()
        crops.append(F.interpolate(crop, size=(size, size), mode="bicubic", align_corners=False, antialias=True))
    m, s = _channel_stats(tuple(mean), tuple(std), device)
    return torch.cat(crops).clamp_(0, 255).div_(255).sub_(m).div_(s)


@functools.lru_cache(maxsize=8)
def _channel_stats(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Made once: building a CUDA tensor from a Python list is a blocking copy (a host sync) per call.
    return (torch.tensor(mean, device=device).view(1, -1, 1, 1), torch.tensor(std, device=device).view(1, -1, 1, 1))


def _batches(cfg: LoaderBench, dataset_name: str, root: Path, device: torch.device) -> Iterator[torch.Tensor]:
    """Image batches on ``device`` as training would see them, for ``cfg.decode``."""
    from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    from zscl.datasets import build_dataset
    from zscl.datasets.streams import StepBatchStream, stream_loader
    from zscl.models import build_transforms

    train, _ = build_transforms(cfg.image_size, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
    if cfg.decode == "cpu":
        stream = StepBatchStream(build_dataset(dataset_name, root, "train", train), cfg.batch, seed=cfg.seed)
        for images, _ in stream_loader(stream, cfg.num_workers, pin_memory=device.type == "cuda"):
            yield images.to(device, non_blocking=True)
        return
    files = build_dataset(dataset_name, root, "train", None)  # LabeledImages over the file paths
    crop = train.transforms[0]  # the real transform's RandomResizedCrop: the same crop distribution
    stream = StepBatchStream(FileBytes(files.source, files.labels), cfg.batch, seed=cfg.seed, collate=collate_bytes)
    for datas, _ in stream_loader(stream, cfg.num_workers):
        yield decode_random_resized_crop(datas, cfg.image_size, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, device,
                                         tuple(crop.scale), tuple(crop.ratio))


def run_loader(cfg: LoaderBench) -> dict[str, Any]:
    """Write the JPEGs, then time ``cfg.batches`` batches after ``cfg.warmup_batches``; one JSON-ready dict."""
    if cfg.images < cfg.classes or cfg.batches < 1:
        raise ValueError(f"need images >= classes and batches >= 1, got images={cfg.images}, "
                         f"classes={cfg.classes}, batches={cfg.batches}")
    if cfg.decode == "gpu" and not torch.cuda.is_available():
        raise ValueError("--decode gpu decodes with nvJPEG and needs CUDA, which is not available; use --decode cpu")
    with tempfile.TemporaryDirectory(prefix="zscl-bench-loader-") as tmp:
        from zscl.bench.jpegs import register_jpeg_dataset, write_jpeg_tree

        root = Path(cfg.workdir) if cfg.workdir else Path(tmp)
        start = time.perf_counter()  # before CUDA: the writer forks
        paths = write_jpeg_tree(root, cfg.images, cfg.classes, split="train", seed=cfg.seed,
                                workers=max(cfg.num_workers, 1))
        write_s = time.perf_counter() - start
        spec = register_jpeg_dataset("BenchJPEGTrain", root, "train", cfg.classes)
        device = resolve_device(cfg.device)
        if cfg.decode == "gpu" and device.type != "cuda":
            raise ValueError(f"--decode gpu needs a CUDA --device, got {device}")
        timing = _time_batches(_batches(cfg, spec.name, root, device), cfg.warmup_batches, cfg.batches, device)
        kb = sum(p.stat().st_size for p in paths) / len(paths) / 1e3
    img_s = cfg.batch * cfg.batches / timing["seconds"]
    out = {"bench": "loader", "img_s": img_s, "batches_s": cfg.batches / timing["seconds"],
           "loader_ms_per_step": (cfg.batch + cfg.ref_batch) / img_s * 1e3,
           "img_s_per_worker": img_s / max(cfg.num_workers, 1), "first_batch_s": timing["first_batch_s"],
           "jpeg_kb": kb, "jpeg_write_s": write_s}
    out.update(_keeps_up(cfg, img_s))
    return {**out, **device_info(device), "settings": asdict(cfg)}


def _time_batches(batches: Iterator[torch.Tensor], warmup: int, n: int, device: torch.device) -> dict[str, float]:
    """Seconds for ``n`` batches after ``warmup`` untimed ones (the first one includes worker start-up)."""
    start = time.perf_counter()
    next(batches)
    synchronize(device)
    first = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
        next(batches)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(n):
        next(batches)
    synchronize(device)
    return {"seconds": time.perf_counter() - start, "first_batch_s": first}


def _keeps_up(cfg: LoaderBench, img_s: float) -> dict[str, Any]:
    if cfg.step_ms is None:
        return {"needed_img_s": None, "keeps_up": None}
    if cfg.step_ms <= 0:
        raise ValueError(f"step_ms must be positive, got {cfg.step_ms}")
    needed = (cfg.batch + cfg.ref_batch) / cfg.step_ms * 1e3
    return {"needed_img_s": needed, "keeps_up": img_s >= needed}
