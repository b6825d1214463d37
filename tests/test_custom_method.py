"""A method from the user's own package: the CoOp example of ``examples/custom_method`` copied out of the
repository, on PYTHONPATH, through ``zscl sequence``, ``zscl eval``, ``zscl compare``, ``zscl fit`` and
``zscl bench step``, with no edit to zscl.

Checked against things the method did not compute: the plain zero-shot path of ``zscl eval`` (CLIP weights
without the method's sidecar), the runner's own rows, and the exported tensors read back with safetensors.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tests.tiny_world import benchmark_yaml, make_tiny_world, task_yaml

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "custom_method"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("custom")
    make_tiny_world(root, per_class=5)
    benchmark_yaml(root, steps=6)
    pkg = root / "elsewhere"
    shutil.copytree(EXAMPLE, pkg)
    env = {**os.environ, "PYTHONPATH": str(pkg), "OMP_NUM_THREADS": "1"}
    return {"root": root, "pkg": pkg, "env": env, "config": str(pkg / "coop.yaml")}


def zscl(outside: dict, *args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "zscl", *args], cwd=outside["root"], env=outside["env"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def run(outside) -> Path:
    out = outside["root"] / "runs" / "coop"
    zscl(outside, "sequence", "--config", str(outside["root"] / "tiny" / "benchmark.yaml"), "--config",
         outside["config"], "--model.ctx_lr", "0.05", "--out", str(out), "--progress", "none")
    return out


def test_the_example_is_not_importable_from_zscl_itself():
    with pytest.raises(ImportError):
        __import__("coop_clip")


def test_a_sequence_of_the_users_method_runs_and_keeps_zero_shot_on_untrained_datasets(run):
    res = json.loads((run / "results.json").read_text())
    assert res["method"] == "coop" and len(res["accuracy"]) == 2
    # after task 1, TinyStripes (not yet trained) is evaluated with CLIP's templates: zero-shot exactly
    assert res["accuracy"][0][1] == res["zero_shot"][1]
    assert res["config"]["model_class"] == "coop_clip.method.CoOpCLIP"


def test_the_clip_is_frozen_and_the_contexts_are_exported_beside_it(run):
    first, second = (load_file(run / "checkpoints" / f) for f in ("00-TinyColors.safetensors", "01-TinyStripes.safetensors"))
    assert first.keys() == second.keys() and all((first[k] == second[k]).all() for k in first)
    contexts = load_file(run / "checkpoints" / "01-TinyStripes.coop.safetensors")
    assert sorted(contexts) == ["context.0", "context.1"] and contexts["context.0"].shape[0] == 4
    assert not (contexts["context.0"] == contexts["context.1"]).all()


def test_zscl_eval_rebuilds_the_method_from_its_export(run, outside, tmp_path):
    res = json.loads((run / "results.json").read_text())
    export = run / "checkpoints" / "01-TinyStripes.safetensors"
    got = json.loads(zscl(outside, "eval", "--model", "zscl-tiny-vit", "--pretrained", str(export), "--datasets",
                          "TinyColors,TinyStripes", "--data-root", str(outside["root"]), "--custom-datasets",
                          str(outside["root"] / "tiny" / "datasets.yaml"), "--json", str(tmp_path / "m.json"),
                          "--progress", "false").stdout and (tmp_path / "m.json").read_text())
    assert got["method"] == "coop_clip.method.CoOpCLIP"
    assert [got["results"][n]["top1"] for n in ("TinyColors", "TinyStripes")] == res["accuracy"][1]
    # the same CLIP weights without the method (no sidecar, no metadata): plain zero-shot, another code path
    plain = tmp_path / "plain.safetensors"
    save_file(load_file(export), str(plain))
    zs = json.loads(zscl(outside, "eval", "--model", "zscl-tiny-vit", "--pretrained", str(plain), "--datasets",
                         "TinyColors,TinyStripes", "--data-root", str(outside["root"]), "--custom-datasets",
                         str(outside["root"] / "tiny" / "datasets.yaml"), "--json", str(tmp_path / "z.json"),
                         "--progress", "false").stdout and (tmp_path / "z.json").read_text())
    assert "method" not in zs
    assert [zs["results"][n]["top1"] for n in ("TinyColors", "TinyStripes")] == res["zero_shot"]


def test_zscl_compare_reads_the_users_run(run, outside):
    out = zscl(outside, "compare", str(run)).stdout
    assert "coop" in out


def test_zscl_fit_and_bench_step_take_the_users_method(outside, tmp_path):
    task = task_yaml(outside["root"], tmp_path / "task.yaml", "TinyColors", 2, tmp_path / "fit")
    out = zscl(outside, "fit", "--config", outside["config"], "--config", str(task))
    assert (tmp_path / "fit" / "TinyColors.coop.safetensors").is_file(), out.stdout[-2000:]
    bench = json.loads(zscl(outside, "bench", "step", "--method", outside["config"], "--steps", "2", "--warmup", "0",
                            "--batch", "4", "--classes", "3", "--device", "cpu", "--json", str(tmp_path / "b.json")).stdout
                       and (tmp_path / "b.json").read_text())
    assert bench["ms_per_step_median"] > 0 and bench["tflops_per_step"] is None
