"""Class-incremental learning (CIL; ZSCL's ``cil/``, iCaRL's protocol) as a setting.

The dataset's classes are split into steps along a fixed class order (``benchmark.classes``,
:class:`~zscl.runner.configs.ClassSteps`). Step ``t`` trains on the training images of its own
classes, with the cross-entropy over *its* class prompts only (a view with the step's classes), for
``epochs`` passes; then the exported model is evaluated on the test images of every class seen so
far, among the prompts of all of them (a view with the classes of steps ``0..t``). results.json holds,
per step, the seen classes, their accuracy and per-class accuracies, and Avg / Last
(:mod:`zscl.evaluation.incremental`), and the initial model's accuracy on every step's seen classes
(``zero_shot``, the paper's Continual-CLIP row; ``benchmark.classes.zero_shot: false`` skips it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

from zscl.settings.base import SETTINGS, Setting, setting_of

if TYPE_CHECKING:
    from zscl.settings.acceptance import Checks, Scores


@dataclass
class ClassSteps:
    """A class-incremental split of one dataset (iCaRL's protocol, as ZSCL's ``cil/`` code runs it).

    Step 0 holds the first ``initial`` classes of ``order``, every later step the next
    ``increment``. ``order`` is a list of labels or the name of ``data/class_orders/<name>.json``.
    ``template`` replaces the dataset's prompts in training and evaluation. ``zero_shot`` adds the
    initial model's accuracy on every step's seen classes (the Continual-CLIP baseline). A step trains for
    ``epochs`` passes over its classes' training images: ``ceil(epochs * n / (batch_size * devices)) + 1``
    iterations (the reference's len(loader) + 1; one epoch, batch 64, one GPU).
    """

    dataset: str = "CIFAR100"
    order: Union[str, list[int]] = "CIFAR100"
    initial: int = 10
    increment: int = 10
    template: Optional[str] = None
    epochs: float = 1.0
    zero_shot: bool = True  # also evaluate the initial model after every step's class set (Continual-CLIP)


def class_steps(order: Sequence[int], initial: int, increment: int) -> list[list[int]]:
    """``order`` cut into a first step of ``initial`` classes and then steps of ``increment``."""
    if initial < 1 or increment < 1 or initial > len(order):
        raise ValueError(f"class steps need 1 <= initial <= {len(order)} and increment >= 1; "
                         f"got initial={initial}, increment={increment}")
    steps = [list(order[:initial])]
    steps += [list(order[i:i + increment]) for i in range(initial, len(order), increment)]
    return steps


def world_size(trainer_cfg: Any) -> int:
    """Devices x nodes when configured as numbers (``auto`` counts as one device)."""
    devices = getattr(trainer_cfg, "devices", 1)
    if isinstance(devices, (list, tuple)):
        n = len(devices)
    elif isinstance(devices, int) or (isinstance(devices, str) and devices.isdigit()):
        n = max(int(devices), 1)
    else:
        n = 1
    return n * max(int(getattr(trainer_cfg, "num_nodes", 1) or 1), 1)


@SETTINGS.register("cil")
class ClassIncremental(Setting):
    """CIL over one dataset (module docstring)."""

    name = "cil"
    result_kind = "curve"
    config_key = "classes"

    @classmethod
    def planned_tasks(cls, benchmark: dict[str, Any]) -> list[Any]:
        c = benchmark["classes"]
        return class_steps(list(c["order"]), c["initial"], c["increment"])

    @classmethod
    def datasets_read(cls, benchmark: dict[str, Any]) -> list[str]:
        return [benchmark["classes"]["dataset"]]

    def prepare(self, runner: Any) -> None:
        from zscl.datasets import build_dataset, dataset_labels, get_dataset
        from zscl.datasets.views import DatasetView, load_class_order, register_view

        cfg, spec_cfg = runner.cfg, self.options
        self.base = get_dataset(spec_cfg.dataset).name
        self.order = load_class_order(spec_cfg.order, get_dataset(self.base).num_classes)
        self.steps = class_steps(self.order, spec_cfg.initial, spec_cfg.increment)
        templates = (spec_cfg.template,) if spec_cfg.template else None
        self.seen = [self.order[:sum(len(s) for s in self.steps[:t + 1])] for t in range(len(self.steps))]
        self.step_views = [register_view(DatasetView(self.base, tuple(s), templates=templates)) for s in self.steps]
        self.seen_views = [register_view(DatasetView(self.base, tuple(s), templates=templates)) for s in self.seen]
        labels = dataset_labels(build_dataset(self.base, cfg.data.data_root, "train"))
        per_class = {c: 0 for c in self.order}
        for y in labels:
            per_class[y] = per_class.get(y, 0) + 1
        batch = cfg.data.batch_size * world_size(cfg.trainer)
        # The reference's step loop runs len(loader) + 1 iterations, the last a real update.
        iters = [math.ceil(spec_cfg.epochs * sum(per_class[c] for c in s) / batch) + 1 for s in self.steps]
        cfg.benchmark.tasks = [{"dataset": v, "steps": n} for v, n in zip(self.step_views, iters)]
        cfg.benchmark.eval_datasets = None

    def results_fields(self, runner: Any) -> dict[str, Any]:
        return {"setting": "cil", "dataset": self.base, "class_order": self.order, "step_classes": self.steps,
                "accuracy": [], "top5": [], "seen_classes": [], "per_class_accuracy": [], "n_test": [],
                "zero_shot": None}

    def check_results(self, runner: Any, old: dict[str, Any]) -> None:
        if setting_of(old) != "cil" or old.get("step_classes") != self.steps or old.get("dataset") != self.base:
            raise ValueError(f"{runner.results_path()} belongs to another run (not this class-incremental benchmark); "
                             "use a new --out")

    def slug(self, runner: Any, k: int) -> str:
        return f"{k:02d}-{self.base}-step{k + 1}"

    def task_cfg(self, runner: Any, k: int, cfg: Any, eval_only: bool) -> None:
        cfg["data.eval_datasets"] = [self.seen_views[k]]

    def zero_shot(self, runner: Any) -> None:
        """The initial model on every step's seen classes, in one validation pass (Continual-CLIP)."""
        from zscl.utils.ranks import say

        if runner.results["zero_shot"] is not None or not self.options.zero_shot:
            return
        say("zero-shot: the initial model on the classes seen after each step")
        cfg = runner.task_cfg(0, runner.cfg.model.init_from, eval_only=True)
        cfg["data.eval_datasets"] = list(self.seen_views)
        model, dm, kw = runner.instantiate(cfg)
        runner.trainer(kw, None, "zero-shot").validate(model, datamodule=dm, verbose=False)
        runner.results["zero_shot"] = [model.eval_results[n].top1 for n in self.seen_views]
        runner.results["zero_shot_top5"] = [model.eval_results[n].top5 for n in self.seen_views]
        runner.save()
        say("  zero-shot per step: " + "  ".join(f"{a:.1f}" for a in runner.results["zero_shot"]))

    def evaluate(self, runner: Any, trainer: Any, module: Any, dm: Any) -> tuple[float, float]:
        """Accuracy on the seen classes; also records the seen classes and per-class accuracies."""
        trainer.validate(module, datamodule=dm, verbose=False)
        name = dm.eval_names[0]
        k = self.seen_views.index(name)
        acc = module.eval_results[name]
        per_class = module.eval_per_class[name]
        runner.results["seen_classes"].append(list(self.seen[k]))
        runner.results["per_class_accuracy"].append([100.0 * c / n if n else None for c, n in per_class])
        runner.results["n_test"].append(acc.n)
        return acc.top1, acc.top5

    def row_text(self, runner: Any, label: str, row: Any) -> str:
        k = len(runner.results["accuracy"]) - 1
        return f"  {label:<24} {len(self.seen[k])} classes seen: {row:.2f}%"

    def finish(self, runner: Any) -> None:
        from zscl.evaluation.incremental import IncrementalCurve, format_cil_table
        from zscl.utils.ranks import say

        runner.results["metrics"] = self.summarize(runner.results)
        runner.save()
        say(format_cil_table(IncrementalCurve.from_results(runner.results), runner.results["metrics"]))

    @classmethod
    def summarize(cls, results: dict[str, Any]) -> dict[str, Any]:
        from zscl.evaluation.incremental import IncrementalCurve, summarize_cil

        return summarize_cil(IncrementalCurve.from_results(results))

    @classmethod
    def acceptance(cls, scores: "Scores", rules: dict[str, Any]) -> "Checks":
        """Class-incremental CIFAR100's published pattern (ZSCL's Table 3, MoE-Adapters' cil/ results), thresholds
        from ``rules``: room to learn (ZS Last <= ``zs_last_max``); fine-tuning forgets (its Last below
        zero-shot's by more than ``ft_forgets``); ZSCL's Avg and Last above fine-tuning's (by more than
        ``zscl_above_ft``) and at least zero-shot's (- ``zscl_keeps``); MoE-Adapters' Avg at least ZSCL's
        (- ``moe_reaches``), its Avg and Last above zero-shot's (by more than ``moe_keeps``)."""
        from zscl.settings.acceptance import Checks

        c = Checks(scores, rules)
        c.claim("room to learn: ZS Last <= max", [], lambda: scores.zero_shot["last"], rules.get("zs_last_max"),
                upper=True)
        c.gap("finetune forgets: ZS Last - finetune Last", "zero_shot", "finetune", "last", "ft_forgets", strict=True)
        for metric in ("avg", "last"):
            c.gap(f"ZSCL above finetune: {metric.title()} - finetune's", "zscl", "finetune", metric, "zscl_above_ft",
                  strict=True)
            c.gap(f"ZSCL keeps zero-shot: {metric.title()} - ZS {metric.title()}", "zscl", "zero_shot", metric,
                  "zscl_keeps", sign=-1.0)
        c.gap("MoE-Adapters reaches ZSCL: Avg - ZSCL Avg", "moe_adapters", "zscl", "avg", "moe_reaches", sign=-1.0)
        for metric in ("avg", "last"):
            c.gap(f"MoE-Adapters above zero-shot: {metric.title()} - ZS {metric.title()}", "moe_adapters", "zero_shot",
                  metric, "moe_keeps", strict=True)
        return c

