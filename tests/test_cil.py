"""Class-incremental learning: class orders, dataset views, the CIL runner on a fake CIFAR100, CIL metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.fake_layouts import make_fake_dataset
from zscl.datasets import DatasetNotFoundError, build_dataset, dataset_labels, get_dataset, load_classnames
from zscl.datasets.views import DatasetView, load_class_order, register_view
from zscl.settings.cil import class_steps

# The reference's orders (ZSCL cil/class_orders/{cifar100,tinyimagenet}.yaml), typed out here.
CIFAR100_ORDER = [
    87, 0, 52, 58, 44, 91, 68, 97, 51, 15, 94, 92, 10, 72, 49, 78, 61, 14, 8, 86, 84, 96, 18, 24, 32, 45, 88, 11, 4,
    67, 69, 66, 77, 47, 79, 93, 29, 50, 57, 83, 17, 81, 41, 12, 37, 59, 25, 20, 80, 73, 1, 28, 6, 46, 62, 82, 53, 9,
    31, 75, 38, 63, 33, 74, 27, 22, 36, 3, 16, 21, 60, 19, 70, 90, 89, 43, 5, 42, 65, 76, 40, 30, 23, 85, 2, 95, 56,
    48, 71, 64, 98, 13, 99, 7, 34, 55, 54, 26, 35, 39,
]  # fmt: skip
TINYIMAGENET_ORDER = [
    131, 181, 22, 172, 144, 92, 97, 187, 58, 93, 6, 70, 106, 68, 153, 168, 179, 199, 29, 46, 9, 142, 134, 88, 193,
    110, 26, 32, 117, 112, 17, 39, 166, 13, 94, 138, 109, 147, 51, 101, 59, 188, 116, 5, 170, 99, 100, 167, 180,
    146, 65, 1, 104, 43, 38, 184, 123, 171, 137, 162, 71, 44, 95, 174, 12, 7, 54, 152, 21, 47, 28, 176, 34, 2, 132,
    118, 42, 189, 150, 14, 165, 41, 192, 45, 82, 128, 63, 57, 197, 160, 53, 75, 108, 135, 121, 159, 183, 67, 169,
    50, 87, 69, 89, 196, 115, 19, 148, 96, 86, 11, 8, 60, 33, 173, 78, 4, 119, 105, 182, 127, 177, 30, 186, 40, 49,
    178, 76, 157, 161, 73, 164, 151, 31, 74, 191, 27, 125, 198, 81, 20, 155, 114, 139, 36, 61, 56, 145, 48, 16, 83,
    62, 85, 126, 0, 102, 23, 3, 140, 15, 195, 133, 113, 190, 141, 52, 163, 156, 80, 111, 90, 175, 143, 120, 84, 18,
    25, 79, 37, 154, 136, 64, 158, 24, 185, 72, 35, 129, 55, 149, 91, 122, 77, 103, 124, 130, 66, 10, 107, 194, 98,
]  # fmt: skip


@pytest.mark.parametrize("name,expected,n", [("CIFAR100", CIFAR100_ORDER, 100), ("TinyImageNet", TINYIMAGENET_ORDER, 200)])
def test_class_orders_are_the_reference_permutations(name, expected, n):
    order = load_class_order(name, get_dataset(name).num_classes)
    assert sorted(order) == list(range(n))
    assert order == expected


def test_class_order_errors():
    with pytest.raises(ValueError, match="permutation of 0..3"):
        load_class_order([0, 1, 1, 3], 4)
    with pytest.raises(FileNotFoundError, match="shipped: CIFAR100, TinyImageNet"):
        load_class_order("cifar1000", 100)


def test_class_steps_follow_the_reference_splits():
    assert [len(s) for s in class_steps(CIFAR100_ORDER, 10, 10)] == [10] * 10
    assert len(class_steps(CIFAR100_ORDER, 2, 2)) == 50
    tiny = class_steps(TINYIMAGENET_ORDER, 100, 10)
    assert [len(s) for s in tiny] == [100] + [10] * 10 and tiny[1] == TINYIMAGENET_ORDER[100:110]


def test_tinyimagenet_missing_layout_names_it(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"tiny-imagenet-200/val/val_annotations.txt"):
        build_dataset("TinyImageNet", tmp_path, "test")


def test_tinyimagenet_train_lists_classes_in_wnids_txt_order(tmp_path):
    """The reference's loader (continuum) walks wnids.txt's order, so iCaRL's first-10,000 candidates of a
    step are the first classes in that order; sorted folder names would give other classes."""
    from zscl.datasets.tinyimagenet import wnids

    ids = wnids()
    assert ids[:3] == ["n02124075", "n04067472", "n04540053"]  # the official wnids.txt's first rows
    classes = [2, 0, 1, 5]  # sorted by folder name: 5 (n01641577) first
    assert sorted(classes, key=lambda c: ids[c]) != sorted(classes)
    make_fake_dataset("TinyImageNet", tmp_path, classes=classes, per_class=2)
    ds = build_dataset("TinyImageNet", tmp_path, "train")
    assert dataset_labels(ds) == [0, 0, 1, 1, 2, 2, 5, 5]


def test_view_remaps_labels_to_its_class_list(tmp_path):
    fake = make_fake_dataset("CIFAR100", tmp_path, classes=[3, 7, 11, 50], per_class=2)
    name = register_view(DatasetView("CIFAR100", (50, 3), templates=("a bad photo of a {c}.",)))
    spec = get_dataset(name)
    names = load_classnames("CIFAR100")
    assert spec.classnames == (names[50], names[3])
    assert spec.prompts() == [f"a bad photo of a {names[50]}.", f"a bad photo of a {names[3]}."]
    for split in ("train", "test"):
        ds = build_dataset(name, tmp_path, split)
        expected = [{50: 0, 3: 1}[y] for y in fake.labels[split] if y in (50, 3)]
        assert dataset_labels(ds) == expected and [ds[i][1] for i in range(len(ds))] == expected
    assert register_view(DatasetView("CIFAR100", (50, 3), templates=("a bad photo of a {c}.",))) == name
    assert register_view(DatasetView("CIFAR100", (3, 50))) != name


# --- the runner on a fake CIFAR100 ----------------------------------------------------------


def _cil_config(root: Path, name: str = "cil_fake") -> Path:
    path = root / f"{name}.yaml"
    path.write_text(f"""benchmark:
  name: {name}
  classes: {{dataset: CIFAR100, order: CIFAR100, initial: 40, increment: 30, template: "a bad photo of a {{c}}."}}
