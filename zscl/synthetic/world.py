"""The synthetic vision-language world: attributes, scenes, captions, tasks, and its files.

An image shows ``count`` items of one kind (a shape, a letter or a digit) in one colour, with a
size and a position, on one of six background families. Its caption names a random subset of
those attributes in one of many phrasings, the way web alt-text names some of what a photo
shows. Tasks classify ONE attribute under ONE background family each (their visual domain), so
fine-tuning on a task pulls the representation towards that attribute and that domain.

:func:`generate_world` writes, under ``<root>/synthetic/``:

* ``<Task>/{train,test}/<class name>/<n>.png`` -- ImageFolder trees, one per task;
* ``reference/images/world/<n>.png`` and ``reference/captions.tsv`` -- the unlabeled reference
  pool in the Conceptual Captions validation-file format (tab separated, columns
  ``filepath`` (relative to the TSV's folder) and ``title``);
* ``reference/shards/ref-000000.tar`` ... -- the same pool as webdataset shards (``png`` + ``txt``);
* ``manifest.json`` -- seed, generator version, per-split counts. Written last.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from zscl.synthetic.render import BACKGROUNDS, PALETTE, SHAPES, Item, Scene, apply_camera, render_array

GENERATOR_VERSION = 4  # 2: SynthLetter (class-incremental); 3: camera tasks (room to learn); 4: 200 test images per class
IMAGE_SIZE = 32

COLOURS: tuple[str, ...] = tuple(PALETTE)
LETTERS: tuple[str, ...] = tuple("BCDEFGHJKLMNPRSTUVWXYZ")  # no A (the article), I/O/Q (like 1/0/0)
DIGITS: tuple[str, ...] = tuple("0123456789")
NUMBER_WORDS: tuple[str, ...] = ("one", "two", "three", "four", "five")
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.28, 0.28), "top right": (0.72, 0.28), "center": (0.5, 0.5),
    "bottom left": (0.28, 0.72), "bottom right": (0.72, 0.72),
}
SIZES: dict[str, tuple[float, float]] = {"small": (0.36, 0.44), "large": (0.58, 0.72)}
MULTI_SIZE = (0.17, 0.22)  # side of each item when several are shown
_MARGIN = 0.05  # scattered items keep this far from the border
BACKGROUND_WORDS: dict[str, str] = {
    "plain": "plain", "stripes": "striped", "noise": "noisy",
    "gradient": "gradient", "checker": "checker", "grid": "grid",
}
assert set(BACKGROUND_WORDS) == set(BACKGROUNDS)
_KINDS = ("shape", "shape", "letter", "digit")  # single items: 1/2 shapes, 1/4 letters, 1/4 digits
_OBJECTS = {"shape": SHAPES, "letter": tuple(f"letter {c}" for c in LETTERS),
            "digit": tuple(f"digit {d}" for d in DIGITS)}
_SIZE_NAMES, _POSITION_NAMES, _BACKGROUND_NAMES = tuple(SIZES), tuple(POSITIONS), tuple(BACKGROUNDS)


# ============================================================================ attributes
@dataclass(frozen=True)
class Attributes:
    """What an image shows. ``obj`` is a shape name, ``"letter X"`` or ``"digit 7"``;
    ``size`` is None for a scatter of 1-5 small items; ``position`` is None unless one small item."""

    obj: str
    colour: str
    count: int
    size: str | None
    position: str | None
    background: str

    @property
    def kind(self) -> str:
        return "shape" if self.obj in SHAPES else self.obj.split()[0]


def _pick(rng: np.random.Generator, options: "tuple[str, ...] | list[str]") -> str:
    return options[int(rng.integers(len(options)))]  # rng.choice converts to an array: slow


def sample_attributes(rng: np.random.Generator, **fixed: object) -> Attributes:
    """Draw attributes from the broad world distribution; ``fixed`` pins some of them.

    Besides the fields of :class:`Attributes`, two switches may be pinned: ``kind`` ("shape",
    "letter", "digit") and ``multi`` -- a scene of 1-5 small shapes scattered at random
    (``size`` and ``position`` None) rather than one small or large item.
    """
    multi = bool(fixed.pop("multi")) if "multi" in fixed else bool(rng.random() < 0.4)
    kind = "shape" if multi else str(fixed.pop("kind", None) or _pick(rng, _KINDS))
    fixed.pop("kind", None)
    size = None if multi else _pick(rng, _SIZE_NAMES)
    attrs = Attributes(
        obj=_pick(rng, _OBJECTS[kind]),
        colour=_pick(rng, COLOURS),
        count=int(rng.integers(1, 6)) if multi else 1,
        size=size,
        position=_pick(rng, _POSITION_NAMES) if size == "small" else None,
        background=_pick(rng, _BACKGROUND_NAMES),
    )
    attrs = replace(attrs, **fixed)  # type: ignore[arg-type]
    if attrs.position is not None and attrs.size != "small":
        attrs = replace(attrs, size="small")  # a pinned position implies a small single item
    return attrs


def _place_many(rng: np.random.Generator, n: int, size: float) -> list[tuple[float, float]]:
    """``n`` non-overlapping centres: distinct cells of a 3x3 grid, jittered inside their cell."""
    cell = (1 - 2 * _MARGIN) / 3
    slack = max(0.0, (cell - size) / 2)
    cells = rng.choice(9, size=n, replace=False)
    return [(_MARGIN + cell * (c % 3 + 0.5) + float(rng.uniform(-slack, slack)),
             _MARGIN + cell * (c // 3 + 0.5) + float(rng.uniform(-slack, slack))) for c in cells]


def make_scene(attrs: Attributes, rng: np.random.Generator) -> Scene:
    """Turn attributes into concrete geometry, with small random jitter."""
    rgb = tuple(float(v) for v in np.clip(np.asarray(PALETTE[attrs.colour]) + rng.uniform(-0.05, 0.05, 3), 0, 1))
    kind = attrs.obj if attrs.kind == "shape" else f"glyph:{attrs.obj.split()[1]}"
    def angle() -> float:
        return float(rng.uniform(-15, 15)) if attrs.kind == "shape" and attrs.obj != "circle" else 0.0
    if attrs.size is None:
        side = float(rng.uniform(*MULTI_SIZE))
        centres = _place_many(rng, attrs.count, side)
        items = tuple(Item(kind, x, y, side, rgb, angle()) for x, y in centres)
    else:
        side = float(rng.uniform(*SIZES[attrs.size or "large"]))
        x, y = POSITIONS[attrs.position or "center"]
        jitter = 0.05 if attrs.position else 0.06
        items = (Item(kind, x + float(rng.uniform(-jitter, jitter)), y + float(rng.uniform(-jitter, jitter)),
                      side, rgb, angle()),)
    return Scene(attrs.background, int(rng.integers(2**62)), items)


# ============================================================================ captions
_PREFIXES = ("a photo of", "an image of", "a picture of", "a drawing of", "a rendering of")
_GENERIC = ("object", "shape", "thing")
_UNINFORMATIVE = {*_GENERIC, *(g + "s" for g in _GENERIC)}
MAX_WORDS = 13  # 16-token context minus start/end tokens minus the final "."


def _plural(noun: str) -> str:
    return {"cross": "crosses", "circle": "circles"}.get(noun, noun + "s")


def _noun(attrs: Attributes, rng: np.random.Generator) -> str:
    """The item's noun phrase: its identity most of the time, else a generic word."""
    many = attrs.count > 1
    if rng.random() < 0.2:
        generic = attrs.kind if attrs.kind != "shape" else _pick(rng, _GENERIC)
        return _plural(generic) if many else generic
    if attrs.kind == "digit" and rng.random() < 0.3:
        return attrs.obj.replace("digit", "number")
    if attrs.obj == "circle" and attrs.size is None and rng.random() < 0.6:
        return "dots" if many else "dot"  # small scattered circles are "dots"
    return _plural(attrs.obj) if many else attrs.obj


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _composed(attrs: Attributes, rng: np.random.Generator) -> list[str]:
    """[prefix] [det] [size] [colour] noun [position] [background], each optional part with p=0.5."""
    noun = _noun(attrs, rng)
    use = {k: rng.random() < 0.5 for k in ("size", "colour", "position", "background", "prefix")}
    informative = noun not in _UNINFORMATIVE or attrs.size is None or use["colour"] or use["background"] \
        or (use["size"] and attrs.size) or (use["position"] and attrs.position)
    if not informative:
        use["colour"] = True  # "an object." says nothing about the image
    words: list[str] = []
    if attrs.size is None or rng.random() < 0.1:  # scatters always say how many
        words.append(NUMBER_WORDS[attrs.count - 1])
    if use["size"] and attrs.size:
        words.append(attrs.size)
    if use["colour"]:
        words.append(attrs.colour)
    words += noun.split()
    if words[0] not in NUMBER_WORDS:
        words.insert(0, "the" if rng.random() < 0.2 else _article(words[0]))
    if use["position"] and attrs.position:
        words += ["in", "the", *attrs.position.split()]
    if use["background"]:
        words += ["on", "a", BACKGROUND_WORDS[attrs.background], "background"]
    if use["prefix"]:
        prefix = _pick(rng, _PREFIXES).split()
        if len(prefix) + len(words) <= MAX_WORDS:
            words = prefix + words
    return words


