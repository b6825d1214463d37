"""The paper's baselines as configs: LwF (task-start teacher, task images and prompts), LwF-VR (virtual
vocabulary), iCaRL (exemplar memory by herding), each checked against things the code did not compute:
exported files, PNGs read back with PIL, a brute-force herding, the reference's memory arithmetic."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.tiny_world import benchmark_yaml, make_tiny_world
from zscl.reference.memory import ExemplarMemory, budgets, herding, update_memory
from zscl.runner.configs import resolve_config_args

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("baselines")
    make_tiny_world(root, per_class=5)
    benchmark_yaml(root, steps=3)
    return root


def run_sequence(world: Path, method: str, out: Path, *extra: str):
    from zscl.cli.sequence import build_parser
    from zscl.runner.sequence import SequenceRunner

    parser = build_parser()
    cfg = parser.parse_args(resolve_config_args(["--config", str(world / "tiny" / "benchmark.yaml"), "--config",
                                                 f"method/{method}", "--out", str(out), "--progress", "none",
                                                 "--checkpoint_every", "100", *extra]))
    runner = SequenceRunner(parser, cfg)
    runner.run()
    return runner


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float() for k, v in model.named_parameters()}


# -- LwF ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lwf_task2(world):
    """The module and data module the runner builds for LwF's second task."""
    runner = run_sequence(world, "lwf", world / "runs" / "lwf")
    model, dm, _ = runner.instantiate(runner.task_cfg(1, runner.start_point(1)))
    return runner, model, dm


def test_lwf_teacher_is_the_previous_tasks_export_not_the_initial_clip(world, lwf_task2):
    runner, model, _ = lwf_task2
    export = load_file(str(world / "runs" / "lwf" / "checkpoints" / "00-TinyColors.safetensors"))
    initial, _, _ = runner.instantiate(runner.task_cfg(0, None, eval_only=True))
    teacher, init = params(model.teacher), params(initial.clip)
    assert all(torch.equal(teacher[k], export[k].float()) for k in teacher), "teacher != task 1's export"
    assert any(not torch.equal(teacher[k], init[k]) for k in teacher), "teacher == initial CLIP"
    # the student starts there too (WC anchor and WE first member would be the same tensors)
    assert all(torch.equal(a, export[n].float()) for n, a in zip(model.trainable_names, model.anchors))


def test_lwf_first_task_teacher_is_the_initial_clip(world):
    from zscl.methods import ContinualCLIP
    from zscl.methods.config import Distillation

    torch.manual_seed(0)
    module = ContinualCLIP(clip="zscl-tiny-vit", pretrained=None, distill=Distillation(1, 1, teacher="task_start"))
    student, teacher = params(module.clip), params(module.teacher)
    assert all(torch.equal(student[k], teacher[k]) for k in student)
    assert module.teacher is not module.clip


def _test_images(world: Path, task: str, transform) -> list[torch.Tensor]:
    """Every train PNG of ``task`` read back with PIL and the test transform (the oracle)."""
    files = sorted((world / "tiny" / task / "train").rglob("*.png"))
    assert files
    return [transform(Image.open(f).convert("RGB")) for f in files]


def test_lwf_reference_batch_comes_from_the_current_tasks_train_split(world, lwf_task2):
    _, model, dm = lwf_task2
    assert dm.ref_images.source == "dataset" and dm.ref_images.path == "TinyStripes" and dm.ref_images.split == "train"
    dm.trainer = types.SimpleNamespace(lightning_module=model)  # what _reference_loader reads the transforms from
    batch = next(iter(dm._reference_loader(0, 0, 1, False)))
    tf = dm._uint8(model.bundle.test_transform)
    ours = _test_images(world, "TinyStripes", tf)
    other = _test_images(world, "TinyColors", tf)
    assert len(batch) == dm.reference_batch_size
    for img in batch:
        assert any(torch.equal(img, x) for x in ours), "a reference image is not a TinyStripes training image"
        assert not any(torch.equal(img, x) for x in other)


