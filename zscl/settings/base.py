"""The setting contract and MTIL, the default setting (multi-domain task-incremental learning).

A :class:`Setting` is asked by the sequence runner (``runner`` below) at each point where protocols
differ, and by ``zscl metrics`` / ``zscl compare`` for the meaning of a results file:

* :meth:`Setting.prepare`: build the task list (a class-incremental setting generates its steps);
* :meth:`Setting.task_cfg`: the task's training data and evaluation datasets;
* :meth:`Setting.zero_shot`, :meth:`Setting.evaluate`: the initial model's row and each task's row;
* :meth:`Setting.results_fields` / :meth:`Setting.check_results`: the setting's own fields of
  ``results.json``, and the refusal to resume a run of another protocol;
* :meth:`Setting.finish` / :meth:`Setting.summarize`: its summary metrics;
* :attr:`Setting.result_kind`: ``"matrix"`` (a task x dataset accuracy matrix: Transfer / Avg / Last)
  or ``"curve"`` (one accuracy per step: Avg / Last); runs of different kinds are never compared.

MTIL (Zheng et al. 2023): after every task, every dataset of the sequence is evaluated among its own
class names; Transfer / Avg / Last from the matrix (:mod:`zscl.evaluation.metrics`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Optional

from zscl.plugins import load_plugins
from zscl.registry import Registry

if TYPE_CHECKING:
    from zscl.settings.acceptance import Checks, Scores


# The built-ins register on import of zscl.settings; plugins (zscl.plugins) on the first lookup.
SETTINGS: "Registry[type[Setting]]" = Registry("setting", loader=load_plugins)


def setting_of(results: dict[str, Any]) -> str:
    """The setting of a results file (``"setting"``; older MTIL and few-shot files have none)."""
    if results.get("setting"):
        return str(results["setting"])
    return "few_shot" if results.get("few_shot") else "mtil"


def result_kind(results: dict[str, Any]) -> str:
    """``"matrix"`` or ``"curve"``: the kind of a results file or published table (see :attr:`Setting.result_kind`)."""
    name = setting_of(results)
    return SETTINGS.get(name).result_kind if name in SETTINGS else "matrix"


def setting_class(benchmark: Any) -> "type[Setting]":
    """The setting of a benchmark (a parsed namespace or a plain ``benchmark:`` dict): ``setting``, else the
    one whose section is set, else MTIL."""
    get = benchmark.get if isinstance(benchmark, dict) else (lambda key: getattr(benchmark, key, None))
    if get("setting"):
        return SETTINGS.get(get("setting"))
    chosen = [cls for _, cls in SETTINGS.items() if cls.config_key and get(cls.config_key) is not None]
    if len(chosen) > 1:
        keys = " and ".join(f"benchmark.{c.config_key}" for c in chosen)
        raise ValueError(f"a benchmark has one setting, but {keys} are both set")
    return chosen[0] if chosen else SETTINGS.get("mtil")


def setting_for(benchmark: Any) -> "Setting":
    """The :class:`Setting` instance of a parsed benchmark config (see :func:`setting_class`)."""
    return setting_class(benchmark)(benchmark)


@SETTINGS.register("mtil")
class Setting:
    """A continual protocol; this base class is MTIL (module docstring)."""

    name: ClassVar[str] = "mtil"
    #: "matrix" (Transfer / Avg / Last of a task x dataset matrix) or "curve" (Avg / Last over steps)
    result_kind: ClassVar[str] = "matrix"
    #: the ``benchmark.<key>`` section holding this setting's options (its presence selects the setting)
    config_key: ClassVar[Optional[str]] = None

    def __init__(self, benchmark: Any) -> None:
        self.benchmark = benchmark

    @property
    def options(self) -> Any:
        return getattr(self.benchmark, self.config_key) if self.config_key else None

    # ----------------------------------------------------------------- a benchmark config as plain data
    @classmethod
    def planned_tasks(cls, benchmark: dict[str, Any]) -> list[Any]:
        """The tasks a benchmark section (a YAML ``benchmark:`` dict) will run, before any data is read."""
        return list(benchmark.get("tasks") or [])

    @classmethod
    def datasets_read(cls, benchmark: dict[str, Any]) -> list[str]:
        """The datasets a benchmark section reads (e.g. to generate only those synthetic tasks)."""
        return [t["dataset"] if isinstance(t, dict) else str(t) for t in cls.planned_tasks(benchmark)]

    # ----------------------------------------------------------------- building the run
    def prepare(self, runner: Any) -> None:
        """Called before the task list is read (``runner.cfg.benchmark.tasks`` may be generated here)."""

    def results_fields(self, runner: Any) -> dict[str, Any]:
        """The fields of a new ``results.json`` (the runner adds benchmark, method, tasks, timing...)."""
        return {"datasets": runner.eval_names, "accuracy": [], "top5": [], "zero_shot": None, "zero_shot_top5": None}

    def check_results(self, runner: Any, old: dict[str, Any]) -> None:
        """Refuse to continue a results file of another run."""
        if setting_of(old) != self.name or old.get("tasks") != runner.task_names or old.get("datasets") != runner.eval_names:
            raise ValueError(f"{runner.results_path()} belongs to another sequence ({old.get('tasks')}); use a new --out")

    def slug(self, runner: Any, k: int) -> str:
        return f"{k:02d}-{runner.task_names[k]}"

    def train_dataset(self, runner: Any, k: int) -> str:
        """The dataset task k trains on (a few-shot setting trains on a view of it)."""
        return runner.task_names[k]

    def task_cfg(self, runner: Any, k: int, cfg: Any, eval_only: bool) -> None:
        """Adjust task k's config in place (its evaluation datasets, its training data)."""
        cfg["data.eval_datasets"] = runner.eval_names

    # ----------------------------------------------------------------- rows
    def zero_shot(self, runner: Any) -> None:
        """The initial model's row."""
        from zscl.utils.ranks import say

        if runner.results["zero_shot"] is not None:
            return
        say("row 0: zero-shot evaluation of the initial model")
        model, dm, kw = runner.instantiate(runner.task_cfg(0, runner.cfg.model.init_from, eval_only=True))
        top1, top5 = self.evaluate(runner, runner.trainer(kw, None, "zero-shot"), model, dm)
        runner.results["zero_shot"], runner.results["zero_shot_top5"] = top1, top5
        runner.save()
        say(self.row_text(runner, "zero-shot", top1))

    def evaluated(self, runner: Any) -> list[str]:
        """The dataset actually evaluated for each of ``runner.eval_names`` (MTIL: the datasets themselves)."""
        return list(runner.eval_names)

    def evaluate(self, runner: Any, trainer: Any, module: Any, dm: Any) -> tuple[Any, Any]:
        """One validation pass; (top-1 row, top-5 row) as ``results.json`` stores them."""
        trainer.validate(module, datamodule=dm, verbose=False)
        res = module.eval_results
        pairs = list(zip(runner.eval_names, self.evaluated(runner)))
        excluded = {n: dm.excluded_test_images.get(v, []) for n, v in pairs}  # --allow-bad-test-images
        runner.results["excluded_test_images"] = {n: len(paths) for n, paths in excluded.items()}
        runner.results["excluded_test_image_paths"] = {n: paths for n, paths in excluded.items() if paths}
        return [res[v].top1 for _, v in pairs], [res[v].top5 for _, v in pairs]

    def row_text(self, runner: Any, label: str, row: Any) -> str:
        cells = "  ".join(f"{n[:10]}={v:.1f}" for n, v in zip(runner.eval_names, row))
        return f"  {label:<24} {cells}"

    # ----------------------------------------------------------------- summary
    def finish(self, runner: Any) -> None:
        """Summary metrics into ``results.json`` and a table on the console."""
        from zscl.evaluation.metrics import AccuracyMatrix, format_table
        from zscl.utils.ranks import say

        if runner.eval_names != runner.task_names:
            say("evaluation datasets differ from the task list: Transfer/Avg/Last need a square matrix; skipped")
            return
        m = AccuracyMatrix(runner.eval_names, runner.results["accuracy"], runner.results["zero_shot"])
        runner.results["metrics"] = self.summarize(runner.results)
        runner.save()
        say(format_table(m, runner.results["metrics"]))

    @classmethod
    def summarize(cls, results: dict[str, Any]) -> dict[str, Any]:
        """The setting's summary metrics of a complete ``results.json``."""
        from zscl.evaluation.metrics import AccuracyMatrix, summarize

        return summarize(AccuracyMatrix(results["datasets"], results["accuracy"], results["zero_shot"]))

    # ----------------------------------------------------------------- the demo's acceptance checks
    @classmethod
    def acceptance(cls, scores: "Scores", rules: dict[str, Any]) -> "Checks":
        """MTIL's pattern (Zheng et al. 2023, Table 1) on the runs (:mod:`zscl.settings.acceptance`), thresholds
        from ``rules``: room to learn; fine-tuning learns (Last - ZS Last >= ``ft_learns``) and forgets
        (ZS Transfer - Transfer >= ``ft_forgets``); ZSCL keeps (Transfer >= ZS Transfer - ``zscl_keeps``) and
        learns as much as fine-tuning (Last - its Last >= ``zscl_vs_ft_last``); ZSCL's Avg beats every method of ``best_of``; each method of
        ``between`` keeps more Transfer than fine-tuning."""
        from zscl.settings.acceptance import Checks

        c = Checks(scores, rules)
        c.room()
        c.gap("finetune learns: Last - ZS Last", "finetune", "zero_shot", "last", "ft_learns")
        c.gap("finetune forgets: ZS Transfer - Transfer", "zero_shot", "finetune", "transfer", "ft_forgets")
        c.gap("ZSCL keeps: Transfer - ZS Transfer", "zscl", "zero_shot", "transfer", "zscl_keeps", sign=-1.0)
        c.gap("ZSCL learns: Last - finetune Last", "zscl", "finetune", "last", "zscl_vs_ft_last")
        rivals = [m for m in rules.get("best_of") or [] if m != "zscl"]
        if rivals:
            c.claim("ZSCL best: Avg - best other Avg of " + ", ".join(rivals), ["zscl", *rivals],
                    lambda: scores.get("zscl", "avg") - max(scores.get(m, "avg") for m in rivals), 0.0, strict=True)
        for m in rules.get("between") or []:
            c.claim(f"{m} keeps more than finetune: Transfer - finetune's", [m, "finetune"],
                    lambda m=m: scores.get(m, "transfer") - scores.get("finetune", "transfer"), 0.0, strict=True)
        c.per_method()
        return c


__all__ = ["SETTINGS", "Setting", "result_kind", "setting_class", "setting_for", "setting_of"]