def _focused(attrs: Attributes, rng: np.random.Generator) -> list[str]:
    """Short captions that name a single attribute (colour, position, count or background)."""
    options = [f"something {attrs.colour}", f"the colour {attrs.colour}",
               f"a {BACKGROUND_WORDS[attrs.background]} background"]
    if attrs.position:
        options += [f"something in the {attrs.position}", f"an object in the {attrs.position}"]
    if attrs.size is None:
        n = NUMBER_WORDS[attrs.count - 1]
        options += [f"{n} objects", f"{n} things"] if attrs.count > 1 else ["one object", "one thing"]
    return _pick(rng, options).split()


def caption(attrs: Attributes, rng: np.random.Generator) -> str:
    """One caption naming some of ``attrs``; at most 14 CLIP tokens (every vocabulary word is one token)."""
    words = _focused(attrs, rng) if rng.random() < 0.15 else _composed(attrs, rng)
    while len(words) > MAX_WORDS:  # only long compositions: drop the background clause
        words = words[: words.index("on")]
    return " ".join(words) + "."


# ============================================================================ tasks
@dataclass(frozen=True)
class SynthTask:
    """One labelled task: ``attribute`` is the label, ``pinned`` fixes the visual domain.

    ``classes`` are the class names (sorted, so ImageFolder's sorted folder order is the label
    order); ``values`` are the matching attribute values.
    """

    name: str
    attribute: str
    classes: tuple[str, ...]
    values: tuple[object, ...]
    pinned: dict[str, object] = field(default_factory=dict)
    camera: tuple[str, float] | None = None  # (render.CAMERAS name, amount): the domain's whole-image effect

    def render(self, attrs: Attributes, rng: np.random.Generator) -> np.ndarray:
        array = render_array(make_scene(attrs, rng), IMAGE_SIZE)
        return apply_camera(array, *self.camera) if self.camera else array

    def sample(self, rng: np.random.Generator, label: int) -> Attributes:
        return sample_attributes(rng, **self.pinned, **{self.attribute: self.values[label]})


