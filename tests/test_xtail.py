"""X-TAIL (the union label space) and RAIL as a method, end to end on a small synthetic world.

Oracles written here, not taken from the code under test: the union is rebuilt from each domain's own spec; the
zero-shot union prediction of every test image is computed from per-domain zero-shot heads concatenated here; the
SIGKILLed run is compared with an uninterrupted one to the bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tests.test_fewshot import world  # noqa: F401  (the module-scoped synthetic world: 8 train / 4 test per class)
from zscl.datasets import build_dataset, dataset_labels, get_dataset
from zscl.datasets.views import DatasetView, class_sources, register_view

DOMAINS = ["SynthShape", "SynthColor", "SynthCount"]
TASKS = "[" + ", ".join(f"{{dataset: {d}}}" for d in DOMAINS) + "]"


# --- the union label space ------------------------------------------------------------------


def test_a_union_view_is_every_domain_in_order_with_offset_labels_and_its_own_templates(world):
    specs = [get_dataset(d) for d in DOMAINS]
    views = [get_dataset(register_view(DatasetView(d, label_space=tuple(DOMAINS)))) for d in DOMAINS]
    names = [c for s in specs for c in s.classnames]
    templates = [s.templates for s in specs for _ in s.classnames]
    for k, view in enumerate(views):
        assert list(view.classnames) == names and list(view.class_templates) == templates
        offset = sum(s.num_classes for s in specs[:k])
        base = dataset_labels(build_dataset(DOMAINS[k], world, "test"))
        assert dataset_labels(build_dataset(view.name, world, "test")) == [y + offset for y in base]
        assert class_sources(view.name)[offset] == (DOMAINS[k], 0)
    assert len({v.name for v in views}) == len(views)


@pytest.mark.parametrize("bench", ["xtail_order1", "xtail_order2", "xtail_order1_fullshot", "xtail_order2_fullshot",
                                   "synthetic_xtail"])
def test_every_method_of_the_issue_parses_with_every_xtail_benchmark(bench):
    from zscl.cli.sequence import build_parser
    from zscl.runner.configs import resolve_config_args
    from zscl.settings import XTAIL, setting_for

    for method in ("finetune", "lwf", "icarl", "wise", "zscl", "moe_adapters", "rail_primal", "rail_dual"):
        argv = resolve_config_args(["--config", f"benchmark/{bench}", "--config", f"method/{method}"])
        cfg = build_parser(argv).parse_args(argv)
        assert isinstance(setting_for(cfg.benchmark), XTAIL), (bench, method)
        assert (cfg.benchmark.xtail.shots is None) == ("fullshot" in bench or bench.startswith("synthetic"))


def test_a_repeated_class_name_keeps_one_label_per_domain():
    space = ("SynthShape", "SynthFadedShape")  # the same shape names in both
    view = get_dataset(register_view(DatasetView("SynthShape", label_space=space)))
    n = get_dataset("SynthShape").num_classes
    assert view.num_classes == 2 * n and view.classnames[:n] == view.classnames[n:]


def _union_zero_shot(model, tokenizer, images: torch.Tensor, domains: list[str] = DOMAINS) -> torch.Tensor:
    """Logits among all ``domains``' classes: each domain's own zero-shot head, side by side (built here)."""
    from zscl.evaluation.zeroshot import build_classifier

    heads = [build_classifier(model, tokenizer, get_dataset(d).classnames, get_dataset(d).templates) for d in domains]
    with torch.no_grad():
        feats = F.normalize(model.encode_image(images).float(), dim=-1)
    return 100.0 * feats @ torch.cat(heads, dim=1)


def _test_images(root: Path, domain: str, transform) -> tuple[torch.Tensor, torch.Tensor]:
    ds = build_dataset(domain, root, "test", transform)
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def test_the_xtail_evaluation_counts_an_image_won_by_another_domain_as_wrong(world, tmp_path, one_thread):
    """Through the union views and a plain CLIP method: its accuracy on each domain is the union oracle's, and some
    image that the within-domain head gets right is lost to another domain's class in the union (the faded shapes
    of the demo's first task, which the pretrained CLIP often calls pale colours)."""
    import lightning as L

    from zscl.methods.base import CLIPMethod
    from zscl.methods.datamodule import ContinualDataModule

    model = CLIPMethod(clip="zscl-synth-tiny", pretrained="synthetic").eval()
    domains = ["SynthFadedShape", "SynthPosition", "SynthPaleColor"]
    views = [register_view(DatasetView(d, label_space=tuple(domains))) for d in domains]
    dm = ContinualDataModule(dataset=domains[0], data_root=str(world), eval_datasets=views, num_workers=0,
                             cache_dir=str(tmp_path / "cache"), eval_batch_size=64)
    L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).validate(model, dm, verbose=False)
    lost, offset = 0, 0
    for d, view in zip(domains, views):
        images, labels = _test_images(world, d, model.bundle.test_transform)
        logits = _union_zero_shot(model.clip, model.bundle.tokenizer, images, domains)
        n = get_dataset(d).num_classes
        union, within = logits.argmax(1), logits[:, offset:offset + n].argmax(1)
        assert model.eval_results[view].correct1 == int((union == labels + offset).sum())
        lost += int(((within == labels) & (union != labels + offset)).sum())
        offset += n
    assert lost > 0, "no image is right within its domain and wrong in the union: the case does not test the union"


