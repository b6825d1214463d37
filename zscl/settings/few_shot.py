"""Few-shot MTIL as a setting: every task trains on ``shots`` images per class (``benchmark.few_shot``).

Task ``k`` trains on a view holding ``shots`` images per class of its training split
(:func:`~zscl.datasets.views.few_shot_indices`, seeded by ``benchmark.few_shot.seed``), and is
evaluated on the full test sets as in MTIL. The chosen file indices are written to
``out/fewshot/NN-<Dataset>.json`` the first time and read back afterwards, so a resumed or
repeated run trains on the same images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zscl.settings.base import SETTINGS, Setting
from zscl.utils.io import write_json_atomic

if TYPE_CHECKING:
    from zscl.settings.acceptance import Checks, Scores


@dataclass
class FewShot:
    """Train every task on ``shots`` images per class (all of a class's images if it has fewer),
    drawn with ``seed``; the same images for every method, machine and rank."""

    shots: int = 5
    seed: int = 42


@SETTINGS.register("few_shot")
class FewShotMTIL(Setting):
    """MTIL with ``benchmark.few_shot.shots`` training images per class (module docstring)."""

    name = "few_shot"
    config_key = "few_shot"

    def draw(self) -> dict[str, int]:
        return {"shots": self.options.shots, "seed": self.options.seed}

    def subset_path(self, runner: Any, k: int) -> Path:
        return runner.out / "fewshot" / f"{runner.slug(k)}.json"

    def subset_view(self, runner: Any, k: int) -> str:
        """The view of task k's few-shot images (drawn once, then read back from the run)."""
        from zscl.datasets import build_dataset, dataset_labels
        from zscl.datasets.views import DatasetView, few_shot_indices, register_view
        from zscl.utils.ranks import is_rank_zero, say

        fs, name, path = self.options, runner.task_names[k], self.subset_path(runner, k)
        if path.exists():
            with open(path, encoding="utf-8") as f:
                stored = json.load(f)
            if stored["shots"] != fs.shots or stored["seed"] != fs.seed or stored["dataset"] != name:
                raise ValueError(f"{path} holds another few-shot draw ({stored['shots']} shots, seed {stored['seed']}); "
                                 "use a new --out")
            indices = stored["indices"]
        else:
            labels = dataset_labels(build_dataset(name, runner.cfg.data.data_root, "train"))
            indices = few_shot_indices(labels, fs.shots, fs.seed)
            # Every rank draws the same indices (a pure function), so no rank waits for rank 0's file;
            # the write is atomic, so a rank that finds the file reads it whole.
            if is_rank_zero():
                write_json_atomic(path, {"dataset": name, "shots": fs.shots, "seed": fs.seed, "split": "train",
                                         "indices": indices})
            say(f"  few-shot: {len(indices)} of {len(labels)} {name} training images ({fs.shots} per class)")
        return register_view(DatasetView(name, train_indices=tuple(indices)))

    def results_fields(self, runner: Any) -> dict[str, Any]:
        return {**super().results_fields(runner), str(self.config_key): self.draw()}

    def check_results(self, runner: Any, old: dict[str, Any]) -> None:
        super().check_results(runner, old)
        if old.get(str(self.config_key)) != self.draw():
            raise ValueError(f"{runner.results_path()} is a run with another few-shot draw "
                             f"({old.get(str(self.config_key))}); use a new --out")

    def train_dataset(self, runner: Any, k: int) -> str:
        return self.subset_view(runner, k)  # iCaRL herds its exemplars among the few-shot images only

    def task_cfg(self, runner: Any, k: int, cfg: Any, eval_only: bool) -> None:
        super().task_cfg(runner, k, cfg, eval_only)
        if not eval_only:
            for j in range(k):  # earlier tasks' views, named in an exemplar memory replayed now
                self.subset_view(runner, j)
            cfg["data.dataset"] = self.subset_view(runner, k)

    @classmethod
    def acceptance(cls, scores: "Scores", rules: dict[str, Any]) -> "Checks":
        """5-shot MTIL's published pattern (the CoDyRA page's table), thresholds from ``rules``: room to learn;
        fine-tuning forgets (ZS Transfer - Transfer >= ``ft_forgets``); ZSCL keeps Transfer within ``zscl_keeps``
        of zero-shot's and ends above zero-shot's Last (by more than ``zscl_learns``); ``best_avg.methods`` have
        the best Avg of ``best_avg.of``; LwF ends below fine-tuning's Last (by more than ``lwf_below_ft``) and below
        zero-shot's (``lwf_below_zs``), and ``lowest_last.methods`` have the lowest Last of ``lowest_last.of``."""
        from zscl.settings.acceptance import Checks

        c = Checks(scores, rules)
        c.room()
        c.gap("finetune forgets: ZS Transfer - Transfer", "zero_shot", "finetune", "transfer", "ft_forgets")
        c.gap("ZSCL keeps: Transfer - ZS Transfer", "zscl", "zero_shot", "transfer", "zscl_keeps", sign=-1.0)
        c.gap("ZSCL learns: Last - ZS Last", "zscl", "zero_shot", "last", "zscl_learns", strict=True)
        c.best("best_avg", "avg")
        c.gap("LwF ends below finetune: finetune Last - LwF Last", "finetune", "lwf", "last", "lwf_below_ft",
              strict=True)
        c.gap("LwF ends below zero-shot: ZS Last - LwF Last", "zero_shot", "lwf", "last", "lwf_below_zs", strict=True)
        c.best("lowest_last", "last", lowest=True)
        c.per_method()
        return c

