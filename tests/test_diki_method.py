"""DIKI as a method (:class:`zscl.diki.module.DIKICLIP`): the module, the runner, export, resume, ``zscl eval``.

The core (prefix attention, calibration, voting) is tested in tests/test_diki.py. Here every claim is
checked against something the module did not compute: open_clip's own forward and tokenizer, numpy's
mean and covariance, the schedule written out, the runner's rows and an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tests.tiny_world import benchmark_yaml, make_tiny_world

ARCH = "zscl-tiny-vit"


def _module(**kw):
    from zscl.runner.build import create_method

    return create_method("diki", clip=ARCH, pretrained=None, **kw)


# ---------------------------------------------------------------------------- pieces
def test_holdout_is_a_seeded_fifth_of_every_class_and_never_a_whole_class():
    from zscl.diki.holdout import holdout_positions

    labels = [0] * 10 + [1] * 7 + [2] * 2 + [3] * 1
    held = holdout_positions(labels, 0.2, seed=42)
    per_class = Counter(labels[i] for i in held)
    assert per_class == {0: 2, 1: 1, 2: 1}  # round(0.2 n), at least 1, never a single image's class
    assert held == holdout_positions(labels, 0.2, seed=42) and held != holdout_positions(labels, 0.2, seed=7)
    assert holdout_positions(labels, 0.0, seed=42) == []


def test_sgd_schedule_is_cosine_from_lr_to_a_thousandth():
    from zscl.diki.module import cosine_floor_factor

    steps, r = 100, 1e-3
    assert cosine_floor_factor(0, steps, r) == 1.0
    assert cosine_floor_factor(steps, steps, r) == pytest.approx(r)
    assert cosine_floor_factor(50, steps, r) == pytest.approx(r + (1 - r) / 2)
    assert cosine_floor_factor(25, steps, r) == pytest.approx(r + (1 - r) * (1 + math.cos(math.pi / 4)) / 2)


def test_the_optimiser_is_plain_sgd_on_this_tasks_prefixes_only(one_thread):
    m = _module()
    groups = m.param_groups()
    opt = m.make_optimizer([{k: v for k, v in g.items() if k != "schedule"} for g in groups])
    assert type(opt) is torch.optim.SGD
    assert opt.defaults["momentum"] == 0.0 and groups[0]["lr"] == 5.0 and groups[0]["weight_decay"] == 0.0
    trainable = {id(p) for p in groups[0]["params"]}
    assert trainable == {id(p) for n, p in m.prefixes.named_parameters() if n.endswith(".0")}
    assert all(not p.requires_grad for p in m.clip.parameters())


def test_task_lr_of_a_benchmark_does_not_reach_dikis_sgd():
    """Benchmarks set model.lr per task (full fine-tuning); DIKI's rate is model.sgd.lr."""
    m = _module(lr=1e-5)
    assert m.param_groups()[0]["lr"] == 5.0


def test_untrained_module_evaluates_as_open_clip_with_the_first_template(one_thread):
    import open_clip

    from zscl.datasets import DatasetSpec

    torch.manual_seed(0)
    m = _module().eval()
    spec = DatasetSpec("X", ("cat", "dog", "bird"), ("a photo of a {c}.", "art of a {c}."), lambda *a: None, "-")
    m._specs = [spec]
    m.prepare_evaluation()
    images = torch.randn(4, 3, m.bundle.image_size, m.bundle.image_size)
    from zscl.models.loading import tiny_configs_dir

    open_clip.add_model_config(tiny_configs_dir())
    plain = open_clip.create_model(ARCH, pretrained=None).eval()  # no hooks: open_clip's own forward
    plain.load_state_dict(m.clip.state_dict())
    with torch.no_grad():
        got = m.eval_logits(images, 0)
        tok = open_clip.get_tokenizer(ARCH)(["a photo of a cat.", "a photo of a dog.", "a photo of a bird."])
        img = F.normalize(plain.encode_image(images), dim=-1)
        txt = F.normalize(plain.encode_text(tok), dim=-1)
    torch.testing.assert_close(got, plain.logit_scale.exp() * img @ txt.T)


# ---------------------------------------------------------------------------- runs on the tiny world
def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["sequence", "--config", str(root / "tiny" / "benchmark.yaml"), "--config", "method/diki", "--out", str(out),
            "--checkpoint_every", "2", "--progress", "none", "--model.select_every", "2", *extra]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("diki")
    make_tiny_world(root, per_class=20)  # TinyColors: 48 kept training images > D = 32
    benchmark_yaml(root, steps=5)
    return root


@pytest.fixture(scope="module")
def reference_run(world) -> Path:
    from tests.test_sequence import run_zscl

    out = world / "runs" / "ref"
    run_zscl(*_args(world, out))
    return out