# --- RAIL -----------------------------------------------------------------------------------


def _argv(world: Path, method: str, out: Path, *extra: str) -> list[str]:  # noqa: F811
    return ["--config", "benchmark/synthetic_xtail", "--config", f"method/{method}", "--data.data_root", str(world),
            "--out", str(out), "--progress", "none", "--checkpoint_every", "2", "--data.batch_size", "7",
            "--data.cache_dir", str(world / "cache"), "--benchmark.tasks", TASKS, *extra]


def _run_here(argv: list[str]) -> dict:
    from zscl.runner.build import build_runner

    torch.set_num_threads(1)
    return build_runner(argv).run()


@pytest.fixture(scope="module")
def rail_run(world, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("rail") / "primal"
    _run_here(_argv(world, "rail_primal", out, "--model.width", "256"))
    return out


def _rail_predictions(root: Path, export: Path, domain: str, beta: float) -> tuple[torch.Tensor, ...]:
    """(RAIL's fused scores, the union zero-shot logits built here, the labels) on ``domain``'s test images."""
    from zscl.rail.module import RAILCLIP

    model = RAILCLIP.load_export(str(export), beta=beta)
    model.start_evaluation([register_view(DatasetView(d, label_space=tuple(DOMAINS))) for d in DOMAINS])
    images, labels = _test_images(root, domain, model.bundle.test_transform)
    fused = model.eval_logits(images, DOMAINS.index(domain))
    return fused, _union_zero_shot(model.clip, model.bundle.tokenizer, images), labels


def test_rail_never_loses_an_image_zero_shot_gets_right_in_an_unseen_domain(rail_run, world):  # noqa: F811
    res = json.loads((rail_run / "results.json").read_text())
    assert res["setting"] == "xtail" and res["label_space"]["classes"] == sum(get_dataset(d).num_classes for d in DOMAINS)
    offsets = [sum(get_dataset(e).num_classes for e in DOMAINS[:j]) for j in range(len(DOMAINS))]
    checked = 0
    for k in range(len(DOMAINS) - 1):
        export = rail_run / "checkpoints" / f"{k:02d}-{DOMAINS[k]}.safetensors"
        for j in range(k + 1, len(DOMAINS)):
            fused, zero_shot, labels = _rail_predictions(world, export, DOMAINS[j], beta=0.8)
            right = zero_shot.argmax(1) == labels + offsets[j]
            assert (fused.argmax(1)[right] == labels[right] + offsets[j]).all()
            checked += int(right.sum())
            assert res["accuracy"][k][j] >= res["zero_shot"][j]
    assert checked > 0


def test_rail_with_beta_zero_is_zero_shot_clip_exactly(rail_run, world):  # noqa: F811
    export = rail_run / "checkpoints" / f"{len(DOMAINS) - 1:02d}-{DOMAINS[-1]}.safetensors"
    for d in DOMAINS:
        fused, zero_shot, _ = _rail_predictions(world, export, d, beta=0.0)
        assert torch.equal(fused, zero_shot.softmax(dim=1))
        learned, _, _ = _rail_predictions(world, export, d, beta=0.8)
        assert not torch.equal(learned, fused), "β = 0.8 must differ on a learned domain (else the test is vacuous)"


def test_rail_encodes_every_training_image_once_and_keeps_the_clip_frozen(rail_run, world):  # noqa: F811
    total, previous = 0, None
    for k, d in enumerate(DOMAINS):
        total += len(build_dataset(d, world, "train"))
        state = load_file(str(rail_run / "checkpoints" / f"{k:02d}-{d}.rail.safetensors"))
        assert int(state["seen"]) == total
        clip = load_file(str(rail_run / "checkpoints" / f"{k:02d}-{d}.safetensors"))
        if previous is not None:
            assert all(torch.equal(clip[n], previous[n]) for n in clip)
        previous = clip


def test_rail_resumes_bit_identically_after_sigkill_mid_task(rail_run, world, tmp_path):  # noqa: F811
    argv = _argv(world, "rail_primal", tmp_path / "killed", "--model.width", "256")
    env = {**os.environ, "ZSCL_KILL_AT": "1:5", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "zscl", "sequence", *argv], env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckpt = torch.load(tmp_path / "killed" / "tasks" / f"01-{DOMAINS[1]}" / "last.ckpt", map_location="cpu",
                      weights_only=False)
    assert ckpt["global_step"] == 4 and 0 < int(ckpt["state_dict"]["task_seen"]) < len(build_dataset(DOMAINS[1], world, "train"))
    _run_here(argv)
    a = json.loads((rail_run / "results.json").read_text())
    b = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert a["accuracy"] == b["accuracy"] and a["zero_shot"] == b["zero_shot"]
    for k, d in enumerate(DOMAINS):
        x = load_file(str(rail_run / "checkpoints" / f"{k:02d}-{d}.rail.safetensors"))
        y = load_file(str(tmp_path / "killed" / "checkpoints" / f"{k:02d}-{d}.rail.safetensors"))
        assert x.keys() == y.keys() and all(torch.equal(x[n], y[n]) for n in x), f"{d}: the head must be bit-identical"


def test_rail_dual_refuses_a_kernel_over_its_budget_before_encoding(world, tmp_path):  # noqa: F811
    from zscl.rail.ridge import KernelMemoryError

    with pytest.raises(KernelMemoryError) as err:
        _run_here(_argv(world, "rail_dual", tmp_path / "dual", "--model.kernel_budget_gib", "1e-6"))
    n = len(build_dataset(DOMAINS[0], world, "train"))
    assert "\n" not in str(err.value) and f"{n:,} stored samples needs" in str(err.value)
    assert not (tmp_path / "dual" / "checkpoints").exists()


def test_rail_in_mtil_leaves_unlearned_datasets_at_zero_shot_and_reads_learned_ones_on_their_own_columns(world, tmp_path):  # noqa: F811
    """MTIL gives the dataset: a dataset not learned yet is CLIP alone (the zero-shot cell exactly); a learned one
    fuses with the joint head read on its own classes' columns, which must move its cell."""
    argv = _argv(world, "rail_primal", tmp_path / "mtil", "--model.width", "256")
    argv[1] = "benchmark/synthetic"
    res = _run_here(argv)
    assert res["setting"] == "mtil" and res["datasets"] == DOMAINS
    for k in range(len(DOMAINS)):
        assert all(res["accuracy"][k][j] == res["zero_shot"][j] for j in range(k + 1, len(DOMAINS)))
    assert res["accuracy"][-1] != res["zero_shot"]


# --- compare --------------------------------------------------------------------------------


def _results(path: Path, setting: str, datasets: list[str]) -> Path:
    n = len(datasets)
    acc = [[50.0 + i + j for j in range(n)] for i in range(n)]
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps({"setting": setting, "benchmark": "xtail_order1", "method": "rail_primal",
                                                   "datasets": datasets, "tasks": datasets, "accuracy": acc,
                                                   "zero_shot": [40.0] * n}))
    return path


def test_compare_puts_an_xtail_run_beside_the_xtail_table_with_its_labelled_re_reports(tmp_path):
    from zscl.evaluation.compare import CompareError, compare, load_published

    domains = load_published("xtail_order1")["datasets"]
    run = _results(tmp_path / "rail_primal", "xtail", domains)
    _, _, tables = compare([str(run)])  # the run's benchmark names its published table
    text = "\n\n".join(t.render("md") for t in tables)
    row = next(line for line in text.splitlines() if line.startswith("| rail_primal"))
    assert "| RAIL-Primal | 62.4 | 70.7 | 79.1 |" in row  # CoDyRA / MoRAM, in the comparison
    assert "| RAIL-Primal (LADA re-report) | – | 71.1 | 81.4 |" in text  # the disagreeing re-report, apart, null kept
    with pytest.raises(CompareError, match="MTIL table"):
        compare([str(run)], published="mtil_order1")
    mtil = _results(tmp_path / "mtil_run", "mtil", domains)
    with pytest.raises(CompareError, match="different settings"):
        compare([str(run), str(mtil)])
