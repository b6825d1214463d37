"""Class-incremental learning (CIL) and few-shot MTIL on top of :class:`SequenceRunner`.

Both are the MTIL runner over :mod:`dataset views <zscl.datasets.views>`; nothing else changes
(training, resume, export, averaging, iCaRL's memory).

**CIL** (``benchmark.classes``; ZSCL's ``cil/``): the dataset's classes are split into steps along
a fixed class order. Step ``t`` trains on the training images of its own classes, with the
cross-entropy over *its* class prompts only (a view with the step's classes), for one epoch by
default; then the exported model is evaluated on the test images of every class seen so far,
among the prompts of all of them (a view with classes of steps ``0..t``). results.json holds,
per step, the seen classes, their accuracy and per-class accuracies, and Avg / Last
(:mod:`zscl.evaluation.incremental`), and the initial model's accuracy on every step's seen classes
(``zero_shot``, the paper's Continual-CLIP row; ``benchmark.classes.zero_shot: false`` skips it).

**Few-shot** (``benchmark.few_shot``): task ``k`` trains on a view holding ``shots`` images per
class of its training split (:func:`few_shot_indices`), evaluated on the full test sets. The
chosen file indices are written to ``out/fewshot/NN-<Dataset>.json`` the first time and read
back afterwards, so a resumed or repeated run trains on the same images.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from zscl.runner.sequence import SequenceRunner, is_rank_zero, say
from zscl.utils.io import write_json_atomic


def class_steps(order: Sequence[int], initial: int, increment: int) -> list[list[int]]:
    """``order`` cut into a first step of ``initial`` classes and then steps of ``increment``."""
    if initial < 1 or increment < 1 or initial > len(order):
        raise ValueError(f"class steps need 1 <= initial <= {len(order)} and increment >= 1; "
                         f"got initial={initial}, increment={increment}")
    steps = [list(order[:initial])]
    steps += [list(order[i:i + increment]) for i in range(initial, len(order), increment)]
    return steps


def _world_size(trainer_cfg: Any) -> int:
    """Devices x nodes when configured as numbers (``auto`` counts as one device)."""
    devices = getattr(trainer_cfg, "devices", 1)
    if isinstance(devices, (list, tuple)):
        n = len(devices)
    elif isinstance(devices, int) or (isinstance(devices, str) and devices.isdigit()):
        n = max(int(devices), 1)
    else:
        n = 1
    return n * max(int(getattr(trainer_cfg, "num_nodes", 1) or 1), 1)


class ClassIncrementalRunner(SequenceRunner):
    """A CIL benchmark (module docstring); ``cfg.benchmark.classes`` says how classes are split."""

    def __init__(self, parser, cfg) -> None:
        from zscl.datasets import build_dataset, dataset_labels, get_dataset, load_custom_datasets
        from zscl.datasets.views import DatasetView, load_class_order, register_view

        if cfg.data.custom_datasets:
            load_custom_datasets(cfg.data.custom_datasets, data_root=cfg.data.data_root)
        spec_cfg = cfg.benchmark.classes
        base = get_dataset(spec_cfg.dataset)
        self.base = base.name
        self.order = load_class_order(spec_cfg.order, base.num_classes)
        self.steps = class_steps(self.order, spec_cfg.initial, spec_cfg.increment)
        templates = (spec_cfg.template,) if spec_cfg.template else None
        seen = [self.order[:sum(len(s) for s in self.steps[:t + 1])] for t in range(len(self.steps))]
        self.step_views = [register_view(DatasetView(self.base, tuple(s), templates=templates)) for s in self.steps]
        self.seen_views = [register_view(DatasetView(self.base, tuple(s), templates=templates)) for s in seen]
        self.seen = seen
        labels = dataset_labels(build_dataset(self.base, cfg.data.data_root, "train"))
        per_class = {c: 0 for c in self.order}
        for y in labels:
            per_class[y] = per_class.get(y, 0) + 1
        batch = cfg.data.batch_size * _world_size(cfg.trainer)
        iters = [math.ceil(spec_cfg.epochs * sum(per_class[c] for c in s) / batch) + 1 for s in self.steps]
        cfg.benchmark.tasks = [{"dataset": v, "steps": n} for v, n in zip(self.step_views, iters)]
        cfg.benchmark.eval_datasets = None
        super().__init__(parser, cfg)

    def _load_results(self) -> dict[str, Any]:
        path = self._results_path()
        if path.exists():
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
            if old.get("setting") != "cil" or old.get("step_classes") != self.steps or old.get("dataset") != self.base:
                raise ValueError(f"{path} belongs to another run (not this class-incremental benchmark); use a new --out")
            return old
        return {"setting": "cil", "benchmark": self.cfg.benchmark.name, "method": self.method_label(),
                "dataset": self.base, "class_order": self.order, "step_classes": self.steps, "tasks": self.task_names,
                "accuracy": [], "top5": [], "seen_classes": [], "per_class_accuracy": [], "n_test": [],
                "zero_shot": None, "timing": []}

    def _slug(self, k: int) -> str:
        return f"{k:02d}-{self.base}-step{k + 1}"

    def _task_cfg(self, k: int, init_from: Optional[str], eval_only: bool = False):
        cfg = super()._task_cfg(k, init_from, eval_only)
        cfg["data.eval_datasets"] = [self.seen_views[k]]
        return cfg

    def _zero_shot(self) -> None:
        """The initial model on every step's seen classes, in one validation pass (Continual-CLIP)."""
        if not self.cfg.benchmark.classes.zero_shot:
            return
        say("zero-shot: the initial model on the classes seen after each step")
        cfg = self._task_cfg(0, self.cfg.model.init_from, eval_only=True)
        cfg["data.eval_datasets"] = list(self.seen_views)
        model, dm, kw = self._instantiate(cfg)
        self._trainer(kw, None, "zero-shot").validate(model, datamodule=dm, verbose=False)
        self.results["zero_shot"] = [model.eval_results[n].top1 for n in self.seen_views]
        self.results["zero_shot_top5"] = [model.eval_results[n].top5 for n in self.seen_views]
        self._save()
        say("  zero-shot per step: " + "  ".join(f"{a:.1f}" for a in self.results["zero_shot"]))

    def _evaluate(self, trainer, module, dm) -> tuple[float, float]:
        """Accuracy on the seen classes; also records the seen classes and per-class accuracies."""
        trainer.validate(module, datamodule=dm, verbose=False)
        name = dm.eval_names[0]
        k = self.seen_views.index(name)
        acc = module.eval_results[name]
        per_class = module.eval_per_class.get(name)  # None: the method's module does not count per class
        self.results["seen_classes"].append(list(self.seen[k]))
        self.results["per_class_accuracy"].append(None if per_class is None else
                                                  [100.0 * c / n if n else None for c, n in per_class])
        self.results["n_test"].append(acc.n)
        return acc.top1, acc.top5

    def _row_text(self, label: str, row: Any) -> str:
        k = len(self.results["accuracy"]) - 1
        return f"  {label:<24} {len(self.seen[k])} classes seen: {row:.2f}%"

    def _finish(self) -> None:
        from zscl.evaluation.incremental import IncrementalCurve, format_cil_table, summarize_cil

        curve = IncrementalCurve.from_results(self.results)
        self.results["metrics"] = summarize_cil(curve)
        self._save()
        say(format_cil_table(curve, self.results["metrics"]))
        say(f"wrote {self._results_path()}")


