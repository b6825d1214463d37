"""Unreadable images never kill a run: training replaces them deterministically and counts them,
evaluation refuses them up front (or excludes and counts them), errors are one line."""

from __future__ import annotations

import io
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
    reporting_loader,
)
from zscl.datasets.common import LabeledImages
from zscl.datasets.streams import StepBatchStream, mix_seed


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
    order = [int(i) for e in range(4) for i in torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, e)))]
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
