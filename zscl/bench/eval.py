"""``zscl bench eval``: zero-shot evaluation throughput, from JPEG files and from the uint8 cache.

Both paths run the code ``zscl eval`` runs (:func:`zscl.evaluation.zeroshot.dataset_batches`
and :func:`~zscl.evaluation.zeroshot.evaluate`) over ``images`` photo-like JPEGs of
:mod:`zscl.bench.jpegs` registered as a user ImageFolder dataset:

* ``jpeg_img_s``: decode + test transform (Resize + CenterCrop, bicubic) in a DataLoader with
  ``num_workers`` workers, then the model, end to end;
* ``cache_build_s``: the one-off build of the preprocessed uint8 cache (decode + resize + crop once);
* ``cache_img_s``: evaluation from the cache (memory-map slices, normalised on the device);
* ``model_img_s``: the model alone on device-resident images (the ceiling of both).

The files are freshly written, so they sit in the page cache: cold-disk reads are not measured.
Both paths must give the same top-1 (``cache_matches``): the cache is bit-identical to the
transform.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from zscl.bench import device_info, resolve_device, timed


@dataclass
class EvalBench:
    """Settings of ``zscl bench eval``."""

    model: Optional[str] = field(default=None, metadata={"help": "open_clip architecture (default: ViT-B-16 on CUDA, zscl-tiny-vit on CPU)"})
    images: int = field(default=2000, metadata={"help": "JPEG images to evaluate"})
    classes: int = field(default=100, metadata={"help": "classes of the zero-shot head"})
    batch: int = field(default=128, metadata={"help": "evaluation batch (reference: 128)"})
    num_workers: int = field(default=8, metadata={"help": "DataLoader workers decoding JPEGs"})
    precision: str = field(default="auto", metadata={"help": "autocast: auto | fp32 | bf16 | fp16 (auto: bf16 on GPU)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    workdir: Optional[str] = field(default=None, metadata={"help": "keep the JPEGs here (default: a temporary folder)"})
    seed: int = field(default=0, metadata={"help": "seed of the JPEGs"})


def model_throughput(model, classifier: torch.Tensor, images: int, batch: int, size: int,
                     device: torch.device, amp) -> float:
    """Images/s of ``image_logits`` on one random batch kept on the device (one untimed warm-up)."""
    from zscl.evaluation.zeroshot import autocast, image_logits

    x = torch.randn(batch, 3, size, size, device=device)
    steps = max(images // batch, 1)

    def run(n: int) -> None:
        with torch.no_grad(), autocast(device, amp):
            for _ in range(n):
                image_logits(model, x, classifier)

    run(1)
    _, seconds = timed(lambda: run(steps), device)
    return steps * batch / seconds


def run_eval(cfg: EvalBench) -> dict[str, Any]:
    """Write the JPEGs, then time JPEG-path and cache-path evaluation; one JSON-ready dict."""
    if cfg.images < cfg.classes:
        raise ValueError(f"images ({cfg.images}) must be >= classes ({cfg.classes}): every class needs a folder")
    with tempfile.TemporaryDirectory(prefix="zscl-bench-eval-") as tmp:
        root = Path(cfg.workdir) if cfg.workdir else Path(tmp) / "jpegs"
        from zscl.bench.jpegs import register_jpeg_dataset, write_jpeg_tree

        start = time.perf_counter()  # JPEGs first: the writer forks, which must precede CUDA
        write_jpeg_tree(root, cfg.images, cfg.classes, split="test", seed=cfg.seed, workers=max(cfg.num_workers, 1))
        jpeg_write_s = time.perf_counter() - start
        spec = register_jpeg_dataset("BenchJPEG", root, "test", cfg.classes)
        out = _measure(cfg, spec, root, Path(tmp) / "cache")
    out["jpeg_write_s"] = jpeg_write_s
    return out


def _measure(cfg: EvalBench, spec, root: Path, cache_dir: Path) -> dict[str, Any]:
    from zscl.evaluation.zeroshot import dataset_batches, evaluate, resolve_amp, spec_classifier
    from zscl.models import load_clip

    device = resolve_device(cfg.device)
    amp = resolve_amp(cfg.precision, device)
    bundle = load_clip(cfg.model or ("ViT-B-16" if device.type == "cuda" else "zscl-tiny-vit"), None, device=device)
    model = bundle.model
    classifier, classifier_s = timed(lambda: spec_classifier(model, bundle.tokenizer, spec, device=device, amp_dtype=amp),
                                     device)
    model_img_s = model_throughput(model, classifier, cfg.images, cfg.batch, bundle.image_size, device, amp)
    common = dict(batch_size=cfg.batch, num_workers=cfg.num_workers, progress=False)

    def run(cache: bool):
        loader, mean, std = dataset_batches(spec.name, str(root), bundle.test_transform, cache=cache,
                                            cache_dir=str(cache_dir), **common)
        return evaluate(model, classifier, loader, device=device, mean=mean, std=std, amp_dtype=amp, progress=False)

    jpeg_acc, jpeg_s = timed(lambda: run(cache=False), device)
    (_, cache_build_s) = timed(lambda: dataset_batches(spec.name, str(root), bundle.test_transform, cache=True,
                                                        cache_dir=str(cache_dir), **common), device)
    cache_acc, cache_s = timed(lambda: run(cache=True), device)
    return {
        "bench": "eval", "jpeg_img_s": jpeg_acc.n / jpeg_s, "cache_img_s": cache_acc.n / cache_s,
        "cache_build_s": cache_build_s, "model_img_s": model_img_s, "classifier_s": classifier_s,
        "n_images": jpeg_acc.n, "top1_jpeg": jpeg_acc.top1, "top1_cache": cache_acc.top1,
        "cache_matches": (jpeg_acc.correct1, jpeg_acc.correct5) == (cache_acc.correct1, cache_acc.correct5),
        **device_info(device),
        "settings": {**asdict(cfg), "model": bundle.name, "amp": str(amp).replace("torch.", "") if amp else "fp32"},
    }
