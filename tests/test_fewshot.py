"""Few-shot MTIL subsets, and the synthetic CIL / few-shot runs end to end (complete; resume after SIGKILL)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zscl.datasets.views import few_shot_indices

# --- the subset -----------------------------------------------------------------------------


def test_few_shot_takes_exactly_k_per_class_or_all_of_a_smaller_class():
    labels = [0] * 9 + [1] * 3 + [2] * 5 + [0, 1, 2] * 2  # class 1 has 5 images < k = 6
    chosen = few_shot_indices(labels, 6, seed=42)
    counts = Counter(labels[i] for i in chosen)
    assert counts == {0: 6, 1: 5, 2: 6}
    assert chosen == sorted(set(chosen))
    ones = [i for i, y in enumerate(labels) if y == 1]
    assert set(ones) <= set(chosen)  # a class with fewer than k images gives all of them
    assert few_shot_indices(labels, 6, seed=43) != chosen  # the seed matters


def test_few_shot_draw_is_identical_in_another_process():
    labels = [i % 7 for i in range(300)]
    here = few_shot_indices(labels, 5, seed=42)
    code = ("import json; from zscl.datasets.views import few_shot_indices; "
            "print(json.dumps(few_shot_indices([i % 7 for i in range(300)], 5, seed=42)))")
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert json.loads(out.stdout) == here


# --- a small synthetic world ----------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The synthetic tasks with 8 train / 4 test images per class and a 32-image reference pool."""
    from zscl.synthetic import world as W

    root = tmp_path_factory.mktemp("world")
    out = root / W.WORLD_DIR
    for task in W.TASKS.values():
        for split, n in (("train", 8), ("test", 4)):
            W._write_task(out, task, split, n, seed=0)
    images = out / "reference" / "images"
    images.mkdir(parents=True)
    rows = ["filepath\ttitle"]
    for i, (array, caption) in enumerate(W.reference_samples(0, 32)):
        (images / f"{i}.png").write_bytes(W.png_bytes(array))
        rows.append(f"images/{i}.png\t{caption}")
    (out / "reference" / "captions.tsv").write_text("\n".join(rows) + "\n")
    return root


def _argv(world: Path, bench: str, method: str, out: Path, steps: int, *extra: str) -> list[str]:
    return ["--config", f"benchmark/{bench}", "--config", f"method/{method}", "--data.data_root", str(world),
            "--out", str(out), "--progress", "none", "--checkpoint_every", "2", "--steps", str(steps),
            "--data.batch_size", "8", "--data.cache_dir", str(world / "cache"), *extra]


def _run_here(argv: list[str]) -> dict:
    from zscl.runner.build import build_runner

    torch.set_num_threads(1)
    return build_runner(argv).run()


def _killed_then_resumed(argv: list[str], kill_at: str) -> dict:
    env = {**os.environ, "ZSCL_KILL_AT": kill_at, "OMP_NUM_THREADS": "1"}  # T:K, the runner's kill hook
    proc = subprocess.run([sys.executable, "-m", "zscl", "sequence", *argv], env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    return _run_here(argv)


def _same_run(a: Path, b: Path, keys: tuple[str, ...]) -> None:
    ra, rb = (json.loads((p / "results.json").read_text()) for p in (a, b))
    for key in keys:
        assert ra[key] == rb[key], key
    exports = sorted(p.name for p in (a / "checkpoints").glob("*.safetensors"))
    assert exports == sorted(p.name for p in (b / "checkpoints").glob("*.safetensors")) and exports
    last_a, last_b = load_file(a / "checkpoints" / exports[-1]), load_file(b / "checkpoints" / exports[-1])
    assert all(torch.equal(last_a[k], last_b[k]) for k in last_a)


@pytest.mark.slow
def test_synthetic_cil_completes_and_resumes_after_sigkill_to_identical_results(world, tmp_path):
    """ZSCL (distillation + WE every 10) on the synthetic CIL benchmark (3 steps of its classes here, to
    keep the test short); killed mid-step 2, resumed."""
    argv = lambda out: _argv(world, "synthetic_cil", "zscl", out, 4, "--benchmark.classes.increment", "8")  # noqa: E731
    res = _run_here(argv(tmp_path / "a"))
    assert res["setting"] == "cil" and len(res["accuracy"]) == 3
    assert [len(s) for s in res["seen_classes"]] == [6, 14, 22]
    assert res["metrics"]["avg"] == pytest.approx(sum(res["accuracy"]) / 3)
    resumed = _killed_then_resumed(argv(tmp_path / "b"), kill_at="1:3")
    assert resumed["accuracy"] == res["accuracy"]
    _same_run(tmp_path / "a", tmp_path / "b", ("accuracy", "top5", "per_class_accuracy", "seen_classes", "n_test",
                                                 "zero_shot"))


@pytest.mark.slow
def test_synthetic_fewshot_completes_and_resumes_after_sigkill_on_the_same_images(world, tmp_path):
    """iCaRL (whose exemplars must come from the few-shot images only), on the first three tasks of the
    synthetic few-shot benchmark; killed mid-task 3, resumed."""
    from zscl.datasets import build_dataset, dataset_labels

    tasks = "[{dataset: SynthShape, lr: 1.0e-3}, {dataset: SynthColor, lr: 1.0e-3}, {dataset: SynthCount, lr: 1.0e-3}]"
    argv = lambda out: _argv(world, "synthetic_fewshot", "icarl", out, 4, "--benchmark.tasks", tasks)  # noqa: E731
    res = _run_here(argv(tmp_path / "a"))
    assert res["few_shot"] == {"shots": 5, "seed": 42} and len(res["accuracy"]) == 3
    for path in sorted((tmp_path / "a" / "fewshot").glob("*.json")):
        stored = json.loads(path.read_text())
        labels = dataset_labels(build_dataset(stored["dataset"], world, "train"))
        assert set(Counter(labels[i] for i in stored["indices"]).values()) == {5}  # 8 per class in this world
        assert stored["indices"] == few_shot_indices(labels, 5, 42)
    memory = json.loads((tmp_path / "a" / "memory" / "02-SynthCount.json").read_text())
    assert [t["dataset"].split("@")[0] for t in memory["tasks"]] == ["SynthShape", "SynthColor", "SynthCount"]
    for t in memory["tasks"]:  # indices into the few-shot view: 5 images per class, nothing else
        n_classes = len(build_dataset(t["dataset"], world, "train").labels) // 5
        assert t["dataset"].startswith(t["dataset"].split("@")[0] + "@all-n") and max(t["indices"]) < 5 * n_classes
    _killed_then_resumed(argv(tmp_path / "b"), kill_at="2:3")
    for path in sorted((tmp_path / "a" / "fewshot").glob("*.json")):
        assert json.loads((tmp_path / "b" / "fewshot" / path.name).read_text()) == json.loads(path.read_text())
    _same_run(tmp_path / "a", tmp_path / "b", ("accuracy", "top5", "zero_shot"))
