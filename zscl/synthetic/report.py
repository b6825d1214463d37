"""The demo's report: tables, plots and the scientific acceptance checks.

Acceptance (``configs/demo.yaml: acceptance``; Transfer / Avg / Last as ``zscl metrics``; ZS = the
initial model's row). The paper's MTIL pattern, on the synthetic benchmark:

* room to learn: ZS Last <= 75, at least 2 tasks under 50 % zero-shot, every task >= 2x chance;
* fine-tuning learns (Last >= ZS Last + 8) and forgets zero-shot (Transfer <= ZS Transfer - 10);
* ZSCL keeps zero-shot (Transfer >= ZS Transfer - 3) and learns at least as well (Last >= finetune's);
* ZSCL's Avg is the highest of the paper's table (finetune, LwF, iCaRL, LwF-VR, WiSE-FT, ZSCL);
* LwF, iCaRL, LwF-VR and WiSE-FT each keep more Transfer than fine-tuning.

A setting's plan may switch a check off (its rule ``null``, or an empty list) and add, per method of a list:

* ``keeps_zero_shot: {methods, within}``: ``0 <= Transfer - ZS Transfer <= within`` (RAIL in X-TAIL);
* ``learns: {methods, min}``: ``Last - ZS Last >= min``;
* ``faster: {method, than, ratio}``: the whole sequence (training + evaluation of every task, the runs'
  ``timing``, in CPU seconds of each run's process, which other jobs on a shared machine do not inflate) of
  ``than`` takes at least ``ratio`` times as long as ``method``'s.

A check whose methods did not run has ``passed: None`` and reads "not run".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from zscl.evaluation.metrics import AccuracyMatrix, summarize
from zscl.utils.io import write_json_atomic, write_text_atomic

DEFAULT_ACCEPTANCE: dict[str, Any] = {
    "zs_last_max": 75.0, "weak_tasks": {"count": 2, "below": 50.0}, "chance_ratio_min": 2.0,
    "ft_learns": 8.0, "ft_forgets": 10.0, "zscl_keeps": 3.0,
    "best_of": ["finetune", "lwf", "icarl", "lwf_vr", "wise", "zscl"], "between": ["lwf", "icarl", "lwf_vr", "wise"],
}


def chance_levels(datasets: list[str]) -> list[float]:
    from zscl.datasets import get_dataset

    return [100.0 / get_dataset(n).num_classes for n in datasets]


def _check(check: str, value: Optional[float], threshold: float, passed: Optional[bool]) -> dict[str, Any]:
    return {"check": check, "value": None if value is None else round(value, 2), "threshold": threshold, "passed": passed}


def _room_checks(zero_shot: list[float], chance: list[float], rules: dict) -> list[dict[str, Any]]:
    zs_last = sum(zero_shot) / len(zero_shot)
    weak = rules["weak_tasks"]
    n_weak = sum(z < weak["below"] for z in zero_shot)
    ratio, least = min(z / c for z, c in zip(zero_shot, chance)), rules["chance_ratio_min"]
    checks = [_check("room to learn: ZS Last <= max", zs_last, rules["zs_last_max"], zs_last <= rules["zs_last_max"]),
              _check(f"tasks under {weak['below']:g} % zero-shot", n_weak, weak["count"], n_weak >= weak["count"])]
    return checks + ([_check("zero-shot / chance on every task (min)", ratio, least, ratio >= least)] if least else [])


def acceptance(summaries: dict[str, dict], zero_shot: list[float], chance: list[float],
               rules: Optional[dict] = None, seconds: Optional[dict[str, float]] = None) -> list[dict[str, Any]]:
    """The checks of the module docstring, each ``{"check", "value", "threshold", "passed"}``.

    ``summaries``: method name -> :func:`zscl.evaluation.metrics.summarize` of its run; ``seconds``: method
    name -> its sequence's time. ``value`` is the margin or quantity the threshold applies to; ``passed`` is
    None when a method is missing."""
    rules = {**DEFAULT_ACCEPTANCE, **(rules or {})}
    checks = _room_checks(zero_shot, chance, rules)
    checks += _mtil_checks(summaries, zero_shot, rules)
    checks += _method_checks(summaries, zero_shot, rules, seconds or {})
    return checks


def _mtil_checks(summaries: dict[str, dict], zero_shot: list[float], rules: dict) -> list[dict[str, Any]]:
    """The MTIL pattern's checks (module docstring); a rule set to null is skipped."""
    checks: list[dict[str, Any]] = []
    # The zero-shot row's Transfer is its mean over tasks 2..T (each column's rows before it are all
    # the initial model); its Avg and Last are its plain mean.
    zs_t, zs_l = sum(zero_shot[1:]) / max(1, len(zero_shot) - 1), sum(zero_shot) / len(zero_shot)
    ft, zscl = summaries.get("finetune"), summaries.get("zscl")

    def margin(name: str, value: Optional[float], threshold: Optional[float], strict: bool = False) -> None:
        if threshold is None:
            return
        passed = None if value is None else (value > threshold if strict else value >= threshold)
        checks.append(_check(name, value, threshold, passed))

    margin("finetune learns: Last - ZS Last", ft and ft["last"] - zs_l, rules["ft_learns"])
    margin("finetune forgets: ZS Transfer - Transfer", ft and zs_t - ft["transfer"], rules["ft_forgets"])
    keeps = rules["zscl_keeps"]
    margin("ZSCL keeps: Transfer - ZS Transfer", zscl and zscl["transfer"] - zs_t, None if keeps is None else -keeps)
    margin("ZSCL learns: Last - finetune Last", zscl and ft and zscl["last"] - ft["last"], 0.0 if keeps is not None else None)
    rivals = [m for m in rules["best_of"] or [] if m != "zscl"]
    ran = zscl is not None and bool(rivals) and all(m in summaries for m in rivals)
    margin("ZSCL best: Avg - best other Avg of " + ", ".join(rivals),
           zscl["avg"] - max(summaries[m]["avg"] for m in rivals) if ran else None, 0.0 if rivals else None, strict=True)
    for m in rules["between"] or []:
        other = summaries.get(m)
        margin(f"{m} keeps more than finetune: Transfer - finetune's",
               other and ft and other["transfer"] - ft["transfer"], 0.0, strict=True)
    return checks