model:
  clip: zscl-synth-tiny
  pretrained: synthetic
  lr: 1.0e-5
  warmup_steps: 1
data:
  data_root: {root}
  batch_size: 16
  eval_batch_size: 32
  num_workers: 0
  cache_dir: {root / 'cache'}
trainer:
  accelerator: cpu
  log_every_n_steps: 1
""")
    return path


def _run(argv: list[str]):
    from zscl.runner.build import build_runner

    runner = build_runner(argv)
    return runner, runner.run()


@pytest.fixture(scope="module")
def cil_run(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cil")
    fake = make_fake_dataset("CIFAR100", root, classes=range(100), per_class=1)
    runner, res = _run(["--config", str(_cil_config(root)), "--config", "method/finetune", "--out", str(root / "out"),
                        "--progress", "none"])
    return root, fake, runner, res


@pytest.mark.slow
def test_cil_seen_class_evaluation_matches_a_hand_built_expectation(cil_run):
    root, fake, runner, res = cil_run
    names = load_classnames("CIFAR100")
    ends = [40, 70, 100]
    assert res["setting"] == "cil" and res["step_classes"] == [CIFAR100_ORDER[:40], CIFAR100_ORDER[40:70],
                                                               CIFAR100_ORDER[70:]]
    for t, end in enumerate(ends):
        seen = CIFAR100_ORDER[:end]
        assert res["seen_classes"][t] == seen
        # the classifier: exactly the seen classes' names, in order, with the CIL prompt only
        spec = get_dataset(runner.setting.seen_views[t])
        assert spec.classnames == tuple(names[c] for c in seen) and spec.templates == ("a bad photo of a {c}.",)
        # the test set: exactly the seen classes' images (one per class in this fake)
        assert res["n_test"][t] == sum(1 for y in fake.labels["test"] if y in seen) == end
        assert len(res["per_class_accuracy"][t]) == end
        assert res["accuracy"][t] == pytest.approx(sum(res["per_class_accuracy"][t]) / end)
        # training: the step's own classes only, labels = position within the step
        step = res["step_classes"][t]
        train = build_dataset(runner.setting.step_views[t], root, "train")
        assert dataset_labels(train) == [step.index(y) for y in fake.labels["train"] if y in step]
    assert res["metrics"]["avg"] == pytest.approx(sum(res["accuracy"]) / 3)
    assert res["metrics"]["last"] == res["accuracy"][2]
    assert len(res["zero_shot"]) == 3 and res["metrics"]["zero_shot_avg"] == pytest.approx(sum(res["zero_shot"]) / 3)


@pytest.mark.slow
def test_cil_step_runs_len_loader_plus_one_iterations_as_the_reference(cil_run):
    """The reference loops len(loader) + 1 times per step: ceil(images / batch) + 1. Steps of 40, 30 and 30
    classes with one image each, batch 16: 3 + 1, 2 + 1, 2 + 1. A step shorter than the warm-up keeps its last
    iteration a real update: CIFAR100 in 50 steps (1000 images, batch 64) runs 17, the 17th at 17/30 of the lr."""
    from zscl.methods.losses import cosine_warmup_factor

    _, _, runner, _ = cil_run
    assert [t["steps"] for t in runner.cfg.benchmark.tasks] == [4, 3, 3]
    assert cosine_warmup_factor(16, 17, 30) == 17 / 30


@pytest.mark.slow
def test_cil_accuracy_recomputed_by_hand_from_the_export(cil_run):
    """Step 2's accuracy again, by a second path: the base test set filtered here, labels mapped
    here, the zero-shot classifier built from the names here (no view, no cache, no runner)."""
    from zscl.evaluation.zeroshot import build_classifier
    from zscl.models import load_clip, load_weights

    root, fake, runner, res = cil_run
    bundle = load_clip("zscl-synth-tiny", "synthetic")
    load_weights(bundle.model, str(root / "out" / "checkpoints" / "01-CIFAR100-step2.safetensors"), arch=bundle.name)
    model = bundle.model.eval()
    seen = CIFAR100_ORDER[:70]
    names = load_classnames("CIFAR100")
    w = build_classifier(model, bundle.tokenizer, [names[c] for c in seen], ["a bad photo of a {c}."])
    base = build_dataset("CIFAR100", root, "test", bundle.test_transform)
    per_class, predicted = {}, set()
    with torch.no_grad():
        for image, y in base:
            if y in seen:
                feat = torch.nn.functional.normalize(model.encode_image(image[None]).float(), dim=-1)
                guess = int((feat @ w).argmax())
                per_class[y] = 100.0 * (guess == seen.index(y))  # one test image per class
                predicted.add(guess)
    assert len(per_class) == 70
    assert len(predicted) >= 5  # not a constant predictor, under which a label permutation would go unseen
    assert res["per_class_accuracy"][1] == [per_class[c] for c in seen]  # aligned with seen_classes
    assert res["accuracy"][1] == pytest.approx(sum(per_class.values()) / 70)


def test_cil_metrics_by_hand_on_three_steps(tmp_path):
    from zscl.evaluation.incremental import IncrementalCurve, summarize_cil

    s = summarize_cil(IncrementalCurve([90.0, 75.0, 60.0], [10, 20, 30], zero_shot=[80.0, 70.0, 66.0]))
    assert s["avg"] == pytest.approx(75.0) and s["last"] == 60.0 and s["steps"] == 3
    assert s["zero_shot_avg"] == pytest.approx(72.0) and s["zero_shot_last"] == 66.0
    res = {"setting": "cil", "accuracy": [90.0, 75.0, 60.0], "seen_classes": [[0], [0, 1], [0, 1, 2]],
           "step_classes": [[0], [1], [2]], "benchmark": "b", "method": "m"}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(res))
    out = subprocess.run([sys.executable, "-m", "zscl", "metrics", str(path), "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["avg"] == pytest.approx(75.0) and json.loads(out.stdout)["last"] == 60.0


def test_compare_refuses_mixing_mtil_and_cil_and_shows_the_paper(tmp_path):
    from zscl.evaluation.compare import CompareError, compare

    cil = {"setting": "cil", "benchmark": "cil_cifar100_10", "method": "zscl", "accuracy": [90.0, 80.0],
           "seen_classes": [[0], [0, 1]], "step_classes": [[0], [1]]}
    mtil = {"benchmark": "cil_cifar100_10", "method": "finetune", "datasets": ["A"], "accuracy": [[50.0]]}
    (tmp_path / "c.json").write_text(json.dumps(cil))
    (tmp_path / "m.json").write_text(json.dumps(mtil))
    with pytest.raises(CompareError, match=r"cannot compare runs of different settings \(cil, mtil\)"):
        compare([str(tmp_path / "c.json"), str(tmp_path / "m.json")])
    with pytest.raises(CompareError, match="is a MTIL table but the runs are CIL"):
        compare([str(tmp_path / "c.json")], published="mtil_order1")
    _, table, tables = compare([str(tmp_path / "c.json")])
    header, row = tables[0].header, tables[0].rows[0]
    assert header[:3] == ["method", "Avg", "Last"] and row[:3] == ["zscl", 85.0, 80.0]
    assert row[3] == "ZSCL" and row[4:6] == [82.15, 73.65]
    assert row[6] == pytest.approx(85.0 - 82.15) and row[7] == pytest.approx(80.0 - 73.65)
    # unknown published numbers stay unknown: no Avg for 20 steps, no Δ either
    _, _, tables = compare([str(tmp_path / "c.json")], published="cil_cifar100_20")
    assert tables[0].rows[0][4] is None and tables[0].rows[0][6] is None and tables[0].rows[0][5] == 69.58
    (tmp_path / "i.json").write_text(json.dumps({**cil, "accuracy": [90.0]}))
    with pytest.raises(CompareError, match="incomplete"):
        compare([str(tmp_path / "i.json")])


def test_published_cil_tables_hold_no_zeros():
    from zscl.evaluation.compare import load_published, published_names

    cil = [n for n in published_names() if n.startswith("cil_")]
    assert len(cil) == 6
    for name in cil:
        table = load_published(name)
        assert table["setting"] == "cil"
        values = [v for e in table["results"] for v in e["published"].values()]
        assert all(v is None or 0 < v <= 100 for v in values)


def test_benchmark_method_overrides_apply_after_the_method_and_before_later_keys():
    from zscl.cli.sequence import build_parser
    from zscl.runner.configs import resolve_config_args, with_method_overrides

    def parse(*extra: str):
        argv = resolve_config_args(["--config", "benchmark/cil_cifar100_10", "--config", "method/zscl", *extra])
        return build_parser().parse_args(with_method_overrides(argv))

    cfg = parse()
    assert cfg.model.distill.image == 5.0 and cfg.model.distill.text == 5.0
    assert cfg.model.weight_constraint == 0.0 and cfg.model.averaging == [{"name": "we", "every": 10}]
    assert cfg.model.lr == 7.1e-6 and cfg.model.warmup_steps == 30 and cfg.model.label_smoothing == 0.2
    assert parse("--model.distill.image", "2.0").model.distill.image == 2.0  # a later key still wins
    mtil = build_parser().parse_args(with_method_overrides(resolve_config_args(
        ["--config", "benchmark/mtil_order1", "--config", "method/zscl"])))
    assert mtil.model.distill.image == 1.0 and mtil.model.averaging == [{"name": "we", "every": 100}]


def test_demo_plans_for_the_other_settings_and_the_cil_report(tmp_path):
    from zscl.synthetic.demo import load_plan, plan_tasks
    from zscl.synthetic.report import write_cil_report

    cil, fewshot = load_plan("cil"), load_plan("fewshot")
    assert cil["benchmark"] == "benchmark/synthetic_cil.yaml" and [len(s) for s in plan_tasks(cil)] == [6, 4, 4, 4, 4]
    assert cil["scale"] == {}  # the CIL benchmark's method_overrides carry its settings
    assert fewshot["scale"]["averaging_every"] == 10 and len(plan_tasks(fewshot)) == 5
    steps = [[0, 1], [2], [3]]
    results = {n: {"setting": "cil", "benchmark": "synthetic_cil", "dataset": "SynthLetter", "step_classes": steps,
                   "accuracy": acc, "seen_classes": [[0, 1], [0, 1, 2], [0, 1, 2, 3]], "zero_shot": [80.0, 60.0, 40.0]}
               for n, acc in (("finetune", [90.0, 60.0, 30.0]), ("zscl", [90.0, 75.0, 66.0]))}
    from zscl.settings import SETTINGS

    rules = {"ft_forgets": 0.0, "zscl_above_ft": 0.0}  # 40 - 30 = 10; 77 - 60 = 17 and 66 - 30 = 36
    summary = write_cil_report(cil, ["finetune", "zscl"], results, tmp_path, 1.0, quick=True,
                               setting=SETTINGS.get("cil"), rules=rules)
    assert [(c["value"], c["passed"]) for c in summary["acceptance"]] == [(10.0, True), (17.0, True), (36.0, True)]
    assert summary["methods"]["zscl"] == {"avg": pytest.approx(77.0), "last": 66.0}
    assert summary["methods"]["finetune"] == {"avg": pytest.approx(60.0), "last": 30.0}
    report = (tmp_path / "report.md").read_text()
    assert "| zscl | 77.0 | 66.0 | ZSCL | 82.2 | 73.7 |" in report and "| ZSCL | 90.0 | 75.0 | 66.0 |" in report
    assert "| zero-shot | 60.0 | 40.0 | – | – | – |" in report and summary["zero_shot"] == {"avg": 60.0, "last": 40.0}
    assert (tmp_path / "plots" / "accuracy_per_step.png").stat().st_size > 0


@pytest.mark.slow
def test_moe_adapters_in_cil_records_per_class_accuracies(tmp_path):
    """The method contract counts per class for every method: MoE-Adapters' routed evaluation too."""
    torch.set_num_threads(1)
    fake = make_fake_dataset("CIFAR100", tmp_path, classes=range(100), per_class=1)
    _, res = _run(["--config", str(_cil_config(tmp_path)), "--config", "method/moe_adapters", "--model.moe.num_experts",
                   "2", "--model.moe.freeze_top", "1", "--out", str(tmp_path / "out"), "--progress", "none"])
    for t, end in enumerate([40, 70, 100]):
        per_class = res["per_class_accuracy"][t]
        assert per_class is not None and len(per_class) == end
        # one test image per class in this fake: every class is 0 or 100, and their mean is the accuracy
        seen = set(CIFAR100_ORDER[:end])
        assert set(per_class) <= {0.0, 100.0} and res["n_test"][t] == sum(1 for y in fake.labels["test"] if y in seen)
        assert res["accuracy"][t] == pytest.approx(sum(per_class) / end)