class FewShotRunner(SequenceRunner):
    """MTIL with ``cfg.benchmark.few_shot.shots`` training images per class (module docstring)."""

    def _subset_path(self, k: int) -> Path:
        return self.out / "fewshot" / f"{self._slug(k)}.json"

    def _subset_view(self, k: int) -> str:
        """The view of task k's few-shot images (drawn once, then read back from the run)."""
        from zscl.datasets import build_dataset, dataset_labels
        from zscl.datasets.views import DatasetView, few_shot_indices, register_view

        fs, name, path = self.cfg.benchmark.few_shot, self.task_names[k], self._subset_path(k)
        if path.exists():
            with open(path, encoding="utf-8") as f:
                stored = json.load(f)
            if stored["shots"] != fs.shots or stored["seed"] != fs.seed or stored["dataset"] != name:
                raise ValueError(f"{path} holds another few-shot draw ({stored['shots']} shots, seed {stored['seed']}); "
                                 "use a new --out")
            indices = stored["indices"]
        else:
            labels = dataset_labels(build_dataset(name, self.cfg.data.data_root, "train"))
            indices = few_shot_indices(labels, fs.shots, fs.seed)
            # Every rank draws the same indices (a pure function), so no rank waits for rank 0's file;
            # the write is atomic, so a rank that finds the file reads it whole.
            if is_rank_zero():
                write_json_atomic(path, {"dataset": name, "shots": fs.shots, "seed": fs.seed, "split": "train",
                                         "indices": indices})
            say(f"  few-shot: {len(indices)} of {len(labels)} {name} training images ({fs.shots} per class)")
        return register_view(DatasetView(name, train_indices=tuple(indices)))

    def _load_results(self) -> dict[str, Any]:
        res = super()._load_results()
        fs = {"shots": self.cfg.benchmark.few_shot.shots, "seed": self.cfg.benchmark.few_shot.seed}
        if res.setdefault("few_shot", fs) != fs:
            raise ValueError(f"{self._results_path()} is a run with another few-shot draw ({res['few_shot']}); use a new --out")
        return res

    def _train_dataset(self, k: int) -> str:
        return self._subset_view(k)  # iCaRL herds its exemplars among the few-shot images only

    def _task_cfg(self, k: int, init_from: Optional[str], eval_only: bool = False):
        cfg = super()._task_cfg(k, init_from, eval_only)
        if not eval_only:
            for j in range(k):  # earlier tasks' views, named in an exemplar memory replayed now
                self._subset_view(j)
            cfg["data.dataset"] = self._subset_view(k)
        return cfg


def make_runner(parser, cfg) -> SequenceRunner:
    """The runner for ``cfg.benchmark``: class-incremental, few-shot, or plain MTIL."""
    if cfg.benchmark.classes is not None and cfg.benchmark.few_shot is not None:
        raise ValueError("a benchmark is either class-incremental (benchmark.classes) or few-shot (benchmark.few_shot)")
    if cfg.benchmark.classes is not None:
        return ClassIncrementalRunner(parser, cfg)
    if cfg.benchmark.few_shot is not None:
        return FewShotRunner(parser, cfg)
    return SequenceRunner(parser, cfg)