def test_lwf_reference_texts_are_the_current_tasks_class_prompts(lwf_task2):
    _, model, dm = lwf_task2
    tok = model.bundle.tokenizer
    expected = tok(["a photo of horizontal.", "a photo of vertical."])  # the tiny world's first template
    assert torch.equal(dm.reference_tokens(tok), expected)


# -- LwF-VR ---------------------------------------------------------------------------------------


def test_lwf_vr_virtual_vocabulary_has_the_reference_shape_and_is_seeded_per_task(world):
    from zscl.cli.sequence import build_parser
    from zscl.methods.datamodule import ContinualDataModule
    from zscl.models import load_clip
    from zscl.reference import ReferenceTexts

    cfg = build_parser().parse_args(resolve_config_args(["--config", str(world / "tiny" / "benchmark.yaml"),
                                                         "--config", "method/lwf_vr"]))
    texts = ReferenceTexts(**vars(cfg.data.reference_texts))
    tok = load_clip("zscl-tiny-vit", None).tokenizer

    def tokens(seed: int, data_seed: int) -> torch.Tensor:
        dm = ContinualDataModule(dataset="DTD", data_root=str(world), seed=data_seed,
                                 reference_texts=ReferenceTexts(**{**vars(texts), "seed": seed}))
        return dm.reference_tokens(tok)

    t = tokens(0, 42)
    assert t.shape == (1000, tok.context_length)
    assert (t[:, 0] == tok.sot_token_id).all() and (t[:, 11] == tok.eot_token_id).all()
    assert (t[:, 12:] == 0).all()
    body = t[:, 1:11]
    assert body.min() >= 0 and body.max() < 49408  # uniform over the whole vocabulary, special tokens included
    assert body.unique().numel() > 5000  # 10,000 draws from 49,408 ids: not a constant or tiny range
    assert torch.equal(t, tokens(0, 42)), "deterministic for a seed"
    assert not torch.equal(t, tokens(1, 42)), "differs between seeds"
    assert not torch.equal(t, tokens(0, 43)), "drawn anew for another task (the runner's per-task data seed)"


# -- iCaRL: herding and the memory rules ----------------------------------------------------------


def brute_force_herding(features: np.ndarray, m: int) -> list[int]:
    """iCaRL's herding written out: pick the row that brings the chosen mean closest to mu."""
    f = features / np.linalg.norm(features, axis=1, keepdims=True)
    mu = f.mean(axis=0)
    chosen: list[int] = []
    for k in range(1, m + 1):
        best, best_d = -1, np.inf
        for i in range(len(f)):
            if i in chosen:
                continue
            d = np.sum((mu - (f[chosen].sum(axis=0) + f[i]) / k) ** 2)
            if d < best_d:
                best, best_d = i, d
        chosen.append(best)
    return chosen


def test_herding_matches_a_brute_force_oracle():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(40, 8))
    assert herding(torch.from_numpy(feats), 15) == brute_force_herding(feats, 15)


def test_memory_sizes_follow_the_reference_rules():
    # reference (dynamic_dataset.py): first task K; then old sets K//t, new set K - K//t
    cfg = ExemplarMemory(size=10)
    assert [budgets(cfg, t) for t in (1, 2, 3)] == [(10, 10), (5, 5), (3, 7)]
    assert budgets(ExemplarMemory(size=10, balanced=True), 3) == (3, 3)
    rng = np.random.default_rng(1)
    memory: dict = {}
    for t, name in enumerate(["A", "B", "C"]):
        n = 25
        feats = torch.from_numpy(rng.normal(size=(n, 6)))
        memory = update_memory(memory, cfg, name, list(range(100, 100 + n)), [i % 5 for i in range(n)], feats)
    sizes = [len(t["indices"]) for t in memory["tasks"]]
    assert [t["dataset"] for t in memory["tasks"]] == ["A", "B", "C"]
    assert sizes == [3, 3, 7]  # the reference's total 13 > K = 10 after three tasks
    assert all(100 <= i < 125 for t in memory["tasks"] for i in t["indices"])