def _method_checks(summaries: dict[str, dict], zero_shot: list[float], rules: dict,
                   seconds: dict[str, float]) -> list[dict[str, Any]]:
    """The optional per-method checks of the module docstring (``keeps_zero_shot``, ``learns``, ``faster``)."""
    zs_t, zs_l = sum(zero_shot[1:]) / max(1, len(zero_shot) - 1), sum(zero_shot) / len(zero_shot)
    checks: list[dict[str, Any]] = []
    keep = rules.get("keeps_zero_shot") or {}
    for m in keep.get("methods", []):
        d = summaries[m]["transfer"] - zs_t if m in summaries else None
        checks.append(_check(f"{m} keeps zero-shot: Transfer - ZS Transfer in [0, within]", d, keep["within"],
                             None if d is None else 0.0 <= d <= keep["within"]))
    learn = rules.get("learns") or {}
    for m in learn.get("methods", []):
        d = summaries[m]["last"] - zs_l if m in summaries else None
        checks.append(_check(f"{m} learns: Last - ZS Last", d, learn["min"], None if d is None else d >= learn["min"]))
    fast = rules.get("faster")
    if fast:
        m, other = fast["method"], fast["than"]
        ratio = seconds[other] / max(seconds[m], 1e-9) if m in seconds and other in seconds else None
        checks.append(_check(f"{m} faster: {other}'s sequence CPU time / {m}'s", ratio, fast["ratio"],
                             None if ratio is None else ratio >= fast["ratio"]))
    return checks