@pytest.mark.slow
def test_the_clip_is_frozen_and_the_gaussians_are_numpys_on_the_kept_images(world, reference_run):
    import open_clip

    from zscl.datasets import build_dataset, dataset_labels, load_custom_datasets
    from zscl.diki.holdout import holdout_positions

    first, second = (load_file(reference_run / "checkpoints" / f) for f in ("00-TinyColors.safetensors",
                                                                             "01-TinyStripes.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    sidecar = load_file(reference_run / "checkpoints" / "01-TinyStripes.diki.safetensors")
    assert sidecar["gaussians.means"].shape[0] == 2 and "prefixes.blocks.0.keys.1" in sidecar
    # oracle: open_clip's own model and preprocessing on the kept images, numpy's mean and covariance
    from zscl.models.loading import tiny_configs_dir

    load_custom_datasets(str(world / "tiny" / "datasets.yaml"), data_root=str(world))
    open_clip.add_model_config(tiny_configs_dir())  # zscl's tiny architecture, as an open_clip config
    model, _, preprocess = open_clip.create_model_and_transforms(ARCH, pretrained=None)
    model.load_state_dict(first)
    ds = build_dataset("TinyColors", str(world), "train", preprocess)
    held = set(holdout_positions(dataset_labels(ds), 0.2, seed=42))
    images = torch.stack([ds[i][0] for i in range(len(ds)) if i not in held])
    with torch.no_grad():
        f = F.normalize(model.eval().encode_image(images), dim=-1).double().numpy()
    np.testing.assert_allclose(sidecar["gaussians.means"][0].numpy(), f.mean(0), atol=1e-6)
    cov = np.cov(f, rowvar=False) + 1e-7 * np.eye(f.shape[1])
    np.testing.assert_allclose(sidecar["gaussians.covariances"][0].numpy(), cov, atol=1e-6)


@pytest.mark.slow
def test_zscl_eval_of_the_export_reproduces_the_runners_row(world, reference_run, tmp_path):
    from zscl.cli.eval import main as eval_main

    res = json.loads((reference_run / "results.json").read_text())
    report = tmp_path / "eval.json"
    assert eval_main(["--model", ARCH, "--pretrained", str(reference_run / "checkpoints" / "01-TinyStripes.safetensors"),
                      "--datasets", "TinyColors,TinyStripes", "--custom-datasets", str(world / "tiny" / "datasets.yaml"),
                      "--data-root", str(world), "--cache-dir", str(tmp_path / "cache"), "--num-workers", "0",
                      "--batch-size", "8", "--progress", "false", "--json", str(report)]) == 0
    got = json.loads(report.read_text())
    assert got["method"] == "zscl.diki.module.DIKICLIP"
    assert [got["results"][n]["top1"] for n in ("TinyColors", "TinyStripes")] == res["accuracy"][-1]


@pytest.mark.slow
def test_sigkill_mid_task_resumes_exactly_with_the_best_epoch_so_far(world, reference_run):
    from tests.test_sequence import run_zscl, zscl_cmd

    out = world / "runs" / "killed"
    # hold-out scored every 2 steps (at the start of steps 3 and 5) and at the last, 5; checkpoints at 2 and 4:
    # SIGKILL after step 5, before the last scoring, leaves a checkpoint whose best epoch is step 2's
    env = {**os.environ, "ZSCL_KILL_AT": "1:5"}
    killed = subprocess.run(zscl_cmd(*_args(world, out)), capture_output=True, text=True, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    ckpt = torch.load(out / "tasks" / "01-TinyStripes" / "last.ckpt", map_location="cpu", weights_only=False)
    best = ckpt["diki"]["best"]
    assert ckpt["global_step"] == 4 and best["scored"] == 2 and best["step"] == 2 and len(best["params"]) > 0
    assert "resuming from" in run_zscl(*_args(world, out)).stdout
    ref, res = (json.loads((d / "results.json").read_text()) for d in (reference_run, out))
    assert res["accuracy"] == ref["accuracy"]
    for name in ("01-TinyStripes.safetensors", "01-TinyStripes.diki.safetensors"):
        a, b = (load_file(str(d / "checkpoints" / name)) for d in (reference_run, out))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name} differs after resume"


def test_bench_step_times_diki_beside_zscl(one_thread):
    from zscl.bench.step import StepBench, run_step

    r = run_step(StepBench(method="diki", baseline="zscl", batch=4, ref_batch=4, classes=3, ref_texts=8, steps=2, warmup=0))
    assert r["settings"]["method"] == "diki" and r["baseline"]["settings"]["method"] == "zscl"
    assert r["step_time_ratio"] > 0 and r["tflops_per_step"] is None
