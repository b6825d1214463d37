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

    argv = ["--config", str(config_registry("benchmark").get(name))]
    cfg = build_parser(argv).parse_args(argv)  # a method-specific variant names its model_class
    if cfg.benchmark.classes is not None:  # class-incremental: the runner generates one task per class step
        from zscl.datasets.views import load_class_order
        from zscl.settings.cil import class_steps

        c = cfg.benchmark.classes
        order = load_class_order(c.order, get_dataset(c.dataset).num_classes)
        assert cfg.benchmark.name == name and len(class_steps(order, c.initial, c.increment)) >= 4
        return
    # a variant file (mtil_order1_moe: the same benchmark with a method's learning rates) keeps the name
    assert (name == cfg.benchmark.name or name.startswith(cfg.benchmark.name + "_")) and len(cfg.benchmark.tasks) >= 5
    for task in cfg.benchmark.tasks:
        get_dataset(task_dataset(task))


# Ablation configs that name MTIL's own data read the tiny world's instead (the same code paths).
TINY_DATA = {
    "ref_classes": ["--data.reference_images.source", "dataset", "--data.reference_images.path", "TinyColors",
                    "--data.reference_images.first_classes", "2", "--data.reference_images.per_class", "3"],
    "texts_so_far": ["--data.reference_texts.datasets", "[TinyColors, TinyStripes]"],
}


@pytest.mark.parametrize("name", METHODS)
def test_every_method_config_runs_a_short_sequence(world, name):
    """Each method config runs the tiny 2-task benchmark end to end through the sequence runner
    (exemplar memories and merges included): a full matrix, finite weights that training moved."""
    import json

    from safetensors.torch import load_file

    from zscl.cli.sequence import build_parser
    from zscl.runner.build import prepare_argv
    from zscl.runner.sequence import SequenceRunner

    out = world / "out" / name
    argv = ["--config", str(world / "tiny" / "benchmark.yaml"), "--config", f"{config_registry('method').get(name)}",
            "--out", str(out), "--steps", "2", "--progress", "none", "--checkpoint_every", "100", *TINY_DATA.get(name, [])]
    argv = prepare_argv(argv)  # the one parse pipeline: the benchmark's method_overrides apply
    parser = build_parser(argv)  # the config's model_class picks the module
    SequenceRunner(parser, parser.parse_args(argv)).run()
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == name
    assert len(res["accuracy"]) == 2 and all(len(row) == 2 for row in res["accuracy"])

    from zscl.methods.classes import model_class

    suffixes = (".safetensors", *model_class(parser.parse_args(argv).get("model_class") or "continual_clip").sidecar_suffixes)

    def exported(stem: str) -> dict:
        """The task's export: CLIP weights, plus the method's sidecars (adapters, a head on a frozen CLIP)."""
        files = {s: out / "checkpoints" / f"{stem}{s}" for s in suffixes}
        return {f"{kind}:{k}": v for kind, f in files.items() if f.exists() for k, v in load_file(f).items()}

    first, second = exported("00-TinyColors"), exported("01-TinyStripes")
    assert any(not torch.equal(first[k], second[k]) for k in first), f"{name}: the second task changed nothing"
    assert all(torch.isfinite(v).all() for v in second.values() if v.is_floating_point())


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


@pytest.mark.parametrize("name", METHODS)
def test_every_method_config_parses_in_zscl_fit(name, capsys, monkeypatch):
    """`zscl fit --config method/<name>` accepts every method config (sequence-only sections included)."""
    from zscl.cli.lightning import fit

    monkeypatch.setattr("sys.argv", ["zscl"])  # fit() rewrites sys.argv for LightningCLI
    with pytest.raises(SystemExit) as exit_:
        fit(["--config", f"method/{name}", "--print_config"])
    assert exit_.value.code == 0, capsys.readouterr().err[-2000:]
    assert "model:" in capsys.readouterr().out
