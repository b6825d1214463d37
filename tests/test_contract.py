"""The method contract, between-task hooks, the settings registry and the one parse pipeline.

Parametrized over the registries (model classes, settings, hooks), so a new entry is checked here
without a new test; and the behaviours that used to hang on folder names and method names:
``method_overrides`` keyed by the method's declared ``name:``, ``--print_config`` of a documented command.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.tiny_world import benchmark_yaml, make_tiny_world
from zscl.methods.base import CLIPMethod
from zscl.methods.classes import MODEL_CLASSES, model_class
from zscl.resources import configs_dir
from zscl.runner.build import parse_run
from zscl.runner.configs import Benchmark
from zscl.runner.hooks import HOOKS, TaskHook
from zscl.settings import SETTINGS, setting_class, setting_for


# -- registries ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_CLASSES.names())
def test_every_registered_method_class_is_on_the_contract(name):
    cls = model_class(name)
    assert issubclass(cls, CLIPMethod)
    assert isinstance(cls.requires_reference({}), bool)
    # what an evaluation-only instance switches off must be arguments of the class
    args = set(inspect.signature(cls.__init__).parameters)
    assert set(cls.evaluation_overrides()) <= args


@pytest.mark.parametrize("name", SETTINGS.names())
def test_every_registered_setting_is_selected_by_its_benchmark_section(name):
    cls = SETTINGS.get(name)
    assert cls.name == name and cls.result_kind in ("matrix", "curve")
    fields = {f.name: f for f in dataclasses.fields(Benchmark)}
    assert setting_class({"setting": name}) is cls
    if cls.config_key:  # its options are a typed section of the benchmark schema, and setting it selects it
        assert cls.config_key in fields
        section = fields[cls.config_key].type
        assert setting_class({cls.config_key: {}}) is cls, section
    else:
        assert setting_class({}) is cls


def test_a_benchmark_with_two_setting_sections_is_refused():
    with pytest.raises(ValueError, match="one setting"):
        setting_for(Benchmark(classes={"dataset": "CIFAR100"}, few_shot={"shots": 5}))


@pytest.mark.parametrize("name", HOOKS.names())
def test_every_registered_hook_is_a_task_hook(name):
    assert issubclass(HOOKS.get(name), TaskHook)


# -- hooks from a config ------------------------------------------------------------------------


CALLS: list[tuple[str, int, bool]] = []


@HOOKS.register("test_recorder", overwrite=True)
class Recorder(TaskHook):
    """Records what the runner asks, and shortens every task (an override for the task)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def task_overrides(self, runner, k):
        CALLS.append(("overrides", k, runner.export_path(k).exists()))
        return {"trainer.max_steps": self.steps}

    def after_task(self, runner, k):
        CALLS.append(("after", k, runner.export_path(k).exists()))


def test_a_hook_picked_by_name_in_a_method_config_runs_around_every_task(tmp_path, one_thread):
    from zscl.runner.build import build_runner

    make_tiny_world(tmp_path, per_class=3)
    bench = benchmark_yaml(tmp_path, steps=4)
    method = tmp_path / "hooked.yaml"
    method.write_text("name: hooked\ncontinual:\n  hooks: [{name: test_recorder, steps: 2}]\n")
    CALLS.clear()
    runner = build_runner(["--config", str(bench), "--config", str(method), "--out", str(tmp_path / "out"),
                           "--progress", "none"])
    res = runner.run()
    assert CALLS == [("overrides", 0, False), ("after", 0, True), ("overrides", 1, False), ("after", 1, True)]
    # the override reached the trainer: 2 steps per task, not the benchmark's 4
    metrics = (tmp_path / "out" / "logs" / "csv" / "00-TinyColors" / "metrics.csv").read_text().splitlines()
    assert max(int(r.split(",")[[c.strip() for c in metrics[0].split(",")].index("step")]) for r in metrics[1:]) == 1
    assert res["method"] == "hooked"


# -- the parse pipeline ---------------------------------------------------------------------------


