"""X-TAIL (cross-domain task-agnostic incremental learning; Xu et al., NeurIPS 2024, arXiv 2406.18868) as a setting.

MTIL without a domain id at test time. Training is few-shot MTIL's (``benchmark.xtail.shots`` images
per class, the same stratified seeded draw, :class:`~zscl.settings.few_shot.FewShotMTIL`; ``shots: null``
trains on every image). After every task, the test set of every domain ``d`` is classified among the
union of all evaluated domains' classes: a label-space view (:class:`~zscl.datasets.views.DatasetView`
``label_space``) whose labels are ``offset(d) + y`` with ``offset(d) = Σ_{e before d} C_e``, each
class prompted with its own domain's templates, and a class name found in two domains kept as two
labels (as the reference does). A method evaluates these views as it evaluates any dataset, so every
method runs unchanged. The row is stored per domain, so Transfer / Avg / Last are MTIL's formulas on
the task x domain matrix (Zheng et al. 2023; RAIL's ``primal_RAIL.py`` uses the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from zscl.settings.base import SETTINGS
from zscl.settings.few_shot import FewShotMTIL

if TYPE_CHECKING:
    from zscl.settings.acceptance import Checks, Scores


@dataclass
class XTail:
    """``shots`` training images per class (None: all of them), drawn with ``seed`` (few-shot MTIL's draw)."""

    shots: Optional[int] = 16
    seed: int = 42


@SETTINGS.register("xtail")
class XTAIL(FewShotMTIL):
    """X-TAIL (module docstring): few-shot or full-shot training, evaluation in the union label space."""

    name = "xtail"
    config_key = "xtail"

    def union_views(self, runner: Any) -> list[str]:
        """One label-space view per evaluated domain, all over the same union (the domains in sequence order)."""
        from zscl.datasets.views import DatasetView, register_view

        space = tuple(runner.eval_names)
        return [register_view(DatasetView(d, label_space=space)) for d in space]

    def evaluated(self, runner: Any) -> list[str]:
        return self.union_views(runner)

    def results_fields(self, runner: Any) -> dict[str, Any]:
        from zscl.datasets import get_dataset

        sizes = [get_dataset(n).num_classes for n in runner.eval_names]
        return {**super().results_fields(runner), "label_space": {"domains": list(runner.eval_names), "sizes": sizes,
                                                                  "classes": sum(sizes)}}

    def train_dataset(self, runner: Any, k: int) -> str:
        return runner.task_names[k] if self.options.shots is None else self.subset_view(runner, k)

    def task_cfg(self, runner: Any, k: int, cfg: Any, eval_only: bool) -> None:
        if self.options.shots is not None:
            super().task_cfg(runner, k, cfg, eval_only)
        cfg["data.eval_datasets"] = self.union_views(runner)

    @classmethod
    def acceptance(cls, scores: "Scores", rules: dict[str, Any]) -> "Checks":
        """X-TAIL's published pattern (RAIL's and LADA's tables), thresholds from ``rules``: RAIL keeps zero-shot
        Transfer (``keeps_zero_shot``) and learns (``learns``), ``best_last.methods`` have the best Last;
        fine-tuning forgets more than in the MTIL demo (``ft_forgets``); ZSCL's Avg lead over fine-tuning is
        below ``zscl_lead_max`` (the MTIL demo's) and its Avg edge over zero-shot below ``zscl_edge_max``
        (published: +10.1 on MTIL, +2.3 on X-TAIL); RAIL is ``faster.ratio`` x faster than ZSCL."""
        from zscl.settings.acceptance import Checks

        c = Checks(scores, rules)
        c.per_method()
        c.best("best_last", "last")
        c.gap("finetune forgets: ZS Transfer - Transfer", "zero_shot", "finetune", "transfer", "ft_forgets")
        c.gap("ZSCL's Avg lead over finetune (below the MTIL demo's)", "zscl", "finetune", "avg", "zscl_lead_max",
              upper=True, strict=True)
        c.gap("ZSCL's Avg edge over zero-shot (most of the MTIL demo's lost)", "zscl", "zero_shot", "avg",
              "zscl_edge_max", upper=True, strict=True)
        return c

