"""The demo's report: tables, plots and the setting's acceptance checks.

The checks are the setting's own (:meth:`zscl.settings.Setting.acceptance`, :mod:`zscl.settings.acceptance`),
with the thresholds of ``configs/demo.yaml`` (the plan's ``acceptance``). Run times of the ``faster`` claim are
the sequences' ``timing`` in CPU seconds of each run's process (training + evaluation of every task), which
other jobs on a shared machine do not inflate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from zscl.evaluation.metrics import AccuracyMatrix
from zscl.utils.io import write_json_atomic, write_text_atomic


def chance_levels(datasets: list[str]) -> list[float]:
    from zscl.datasets import get_dataset

    return [100.0 / get_dataset(n).num_classes for n in datasets]


def check_runs(setting: Any, rules: Optional[dict], summaries: dict[str, dict], zero_shot: dict[str, float],
               seconds: dict[str, float], zero_shot_row: Optional[list[float]] = None,
               chance: Optional[list[float]] = None) -> tuple[list[dict[str, Any]], int]:
    """``setting``'s acceptance checks of the runs, and how many were left out (their methods did not run)."""
    from zscl.settings.acceptance import Scores

    checks = setting.acceptance(Scores(summaries, zero_shot, zero_shot_row, chance, seconds), rules or {})
    return checks.items, checks.skipped


def matrix_zero_shot(row: list[float]) -> dict[str, float]:
    """The zero-shot row's Transfer (its mean over tasks 2..T: each column's rows before it are all the initial
    model), Avg and Last (its plain mean)."""
    mean = sum(row) / len(row)
    return {"transfer": sum(row[1:]) / max(1, len(row) - 1), "avg": mean, "last": mean}


def sequence_seconds(results: dict, cpu: bool = False) -> float:
    """A run's time: training and evaluation of every task (``timing`` of results.json), zero-shot row excluded;
    with ``cpu``, the process's CPU seconds (runs written before they were recorded count their wall seconds)."""
    timing = results.get("timing") or []
    if cpu and all("train_cpu_s" in t for t in timing):
        return float(sum(t["train_cpu_s"] + t["eval_cpu_s"] for t in timing))
    return float(sum(t["train_s"] + t["eval_s"] for t in timing))


def _verdict(check: dict) -> str:
    return "PASS" if check["passed"] else "FAIL"


def _acceptance_lines(checks: list[dict], skipped: int) -> list[str]:
    lines = ["## Acceptance", ""]
    if checks:
        lines.append(_table([[c["check"], f"{c['value']}", f"{c['threshold']}", _verdict(c)] for c in checks],
                            ["check", "value", "threshold", "result"]))
    if skipped:
        lines += ["", f"{skipped} check(s) left out: their methods were not run."]
    return lines + [""]


def print_checks(checks: list[dict], skipped: int) -> None:
    for c in checks:
        print(f"  [{_verdict(c)}] {c['check']}: {c['value']} (threshold {c['threshold']})")
    if skipped:
        print(f"  ({skipped} check(s) left out: their methods were not run)")


