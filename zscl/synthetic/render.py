"""Procedural rendering of the synthetic world's images (numpy + PIL, no torch).

A :class:`Scene` is a background family plus a few coloured items (geometric shapes or
glyphs). :func:`render_array` turns it into a small RGB image (uint8 H x W x 3):

    image = background * (1 - alpha) + colour * alpha     (per item, painted in order)

where ``alpha`` is the item's coverage mask, drawn at ``SUPERSAMPLE`` times the resolution
and box-filtered down, so edges are anti-aliased and small shapes keep their identity.
Everything random about a background (stripe angle, tints, noise) comes from ``Scene.bg_seed``,
so a scene renders to the same pixels every time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SUPERSAMPLE = 4  # masks are drawn at 4x and box-filtered: cheap at 32 px, and crisp enough

# Saturated object colours; backgrounds are muted greys (see ``_muted``), so the colour of an
# item is never confused with its background.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.72, 0.15),
    "blue": (0.12, 0.25, 0.95),
    "yellow": (0.97, 0.88, 0.08),
    "purple": (0.58, 0.12, 0.80),
    "orange": (1.00, 0.52, 0.02),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")


@dataclass(frozen=True)
class Item:
    """One painted object. ``kind`` is a shape name or ``"glyph:<character>"``.

    ``x``, ``y`` (centre) and ``size`` (bounding-box side) are fractions of the image side;
    ``angle`` rotates shapes (degrees); ``rgb`` is in [0, 1].
    """

    kind: str
    x: float
    y: float
    size: float
    rgb: tuple[float, float, float]
    angle: float = 0.0


@dataclass(frozen=True)
class Scene:
    background: str
    bg_seed: int
    items: tuple[Item, ...]


# ----------------------------------------------------------------------------- backgrounds
def _muted(rng: np.random.Generator, lo: float = 0.3, hi: float = 0.7) -> np.ndarray:
    """A low-saturation colour: a grey level plus a small tint."""
    return np.clip(rng.uniform(lo, hi) + rng.uniform(-0.06, 0.06, size=3), 0.0, 1.0)


def _two_tones(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    # A dark and a light muted tone with a visible but not dominant contrast.
    return _muted(rng, 0.25, 0.45), _muted(rng, 0.55, 0.75)


@lru_cache(maxsize=4)
def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    xx.flags.writeable = yy.flags.writeable = False  # cached: shared by every call
    return xx, yy


def _bg_plain(rng: np.random.Generator, size: int) -> np.ndarray:
    return np.broadcast_to(_muted(rng), (size, size, 3)).copy()


def _bg_stripes(rng: np.random.Generator, size: int) -> np.ndarray:
    dark, light = _two_tones(rng)
    theta = math.radians(float(rng.choice([0, 45, 90, 135])))
    period = rng.uniform(4.0, 7.0)
    xx, yy = _coords(size)
    phase = (xx * math.cos(theta) + yy * math.sin(theta)) / period + rng.uniform(0, 1)
    on = (np.floor(phase) % 2).astype(np.float32)[..., None]
    return dark * on + light * (1 - on)


def _bg_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    # Grey value noise on 2x2 blocks: texture without any hue, so colour stays the item's.
    cells = rng.uniform(0.2, 0.8, size=(size // 2 + 1, size // 2 + 1)).astype(np.float32)
    grey = np.repeat(np.repeat(cells, 2, 0), 2, 1)[:size, :size]
    return np.repeat(grey[..., None], 3, axis=2)


def _bg_gradient(rng: np.random.Generator, size: int) -> np.ndarray:
    dark, light = _two_tones(rng)
    if rng.random() < 0.5:
        dark, light = light, dark
    theta = rng.uniform(0, 2 * math.pi)
    xx, yy = _coords(size)
    t = (xx - size / 2) * math.cos(theta) + (yy - size / 2) * math.sin(theta)
    t = ((t / (size * 0.75)) + 0.5).clip(0, 1)[..., None]
    return dark * (1 - t) + light * t


def _bg_checker(rng: np.random.Generator, size: int) -> np.ndarray:
    dark, light = _two_tones(rng)
    cell = int(rng.integers(3, 6))
    ox, oy = rng.integers(0, cell, size=2)
    xx, yy = _coords(size)
    on = (((xx + ox) // cell + (yy + oy) // cell) % 2)[..., None]
    return dark * on + light * (1 - on)


def _bg_grid(rng: np.random.Generator, size: int) -> np.ndarray:
    base, line = _muted(rng, 0.55, 0.75), _muted(rng, 0.15, 0.35)
    step = int(rng.integers(6, 9))
    ox, oy = rng.integers(0, step, size=2)
    xx, yy = _coords(size)
    on = ((((xx + ox) % step) == 0) | (((yy + oy) % step) == 0))[..., None]
    return np.where(on, line, base)


BACKGROUNDS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "plain": _bg_plain,
    "stripes": _bg_stripes,
    "noise": _bg_noise,
    "gradient": _bg_gradient,
    "checker": _bg_checker,
    "grid": _bg_grid,
}


# ----------------------------------------------------------------------------- item masks
def _star(n_points: int, inner: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(2 * n_points):
        r = 1.0 if k % 2 == 0 else inner
        a = math.pi * k / n_points - math.pi / 2
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


# Unit polygons in [-1, 1]^2 (y points down, as in images).
_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "triangle": [(0.0, -0.95), (0.95, 0.8), (-0.95, 0.8)],
    "star": _star(5, 0.42),
    "cross": [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1),
              (-0.3, 1), (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)],
    "diamond": [(0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)],
}


@lru_cache(maxsize=16)
def _font(pixels: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow's bundled default font (FreeType when available): works offline, sizes freely.
    return ImageFont.load_default(size=pixels)


def _draw_item(draw: ImageDraw.ImageDraw, item: Item, side: int) -> None:
    cx, cy, half = item.x * side, item.y * side, item.size * side / 2
    if item.kind == "circle":
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=255)
    elif item.kind.startswith("glyph:"):
        # Glyph height ~ the item size; the font's em box is taller than its digits/capitals.
        draw.text((cx, cy), item.kind[6:], fill=255, font=_font(max(4, round(2.7 * half))), anchor="mm")
    elif item.kind in _POLYGONS:
        c, s = math.cos(math.radians(item.angle)), math.sin(math.radians(item.angle))
        pts = [(cx + half * (c * x - s * y), cy + half * (s * x + c * y)) for x, y in _POLYGONS[item.kind]]
        draw.polygon(pts, fill=255)
    else:
        raise ValueError(f"unknown item kind {item.kind!r}: expected one of {SHAPES} or 'glyph:<char>'")


def items_mask(items: tuple[Item, ...], size: int) -> np.ndarray:
    """Coverage of ``items`` in [0, 1], shape (size, size), anti-aliased by supersampling."""
    side = size * SUPERSAMPLE
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    for item in items:
        _draw_item(draw, item, side)
    small = mask.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def render_array(scene: Scene, size: int = 32) -> np.ndarray:
    """The scene as a uint8 array of shape (size, size, 3)."""
    if scene.background not in BACKGROUNDS:
        raise ValueError(f"unknown background {scene.background!r}: expected one of {sorted(BACKGROUNDS)}")
    rng = np.random.default_rng(scene.bg_seed)
    img = BACKGROUNDS[scene.background](rng, size).astype(np.float32)
    # Items sharing a colour are painted through one mask (the world's scenes are one colour).
    for rgb in dict.fromkeys(item.rgb for item in scene.items):
        alpha = items_mask(tuple(i for i in scene.items if i.rgb == rgb), size)[..., None]
        img = img * (1 - alpha) + np.asarray(rgb, dtype=np.float32) * alpha
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)



# ----------------------------------------------------------------------------- cameras
def _faded(img: np.ndarray, a: float) -> np.ndarray:
    return img * a + (1 - a) * 127.5  # contrast a around mid-grey: a washed-out print


def _pale(img: np.ndarray, a: float) -> np.ndarray:
    grey = img.mean(axis=-1, keepdims=True)
    return grey + a * (img - grey)  # saturation a: hue survives, weakly


def _dark(img: np.ndarray, a: float) -> np.ndarray:
    return img * a  # exposure a: an underexposed shot


CAMERAS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {"faded": _faded, "pale": _pale, "dark": _dark}
"""Whole-image effects that pretraining never shows: a task's "camera" is its domain shift.
Each keeps the label's information (the image stays learnable) but moves it off the
pretraining distribution, so zero-shot accuracy drops and fine-tuning has room to learn."""


def apply_camera(array: np.ndarray, camera: str, amount: float) -> np.ndarray:
    """``array`` (uint8 H x W x 3) through ``CAMERAS[camera]`` with strength ``amount``."""
    if camera not in CAMERAS:
        raise ValueError(f"unknown camera {camera!r}: expected one of {sorted(CAMERAS)}")
    return np.clip(np.rint(CAMERAS[camera](array.astype(np.float32), amount)), 0, 255).astype(np.uint8)