def test_per_class_herding_balances_classes():
    rng = np.random.default_rng(2)
    labels = [i % 4 for i in range(40)]
    memory = update_memory({}, ExemplarMemory(size=12, per_class=True), "A", list(range(40)), labels,
                           torch.from_numpy(rng.normal(size=(40, 5))))
    got = memory["tasks"][0]["labels"]
    assert sorted(got) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    cut = got[:4]  # interleaved: a cut set stays balanced
    assert sorted(cut) == [0, 1, 2, 3]


def test_icarl_sequence_memory_holds_only_seen_tasks_with_reference_sizes(world):
    out = world / "runs" / "icarl"
    runner = run_sequence(world, "icarl", out, "--continual.memory.size", "5")
    first = json.loads((out / "memory" / "00-TinyColors.json").read_text())
    second = json.loads((out / "memory" / "01-TinyStripes.json").read_text())
    assert [t["dataset"] for t in first["tasks"]] == ["TinyColors"]
    assert [t["dataset"] for t in second["tasks"]] == ["TinyColors", "TinyStripes"]
    assert [len(t["indices"]) for t in first["tasks"]] == [5]
    assert [len(t["indices"]) for t in second["tasks"]] == [2, 3]  # K//2 old, K - K//2 new
    assert second["tasks"][0]["indices"] == first["tasks"][0]["indices"][:2], "old sets keep their best (first) exemplars"
    # the exemplar labels are the datasets' own labels of those indices (ImageFolder order)
    from zscl.datasets import build_dataset

    ds = build_dataset("TinyStripes", str(world), "train", None)
    assert [ds[i][1] for i in second["tasks"][1]["indices"]] == second["tasks"][1]["labels"]
    # task 2 distils on exactly those exemplars; task 1 (no memory yet) trains without distillation
    model0, _, _ = runner.instantiate(runner.task_cfg(0, None))
    assert model0.teacher is None
    model1, dm1, _ = runner.instantiate(runner.task_cfg(1, runner.start_point(1)))
    assert dm1.ref_images.source == "memory" and dm1.ref_images.path.endswith("memory/00-TinyColors.json")
    # the reference's iCaRL distils toward the zero-shot CLIP: the teacher is not the task-start student
    assert model1.distill.teacher == "initial"
    start = dict(model1.clip.named_parameters())
    assert any(not torch.equal(p, start[n]) for n, p in model1.teacher.named_parameters())


def test_icarl_memory_is_recomputed_identically(world):
    """A run killed after an export but before its memory file rebuilds the same memory."""
    out = world / "runs" / "icarl"
    before = (out / "memory" / "01-TinyStripes.json").read_bytes()
    (out / "memory" / "01-TinyStripes.json").unlink()
    runner = run_sequence(world, "icarl", world / "runs" / "icarl", "--continual.memory.size", "5")
    runner.hooks[0].after_task(runner, 1)  # the exemplar_memory hook, which finds no file
    assert (out / "memory" / "01-TinyStripes.json").read_bytes() == before


def test_memory_source_without_a_memory_is_refused(world):
    from zscl.cli.sequence import build_parser
    from zscl.runner.sequence import SequenceRunner

    parser = build_parser()
    cfg = parser.parse_args(resolve_config_args(["--config", str(world / "tiny" / "benchmark.yaml"), "--config",
                                                 "method/icarl", "--out", str(world / "runs" / "nomem"),
                                                 "--continual.memory", "null"]))
    with pytest.raises(ValueError, match="needs an exemplar memory"):
        SequenceRunner(parser, cfg)


def test_icarl_reads_its_memory_when_out_is_a_relative_path(world, monkeypatch):
    """The memory lives under --out, data paths are read under the data root: a relative --out (the demo's
    default ``runs/demo``) must still find it (the memory path handed to the data module is absolute)."""
    monkeypatch.chdir(world.parent)
    out = Path(world.name) / "runs" / "icarl"  # relative to the working folder, not to the data root
    runner = run_sequence(world, "icarl", out, "--continual.memory.size", "5")
    cfg = runner.task_cfg(1, runner.start_point(1))
    assert Path(cfg["data.reference_images.path"]).is_absolute()
    _, dm, _ = runner.instantiate(cfg)
    assert dm.ref_images.path == str((world / "runs" / "icarl" / "memory" / "00-TinyColors.json").resolve())
