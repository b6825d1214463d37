"""The LightningModule and DataModule on a tiny real-format world: what trains, what is cached, data sources."""

import io

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from tests.tiny_world import make_tiny_world
from zscl.methods import ContinualCLIP, ContinualDataModule, Distillation
from zscl.reference import ReferenceImages, ReferenceTexts


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    make_tiny_world(root)
    return root


def datamodule(root, **kw):
    args = dict(dataset="TinyColors", data_root=str(root), batch_size=4, num_workers=0,
                custom_datasets=str(root / "tiny" / "datasets.yaml"), cache_dir=str(root / "cache"),
                reference_images=ReferenceImages(source="folder", path="tiny/reference/images"),
                reference_texts=ReferenceTexts(source="captions", path="tiny/reference/captions.tsv"))
    return ContinualDataModule(**{**args, **kw})


def fit(module, dm, steps=3):
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    return trainer


def snapshot(model, prefix=""):
    return {k: v.detach().clone() for k, v in model.named_parameters() if k.startswith(prefix)}


@pytest.mark.parametrize("mode,frozen,trained", [("image", "transformer.", "visual."), ("text", "visual.", "transformer.")])
def test_train_mode_selects_the_tower_that_changes(root, mode, frozen, trained):
    torch.manual_seed(0)
    module = ContinualCLIP(clip="zscl-tiny-vit", pretrained=None, train_mode=mode, lr=1e-3, warmup_steps=1)
    before = snapshot(module.clip)
    fit(module, datamodule(root))
    after = snapshot(module.clip)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(frozen))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(trained))
    assert torch.equal(before["logit_scale"], after["logit_scale"])


def test_teacher_text_embeddings_are_computed_once_per_task(root):
    torch.manual_seed(0)
    module = ContinualCLIP(clip="zscl-tiny-vit", pretrained=None, lr=1e-3, warmup_steps=1,
                           distill=Distillation(image=1.0, text=1.0))
    calls = []
    original = module.teacher.encode_text
    module.teacher.encode_text = lambda tokens, **kw: calls.append(len(tokens)) or original(tokens, **kw)
    teacher_before = snapshot(module.teacher)
    fit(module, datamodule(root), steps=4)
    assert calls == [12], "all 12 captions, encoded once, not once per step"
    assert all(torch.equal(v, snapshot(module.teacher)[k]) for k, v in teacher_before.items())
    assert not any(k.startswith("teacher") for k in module.state_dict())


def test_webdataset_reference_images_train_through_the_datamodule(root):
    import webdataset as wds

    shards = root / "shards"
    shards.mkdir(exist_ok=True)
    with wds.TarWriter(str(shards / "ref-000000.tar")) as sink:
        for i in range(10):
            buf = io.BytesIO()
            Image.fromarray(np.full((32, 32, 3), 20 * i, dtype=np.uint8)).save(buf, format="PNG")
            sink.write({"__key__": f"{i:04d}", "png": buf.getvalue(), "txt": f"text {i}"})
    torch.manual_seed(0)
    module = ContinualCLIP(clip="zscl-tiny-vit", pretrained=None, lr=1e-3, warmup_steps=1,
                           distill=Distillation(image=1.0, text=1.0))
    dm = datamodule(root, reference_images=ReferenceImages(source="wds", path="shards/ref-000000.tar"),
                    reference_texts=ReferenceTexts(source="wds", path="shards/ref-000000.tar"))
    trainer = fit(module, dm, steps=3)
    assert trainer.global_step == 3 and module.ref_text_emb.shape[0] == 10


def test_unknown_averaging_name_fails_at_construction():
    from zscl.registry import RegistryError

    with pytest.raises(RegistryError, match="unknown averaging callback 'wee'"):
        ContinualCLIP(clip="zscl-tiny-vit", pretrained=None, averaging=[{"name": "wee"}])


def test_training_needs_max_steps(root):
    module = ContinualCLIP(clip="zscl-tiny-vit", pretrained=None)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="trainer.max_steps"):
        trainer.fit(module, datamodule=datamodule(root))
