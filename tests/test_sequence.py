"""End-to-end runs of `zscl sequence` / `zscl fit` on a tiny real-format world (CPU).

One uninterrupted ZSCL run is shared by the tests that compare against it: the resumed run after
SIGKILL and the 2-process DDP run must reproduce it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny_world import benchmark_yaml, make_tiny_world, task_yaml

STEPS = 8
pytestmark = pytest.mark.slow


def zscl_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "zscl", *args]


def run_zscl(*args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(zscl_cmd(*args), capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"zscl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def sequence_args(root: Path, out: Path, method: str = "method/zscl", *extra: str) -> list[str]:
    return ["sequence", "--config", str(root / "tiny" / "benchmark.yaml"), "--config", method, "--out", str(out),
            "--checkpoint_every", "2", "--progress", "none", *extra]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    make_tiny_world(root)
    benchmark_yaml(root, steps=STEPS)
    return root


@pytest.fixture(scope="module")
def reference_run(world) -> Path:
    out = world / "runs" / "zscl"
    run_zscl(*sequence_args(world, out))
    return out


def read_results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_zscl_sequence_writes_matrix_metrics_exports_and_logs(reference_run):
    res = read_results(reference_run)
    assert res["datasets"] == ["TinyColors", "TinyStripes"] == res["tasks"]
    assert len(res["accuracy"]) == 2 and all(len(r) == 2 for r in res["accuracy"])
    assert len(res["zero_shot"]) == 2
    for key in ("transfer", "avg", "last", "bwt", "forgetting", "per_dataset"):
        assert key in res["metrics"]
    assert res["metrics"]["last"] == pytest.approx(sum(res["accuracy"][-1]) / 2)
    assert res["config"]["model"]["distill"]["image"] == 1.0 and res["versions"]["torch"] == torch.__version__
    assert (reference_run / "logs" / "csv" / "01-TinyStripes" / "metrics.csv").read_text().count("train/ce") == 1
    assert list((reference_run / "logs" / "tb" / "00-TinyColors").glob("events.out.tfevents.*"))
    assert not list((reference_run / "tasks").rglob("*.ckpt")), "finished tasks drop their Lightning checkpoints"
    # `zscl metrics` reads results.json directly
    proc = run_zscl("metrics", str(reference_run / "results.json"), "--json")
    assert json.loads(proc.stdout)["last"] == pytest.approx(res["metrics"]["last"])


def test_exports_load_in_open_clip_and_are_averaged_weights(reference_run):
    import open_clip

    from zscl.models import list_models

    list_models()  # registers the tiny configs with open_clip
    for name in ("00-TinyColors", "01-TinyStripes"):
        path = reference_run / "checkpoints" / f"{name}.safetensors"
        model = open_clip.create_model("zscl-tiny-vit", pretrained=str(path))
        sd = load_file(str(path))
        assert torch.equal(model.state_dict()["visual.conv1.weight"], sd["visual.conv1.weight"])
        tokens = open_clip.get_tokenizer("zscl-tiny-vit")(["a photo of red."])
        assert torch.isfinite(model.encode_text(tokens)).all()


def test_finetune_sequence_end_to_end(world, reference_run):
    out = world / "runs" / "finetune"
    run_zscl(*sequence_args(world, out, "method/finetune"))
    res = read_results(out)
    assert len(res["accuracy"]) == 2 and res["config"]["model"]["distill"] is None
    ft = load_file(str(out / "checkpoints" / "01-TinyStripes.safetensors"))
    zs = load_file(str(reference_run / "checkpoints" / "01-TinyStripes.safetensors"))
    assert not torch.equal(ft["visual.proj"], zs["visual.proj"]), "the methods must differ"


def test_sigkill_mid_task_then_rerun_reproduces_the_uninterrupted_run(world, reference_run):
    out = world / "runs" / "killed"
    args = sequence_args(world, out)
    marker = out / "tasks" / "01-TinyStripes" / "last.ckpt"
    proc = subprocess.Popen(zscl_cmd(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert marker.exists(), "the second task never wrote a checkpoint"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoints" / "01-TinyStripes.safetensors").exists(), "killed too late: task 2 had finished"
    assert len(read_results(out)["accuracy"]) == 1
    rerun = run_zscl(*args)
    assert "resuming from" in rerun.stdout
    assert read_results(out)["accuracy"] == read_results(reference_run)["accuracy"]
    a = load_file(str(out / "checkpoints" / "01-TinyStripes.safetensors"))
    b = load_file(str(reference_run / "checkpoints" / "01-TinyStripes.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b), "resumed weights must be bit-identical"


def test_two_process_ddp_matches_one_process(world, reference_run):
    out = world / "runs" / "ddp"
    # two ranks x batch 2 read exactly the samples one process reads with batch 4
    run_zscl(*sequence_args(world, out, "method/zscl", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                            "--data.batch_size", "2"))
    single, ddp = read_results(reference_run), read_results(out)
    assert ddp["zero_shot"] == single["zero_shot"]
    flat = lambda rows: [v for row in rows for v in row]  # noqa: E731
    assert flat(ddp["accuracy"]) == pytest.approx(flat(single["accuracy"]), abs=1e-6)
    # Adam turns float-rounding noise on parameters whose gradient is mathematically zero (attention key
    # biases) into lr-sized steps, so weights agree in aggregate, not elementwise; the gradient maths of
    # DDP itself is checked exactly in test_distributed.py.
    a = load_file(str(out / "checkpoints" / "01-TinyStripes.safetensors"))
    b = load_file(str(reference_run / "checkpoints" / "01-TinyStripes.safetensors"))
    start = load_file(str(reference_run / "checkpoints" / "00-TinyColors.safetensors"))
    diff = sum(((a[k] - b[k]) ** 2).sum() for k in b) ** 0.5
    update = sum(((b[k] - start[k]) ** 2).sum() for k in b) ** 0.5
    assert diff / update < 0.1, f"DDP and one process moved apart: |a-b|/|b-start| = {diff / update:.3f}"


def test_unknown_task_fails_before_any_work(world):
    bad = world / "tiny" / "bad_task.yaml"
    bad.write_text("benchmark:\n  tasks: [{dataset: TinyColours}]\n")
    proc = run_zscl(*sequence_args(world, world / "runs" / "bad1"), "--config", str(bad), check=False)
    assert proc.returncode == 2
    assert "unknown dataset 'TinyColours'" in proc.stderr and "Did you mean TinyColors" in proc.stderr
    assert not (world / "runs" / "bad1" / "results.json").exists()


def test_missing_reference_data_fails_before_any_work(world):
    proc = run_zscl(*sequence_args(world, world / "runs" / "bad2"), "--data.reference_texts.path", "nowhere.tsv", check=False)
    assert proc.returncode == 2
    assert "ZSCL needs reference data" in proc.stderr and "nowhere.tsv" in proc.stderr
    assert not (world / "runs" / "bad2" / "results.json").exists()


def test_every_missing_dataset_split_and_the_reference_data_are_listed_in_one_message(world, tmp_path):
    import shutil

    partial = tmp_path / "partial"  # TinyColors without its test split, no TinyStripes, images but no captions
    shutil.copytree(world / "tiny" / "TinyColors" / "train", partial / "tiny" / "TinyColors" / "train")
    shutil.copytree(world / "tiny" / "reference" / "images", partial / "tiny" / "reference" / "images")
    datasets = tmp_path / "datasets.yaml"  # class names listed: registering a dataset then reads no folder
    datasets.write_text("- {name: TinyColors, kind: imagefolder, path: tiny/TinyColors, classnames: [blue, green, red]}\n"
                        "- {name: TinyStripes, kind: imagefolder, path: tiny/TinyStripes, "
                        "classnames: [horizontal, vertical]}\n")
    out = tmp_path / "run"
    proc = run_zscl(*sequence_args(world, out), "--data.data_root", str(partial), "--data.custom_datasets",
                    str(datasets), "--data.cache_dir", str(tmp_path / "cache"), check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zscl sequence: 3 input(s) of this sequence are missing"), lines
    parts = lines[0].split(" | ")
    assert "TinyColors (test): " in parts[0] and str(partial / "tiny" / "TinyColors" / "test") in parts[0]
    assert parts[1].startswith("TinyStripes (train, test): ") and str(partial / "tiny" / "TinyStripes") in parts[1]
    assert parts[2].startswith("ZSCL needs reference data") and "captions.tsv" in parts[2]
    assert not out.exists() and not (tmp_path / "cache").exists(), "nothing is written before the check"


def test_checkpoint_of_another_architecture_is_rejected(world, tmp_path):
    from zscl.models import load_clip, save_state_dict

    other = tmp_path / "rn.safetensors"
    save_state_dict(load_clip("zscl-tiny-rn").model.state_dict(), other)
    proc = run_zscl(*sequence_args(world, world / "runs" / "bad3"), "--model.init_from", str(other), check=False)
    assert proc.returncode == 2
    assert "does not fit" in proc.stderr and "zscl-tiny-vit" in proc.stderr


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(world):
    out = world / "runs" / "nan"
    exploding = world / "tiny" / "exploding.yaml"  # a task's own lr overrides model.lr
    exploding.write_text("benchmark:\n  tasks: [{dataset: TinyColors, lr: 1.0e30, steps: 6}]\n  eval_datasets: [TinyColors]\n")
    proc = run_zscl(*sequence_args(world, out, "method/finetune", "--config", str(exploding),
                                   "--model.nan_check_every", "1", "--checkpoint_every", "1"), check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "NaN/inf" in proc.stderr and "last good checkpoint" in proc.stderr
    ckpt = torch.load(out / "tasks" / "00-TinyColors" / "last.ckpt", map_location="cpu", weights_only=False)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert not (out / "checkpoints" / "00-TinyColors.safetensors").exists()


def test_fit_cli_single_task_exports_and_evaluates(world, reference_run, tmp_path):
    task = task_yaml(world, tmp_path / "task.yaml", "TinyStripes", steps=3, default_root_dir=tmp_path / "fit")
    init = reference_run / "checkpoints" / "00-TinyColors.safetensors"
    proc = run_zscl("fit", "--config", "configs/method/zscl.yaml", "--config", str(task), "--model.init_from", str(init))
    assert "exported the final weights" in proc.stdout and "zero-shot TinyStripes: top-1" in proc.stdout
    assert (tmp_path / "fit" / "TinyStripes.safetensors").exists()
    printed = run_zscl("fit", "--config", "method/zscl", "--config", str(task), "--print_config").stdout
    assert "weight_constraint: 1.0" in printed and "dataset: TinyStripes" in printed


@pytest.mark.parametrize("method,init", [("magmax", "sequential"), ("task_arithmetic", "independent")])
def test_merge_based_methods_evaluate_the_merge_of_trained_weights(world, method, init):
    import yaml

    from zscl.merging import merge

    out = world / "runs" / method
    run_zscl(*sequence_args(world, out, f"method/{method}"))
    res = read_results(out)
    assert len(res["accuracy"]) == 2 and res["config"]["continual"]["merge"] == method
    trained = [load_file(str(out / "trained" / f"{s}.safetensors")) for s in ("00-TinyColors", "01-TinyStripes")]
    initial = load_file(str(out / "trained" / "initial.safetensors"))
    hparams = res["config"]["continual"]["hparams"]
    expected = merge(method, initial, trained, **hparams)
    got = load_file(str(out / "checkpoints" / "01-TinyStripes.safetensors"))
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    logged = (out / "logs" / "csv" / "01-TinyStripes" / "hparams.yaml").read_text()
    start = yaml.safe_load(next(line for line in logged.splitlines() if line.startswith("init_from:")))["init_from"]
    assert (start is None) if init == "independent" else start.endswith("trained/00-TinyColors.safetensors")