def _resolved(*argv: str) -> dict:
    """The configuration a `zscl sequence` run records in results.json ("config"), without running it."""
    from zscl.runner.build import parse_run

    parser, cfg = parse_run([*argv, "--out", "unused"])  # the model schema of the method's model_class
    return json.loads(parser.dump(cfg, format="json", skip_none=False))


@pytest.mark.parametrize("bench, batch", [("cil_cifar100_10", 128), ("cil_cifar100_20", 128), ("cil_cifar100_50", 64),
                                          ("cil_tinyimagenet_5", 64), ("cil_tinyimagenet_10", 64),
                                          ("cil_tinyimagenet_20", 64)])
def test_moe_adapters_on_cil_resolves_to_the_reference_cil_recipe(bench, batch):
    """MoE-Adapters4CL's cil/ set-up, written out here: 2 experts, top-2, one shared router, no activate-freeze,
    no DDAS, lr 1e-3, label smoothing 0, batch 128 (CIFAR100, 10 and 20 steps) or 64."""
    from zscl.evaluation.compare import load_published, published_row, recipe_mismatches

    cfg = _resolved("--config", f"benchmark/{bench}", "--config", "method/moe_adapters")
    model = cfg["model"]
    assert (model["lr"], model["label_smoothing"], cfg["data"]["batch_size"]) == (1e-3, 0.0, batch)
    moe = model["moe"]
    assert (moe["num_experts"], moe["top_k"], moe["freeze_top"], moe["shared_router"]) == (2, 2, 0, True)
    assert model["ddas"]["enabled"] is False and moe["eval_gate_noise"] is True
    entry = published_row(load_published(bench), "moe_adapters")
    assert entry is not None and recipe_mismatches(entry, cfg) == []
    later = _resolved("--config", f"benchmark/{bench}", "--config", "method/moe_adapters", "--model.lr", "7.1e-6")
    assert recipe_mismatches(entry, later) == ["model.lr = 7.1e-06 (published: 0.001)"], "a later key still wins"


