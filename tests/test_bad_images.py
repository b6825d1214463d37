"""Unreadable images never kill a run: training replaces them deterministically and counts them,
evaluation refuses them up front (or excludes and counts them), errors are one line."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zscl.datasets.badimages import (
    BadImageLog,
    ReportingLoader,
    SafeImages,
    UnreadableImageError,

)
from zscl.datasets.common import LabeledImages
from zscl.datasets.streams import StepBatchStream, mix_seed, reporting_loader


def png_bytes(seed: int = 0, size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def plant_corrupt_images(folder: Path) -> list[Path]:
    """Three kinds of broken files: text saved as .png, a truncated PNG, an empty file."""
    folder.mkdir(parents=True, exist_ok=True)
    good = png_bytes(7)
    files = {"zz_text.png": b"this is a caption, not an image\n", "zz_truncated.png": good[: len(good) // 2],
             "zz_empty.png": b""}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return sorted(folder / name for name in files)


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img).copy())


class FakeImages(torch.utils.data.Dataset):
    """Item i is (tensor([i, random draw]), i); the items in ``bad`` raise like an unreadable file."""

    def __init__(self, n: int, bad: set[int]) -> None:
        self.n, self.bad = n, bad

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if i in self.bad:
            raise UnreadableImageError(f"unreadable image f{i} (broken)", f"f{i}", "broken")
        return torch.tensor([float(i), torch.rand(()).item()]), i


def test_unreadable_samples_are_replaced_by_the_next_readable_one_of_the_stream():
    n, bad, batch, seed = 10, {2, 5, 6}, 4, 3
    stream = StepBatchStream(FakeImages(n, bad), batch, seed=seed, skip_unreadable=True)
    # The stream's order, written independently: epoch e is randperm(n) seeded with mix_seed(seed, e).
    perm = lambda e: torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, e))).tolist()  # noqa: E731
    order = [i for e in range(4) for i in perm(e)]
    for step in range(6):
        x, y = stream.batch(step)
        for k, p in enumerate(range(step * batch, (step + 1) * batch)):
            q = p
            while order[q] in bad:
                q += 1
            assert int(y[k]) == order[q], f"position {p}: expected the next readable sample {order[q]}"
    assert {path for path, _ in stream.unreadable} == {"f2", "f5", "f6"}
    # A pure function of (seed, step): a fresh stream started at step 4 gives the same batch, random draws included.
    again = StepBatchStream(FakeImages(n, bad), batch, seed=seed, start_step=4, skip_unreadable=True)
    assert torch.equal(next(iter(again))[0], stream.batch(4)[0])
    strict = StepBatchStream(FakeImages(n, bad), batch, seed=seed)
    with pytest.raises(UnreadableImageError, match="unreadable image f"):
        [strict.batch(s) for s in range(6)]


def test_safe_images_name_the_file_of_each_kind_of_corruption(tmp_path):
    bad = plant_corrupt_images(tmp_path / "imgs")
    good = tmp_path / "imgs" / "good.png"
    good.write_bytes(png_bytes())
    ds = SafeImages(LabeledImages([str(p) for p in [good, *bad]], [0, 1, 2, 3]))
    assert ds[0][0].size == (32, 32)
    for i, path in enumerate(bad, start=1):
        with pytest.raises(UnreadableImageError) as info:
            ds[i]
        assert info.value.path == str(path) and str(info.value).startswith(f"unreadable image {path} (")


def test_reporting_loader_counts_distinct_files_and_is_resumable_for_lightning(tmp_path):
    from lightning.fabric.utilities.types import _Stateful

    bad = plant_corrupt_images(tmp_path / "imgs")
    goods = []
    for i in range(5):
        goods.append(tmp_path / "imgs" / f"g{i}.png")
        goods[-1].write_bytes(png_bytes(i))
    files = [str(p) for p in goods + bad]
    stream = StepBatchStream(SafeImages(LabeledImages(files, list(range(8)), to_tensor)), 4, skip_unreadable=True)
    log = BadImageLog()
    loader = reporting_loader(stream, stream.unreadable, log, "training")
    batches = iter(loader)
    for _ in range(6):  # 24 samples: every file at least twice
        next(batches)
    assert sorted(log.paths) == sorted(map(str, bad)), "each unreadable file counted once"
    assert isinstance(loader, _Stateful), "Lightning must see the loader as resumable"
    restored = ReportingLoader(loader.loader, BadImageLog(), "training")
    restored.load_state_dict(loader.state_dict())
    assert restored.log.paths == log.paths
    assert "3 unreadable image(s)" in log.summary("TinyColors")


def write_shard(path: Path, samples: dict[str, bytes]) -> None:
    import webdataset as wds

    with wds.TarWriter(str(path)) as sink:
        for key, data in samples.items():
            sink.write({"__key__": key, "png": data, "txt": f"text {key}"})


def test_webdataset_skips_a_corrupt_sample_and_an_unopenable_shard_and_names_them(tmp_path):
    from zscl.reference import ReferenceImages, reference_wds_stream

    write_shard(tmp_path / "s-0.tar", {f"{i:04d}": png_bytes(i, 8) for i in range(5)} | {"0005": b"not a png"})
    (tmp_path / "s-1.tar").write_bytes(b"this is not a tar file" * 40)
    records: list = []
    cfg = ReferenceImages(source="wds", path="s-{0..1}.tar")
    stream = reference_wds_stream(cfg, tmp_path, to_tensor, batch_size=5, seed=0, records=records)
    log = BadImageLog()
    loader = reporting_loader(stream, records, log, "reference")
    got = [b for _, b in zip(range(3), loader)]
    assert all(b.shape == (5, 8, 8, 3) for b in got)
    assert set(log.paths) == {f"{tmp_path / 's-0.tar'}#0005", f"shard {tmp_path / 's-1.tar'}"}
    strict = reference_wds_stream(ReferenceImages(source="wds", path="s-0.tar"), tmp_path, to_tensor, 6,
                                  skip_unreadable=False)
    with pytest.raises(UnreadableImageError, match="s-0.tar#0005"):
        next(iter(strict))


def test_a_worker_exception_is_reported_as_one_line_naming_the_file(capsys, monkeypatch):
    from torch._utils import ExceptionWrapper

    from zscl.cli.errors import report_errors

    monkeypatch.delenv("ZSCL_DEBUG", raising=False)
    for original, expected in [
        (UnreadableImageError("unreadable image /d/x.png (cannot identify image file)"),
         "unreadable image /d/x.png (cannot identify image file)"),
        (FileNotFoundError(2, "No such file or directory", "/d/gone.png"), "No such file or directory: '/d/gone.png'"),
        (SyntaxError("broken PNG file"), "broken PNG file"),
    ]:
        try:
            raise original
        except BaseException:
            wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
        with report_errors("zscl fit") as status:
            wrapped.reraise()
        err = capsys.readouterr().err
        assert status.code == 2 and err.count("\n") == 1, err
        assert err.startswith("zscl fit: ") and expected in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------- end to end
def _one_task_benchmark(root: Path, steps: int = 8) -> Path:
    from tests.tiny_world import _settings

    path = root / "tiny" / "one_task.yaml"
    path.write_text(f"""benchmark:
  name: tiny-one
  tasks:
    - {{dataset: TinyColors, lr: 1.0e-3, steps: {steps}}}
  eval_datasets: [TinyColors]
