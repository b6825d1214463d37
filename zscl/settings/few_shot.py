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
from typing import Any

from zscl.settings.base import SETTINGS, Setting
from zscl.utils.io import write_json_atomic


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