def _resolved(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "zscl", "sequence", *argv, "--print_config"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return yaml.safe_load(out.stdout)


def test_print_config_shows_the_fewshot_moe_autoencoder_rate_of_the_documented_command(tmp_path):
    """The README's command for few-shot MoE-Adapters: the benchmark's rate (3e-3, the reference's few-shot
    autoencoder rate) beats the method's own 0.01, and a command-line key beats both. Nothing is read:
    the data root does not exist."""
    argv = ["--config", "benchmark/mtil_order1_fewshot5_moe", "--config", "method/moe_adapters",
            "--data.data_root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]
    cfg = _resolved(argv)
    assert cfg["model"]["ddas"]["lr"] == 0.003 and cfg["benchmark"]["few_shot"] == {"shots": 5, "seed": 42}
    assert cfg["model"]["moe"]["num_experts"] == 22 and cfg["name"] == "moe_adapters"
    assert _resolved(argv + ["--model.ddas.lr", "0.5"])["model"]["ddas"]["lr"] == 0.5
    assert not (tmp_path / "out").exists()


def test_method_overrides_follow_the_declared_name_not_the_folder(tmp_path):
    """A user's copy of method/zscl.yaml, anywhere, keeps the CIL benchmark's settings for zscl (KD 5, WE every
    10 iterations, no WC); renamed, it gets none."""
    mine = tmp_path / "my_zscl.yaml"
    shutil.copy(configs_dir() / "method" / "zscl.yaml", mine)
    _, cfg = parse_run(["--config", "benchmark/synthetic_cil", "--config", str(mine)])
    assert cfg.model.distill.image == 5.0 and cfg.model.weight_constraint == 0.0
    assert cfg.model.averaging == [{"name": "we", "every": 10}]
    renamed = tmp_path / "other.yaml"
    renamed.write_text(mine.read_text().replace("name: zscl", "name: other"))
    _, cfg = parse_run(["--config", "benchmark/synthetic_cil", "--config", str(renamed)])
    assert cfg.model.distill.image == 1.0 and cfg.model.weight_constraint == 1.0


def test_every_method_config_declares_its_name():
    for path in sorted((configs_dir() / "method").glob("*.yaml")):
        assert yaml.safe_load(path.read_text())["name"] == path.stem, path


def test_create_method_builds_the_configs_class_with_overrides():
    from zscl.methods import ContinualCLIP
    from zscl.moe.module import MoEAdapterCLIP
    from zscl.runner.build import create_method

    zscl = create_method("zscl", clip="zscl-tiny-vit", pretrained=None)
    assert type(zscl) is ContinualCLIP and zscl.distill.image == 1.0 and zscl.hparams.weight_constraint == 1.0
    moe = create_method("method/moe_adapters", clip="zscl-tiny-vit", pretrained=None, moe={"num_experts": 3})
    assert type(moe) is MoEAdapterCLIP and moe.moe_cfg.num_experts == 3 and moe.moe_cfg.top_k == 2
    assert json.loads(json.dumps(moe.hparams["moe"]))["num_experts"] == 3


def test_a_model_class_that_cannot_be_used_is_refused_in_one_line(tmp_path):
    """A user's model_class that is not importable, or not a method, is named with what was expected."""
    from zscl.methods.classes import model_class

    with pytest.raises(ValueError, match=r"cannot import nopkg\.mod\.Cls .*No module named 'nopkg'.*PYTHONPATH"):
        model_class("nopkg.mod.Cls")
    with pytest.raises(ValueError, match=r"zscl\.runner\.build\.parse_run is not a zscl\.methods\.CLIPMethod subclass"):
        model_class("zscl.runner.build.parse_run")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nmodel_class: nopkg.mod.Cls\n")
    out = subprocess.run([sys.executable, "-m", "zscl", "sequence", "--config", "benchmark/synthetic", "--config",
                          str(bad), "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "zscl sequence: model_class 'nopkg.mod.Cls': cannot import" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "out").exists()
