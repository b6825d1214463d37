"""The synthetic world (zscl.synthetic): determinism, on-disk formats, registry, tiny CLIP."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zscl.synthetic import world as W
from zscl.synthetic.render import BACKGROUNDS, SHAPES, Item, Scene, render_array
from zscl.synthetic.tasks import SYNTHETIC_TASKS


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def quick_world(tmp_path_factory: pytest.TempPathFactory) -> W.WorldInfo:
    return W.generate_world(tmp_path_factory.mktemp("world"), seed=0, quick=True)


# ----------------------------------------------------------------------------- rendering
def test_render_shapes_and_backgrounds_are_distinct() -> None:
    items = {s: render_array(Scene("plain", 1, (Item(s, 0.5, 0.5, 0.6, (1.0, 0.0, 0.0)),))) for s in SHAPES}
    for a in SHAPES:
        assert items[a].shape == (32, 32, 3) and items[a].dtype == np.uint8
        for b in SHAPES:
            if a < b:
                assert np.abs(items[a].astype(int) - items[b].astype(int)).sum() > 2000, (a, b)
    backs = [render_array(Scene(b, 7, ())) for b in BACKGROUNDS]
    assert len({x.tobytes() for x in backs}) == len(BACKGROUNDS)
    glyph = render_array(Scene("plain", 1, (Item("glyph:7", 0.5, 0.5, 0.6, (0.0, 0.0, 1.0)),)))
    assert glyph[..., 2].max() > 200  # the blue glyph is painted
    with pytest.raises(ValueError, match="unknown item kind"):
        render_array(Scene("plain", 1, (Item("blob", 0.5, 0.5, 0.5, (1.0, 1.0, 1.0)),)))
    with pytest.raises(ValueError, match="unknown background"):
        render_array(Scene("marble", 1, ()))


def test_task_samples_carry_their_label_and_domain() -> None:
    rng = np.random.default_rng(0)
    for task in W.TASKS.values():
        for label in range(len(task.classes)):
            attrs = task.sample(rng, label)
            assert getattr(attrs, task.attribute) == task.values[label]
            for key, value in task.pinned.items():
                if key == "kind":
                    assert attrs.kind == value
                elif key != "multi":
                    assert getattr(attrs, key) == value, (task.name, key)


def _attribute_words(attrs: W.Attributes) -> set[str]:
    """Words a caption may use truthfully about ``attrs``."""
    words = {attrs.colour, W.BACKGROUND_WORDS[attrs.background], *attrs.obj.lower().split(), attrs.kind,
             *(attrs.position or "").split(), attrs.size or "", W.NUMBER_WORDS[attrs.count - 1]}
    return words | {w + "s" for w in words} | {w + "es" for w in words} | {"dot", "dots", "number"}


def test_captions_are_short_varied_and_true() -> None:
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = SimpleTokenizer()  # the standard CLIP BPE, as zscl-synth-tiny uses
    rng = np.random.default_rng(1)
    everything = _attribute_words(W.Attributes("digit 0", "red", 1, "small", "top left", "plain"))
    for attrs in (W.Attributes(o, c, n, s, None, b) for o in (*SHAPES, "letter b", *(f"digit {d}" for d in W.DIGITS))
                  for c in W.COLOURS for n in (1, 2, 3, 4, 5) for s in W.SIZES for b in BACKGROUNDS):
        everything |= _attribute_words(attrs)
    everything |= {p for pos in W.POSITIONS for p in pos.split()} | {c.lower() for c in W.LETTERS}
    captions = set()
    for _ in range(1000):
        attrs = W.sample_attributes(rng)
        text = W.caption(attrs, rng)
        captions.add(text)
        assert len(tokenizer.encode(text)) <= 14, text  # 16-token context = start + 14 + end
        named = set(text.lower().rstrip(".").split()) & everything
        assert named, text  # names at least one attribute...
        assert named <= _attribute_words(attrs), (text, attrs)  # ...and only true ones
    assert len(captions) > 500  # many phrasings, not a handful of strings


def test_templates_and_classnames_match_the_world() -> None:
    from open_clip.tokenizer import SimpleTokenizer

    from zscl.datasets import load_classnames, load_templates

    tokenizer = SimpleTokenizer()
    assert SYNTHETIC_TASKS == tuple(W.TASKS)
    for name, task in W.TASKS.items():
        assert load_classnames(name) == task.classes
        templates = load_templates(name)
        assert len(templates) >= 4
        for t in templates:
            for c in task.classes:
                assert len(tokenizer.encode(t.replace("{c}", c))) <= 14


# ----------------------------------------------------------------------------- the world on disk
def test_generation_is_deterministic_and_seeded(quick_world: W.WorldInfo, tmp_path: Path) -> None:
    again = W.generate_world(tmp_path / "a", seed=0, quick=True)
    assert _hashes(again.root) == _hashes(quick_world.root)
    other = _hashes(W.generate_world(tmp_path / "b", seed=1, quick=True).root)
    same = sum(other.get(k) == v for k, v in _hashes(quick_world.root).items() if k.endswith(".png"))
    assert same < 10  # a few flat images may coincide; the worlds do not
    manifest = json.loads((quick_world.root / W.MANIFEST).read_text())
    assert manifest["seed"] == 0 and manifest["version"] == W.GENERATOR_VERSION and manifest["quick"] is True
    assert manifest["counts"] == quick_world.counts


def test_generation_reuses_refuses_and_recovers(tmp_path: Path) -> None:
    info = W.generate_world(tmp_path, seed=3, quick=True)
    stamp = (info.root / W.MANIFEST).stat().st_mtime_ns
    assert W.generate_world(tmp_path, seed=3, quick=True).reused
    assert (info.root / W.MANIFEST).stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="overwrite"):
        W.generate_world(tmp_path, seed=4, quick=True)
    # A killed run: a world without its manifest, and a half-written folder of a dead process.
    (info.root / W.MANIFEST).unlink()
    dead = tmp_path / ".synthetic-partial-999999999-x"
    dead.mkdir()
    fresh = W.generate_world(tmp_path, seed=4, quick=True)
    assert not fresh.reused and fresh.seed == 4 and not dead.exists()
    assert W.generate_world(tmp_path, seed=5, quick=True, overwrite=True).seed == 5
    assert [p.name for p in tmp_path.iterdir()] == [W.WORLD_DIR]


def test_tasks_load_through_the_dataset_registry(quick_world: W.WorldInfo) -> None:
    from zscl.datasets import build_dataset, dataset_labels, get_dataset

    data_root = quick_world.root.parent
    for name in SYNTHETIC_TASKS:
        spec = get_dataset(name)
        for split in ("train", "test"):
            ds = build_dataset(name, data_root, split, transform=None)
            labels = dataset_labels(ds)
            assert len(ds) == quick_world.counts[f"{name}/{split}"]
            assert sorted(set(labels)) == list(range(spec.num_classes))
        image, label = ds[len(ds) - 1]
        assert image.size == (32, 32) and label == spec.num_classes - 1


def test_reference_captions_and_shards_are_readable(quick_world: W.WorldInfo) -> None:
    import webdataset as wds

    with open(quick_world.captions, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert len(rows) == quick_world.counts["reference"]
    assert list(rows[0]) == ["filepath", "title"]
    for row in rows[:20]:
        assert (quick_world.captions.parent / row["filepath"]).is_file()
    samples = list(wds.WebDataset([str(s) for s in quick_world.shards], shardshuffle=False).decode("pil"))
    assert len(samples) == len(rows) > len(quick_world.shards) > 1
    first = samples[0]
    assert first["txt"] == rows[0]["title"] and first["png"].size == (32, 32)
    with Image.open(quick_world.captions.parent / rows[0]["filepath"]) as on_disk:
        assert np.array_equal(np.asarray(first["png"].convert("RGB")), np.asarray(on_disk.convert("RGB")))


# ----------------------------------------------------------------------------- tiny CLIP
def test_shipped_weights_have_zero_shot_ability(quick_world: W.WorldInfo) -> None:
    from zscl.datasets import build_dataset, get_dataset
    from zscl.evaluation.zeroshot import build_classifier
    from zscl.models import load_clip
    from zscl.synthetic.pretrain import synthetic_weights_path

    path = synthetic_weights_path()
    assert path.is_file() and path.stat().st_size < 10 * 2**20
    bundle = load_clip("zscl-synth-tiny", "synthetic")
    for name in SYNTHETIC_TASKS:
        spec = get_dataset(name)
        ds = build_dataset(name, quick_world.root.parent, "test", bundle.test_transform)
        images = torch.stack([ds[i][0] for i in range(len(ds))])
        labels = torch.tensor([ds[i][1] for i in range(len(ds))])
        head = build_classifier(bundle.model, bundle.tokenizer, spec.classnames, spec.templates)
        with torch.no_grad():
            pred = (torch.nn.functional.normalize(bundle.model.encode_image(images), dim=-1) @ head).argmax(1)
        accuracy = (pred == labels).float().mean().item()
        assert accuracy >= 2.0 / spec.num_classes, (name, accuracy)


def test_shipped_weights_load_with_plain_open_clip() -> None:
    import open_clip

    from zscl.models import tiny_configs_dir
    from zscl.synthetic.pretrain import synthetic_weights_path

    open_clip.add_model_config(tiny_configs_dir())
    model = open_clip.create_model("zscl-synth-tiny", pretrained=str(synthetic_weights_path()))
    assert open_clip.get_tokenizer("zscl-synth-tiny")(["a red star."]).shape == (1, 16)
    assert model.logit_scale.exp().item() > 20  # trained, not the 1/0.07 initialisation


def test_pretraining_learns_and_saves(tmp_path: Path) -> None:
    import math

    from zscl.cli.synthetic import main
    from zscl.models import read_state_dict
    from zscl.synthetic.pretrain import PretrainConfig, pretrain

    out = tmp_path / "w.safetensors"
    config = PretrainConfig(steps=100, batch_size=32, lr=1.5e-3, warmup=5, pool_size=512, log_every=0)
    result = pretrain(config, out=out, log=lambda line: None)
    # InfoNCE starts at ~log(B) (every pairing equally likely); below it, images find their captions.
    assert np.mean(result.losses[-10:]) < math.log(config.batch_size) - 0.25
    assert np.mean(result.losses[-10:]) < np.mean(result.losses[:10]) - 0.3
    state = read_state_dict(out)
    assert state["visual.conv1.weight"].dtype == torch.float16
    torch.testing.assert_close(state["logit_scale"].float(), result.model.logit_scale.detach().half().float())
    cli_out = tmp_path / "cli.safetensors"
    argv = ["pretrain", "--out", str(cli_out), "--steps", "2", "--batch_size", "16", "--pool_size", "32"]
    assert main(argv) == 0 and cli_out.is_file()


def test_cli_generate(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from zscl.cli.synthetic import main

    assert main(["generate", "--root", str(tmp_path), "--quick", "--seed", "2"]) == 0
    assert "generated" in capsys.readouterr().out
    assert main(["generate", "--root", str(tmp_path), "--quick", "--seed", "2"]) == 0
    assert "reused" in capsys.readouterr().out
    assert main(["generate", "--root", str(tmp_path), "--quick", "--seed", "9"]) == 2
    assert "overwrite" in capsys.readouterr().err
    assert main([]) == 2


# ----------------------------------------------------------------------------- cameras
def test_cameras_follow_their_formulas_on_hand_picked_pixels() -> None:
    from zscl.synthetic.render import apply_camera

    px = np.array([[[255, 0, 30], [128, 128, 128]]], dtype=np.uint8)
    # faded a: x' = a x + (1 - a) 127.5   -> 255 * .36 + .64 * 127.5 = 173.4; 0 -> 81.6; 30 -> 92.4
    assert apply_camera(px, "faded", 0.36).tolist() == [[[173, 82, 92], [128, 128, 128]]]
    # pale a: grey + a (x - grey), grey = 95 -> 95 + .16 * 160 = 120.6; 95 - 15.2 = 79.8; 95 - 10.4 = 84.6
    assert apply_camera(px, "pale", 0.16).tolist() == [[[121, 80, 85], [128, 128, 128]]]
    # dark a: a x -> 71.4, 0, 8.4; 35.84
    assert apply_camera(px, "dark", 0.28).tolist() == [[[71, 0, 8], [36, 36, 36]]]
    with pytest.raises(ValueError, match="unknown camera"):
        apply_camera(px, "sepia", 1.0)


def test_a_camera_task_is_its_plain_scene_through_its_camera() -> None:
    """A camera task's image is the same scene rendered plainly, then the camera (not a new scene)."""
    from zscl.synthetic.render import apply_camera

    for task in (t for t in W.TASKS.values() if t.camera):
        rng_a, rng_b = W.stream_rng(3, "x"), W.stream_rng(3, "x")
        attrs_a, attrs_b = task.sample(rng_a, 1), task.sample(rng_b, 1)
        plain = W.render_array(W.make_scene(attrs_b, rng_b), W.IMAGE_SIZE)
        assert np.array_equal(task.render(attrs_a, rng_a), apply_camera(plain, *task.camera)), task.name
        assert not np.array_equal(plain, apply_camera(plain, *task.camera))


def test_a_world_holds_the_tasks_asked_for_and_grows_without_changing_files(tmp_path) -> None:
    one = W.generate_world(tmp_path / "w", seed=2, quick=True, tasks=["SynthCount"])
    assert one.tasks == ("SynthCount",) and not (one.root / "SynthShape").exists()
    before = _hashes(one.root / "SynthCount")
    grown = W.generate_world(tmp_path / "w", seed=2, quick=True, tasks=["SynthShape"])
    assert not grown.reused and set(grown.tasks) == {"SynthCount", "SynthShape"}
    assert _hashes(grown.root / "SynthCount") == before  # a task's files depend on (seed, task) only
    assert W.generate_world(tmp_path / "w", seed=2, quick=True, tasks=["SynthShape"]).reused
    full = W.generate_world(tmp_path / "all", seed=2, quick=True)
    assert _hashes(full.root / "SynthShape") == _hashes(grown.root / "SynthShape")
    with pytest.raises(ValueError, match="unknown synthetic task"):
        W.generate_world(tmp_path / "w", seed=2, quick=True, tasks=["SynthNope"])
