"""End-to-end runs of `zscl sequence` / `zscl fit` on a tiny real-format world (CPU).

One uninterrupted ZSCL run is shared by the tests that compare against it: the resumed run after
SIGKILL and the 2-process DDP run must reproduce it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests import snapshots
from tests.tiny_world import task_yaml, world_with_start

STEPS = 8
WE_EVERY = 4  # WE members: task start, after iterations 0 and 4, and the final weights (8 % 4 == 0)
TEST_SIZES = {"TinyColors": 9, "TinyStripes": 6}  # test images per dataset in the tiny world
LR0 = 1.0e-3 / 2  # the tiny benchmark's lr at iteration 0 (linear warm-up over warmup_steps = 2)
ADAM_EPS = 1e-8  # torch.optim.AdamW's default eps
REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def zscl_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "zscl", *args]


def run_zscl(*args: str, check: bool = True, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)  # tests.snapshots
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **(env or {})}
    proc = subprocess.run(zscl_cmd(*args), capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"zscl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def sequence_args(root: Path, out: Path, method: str = "method/zscl", *extra: str) -> list[str]:
    zscl = ["--model.averaging", json.dumps([{"name": "we", "every": WE_EVERY}]),
            "--model.init_from", str(root / "tiny" / "start.safetensors")] if method == "method/zscl" else []
    return ["sequence", "--config", str(root / "tiny" / "benchmark.yaml"), "--config", method, "--out", str(out),
            "--checkpoint_every", "2", "--progress", "none", *zscl, *extra]


def snapshot_args(folder: Path) -> list[str]:
    """Attach tests.snapshots.SaveWeights: the student's weights at task start, after every step, at the end."""
    spec = [{"class_path": "tests.snapshots.SaveWeights", "init_args": {"folder": str(folder)}}]
    return ["--trainer.callbacks", json.dumps(spec)]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return world_with_start(tmp_path_factory.mktemp("world"), STEPS)


@pytest.fixture(scope="module")
def reference_run(world) -> Path:
    out = world / "runs" / "zscl"
    run_zscl(*sequence_args(world, out, "method/zscl", *snapshot_args(out / "snapshots")))
    return out


def correct_counts(res: dict, key: str = "accuracy") -> list[list[int]]:
    """Correct top-1 predictions per row and dataset, from the percentages and the test sizes."""
    rows = res[key] if key == "accuracy" else [res[key]]
    counts = [[top1 * TEST_SIZES[name] / 100 for name, top1 in zip(res["datasets"], row)] for row in rows]
    assert all(abs(c - round(c)) < 1e-9 for row in counts for c in row), counts
    return [[round(c) for c in row] for row in counts]


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


def test_exports_are_the_weight_ensemble_of_snapshots_taken_during_the_run(reference_run):
    """Each export = mean(θ_start, θ after iterations 0 and 4, θ_final) of the student's weights, averaged
    here by hand from snapshots the run wrote; task 2 starts from task 1's export; open_clip loads them."""
    import open_clip

    from zscl.models import list_models

    list_models()  # registers the tiny configs with open_clip
    previous = None
    for name in ("00-TinyColors", "01-TinyStripes"):
        path = reference_run / "checkpoints" / f"{name}.safetensors"
        export = load_file(str(path))
        snap = snapshots.load(reference_run / "snapshots", name[3:])
        assert sorted(snap["steps"]) == list(range(1, STEPS + 1))
        members = [snap["start"], snap["steps"][1], snap["steps"][1 + WE_EVERY], snap["steps"][STEPS]]
        for key, start in snap["start"].items():
            expected = sum(m[key] for m in members) / len(members)
            torch.testing.assert_close(export[key], expected, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name} {key}: {m}")
            if previous is not None:
                assert torch.equal(start, previous[key]), f"task 2 must start from task 1's export ({key})"
        assert not torch.equal(export["visual.proj"], snap["steps"][STEPS]["visual.proj"]), "averaging changed nothing"
        model = open_clip.create_model("zscl-tiny-vit", pretrained=str(path))
        assert torch.equal(model.state_dict()["visual.conv1.weight"], export["visual.conv1.weight"])
        previous = export


def test_finetune_sequence_end_to_end(world, reference_run):
    out = world / "runs" / "finetune"
    run_zscl(*sequence_args(world, out, "method/finetune"))
    res = read_results(out)
    assert len(res["accuracy"]) == 2 and res["config"]["model"]["distill"] is None
    ft = load_file(str(out / "checkpoints" / "01-TinyStripes.safetensors"))
    zs = load_file(str(reference_run / "checkpoints" / "01-TinyStripes.safetensors"))
    assert not torch.equal(ft["visual.proj"], zs["visual.proj"]), "the methods must differ"