def sequence_seconds(results: dict, cpu: bool = False) -> float:
    """A run's time: training and evaluation of every task (``timing`` of results.json), zero-shot row excluded;
    with ``cpu``, the process's CPU seconds (runs written before they were recorded count their wall seconds)."""
    timing = results.get("timing") or []
    if cpu and all("train_cpu_s" in t for t in timing):
        return float(sum(t["train_cpu_s"] + t["eval_cpu_s"] for t in timing))
    return float(sum(t["train_s"] + t["eval_s"] for t in timing))


def _verdict(check: dict) -> str:
    return "not run" if check["passed"] is None else "PASS" if check["passed"] else "FAIL"


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
                 quick: bool = False) -> dict[str, Any]:
    """report.md, plots/ and summary.json under ``out``; prints the summary; returns summary.json's content."""
    from zscl.evaluation.compare import write_plots

    runs = _runs(names, results)
    summaries = {r.label: r.summary for r in runs}
    first = runs[0].matrix
    seconds = {n: sequence_seconds(results[n]) for n in names}
    cpu_seconds = {n: sequence_seconds(results[n], cpu=True) for n in names}
    checks = acceptance(summaries, first.zero_shot, chance_levels(first.datasets), plan.get("acceptance"), cpu_seconds)
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
             "## Acceptance", "", _table([[c["check"], f"{c['value']}", f"{c['threshold']}", _verdict(c)]
                                          for c in checks], ["check", "value", "threshold", "result"]), ""]
    for n, run in zip(names, runs):
        lines += [f"## {plan['methods'][n]['label']} (`{n}`)", "", _per_dataset_table(run.matrix), ""]
    lines += ["## Plots", "", "![metrics](plots/metrics.png)", "", "![transfer curves](plots/transfer_curves.png)", "",
              "![accuracy matrices](plots/heatmaps.png)", ""]
    write_text_atomic(out / "report.md", "\n".join(lines))
    summary = {"methods": {n: {**{k: summaries[n][k] for k in ("transfer", "avg", "last")},
                               "sequence_s": round(seconds[n], 1), "sequence_cpu_s": round(cpu_seconds[n], 1)}
                           for n in names},
               "zero_shot": {"transfer": summaries[names[0]]["zero_shot_transfer"], "avg": summaries[names[0]]["zero_shot_avg"]},
               "acceptance": checks, "elapsed_s": round(elapsed, 1), "quick": quick,
               "plots": [str(p) for p in plots]}
    write_json_atomic(out / "summary.json", summary)
    print("\n" + table + "\n")
    for c in checks:
        print(f"  [{_verdict(c)}] {c['check']}: {c['value']} (threshold {c['threshold']})")
    print(f"\nwrote {out / 'report.md'}, {out / 'summary.json'} and {len(plots)} plots in {out / 'plots'} ({elapsed:.0f} s)")
    return summary


def write_cil_report(plan: dict, names: list[str], results: dict[str, dict], out: Path, elapsed: float,
                     quick: bool = False) -> dict[str, Any]:
    """The class-incremental demo's report.md, plots/ and summary.json (Avg / Last, accuracy per step).

    No acceptance checks: the paper makes no zero-shot claim for CIL; the report shows the pattern."""
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
             "## Plots", "", "![accuracy per step](plots/accuracy_per_step.png)", ""]
    write_text_atomic(out / "report.md", "\n".join(lines))
    summary = {"setting": "cil", "methods": {r.label: {k: r.summary[k] for k in ("avg", "last")} for r in runs},
               "zero_shot": {k: runs[0].summary[f"zero_shot_{k}"] for k in ("avg", "last")} if zs else None,
               "elapsed_s": round(elapsed, 1), "quick": quick, "plots": [str(p) for p in plots]}
    write_json_atomic(out / "summary.json", summary)
    print("\n" + table + "\n\n" + per_step + "\n")
    print(f"wrote {out / 'report.md'}, {out / 'summary.json'} and {len(plots)} plot in {out / 'plots'} ({elapsed:.0f} s)")
    return summary


#: the demo's report writer for each kind of result (:attr:`zscl.settings.Setting.result_kind`)
REPORTS = {"matrix": write_report, "curve": write_cil_report}
