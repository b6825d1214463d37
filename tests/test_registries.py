"""Every registry entry is exercised: method, task and benchmark configs, and averaging callbacks.

A new YAML under configs/ or a new averaging callback is picked up here automatically.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from tests.tiny_world import benchmark_yaml, make_tiny_world
from zscl.runner.configs import config_registry, task_dataset

METHODS = config_registry("method").names()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("registries")
    make_tiny_world(root, per_class=4)
    benchmark_yaml(root)
    return root


@pytest.mark.parametrize("name", config_registry("task").names())
def test_task_configs_name_a_registered_dataset_and_the_reference_lr(name):
    from zscl.datasets import get_dataset

    dataset = task_dataset(name)
    get_dataset(dataset)
    import yaml

    cfg = yaml.safe_load(config_registry("task").get(name).read_text())
    assert cfg["model"]["lr"] == (5e-5 if dataset in ("Aircraft", "MNIST") else 1e-5)
    assert cfg["trainer"]["max_steps"] == 1000


@pytest.mark.parametrize("name", config_registry("benchmark").names())
def test_benchmark_configs_parse_and_their_tasks_are_registered(name):
    from zscl.cli.sequence import build_parser
    from zscl.datasets import get_dataset

    cfg = build_parser().parse_args(["--config", str(config_registry("benchmark").get(name))])
    assert cfg.benchmark.name == name and len(cfg.benchmark.tasks) >= 5
    for task in cfg.benchmark.tasks:
        get_dataset(task_dataset(task))


@pytest.mark.parametrize("name", METHODS)
def test_every_method_config_builds_and_trains(world, name):
    """Parse the method config with the sequence parser, build its module and data, train 2 steps."""
    from zscl.cli.sequence import build_parser
    from zscl.merging import MERGE_RULES

    argv = ["--config", str(world / "tiny" / "benchmark.yaml"), "--config", f"{config_registry('method').get(name)}",
            "--out", str(world / "out" / name)]
    parser = build_parser(argv)  # the config's model_class picks the module
    cfg = parser.parse_args(argv)
    if cfg.continual.merge is not None:
        MERGE_RULES.get(cfg.continual.merge)
    from zscl.datasets import load_custom_datasets

    load_custom_datasets(cfg.data.custom_datasets, data_root=cfg.data.data_root)
    cfg["data.dataset"] = "TinyColors"
    init = parser.instantiate_classes(cfg)
    # the whole module: methods that train adapters on a frozen CLIP (moe_adapters) change their own state
    before = {k: v.clone() for k, v in init.model.state_dict().items()}
    trainer = L.Trainer(accelerator="cpu", max_steps=2, max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(init.model, datamodule=init.data)
    after = init.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), f"{name}: training changed nothing"
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())


def test_every_averaging_callback_keeps_buffers_and_finite_text_features(world):
    """Each registered averaging callback, run inside the real module, leaves the text tower usable."""
    from zscl.merging import AVERAGING_CALLBACKS
    from zscl.methods import ContinualCLIP, ContinualDataModule
    from zscl.reference import ReferenceImages, ReferenceTexts
    from zscl.datasets import load_custom_datasets

    load_custom_datasets(str(world / "tiny" / "datasets.yaml"), data_root=str(world))
    required = {"checkpoint_avg": {"every": 1}}
    for name in AVERAGING_CALLBACKS.names():
        torch.manual_seed(0)
        module = ContinualCLIP(clip="zscl-tiny-vit", pretrained=None, lr=1e-3, warmup_steps=1,
                               averaging=[{"name": name, **required.get(name, {})}])
        mask = module.clip.attn_mask.clone()
        dm = ContinualDataModule(dataset="TinyColors", data_root=str(world), batch_size=4, num_workers=0,
                                 cache_dir=str(world / "cache"),
                                 reference_images=ReferenceImages(source="folder", path="tiny/reference/images"),
                                 reference_texts=ReferenceTexts(source="captions", path="tiny/reference/captions.tsv"))
        L.Trainer(accelerator="cpu", max_steps=3, max_epochs=-1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False).fit(module, datamodule=dm)
        assert torch.equal(module.clip.attn_mask, mask), f"{name} touched the attention mask"
        with torch.no_grad():
            feats = module.clip.encode_text(module.bundle.tokenizer(["a photo of red.", "an image of blue."]))
        assert torch.isfinite(feats).all(), f"{name} made the text features non-finite"