def kill_then_resume(args: list[str], out: Path, task: int = 1, step: int = 5) -> None:
    """Run until SIGKILL right after step ``step`` of task ``task`` (mid-task: checkpoints every 2 steps),
    check what the crash left, then rerun the same command to completion."""
    killed = run_zscl(*args, check=False, env={"ZSCL_KILL_AT": f"{task}:{step}"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    slug = "01-TinyStripes"
    ckpt = torch.load(out / "tasks" / slug / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == step - step % 2, "the last checkpoint is the one before the kill"
    assert not (out / "checkpoints" / f"{slug}.safetensors").exists()
    assert len(read_results(out)["accuracy"]) == task
    rerun = run_zscl(*args)
    assert f"resuming from {out / 'tasks' / slug / 'last.ckpt'}" in rerun.stdout


def assert_same_run(a: Path, b: Path) -> None:
    assert read_results(a)["accuracy"] == read_results(b)["accuracy"]
    for name in ("00-TinyColors", "01-TinyStripes"):
        x = load_file(str(a / "checkpoints" / f"{name}.safetensors"))
        y = load_file(str(b / "checkpoints" / f"{name}.safetensors"))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in y), f"{name}: weights must be bit-identical"
        # Equal weights must give equal files (hashes): safetensors' metadata order is per process.
        same = (a / "checkpoints" / f"{name}.safetensors").read_bytes() == (b / "checkpoints" / f"{name}.safetensors").read_bytes()
        assert same, f"{name}: the exports hold equal tensors but differ in bytes"


def test_sigkill_mid_task_then_rerun_reproduces_the_uninterrupted_run(world, reference_run):
    out = world / "runs" / "killed"
    kill_then_resume(sequence_args(world, out), out)
    assert_same_run(out, reference_run)


def test_sigkill_resume_with_webdataset_reference_images_is_bit_identical(world):
    """Reference images streamed from webdataset shards resume at the step too (zscl.reference.wds)."""
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    shards = world / "tiny" / "shards"
    shards.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for s in range(2):
        with wds.TarWriter(str(shards / f"ref-{s:06d}.tar")) as sink:
            for i in range(7):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
                sink.write({"__key__": f"{s}_{i}", "png": buf.getvalue(), "txt": f"shard {s} picture {i}"})
    ref = ["--data.reference_images", json.dumps({"source": "wds", "path": "tiny/shards/ref-{000000..000001}.tar"})]
    uninterrupted, resumed = world / "runs" / "wds", world / "runs" / "wds-killed"
    run_zscl(*sequence_args(world, uninterrupted, "method/zscl", *ref))
    kill_then_resume(sequence_args(world, resumed, "method/zscl", *ref), resumed)
    assert_same_run(resumed, uninterrupted)


def test_two_process_ddp_matches_one_process(world, reference_run):
    out = world / "runs" / "ddp"
    # two ranks x batch 2 read exactly the samples one process reads with batch 4
    run_zscl(*sequence_args(world, out, "method/zscl", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                            "--data.batch_size", "2", *snapshot_args(out / "snapshots")))
    single, ddp = read_results(reference_run), read_results(out)
    assert correct_counts(ddp, "zero_shot") == correct_counts(single, "zero_shot")
    assert correct_counts(ddp) == correct_counts(single)
    # Task 1 starts from the same initial weights in both runs, so its first iteration is the same maths.
    one = snapshots.load(reference_run / "snapshots", "TinyColors")
    ranks = [snapshots.load(out / "snapshots", "TinyColors", r) for r in (0, 1)]
    assert all(torch.equal(r["start"][k], v) for r in ranks for k, v in one["start"].items())
    for key, grad in one["grads0"].items():
        # The all-reduced gradient of iteration 0 equals the single-process one (summation order aside).
        tol = 1e-5 * grad.abs().max().item() + 1e-12
        for rank in ranks:
            torch.testing.assert_close(rank["grads0"][key], grad, rtol=1e-5, atol=tol, msg=lambda m: f"{key}: {m}")
        # One AdamW step moves a weight by lr0 * g / (|g| + eps), so a gradient known to within tol changes
        # that step by at most lr0 * eps * tol / (|g| - tol)^2; checked wherever the gradient is known to
        # 1 % (entries whose exact gradient is zero, e.g. attention key biases, hold rounding noise that
        # Adam turns into steps of up to lr0 with a random sign, so later steps and task 2 differ there).
        known = grad.abs() > 100 * tol
        bound = LR0 * ADAM_EPS * tol / (grad.abs() - tol).clamp_min(1e-30) ** 2
        start, after = one["start"][key], one["steps"][1][key]
        rounding = 2.5e-7 * (start.abs() + after.abs()) + 1e-6 * (after - start).abs()  # a few float32 ulps
        excess = ((ranks[0]["steps"][1][key] - after).abs() - bound - rounding)[known]
        assert (excess <= 0).all(), f"{key}: weights after one step differ by up to {excess.max():.3g} beyond the bound"
    # Every rank ends every task with the same averaged weights, which are the export.
    for slug in ("00-TinyColors", "01-TinyStripes"):
        export = load_file(str(out / "checkpoints" / f"{slug}.safetensors"))
        ranks = [snapshots.load(out / "snapshots", slug[3:], r) for r in (0, 1)]
        for key, final in ranks[0]["final"].items():
            assert torch.equal(final, ranks[1]["final"][key]), f"{slug}: ranks differ in {key}"
            assert torch.equal(final, export[key]), f"{slug}: the export is not rank 0's final weights ({key})"


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


@pytest.mark.parametrize("method", ["lwf", "icarl"])
def test_sigkill_resume_of_the_papers_baselines_is_bit_identical(world, method):
    """LwF (task-start teacher, its own reference stream over the task split) and iCaRL (an exemplar
    memory written between tasks) resume mid-task to the uninterrupted run's matrix, weights and memory."""
    extra = ("--continual.memory.size", "5") if method == "icarl" else ()
    ref, out = world / "runs" / f"{method}-ref", world / "runs" / f"{method}-killed"
    run_zscl(*sequence_args(world, ref, f"method/{method}", *extra))
    kill_then_resume(sequence_args(world, out, f"method/{method}", *extra), out, step=3)
    assert_same_run(out, ref)
    for memory in sorted((ref / "memory").glob("*.json")):
        assert (out / "memory" / memory.name).read_bytes() == memory.read_bytes()
    assert (method == "icarl") == bool(list((ref / "memory").glob("*.json")))