def _task(name: str, attribute: str, names_values: dict[str, object], camera: tuple[str, float] | None = None,
          **pinned: object) -> SynthTask:
    classes = tuple(sorted(names_values))
    return SynthTask(name, attribute, classes, tuple(names_values[c] for c in classes), pinned, camera)


TASKS: dict[str, SynthTask] = {t.name: t for t in (
    _task("SynthShape", "obj", {s: s for s in SHAPES}, background="stripes", kind="shape", multi=False,
          size="large", position=None),
    _task("SynthColor", "colour", {c: c for c in COLOURS}, background="noise", kind="letter", multi=False),
    _task("SynthCount", "count", {f"{w} dot" + ("s" if i else ""): i + 1 for i, w in enumerate(NUMBER_WORDS)},
          background="gradient", obj="circle", multi=True),
    _task("SynthDigit", "obj", {d: f"digit {d}" for d in DIGITS}, background="checker", kind="digit", multi=False,
          size="large", position=None),
    _task("SynthPosition", "position", {p: p for p in POSITIONS}, background="grid", kind="shape", multi=False),
    # 22 classes on the one background no other task uses: the class-incremental benchmark's dataset.
    _task("SynthLetter", "obj", {c: f"letter {c}" for c in LETTERS}, background="plain", kind="letter", multi=False,
          size="large", position=None),
    # Camera tasks (zscl demo's benchmark): each on its own domain shift that pretraining never saw
    # (render.CAMERAS), so zero-shot is weak but above chance, and what the label needs stays visible:
    # room to learn. Their classes are the plain tasks' classes.
    _task("SynthFadedShape", "obj", {s: s for s in SHAPES}, camera=("faded", 0.33), background="stripes",
          kind="shape", multi=False, size="large", position=None),
    _task("SynthPaleColor", "colour", {c: c for c in COLOURS}, camera=("pale", 0.16), background="noise",
          kind="letter", multi=False),
    _task("SynthDarkPosition", "position", {p: p for p in POSITIONS}, camera=("dark", 0.28), background="grid",
          kind="shape", multi=False),
    # SynthLetter's 22 letters through a faded camera (contrast 0.7): the class-incremental demo's dataset, with
    # room to learn (zero-shot ~36 % over all 22 letters, 8x chance; plain letters: ~52 %). Letters are more
    # fragile than shapes: at the shapes' 0.33 they fall to 8 %; at 0.6 (26 %) fine-tuning's Last was level
    # with zero-shot's, where CIFAR100's fine-tuning falls far below it.
    _task("SynthFadedLetter", "obj", {c: f"letter {c}" for c in LETTERS}, camera=("faded", 0.7), background="plain",
          kind="letter", multi=False, size="large", position=None),
)}
"""The benchmark's tasks, in the default order."""


