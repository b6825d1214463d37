"""ZSCL's reference data: every image and text source, in the formats users have on disk."""

import io
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from zscl.datasets import CustomDataset, register_custom
from zscl.reference import (
    ReferenceImages,
    ReferenceTexts,
    reference_image_dataset,
    reference_text_tokens,
    reference_texts,
    reference_wds_stream,
)


def png(value: int) -> Image.Image:
    return Image.fromarray(np.full((6, 6, 3), value, dtype=np.uint8))


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float()


@pytest.fixture()
def pool(tmp_path):
    """An ImageNet-style tree, a CC-style TSV (filepath, title) and two webdataset shards."""
    import webdataset as wds

    for i in range(6):
        folder = tmp_path / "imgs" / f"n0{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        png(10 * i).save(folder / f"{i}.png")
    rows = ["filepath\ttitle"] + [f"imgs/n0{i % 2}/{i}.png\tcaption number {i}" for i in range(6)]
    (tmp_path / "cc.tsv").write_text("\n".join(rows) + "\n")
    (tmp_path / "shards").mkdir()
    for s in range(2):
        with wds.TarWriter(str(tmp_path / "shards" / f"ref-{s:06d}.tar")) as sink:
            for i in range(4):
                buf = io.BytesIO()
                png(100 + 10 * s + i).save(buf, format="PNG")
                sink.write({"__key__": f"{s}_{i}", "png": buf.getvalue(), "txt": f"shard {s} text {i}"})
    return tmp_path


def test_folder_source_lists_images_recursively_in_sorted_order(pool):
    ds = reference_image_dataset(ReferenceImages(source="folder", path="imgs"), pool, to_tensor)
    assert len(ds) == 6
    assert [int(ds[i][0, 0, 0]) for i in range(6)] == [0, 20, 40, 10, 30, 50]  # n00/0,2,4 then n01/1,3,5


def test_csv_source_reads_the_cc_validation_format(pool):
    ds = reference_image_dataset(ReferenceImages(source="csv", path="cc.tsv", column="filepath"), pool, to_tensor)
    assert [int(ds[i][0, 0, 0]) for i in range(6)] == [0, 10, 20, 30, 40, 50]
    with pytest.raises(ValueError, match="no column 'path'"):
        reference_image_dataset(ReferenceImages(source="csv", path="cc.tsv", column="path"), pool, to_tensor)


def test_dataset_source_drops_labels_and_limit_applies(pool):
    (pool / "lab" / "train" / "a").mkdir(parents=True)
    (pool / "lab" / "test" / "a").mkdir(parents=True)
    for i in range(3):
        png(7).save(pool / "lab" / "train" / "a" / f"{i}.png")
        png(7).save(pool / "lab" / "test" / "a" / f"{i}.png")
    register_custom(CustomDataset(name="RefLabelled", kind="imagefolder", path="lab", classnames=["a"]), data_root=pool)
    ds = reference_image_dataset(ReferenceImages(source="dataset", path="RefLabelled", limit=2), pool, to_tensor)
    assert len(ds) == 2 and isinstance(ds[0], torch.Tensor) and ds[0].shape == (3, 6, 6)


def test_class_subset_keeps_the_first_classes_and_their_first_images(pool):
    """The reference's ImageNetSM: labels < N, the first K images of each in the pool's order."""
    for c, name in enumerate("abc"):
        (pool / "three" / "train" / name).mkdir(parents=True)
        (pool / "three" / "test" / name).mkdir(parents=True)
        for i in range(3):
            png(10 * c + i).save(pool / "three" / "train" / name / f"{i}.png")
            png(0).save(pool / "three" / "test" / name / f"{i}.png")
    register_custom(CustomDataset(name="RefThree", kind="imagefolder", path="three", classnames=["a", "b", "c"]),
                    data_root=pool)
    cfg = ReferenceImages(source="dataset", path="RefThree", first_classes=2, per_class=2)
    ds = reference_image_dataset(cfg, pool, to_tensor)
    assert [int(ds[i][0, 0, 0]) for i in range(len(ds))] == [0, 1, 10, 11]  # a/0, a/1, b/0, b/1
    ds = reference_image_dataset(ReferenceImages(source="dataset", path="RefThree", per_class=1), pool, to_tensor)
    assert [int(ds[i][0, 0, 0]) for i in range(len(ds))] == [0, 10, 20]


def test_limit_is_the_reference_seeded_random_subset_not_a_sorted_prefix(pool):
    """ImageNetSUB keeps random_split(pool, [N, rest], generator=manual_seed(seed))[0]; same draw on every call."""
    full = reference_image_dataset(ReferenceImages(source="folder", path="imgs"), pool, to_tensor)
    values = [int(full[i][0, 0, 0]) for i in range(6)]
    for seed in (42, 7):
        cfg = ReferenceImages(source="folder", path="imgs", limit=4, limit_seed=seed)
        picked = torch.utils.data.random_split(range(6), [4, 2], generator=torch.Generator().manual_seed(seed))[0]
        expect = [values[i] for i in picked.indices]
        for _ in range(2):  # a resumed run (or another rank) builds the pool again: the same subset
            ds = reference_image_dataset(cfg, pool, to_tensor)
            assert [int(ds[i][0, 0, 0]) for i in range(4)] == expect
        assert expect != values[:4], f"seed {seed}'s draw happens to be the sorted prefix: pick another size"


def test_missing_reference_images_are_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        reference_image_dataset(ReferenceImages(source="folder", path="nope"), tmp_path, None)