""" + _settings(root))
    return path


@pytest.fixture(scope="module")
def corrupt_world(tmp_path_factory) -> tuple[Path, list[Path]]:
    """The tiny world with three broken files among TinyColors' training images."""
    from tests.tiny_world import make_tiny_world

    root = tmp_path_factory.mktemp("corrupt")
    make_tiny_world(root)
    _one_task_benchmark(root)
    return root, plant_corrupt_images(root / "tiny" / "TinyColors" / "train" / "red")


def _sequence(root: Path, out: Path, *extra: str) -> list[str]:
    return ["sequence", "--config", str(root / "tiny" / "one_task.yaml"), "--config", "method/zscl", "--out", str(out),
            "--checkpoint_every", "2", "--progress", "none", *extra]


@pytest.mark.slow
def test_corrupt_training_images_are_replaced_counted_named_and_resume_is_bit_identical(corrupt_world, capsys):
    import json
    import signal
    import subprocess
    import time

    from safetensors.torch import load_file

    from tests.test_sequence import zscl_cmd
    from zscl.cli.sequence import main

    root, bad = corrupt_world
    assert main(_sequence(root, root / "runs" / "full")[1:]) == 0  # in this process: no start-up cost
    full = capsys.readouterr()
    res = json.loads((root / "runs" / "full" / "results.json").read_text())
    assert res["bad_images"] == {"TinyColors": 3}
    assert sorted(res["bad_image_paths"]["TinyColors"]) == sorted(map(str, bad))
    assert all(str(p) in full.err for p in bad), "the first unreadable files are named as they are met"
    assert "TinyColors: 3 unreadable image(s) replaced" in full.err  # the warning at the end of the task
    assert "unreadable training/reference images replaced: TinyColors 3" in full.out  # under the table

    out = root / "runs" / "killed"
    marker = out / "tasks" / "00-TinyColors" / "last.ckpt"
    proc = subprocess.Popen(zscl_cmd(*_sequence(root, out)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert marker.exists(), "the task never wrote a checkpoint"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoints" / "00-TinyColors.safetensors").exists(), "killed too late: the task had finished"
    with warnings.catch_warnings(record=True) as caught:  # nothing silences Lightning's "not resumable" warning
        warnings.simplefilter("always")
        assert main(_sequence(root, out)[1:]) == 0
    assert "resuming from" in capsys.readouterr().out and not [w for w in caught if "not resumable" in str(w.message)]
    a = load_file(str(out / "checkpoints" / "00-TinyColors.safetensors"))
    b = load_file(str(root / "runs" / "full" / "checkpoints" / "00-TinyColors.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b), "resumed weights must be bit-identical"
    assert json.loads((out / "results.json").read_text())["bad_images"] == {"TinyColors": 3}


@pytest.mark.slow
def test_on_bad_image_error_stops_with_one_line_naming_the_file(corrupt_world, tmp_path, capsys, monkeypatch):
    import sys

    from tests.tiny_world import task_yaml
    from zscl.cli.lightning import fit

    monkeypatch.setattr(sys, "argv", ["zscl"])  # the CLI rewrites it for LightningCLI
    monkeypatch.delenv("ZSCL_DEBUG", raising=False)
    root, bad = corrupt_world
    task = task_yaml(root, tmp_path / "task.yaml", "TinyColors", steps=8, default_root_dir=tmp_path / "fit")
    # One DataLoader worker: the error crosses a process boundary, as in real runs.
    code = fit(["--config", "method/finetune", "--config", str(task), "--data.on_bad_image", "error",
                "--data.num_workers", "1"])
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("zscl fit:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert any(f"unreadable image {p} (" in lines[0] for p in bad), lines[0]


@pytest.mark.slow
def test_a_corrupt_test_image_stops_the_run_before_training_unless_allowed(tmp_path, capsys, monkeypatch):
    import json

    from tests.tiny_world import make_tiny_world
    from zscl.cli.sequence import main

    monkeypatch.delenv("ZSCL_DEBUG", raising=False)
    make_tiny_world(tmp_path)
    _one_task_benchmark(tmp_path, steps=2)
    broken = tmp_path / "tiny" / "TinyColors" / "test" / "blue" / "zz_broken.png"
    broken.write_bytes(png_bytes(3)[:100])
    args = ["--config", str(tmp_path / "tiny" / "one_task.yaml"), "--config", "method/finetune",
            "--out", str(tmp_path / "run"), "--progress", "none"]
    assert main([*args, "--check-data"]) == 2  # zscl check-data first: nothing runs
    out = capsys.readouterr().out
    assert f"unreadable: {broken}" in out and "check-data: PROBLEMS: 1 unreadable image(s)" in out
    assert not (tmp_path / "run").exists()
    assert main(args) == 2
    captured = capsys.readouterr()
    assert str(broken) in captured.err and "--allow-bad-test-images" in captured.err
    assert "task 1/1" not in captured.out and not (tmp_path / "run" / "results.json").exists()
    assert main([*args, "--allow-bad-test-images"]) == 0
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["excluded_test_images"] == {"TinyColors": 1}
    assert res["excluded_test_image_paths"] == {"TinyColors": [str(broken)]}
    assert "unreadable test images excluded (--allow-bad-test-images): TinyColors 1" in capsys.readouterr().out


def build_eval_cache(data: str, cache: str, name: str = "ManyImages"):
    """The uint8 evaluation cache of the imagefolder dataset ``data/many`` (also run in a subprocess)."""
    from torchvision import transforms as T

    from zscl.datasets import CustomDataset, register_custom
    from zscl.datasets.cache import cached_dataset

    register_custom(CustomDataset(name, "imagefolder", "many"), data_root=data)
    tf = T.Compose([T.Resize(8), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    return cached_dataset(name, "test", data, tf, cache, progress=False)[0]


def test_an_eval_cache_killed_mid_build_is_never_read_as_complete(tmp_path):
    import os
    import subprocess
    import sys

    for i in range(150):  # three batches of the cache builder's 64
        folder = tmp_path / "data" / "many" / ("train" if i < 10 else "test") / f"c{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), i, dtype=np.uint8)).save(folder / f"{i:03d}.png")
    data, cache = str(tmp_path / "data"), str(tmp_path / "cache")
    build = f"from tests.test_bad_images import build_eval_cache; build_eval_cache({data!r}, {cache!r})"
    env = {**os.environ, "ZSCL_KILL_AT": "eval-cache-fill"}  # SIGKILL after the first of three batches
    proc = subprocess.run([sys.executable, "-c", build], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    leftovers = [p.name for p in (tmp_path / "cache").iterdir()]
    assert leftovers and all(name.endswith(".tmp") for name in leftovers), leftovers
    cached = build_eval_cache(data, cache)
    values = sorted(int(cached[i][0][0, 0, 0]) for i in range(len(cached)))
    assert values == list(range(10, 150)), "the rebuilt cache holds every test image exactly once"


@pytest.mark.slow
def test_check_data_on_a_fake_mtil_tree_finds_exactly_the_planted_problems(tmp_path, capsys):
    import json
    import shutil

    from tests.fake_layouts import make_fake_dataset
    from zscl.cli.check_data import main
    from zscl.datasets import get_dataset
    from zscl.datasets.mtil import CALTECH101_FOLDERS, MTIL_ORDER_I

    root = tmp_path / "data"
    for name in MTIL_ORDER_I:  # every class populated: a class without images is then a planted problem
        make_fake_dataset(name, root, classes=range(get_dataset(name).num_classes), per_class=1)
    (root / "ref").mkdir()
    for i in range(4):
        (root / "ref" / f"{i}.png").write_bytes(png_bytes(i, 8))
    args = ["--config", "benchmark/mtil_order1", "--config", "method/zscl", "--data-root", str(root), "--workers", "1",
            "--no-progress", "--data.reference_images.source", "folder", "--data.reference_images.path", "ref"]
    assert main(args) == 0, "the fake tree is clean before the problems are planted"
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("check-data: OK")
    planted = [root / "dtd" / "dtd" / "images" / "blotchy" / "blotchy_test_0000.jpg",  # DTD test: text bytes
               root / "food-101" / "images" / "apple_pie" / "train0.jpg",                # Food train: truncated
               root / "ref" / "2.png"]                                                    # reference: empty
    assert all(p.exists() for p in planted), [p for p in planted if not p.exists()]
    planted[0].write_bytes(b"not a jpeg")
    planted[1].write_bytes(planted[1].read_bytes()[:40])
    planted[2].write_bytes(b"")
    shutil.rmtree(root / "caltech101" / "101_ObjectCategories" / CALTECH101_FOLDERS[5])  # airplanes
    code = main([*args, "--json", str(tmp_path / "report.json")])
    out = capsys.readouterr().out
    assert code == 2, out
    report = json.loads((tmp_path / "report.json").read_text())
    unreadable = sorted(path for s in report["splits"] for path, _ in s["unreadable"])
    assert unreadable == sorted(map(str, planted)), out
    missing = {s["dataset"]: s["missing_classes"] for s in report["splits"] if s["missing_classes"]}
    assert missing == {"Caltech101": [get_dataset("Caltech101").classnames[5]]}, out
    assert not any(s["missing"] for s in report["splits"])
    assert {s["dataset"] for s in report["splits"]} >= set(MTIL_ORDER_I)
    assert sum(s["converted"].get("L", 0) for s in report["splits"] if s["dataset"] == "Caltech101") == 2
    assert out.strip().splitlines()[-1].startswith("check-data: PROBLEMS: 3 unreadable image(s), 1 class(es)")


def test_eval_cache_leaves_unreadable_images_out_and_rebuilds_once_they_are_repaired(tmp_path):
    from torchvision import transforms as T

    from zscl.datasets import CustomDataset, UnreadableTestImagesError, register_custom
    from zscl.datasets.cache import cached_dataset
    from zscl.evaluation.zeroshot import dataset_batches

    for split, n in (("train", 2), ("test", 6)):
        for i in range(n):
            folder = tmp_path / "data" / "few" / split / f"c{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), 10 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    broken = tmp_path / "data" / "few" / "test" / "c1" / "3.png"
    good = broken.read_bytes()
    broken.write_bytes(b"")
    register_custom(CustomDataset("FewImages", "imagefolder", "few"), data_root=tmp_path / "data")
    tf = T.Compose([T.Resize(8), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    args = ("FewImages", str(tmp_path / "data"), tf)
    with pytest.raises(UnreadableTestImagesError, match=f"1 unreadable test image.*{broken}"):
        dataset_batches(*args, cache_dir=str(tmp_path / "cache"), progress=False)
    for cache in (True, False):
        loader, _, _ = dataset_batches(*args, cache=cache, cache_dir=str(tmp_path / "cache"), progress=False,
                                       allow_bad=True)
        assert [p for p, _ in loader.dataset.excluded] == [str(broken)]
        assert sum(len(y) for _, y in loader) == 5
    broken.write_bytes(good)  # repaired: the cache is rebuilt with it
    cached, _, _ = cached_dataset("FewImages", "test", tmp_path / "data", tf, tmp_path / "cache", progress=False)
    assert len(cached) == 6 and cached.excluded == []