def test_compare_pairs_the_published_moe_cil_row_only_with_runs_of_its_recipe(tmp_path):
    from zscl.evaluation.compare import compare

    recipe = _resolved("--config", "benchmark/cil_cifar100_10", "--config", "method/moe_adapters")
    mtil_recipe = _resolved("--config", "benchmark/cil_cifar100_10", "--config", "method/moe_adapters",
                            "--model.moe.num_experts", "22", "--model.moe.shared_router", "false")
    base = {"setting": "cil", "benchmark": "cil_cifar100_10", "method": "moe_adapters", "accuracy": [90.0, 80.0],
            "seen_classes": [[0], [0, 1]], "step_classes": [[0], [1]]}
    for name, config in (("good", recipe), ("bad", mtil_recipe), ("none", None)):
        (tmp_path / f"{name}.json").write_text(json.dumps({**base, "config": config}))
    _, _, tables = compare([str(tmp_path / "good.json")])
    assert tables[0].rows[0][3:6] == ["MoE-Adapters", 85.21, 77.52] and not tables[0].notes
    for name in ("bad", "none"):
        _, _, tables = compare([str(tmp_path / f"{name}.json")])
        assert tables[0].rows[0][3:] == [None] * 5, f"{name}: a run of another recipe must stand alone"
        assert "not paired with the published MoE-Adapters row" in tables[0].render("md")
    assert "model.moe.num_experts = 22 (published: 2)" in compare([str(tmp_path / "bad.json")])[2][0].notes[0]
