"""Photo-like test JPEGs for the loader and evaluation benchmarks.

Decoding cost depends on pixel count and entropy, so the images mimic ImageNet photos: about
500x375 pixels, a smooth colour field (a low-resolution random image upsampled bicubically),
a few filled ellipses and rectangles, and mild sensor noise, saved by PIL at quality 90
(about 75 kB each; ImageNet train JPEGs average ~110 kB at the same size).

Layout (an ImageFolder tree that :class:`zscl.datasets.CustomDataset` reads)::

    <root>/<split>/class_<k>/<i>.jpg      split in {train, test}, k = i mod classes
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from zscl.utils.io import atomic_path

SIZE = (500, 375)  # width, height: ImageNet's most common shape


def photo_like(rng: np.random.Generator, size: tuple[int, int] = SIZE) -> Image.Image:
    """One RGB image: smooth colour field + random shapes + grain texture + uniform noise."""
    w, h = size
    coarse = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    field = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(field)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        x1, y1 = x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    # Grain at half resolution (luminance) plus per-pixel noise: the mid and high frequencies
    # that make a photo's JPEG ~90 kB instead of the ~20 kB of a flat synthetic picture.
    grain = rng.integers(88, 169, (h // 2, w // 2), dtype=np.uint8)  # 128 +- 40
    grain = np.asarray(Image.fromarray(grain).resize((w, h), Image.Resampling.BILINEAR))
    pixels = np.asarray(field, dtype=np.int16) + (grain.astype(np.int16) - 128)[..., None]
    pixels += rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _write_one(args: tuple[Path, int, int, str, tuple[int, int], int]) -> None:
    path, seed, index, split, size, quality = args
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 1 if split == "train" else 2, index])
    with atomic_path(path) as tmp:
        photo_like(rng, size).save(tmp, format="JPEG", quality=quality)


def write_jpeg_tree(
    root: str | Path,
    n_images: int,
    classes: int,
    *,
    split: str = "train",
    size: tuple[int, int] = SIZE,
    quality: int = 90,
    seed: int = 0,
    workers: int = 1,
) -> list[Path]:
    """Write ``n_images`` photo-like JPEGs under ``root/<split>/class_<k>/``; return their paths.

    Image ``i`` is a pure function of ``(seed, split, i)`` and goes to class ``i mod classes``.
    Existing files are kept, so a benchmark folder can be reused. ``workers > 1`` encodes in
    forked processes (call it before CUDA is initialised).
    """
    if n_images < 1 or classes < 1:
        raise ValueError(f"need at least one image and one class, got n_images={n_images}, classes={classes}")
    root = Path(root)
    paths = [root / split / f"class_{i % classes:04d}" / f"{i:07d}.jpg" for i in range(n_images)]
    todo = [(p, seed, i, split, size, quality) for i, p in enumerate(paths) if not p.exists()]
    if workers > 1 and len(todo) > workers:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(workers) as pool:
            pool.map(_write_one, todo, chunksize=16)
    else:
        for job in todo:
            _write_one(job)
    return paths


def register_jpeg_dataset(name: str, root: str | Path, split: str, classes: int):
    """Register the ``root/<split>`` tree as user ImageFolder dataset ``name`` (both splits read it).

    Returns the :class:`~zscl.datasets.DatasetSpec`; the classes are named ``class <k>``.
    """
    from zscl.datasets import CustomDataset, register_custom

    cfg = CustomDataset(name=name, kind="imagefolder", path=str(Path(root).resolve()), train=split, test=split,
                        classnames=[f"class {k}" for k in range(classes)])
    return register_custom(cfg, overwrite=True)
