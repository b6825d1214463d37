"""The demo's report: tables, plots and the scientific acceptance checks.

Acceptance (the demo's claim, on the default run):

* the pretrained tiny CLIP is at least 2x chance zero-shot on every task;
* plain continual fine-tuning loses >= 10 points of Transfer against the zero-shot Transfer;
* ZSCL recovers >= 60 % of that loss: ``(T_zscl - T_ft) / (T_zs - T_ft) >= 0.6``;
* ZSCL's Last is within 3 points of fine-tuning's Last, or better.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from zscl.evaluation.metrics import AccuracyMatrix, summarize
from zscl.utils.io import write_json_atomic, write_text_atomic


def chance_levels(datasets: list[str]) -> list[float]:
    from zscl.datasets import get_dataset

    return [100.0 / get_dataset(n).num_classes for n in datasets]


def acceptance(summaries: dict[str, dict], zero_shot: list[float], chance: list[float]) -> list[dict[str, Any]]:
    """The four checks, each ``{"check", "value", "threshold", "passed"}`` (None where a method is missing)."""
    checks = [{"check": "zero-shot >= 2x chance on every task",
               "value": round(min(z / c for z, c in zip(zero_shot, chance)), 2), "threshold": 2.0}]
    checks[0]["passed"] = checks[0]["value"] >= 2.0
    ft, zs = summaries.get("finetune"), summaries.get("zscl")
    if ft is None or zs is None:
        return checks
    t0 = ft["zero_shot_transfer"]
    loss = t0 - ft["transfer"]
    recovered = (zs["transfer"] - ft["transfer"]) / loss if loss > 0 else float("nan")
    checks += [
        {"check": "finetune loses >= 10 points of Transfer", "value": round(loss, 2), "threshold": 10.0, "passed": loss >= 10},
        {"check": "ZSCL recovers >= 60 % of that loss", "value": round(100 * recovered, 1), "threshold": 60.0,
         "passed": recovered >= 0.6},
        {"check": "ZSCL Last >= finetune Last - 3", "value": round(zs["last"] - ft["last"], 2), "threshold": -3.0,
         "passed": zs["last"] >= ft["last"] - 3},
    ]
    return checks


def _table(rows: list[list[str]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _summary_table(plan: dict, names: list[str], summaries: dict[str, dict]) -> str:
    first = summaries[names[0]]
    rows = [["zero-shot (initial model)", f"{first['zero_shot_transfer']:.1f}", f"{first['zero_shot_avg']:.1f}",
             f"{first['zero_shot_avg']:.1f}"]]
    for n in names:
        s = summaries[n]
        rows.append([f"{plan['methods'][n]['label']} (`{n}`)", f"{s['transfer']:.1f}", f"{s['avg']:.1f}", f"{s['last']:.1f}"])
    return _table(rows, ["method", "Transfer", "Avg", "Last"])


def _per_dataset_table(m: AccuracyMatrix) -> str:
    rows = [["zero-shot"] + [f"{v:.1f}" for v in m.zero_shot or []]]
    rows += [[f"after {m.datasets[i]}"] + [f"{v:.1f}" for v in row] for i, row in enumerate(m.accuracy)]
    return _table(rows, ["row \\ dataset", *m.datasets])


def _plots(names: list[str], matrices: dict[str, AccuracyMatrix], summaries: dict, plan: dict, out: Path) -> list[Path]:
    from zscl.evaluation.plots import plot_heatmap, plot_metric_bars, plot_transfer_curve

    labels = {n: plan["methods"][n]["label"] for n in names}
    plots = [plot_heatmap(matrices[n], out / f"heatmap_{n}.png", title=f"{labels[n]}: accuracy after each task")
             for n in names]
    plots.append(plot_transfer_curve({labels[n]: matrices[n] for n in names}, out / "transfer_curve.png"))
    plots.append(plot_metric_bars({labels[n]: summaries[n] for n in names}, out / "metrics.png",
                                  title="synthetic benchmark: Transfer / Avg / Last"))
    return plots


def write_report(plan: dict, names: list[str], results: dict[str, dict], out: Path, elapsed: float,
                 quick: bool = False) -> dict[str, Any]:
    """report.md, plots/ and summary.json under ``out``; prints the summary; returns summary.json's content."""
    matrices = {n: AccuracyMatrix(r["datasets"], r["accuracy"], r["zero_shot"]) for n, r in results.items()}
    summaries = {n: summarize(m) for n, m in matrices.items()}
    first = matrices[names[0]]
    checks = acceptance(summaries, first.zero_shot, chance_levels(first.datasets))
    plots = _plots(names, matrices, summaries, plan, out / "plots")
    lines = [f"# zscl demo: the synthetic continual benchmark{' (quick)' if quick else ''}", "",
             f"Tasks in order: {', '.join(first.datasets)}. Total time {elapsed:.0f} s.", "",
             "## Methods", "", _summary_table(plan, names, summaries), "",
             "Transfer: accuracy on tasks not trained yet; Avg: mean of the whole matrix; Last: after the last task.", "",
             "## Acceptance", "", _table([[c["check"], f"{c['value']}", f"{c['threshold']}", "PASS" if c["passed"] else "FAIL"]
                                          for c in checks], ["check", "value", "threshold", "result"]), ""]
    for n in names:
        lines += [f"## {plan['methods'][n]['label']} (`{n}`)", "", _per_dataset_table(matrices[n]), "",
                  f"![heatmap](plots/heatmap_{n}.png)", ""]
    lines += ["## Plots", "", "![transfer curve](plots/transfer_curve.png)", "", "![metrics](plots/metrics.png)", ""]
    write_text_atomic(out / "report.md", "\n".join(lines))
    summary = {"methods": {n: {k: summaries[n][k] for k in ("transfer", "avg", "last")} for n in names},
               "zero_shot": {"transfer": summaries[names[0]]["zero_shot_transfer"], "avg": summaries[names[0]]["zero_shot_avg"]},
               "acceptance": checks, "elapsed_s": round(elapsed, 1), "quick": quick,
               "plots": [str(p) for p in plots]}
    write_json_atomic(out / "summary.json", summary)
    print("\n" + _summary_table(plan, names, summaries) + "\n")
    for c in checks:
        print(f"  [{'PASS' if c['passed'] else 'FAIL'}] {c['check']}: {c['value']}")
    print(f"\nwrote {out / 'report.md'}, {out / 'summary.json'} and {len(plots)} plots in {out / 'plots'} ({elapsed:.0f} s)")
    return summary


def load_summary(out: str | Path) -> dict[str, Any]:
    return json.loads((Path(out) / "summary.json").read_text())