def _table(rows: list[list[str]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _runs(names: list[str], results: dict[str, dict]) -> list:
    """The demo's methods as :class:`zscl.evaluation.compare.Run` (the code behind ``zscl compare``)."""
    from zscl.evaluation.compare import Run

    return [Run(n, str(results[n].get("benchmark", "synthetic")),
                AccuracyMatrix(results[n]["datasets"], results[n]["accuracy"], results[n]["zero_shot"])) for n in names]


def _summary_table(runs: list, published: str = "mtil_order1") -> str:
    """Ours on the synthetic benchmark, with the paper's MTIL order I row of the same method beside it
    (no delta: the benchmarks differ; the point is the pattern)."""
    from zscl.evaluation.compare import load_published, other_reports_table, summary_table

    title = {"mtil_order1": "paper MTIL-I", "mtil_order1_fewshot5": "paper 5-shot MTIL-I",
             "xtail_order1": "published X-TAIL-I"}.get(published, f"paper {published}")
    table = load_published(published)
    others = other_reports_table(table)
    text = summary_table(runs, table, delta=False, published_title=title).render("md")
    return text + ("\n\n" + others.render("md") if others is not None else "")


def _per_dataset_table(m: AccuracyMatrix) -> str:
    rows = [["zero-shot"] + [f"{v:.1f}" for v in m.zero_shot or []]]
    rows += [[f"after {m.datasets[i]}"] + [f"{v:.1f}" for v in row] for i, row in enumerate(m.accuracy)]
    return _table(rows, ["row \\ dataset", *m.datasets])


def write_report(plan: dict, names: list[str], results: dict[str, dict], out: Path, elapsed: float,
                 quick: bool = False, *, setting: Any, rules: Optional[dict]) -> dict[str, Any]:
    """report.md, plots/ and summary.json under ``out``; prints the summary; returns summary.json's content."""
    from zscl.evaluation.compare import write_plots

    runs = _runs(names, results)
    summaries = {r.label: r.summary for r in runs}
    first = runs[0].matrix
    seconds = {n: sequence_seconds(results[n]) for n in names}
    cpu_seconds = {n: sequence_seconds(results[n], cpu=True) for n in names}
    zero_shot = matrix_zero_shot(first.zero_shot)
    checks, skipped = check_runs(setting, rules, summaries, zero_shot, cpu_seconds, first.zero_shot,
                                 chance_levels(first.datasets))
    plots = write_plots(runs, out / "plots", "synthetic benchmark")
    table = _summary_table(runs, plan.get("published") or "mtil_order1")
    labels = ", ".join(f"`{n}` = {plan['methods'][n]['label']}" for n in names)
    kind = {"fewshot": "few-shot (5 images per class) ", "xtail": "X-TAIL (no task id: union label space) "}.get(
        plan.get("setting") or "", "")
    lines = [f"# zscl demo: the synthetic {kind}continual benchmark{' (quick)' if quick else ''}", "",
             f"Tasks in order: {', '.join(first.datasets)}. Total time {elapsed:.0f} s.", "",
             "## Methods", "", table, "", f"Methods: {labels}.", "",
             "Transfer: accuracy on tasks not trained yet; Avg: mean of the whole matrix; Last: after the last task. "
             "The paper's columns are its MTIL order I numbers for the same method (another benchmark: compare "
             "the pattern, not the values).", "",
             *_acceptance_lines(checks, skipped)]
    for n, run in zip(names, runs):
        lines += [f"## {plan['methods'][n]['label']} (`{n}`)", "", _per_dataset_table(run.matrix), ""]
    lines += ["## Plots", "", "![metrics](plots/metrics.png)", "", "![transfer curves](plots/transfer_curves.png)", "",
              "![accuracy matrices](plots/heatmaps.png)", ""]
    write_text_atomic(out / "report.md", "\n".join(lines))
    summary = {"methods": {n: {**{k: summaries[n][k] for k in ("transfer", "avg", "last")},
                               "sequence_s": round(seconds[n], 1), "sequence_cpu_s": round(cpu_seconds[n], 1)}
                           for n in names},
               "zero_shot": {"transfer": summaries[names[0]]["zero_shot_transfer"], "avg": summaries[names[0]]["zero_shot_avg"]},
               "acceptance": checks, "checks_left_out": skipped, "elapsed_s": round(elapsed, 1), "quick": quick,
               "plots": [str(p) for p in plots]}
    write_json_atomic(out / "summary.json", summary)
    print("\n" + table + "\n")
    print_checks(checks, skipped)
    print(f"\nwrote {out / 'report.md'}, {out / 'summary.json'} and {len(plots)} plots in {out / 'plots'} ({elapsed:.0f} s)")
    return summary


def write_cil_report(plan: dict, names: list[str], results: dict[str, dict], out: Path, elapsed: float,
                     quick: bool = False, *, setting: Any, rules: Optional[dict]) -> dict[str, Any]:
    """The class-incremental demo's report.md, plots/ and summary.json (Avg / Last, accuracy per step), with the
    setting's acceptance checks."""
    from zscl.evaluation.compare import Table, load_published
    from zscl.evaluation.incremental import CurveRun, IncrementalCurve, curve_summary_rows, write_curve_plots

    runs = [CurveRun(n, str(results[n].get("benchmark")), IncrementalCurve.from_results(results[n]),
                   results[n]["step_classes"]) for n in names]
    published = plan.get("published")
    header, rows = curve_summary_rows(runs, load_published(published) if published else None)
    header = [h.replace("paper", f"paper {published}") if h.startswith("paper") else h for h in header]
    keep = 6 if published else 3  # method, Avg, Last (+ the paper's row, Avg, Last); no deltas: another benchmark
    table = Table(header[:keep], [r[:keep] for r in rows], "class-incremental Avg / Last (%)").render("md")
    plots = write_curve_plots(runs, out / "plots", "synthetic class-incremental benchmark")
    steps = results[names[0]]["step_classes"]
    zs = runs[0].curve.zero_shot
    zero_shot = {k: runs[0].summary[f"zero_shot_{k}"] for k in ("avg", "last")} if zs else {}
    checks, skipped = check_runs(setting, rules, {r.label: r.summary for r in runs}, zero_shot,
                                 {n: sequence_seconds(results[n], cpu=True) for n in names})
    per_step = _table(([["zero-shot", *(f"{a:.1f}" for a in zs)]] if zs else [])
                      + [[plan["methods"][r.label]["label"], *(f"{a:.1f}" for a in r.curve.accuracy)] for r in runs],
                      ["method", *(f"{len(s)} new / {sum(len(x) for x in steps[:t + 1])} seen" for t, s in enumerate(steps))])
    lines = [f"# zscl demo: the synthetic class-incremental benchmark{' (quick)' if quick else ''}", "",
             f"{results[names[0]]['dataset']}: {sum(len(s) for s in steps)} classes in {len(steps)} steps. "
             f"Total time {elapsed:.0f} s.", "", "## Methods", "", table, "",
             "Avg: mean over steps of the accuracy on all classes seen so far (first step included); Last: after the "
             "last step. The paper's columns are published numbers of the same method on CIFAR100 in 10 steps "
             "(another benchmark: compare the pattern, not the values).", "",
             "## Accuracy on the seen classes after each step", "", per_step, "",
             *_acceptance_lines(checks, skipped),
             "## Plots", "", "![accuracy per step](plots/accuracy_per_step.png)", ""]
    write_text_atomic(out / "report.md", "\n".join(lines))
    summary = {"setting": "cil", "methods": {r.label: {k: r.summary[k] for k in ("avg", "last")} for r in runs},
               "zero_shot": zero_shot or None, "acceptance": checks, "checks_left_out": skipped,
               "elapsed_s": round(elapsed, 1), "quick": quick, "plots": [str(p) for p in plots]}
    write_json_atomic(out / "summary.json", summary)
    print("\n" + table + "\n\n" + per_step + "\n")
    print_checks(checks, skipped)
    print(f"wrote {out / 'report.md'}, {out / 'summary.json'} and {len(plots)} plot in {out / 'plots'} ({elapsed:.0f} s)")
    return summary


#: the demo's report writer for each kind of result (:attr:`zscl.settings.Setting.result_kind`)
REPORTS = {"matrix": write_report, "curve": write_cil_report}