def _wds_batches(pool, n, *, start_step=0, rank=0, workers=0, seed=1):
    from zscl.datasets.streams import stream_loader

    cfg = ReferenceImages(source="wds", path="shards/ref-{000000..000001}.tar")
    stream = reference_wds_stream(cfg, pool, to_tensor, batch_size=3, seed=seed, start_step=start_step, rank=rank,
                                  world_size=2 if rank else 1)
    return list(itertools.islice(iter(stream_loader(stream, workers)), n))


def test_webdataset_stream_is_endless_batched_seeded_and_distinct_per_rank(pool):
    batches = _wds_batches(pool, 5)
    assert len(batches) == 5 and all(b.shape == (3, 3, 6, 6) for b in batches)  # 8 samples, 15 drawn: it cycles
    values = {int(v) for b in batches for v in b[:, 0, 0, 0]}
    assert values <= {100 + 10 * s + i for s in range(2) for i in range(4)}
    assert all(torch.equal(a, b) for a, b in zip(batches, _wds_batches(pool, 5))), "a run is reproducible"
    assert any(not torch.equal(a, b) for a, b in zip(batches, _wds_batches(pool, 5, seed=2)))
    other = _wds_batches(pool, 5, rank=1)
    assert any(not torch.equal(a, b) for a, b in zip(batches, other)), "ranks must not draw the same stream"


@pytest.mark.parametrize("workers", [0, 2])
def test_webdataset_stream_resumed_at_step_k_continues_the_uninterrupted_stream(pool, workers):
    uninterrupted = _wds_batches(pool, 9, workers=workers)
    for k in (3, 4):  # both worker roles come first after a resume at an odd and an even step
        resumed = _wds_batches(pool, 9 - k, start_step=k, workers=workers)
        assert all(torch.equal(a, b) for a, b in zip(resumed, uninterrupted[k:]))


def test_caption_wds_and_classname_texts(pool):
    caps = reference_texts(ReferenceTexts(source="captions", path="cc.tsv"), pool)
    assert caps == [f"caption number {i}" for i in range(6)]
    wds_txt = reference_texts(ReferenceTexts(source="wds", path="shards/ref-{000000..000001}.tar"), pool)
    assert sorted(wds_txt) == sorted(f"shard {s} text {i}" for s in range(2) for i in range(4))
    names = reference_texts(ReferenceTexts(source="classnames", datasets=["MNIST"]), pool)
    assert len(names) == 10 and "0" in names[0]
    assert reference_texts(ReferenceTexts(source="captions", path="cc.tsv", limit=2), pool) == caps[:2]
    with pytest.raises(ValueError, match="at least one dataset"):
        reference_texts(ReferenceTexts(source="classnames"), pool)


def test_random_virtual_vocabulary_tokens():
    import open_clip

    tok = open_clip.get_tokenizer("ViT-B-16")
    t = reference_text_tokens(ReferenceTexts(source="random", n_random=5, random_length=10, seed=3), ".", tok)
    assert t.shape == (5, 77)
    assert (t[:, 0] == tok.sot_token_id).all() and (t[:, 11] == tok.eot_token_id).all() and (t[:, 12:] == 0).all()
    again = reference_text_tokens(ReferenceTexts(source="random", n_random=5, random_length=10, seed=3), ".", tok)
    assert torch.equal(t, again)


def test_reference_cache_returns_the_same_images_and_is_reused(pool, tmp_path):
    from torchvision.transforms import PILToTensor

    plain = reference_image_dataset(ReferenceImages(source="folder", path="imgs"), pool, PILToTensor())
    cfg = ReferenceImages(source="folder", path="imgs", cache=True)
    cached = reference_image_dataset(cfg, pool, PILToTensor(), cache_dir=tmp_path / "c")
    assert len(cached) == len(plain) and all(torch.equal(cached[i], plain[i]) for i in range(len(plain)))
    files = sorted((tmp_path / "c").glob("reference-*.npy"))
    assert len(files) == 2
    mtimes = [f.stat().st_mtime_ns for f in files]
    reference_image_dataset(cfg, pool, PILToTensor(), cache_dir=tmp_path / "c")
    assert [f.stat().st_mtime_ns for f in files] == mtimes, "a second use must read the cache, not rebuild it"


def test_ref_classes_method_config_resolves_to_the_imagenet_class_subset():
    from zscl.cli.sequence import build_parser
    from zscl.runner.configs import resolve_config_args

    args = resolve_config_args(["--config", "benchmark/mtil_order1", "--config", "method/ref_classes", "--out", "unused"])
    ref = build_parser(args).parse_args(args).data.reference_images
    assert (ref.source, ref.path, ref.split, ref.first_classes, ref.per_class) == ("dataset", "ImageNet", "train", 64, 100)


def test_classnames_so_far_accumulate_the_prompts_of_the_tasks_trained_so_far():
    """Task k's reference texts: the class prompts of tasks 0..k, in task order (the reference's growing
    --text-datasets lists); method/texts_so_far carries MTIL order I."""
    from zscl.datasets import get_dataset
    from zscl.reference.texts import for_task

    order = ["DTD", "MNIST", "EuroSAT"]
    cfg = ReferenceTexts(source="classnames_so_far", datasets=order)
    for k, name in enumerate(order):
        texts = reference_texts(for_task(cfg, name, 42), ".")
        assert texts == [p for d in order[: k + 1] for p in get_dataset(d).prompts()]
    with pytest.raises(ValueError, match="lacks the task 'Food'"):
        for_task(cfg, "Food", 42)
    import yaml

    from zscl.resources import configs_dir

    method = yaml.safe_load((configs_dir() / "method" / "texts_so_far.yaml").read_text())
    assert method["data"]["reference_texts"]["datasets"][:3] == ["Aircraft", "Caltech101", "CIFAR100"]