# ============================================================================ files on disk
@dataclass(frozen=True)
class WorldSize:
    """Images per class per split of every task, and the reference pool's size."""

    train_per_class: int
    test_per_class: int
    reference: int
    shard_size: int = 1000


# 200 test images per class (1,000-1,200 per task): at 50, one task's accuracy had a sampling sd of ~3 points,
# as large as the margins the demo's acceptance checks read.
FULL = WorldSize(train_per_class=200, test_per_class=200, reference=2000)
QUICK = WorldSize(train_per_class=32, test_per_class=20, reference=256, shard_size=128)
WORLD_DIR = "synthetic"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class WorldInfo:
    """A generated world: ``root`` is ``<data root>/synthetic``; paths are absolute."""

    root: Path
    seed: int
    quick: bool
    tasks: tuple[str, ...]
    counts: dict[str, int]  # "<Task>/<split>" or "reference" -> number of images
    reference_images: Path
    captions: Path
    shards: tuple[Path, ...]
    reused: bool


def stream_rng(seed: int, stream: str) -> np.random.Generator:
    """An independent generator per (seed, stream name); crc32 because ``hash(str)`` is salted per process."""
    return np.random.default_rng([seed, zlib.crc32(stream.encode())])


def png_bytes(array: np.ndarray) -> bytes:
    """PNG with fixed settings and no metadata, so equal pixels give equal bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array, mode="RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def reference_samples(seed: int, n: int) -> Iterator[tuple[np.ndarray, str]]:
    """The reference pool: broad-world images with one caption each (the stream "reference")."""
    rng = stream_rng(seed, "reference")
    for _ in range(n):
        attrs = sample_attributes(rng)
        yield render_array(make_scene(attrs, rng), IMAGE_SIZE), caption(attrs, rng)


def _write_task(out: Path, task: SynthTask, split: str, per_class: int, seed: int) -> int:
    rng = stream_rng(seed, f"{task.name}/{split}")
    for label, name in enumerate(task.classes):
        folder = out / task.name / split / name
        folder.mkdir(parents=True)
        for n in range(per_class):
            attrs = task.sample(rng, label)
            (folder / f"{n:05d}.png").write_bytes(png_bytes(task.render(attrs, rng)))
    return per_class * len(task.classes)


def _write_reference(out: Path, size: WorldSize, seed: int) -> list[str]:
    """Images, captions TSV and webdataset shards of the reference pool; returns the shard names."""
    import webdataset as wds

    images = out / "reference" / "images" / "world"
    (out / "reference" / "shards").mkdir(parents=True)
    images.mkdir(parents=True)
    rows, shards, writer = ["filepath\ttitle"], [], None
    for n, (array, text) in enumerate(reference_samples(seed, size.reference)):
        if n % size.shard_size == 0:
            if writer is not None:
                writer.close()
            shards.append(f"reference/shards/ref-{len(shards):06d}.tar")
            writer = wds.TarWriter(str(out / shards[-1]), mtime=0.0)  # fixed mtime: byte-identical tars
        data = png_bytes(array)
        (images / f"{n:05d}.png").write_bytes(data)
        rows.append(f"images/world/{n:05d}.png\t{text}")
        writer.write({"__key__": f"{n:05d}", "png": data, "txt": text})
    if writer is not None:
        writer.close()
    (out / "reference" / "captions.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return shards


def _manifest(seed: int, quick: bool) -> dict:
    return {"generator": "zscl.synthetic", "version": GENERATOR_VERSION, "seed": seed, "quick": quick,
            "image_size": IMAGE_SIZE}


def _info(world: Path, manifest: dict, reused: bool) -> WorldInfo:
    return WorldInfo(
        root=world, seed=manifest["seed"], quick=manifest["quick"], tasks=tuple(manifest["tasks"]),
        counts=dict(manifest["counts"]), reference_images=world / "reference" / "images",
        captions=world / "reference" / "captions.tsv",
        shards=tuple(world / s for s in manifest["shards"]), reused=reused,
    )


def _build(out: Path, seed: int, quick: bool, tasks: tuple[str, ...]) -> dict:
    size = QUICK if quick else FULL
    counts: dict[str, int] = {}
    for task in (TASKS[name] for name in tasks):
        for split, per_class in (("train", size.train_per_class), ("test", size.test_per_class)):
            counts[f"{task.name}/{split}"] = _write_task(out, task, split, per_class, seed)
    shards = _write_reference(out, size, seed)
    counts["reference"] = size.reference
    manifest = {**_manifest(seed, quick), "tasks": {n: list(TASKS[n].classes) for n in tasks},
                "counts": counts, "shards": shards}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")  # last: marks completion
    return manifest


class WorldMismatch(FileExistsError):
    """A complete world of another seed, size (quick) or generator version is where one was asked for.

    ``found`` and ``wanted`` are its and the asked-for manifest fields, for callers that phrase their own advice."""

    def __init__(self, world: Path, found: dict, wanted: dict) -> None:
        self.world, self.found, self.wanted = world, found, wanted
        super().__init__(f"{world} holds a synthetic world with {describe_world(found)}; asked for "
                         f"{describe_world(wanted)}. Pass overwrite=True (--overwrite) to replace it, or use another root.")


def describe_world(fields: dict) -> str:
    """The text "seed=0, quick=False, version=4" from manifest fields."""
    return ", ".join(f"{k}={fields.get(k)}" for k in ("seed", "quick", "version"))


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def _remove_stale_partials(root: Path) -> None:
    """Delete half-written worlds left by killed generations (their process is gone)."""
    for partial in root.glob(".synthetic-partial-*"):
        try:
            pid = int(partial.name.split("-")[2])  # .synthetic-partial-<pid>-<random>
            os.kill(pid, 0)  # raises if no such process
        except (ValueError, ProcessLookupError):
            shutil.rmtree(partial, ignore_errors=True)
        except PermissionError:
            pass  # alive, someone else's


def generate_world(root: str | Path, seed: int = 0, *, quick: bool = False, overwrite: bool = False,
                   tasks: "tuple[str, ...] | list[str] | None" = None) -> WorldInfo:
    """Write the synthetic world under ``<root>/synthetic`` (see the module docstring).

    ``tasks``: only these tasks' trees (default: every task of :data:`TASKS`). Each task's images come
    from its own random stream, so a task's files do not depend on which other tasks are written.
    Idempotent: a complete world with the same seed, size and generator version is reused (if it lacks
    some of ``tasks``, it is rebuilt with the tasks it had plus those).
    A different one raises unless ``overwrite``. The world is built in a hidden sibling folder
    and renamed into place once its manifest is written, so a killed run leaves no world behind
    and the next call regenerates it. The same seed gives byte-identical files.
    """
    root = Path(root)
    world = root / WORLD_DIR
    manifest_path = world / MANIFEST
    names = tuple(TASKS) if tasks is None else tuple(dict.fromkeys(tasks))
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown synthetic task(s) {unknown}; expected some of {list(TASKS)}")
    if manifest_path.is_file() and not overwrite:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        wanted = _manifest(seed, quick)
        if {k: manifest.get(k) for k in wanted} == wanted:
            if set(names) <= set(manifest["tasks"]):
                return _info(world, manifest, reused=True)
            names = tuple(n for n in TASKS if n in set(names) | set(manifest["tasks"]))  # extend: same seed, same files
        else:
            raise WorldMismatch(world, {k: manifest.get(k) for k in wanted}, wanted)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(root)
    partial = Path(tempfile.mkdtemp(prefix=f".synthetic-partial-{os.getpid()}-", dir=root))
    partial.chmod(0o777 & ~_umask())  # mkdtemp makes a private (0700) folder; the world is ordinary data
    try:
        manifest = _build(partial, seed, quick, names)
        if world.exists():  # an older or incomplete world: move aside, then swap in
            old = Path(tempfile.mkdtemp(prefix=f".synthetic-partial-{os.getpid()}-old-", dir=root))
            os.replace(world, old / WORLD_DIR)
            os.replace(partial, world)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(partial, world)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return _info(world, manifest, reused=False)
