"""Zero-shot evaluation: classifier construction, top-k counting, the uint8 cache, and `zscl eval`."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.fake_layouts import make_fake_dataset
from zscl.cli.main import main
from zscl.datasets.pixels import normalize_images
from zscl.datasets.cache import cached_dataset, split_normalize
from zscl.evaluation.zeroshot import build_classifier, evaluate, topk_correct
from zscl.models import load_clip


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_clip("zscl-tiny-vit")


def test_classifier_is_the_renormalised_mean_of_normalised_prompt_embeddings(tiny):
    classes, templates = ["cat", "dog", "bird"], ["a photo of a {c}.", "a drawing of a {c}.", "{c}"]
    W = build_classifier(tiny.model, tiny.tokenizer, classes, templates)
    assert W.shape == (tiny.model.text_projection.shape[1], 3)
    with torch.no_grad():
        for j, c in enumerate(classes):
            emb = tiny.model.encode_text(tiny.tokenizer([t.replace("{c}", c) for t in templates]))
            expected = F.normalize(F.normalize(emb, dim=-1).mean(0), dim=0)
            torch.testing.assert_close(W[:, j], expected, rtol=1e-5, atol=1e-6)


def test_topk_counts():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    assert topk_correct(logits, labels, ks=(1, 2, 5)).tolist() == [1, 2, 3]


def test_uint8_cache_plus_device_normalisation_equals_the_test_transform(tiny):
    rng = np.random.default_rng(0)
    uint8_tf, mean, std = split_normalize(tiny.test_transform)
    for h, w in [(40, 57), (32, 32), (91, 33)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        via_cache = normalize_images(uint8_tf(img).unsqueeze(0), mean, std)[0]
        assert torch.equal(via_cache, tiny.test_transform(img)), "the cache must not change a single bit"


def test_cached_and_uncached_evaluation_agree(tiny, tmp_path):
    make_fake_dataset("DTD", tmp_path / "data", classes=[0, 1, 2], per_class=3, image_size=20)
    spec_cls = ["banded", "blotchy", "braided"]
    W = build_classifier(tiny.model, tiny.tokenizer, spec_cls, ["a photo of a {c} texture."])
    from zscl.datasets import build_dataset

    ds = build_dataset("DTD", tmp_path / "data", "test", tiny.test_transform)
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    plain = evaluate(tiny.model, W, loader, device="cpu", progress=False)
    cached, mean, std = cached_dataset("DTD", "test", tmp_path / "data", tiny.test_transform, tmp_path / "cache", progress=False)
    batches = [cached.get_batch(range(i, min(i + 4, len(cached)))) for i in range(0, len(cached), 4)]
    fast = evaluate(tiny.model, W, batches, device="cpu", mean=mean, std=std, progress=False)
    assert (plain.correct1, plain.correct5, plain.n) == (fast.correct1, fast.correct5, fast.n) and plain.n == len(ds)
    assert len(list((tmp_path / "cache").glob("DTD-test-*.npy"))) == 2  # images + labels, reused next time


def _replace_in_place(dataset: str, root) -> None:
    """New pixels under the same file names and counts (a regenerated or re-extracted dataset)."""
    import os
    import pickle

    if dataset == "CIFAR100":
        path = root / "cifar-100-python" / "test"
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        entry["data"] = 255 - entry["data"]
        with open(path, "wb") as f:
            pickle.dump(entry, f)
        return
    for file in sorted((root / "dtd").rglob("*.jpg")):
        with Image.open(file) as img:
            inverted = Image.fromarray(255 - np.asarray(img.convert("RGB")))
        stat = file.stat()
        inverted.save(file)
        os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # distinct mtime, set, not waited for


@pytest.mark.parametrize("dataset", ["DTD", "CIFAR100"])  # image files; an in-memory array from a pickle
def test_the_cache_never_serves_pixels_of_a_dataset_replaced_in_place(tiny, tmp_path, dataset):
    """Regenerating a dataset under the same folder (same names, same count) must not read stale pixels."""
    from zscl.datasets import build_dataset

    def pixels() -> torch.Tensor:
        cached, _, _ = cached_dataset(dataset, "test", tmp_path / "data", tiny.test_transform, tmp_path / "cache",
                                      progress=False)
        return torch.from_numpy(np.array(cached.images))

    def truth() -> torch.Tensor:  # the files as they are now, through the plain uint8 transform
        ds = build_dataset(dataset, tmp_path / "data", "test", split_normalize(tiny.test_transform)[0])
        return torch.stack([ds[i][0] for i in range(len(ds))])

    make_fake_dataset(dataset, tmp_path / "data", classes=[0, 1], per_class=2, image_size=20)
    first = pixels()
    assert torch.equal(first, truth())
    _replace_in_place(dataset, tmp_path / "data")
    second = pixels()
    assert not torch.equal(first, second) and torch.equal(second, truth())


def test_zscl_eval_prints_a_table_and_writes_json(tmp_path, capsys):
    dtd = make_fake_dataset("DTD", tmp_path / "data", classes=[0, 1], per_class=2, image_size=16)
    mnist = make_fake_dataset("MNIST", tmp_path / "data", classes=[3, 7], per_class=2, image_size=28)
    out = tmp_path / "zs.json"
    args = ["eval", "--model", "zscl-tiny-vit", "--datasets", "DTD,mnist", "--data-root", str(tmp_path / "data"),
            "--cache-dir", str(tmp_path / "cache"), "--num-workers", "0", "--progress", "false", "--json", str(out)]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert "DTD" in printed and "MNIST" in printed and "top-1" in printed and "mean" in printed
    result = json.loads(out.read_text())
    assert set(result["results"]) == {"DTD", "MNIST"}
    assert result["results"]["MNIST"]["classes"] == 10 and result["results"]["DTD"]["classes"] == 47
    assert result["results"]["DTD"]["n"] == len(dtd.labels["test"]) and result["results"]["MNIST"]["n"] == len(mnist.labels["test"])
    for r in result["results"].values():
        assert 0 <= r["top1"] <= r["top5"] <= 100


def test_zscl_eval_errors_name_the_problem(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--model", "zscl-tiny-vit", "--datasets", "DTDD", "--data-root", str(tmp_path)])
    assert exit_.value.code == 2 and "Did you mean DTD" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--model", "zscl-tiny-vit", "--datasets", "DTD", "--data-root", str(tmp_path), "--progress", "false"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "DTD not found under" in err and "dtd/dtd/images" in err


@pytest.mark.parametrize("cores,expected", [(2, 2), (1, 1), (16, 4)])
def test_eval_loader_workers_default_to_the_usable_cores(monkeypatch, cores, expected):
    import os

    from zscl.cli.eval import build_parser

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert build_parser().get_defaults().num_workers == expected
