"""Class-incremental results: accuracy on the classes seen so far, after every step.

``a_t`` is the top-1 accuracy (percent) after step ``t`` on the test images of every class of
steps ``0..t``, classified among exactly those classes. With ``T`` steps (ZSCL's ``cil/main.py``,
iCaRL's "average incremental accuracy"):

- Avg  = (1/T) sum_t a_t    (the first step included)
- Last = a_{T-1}

A run's results.json (``"setting": "cil"``) holds, per step, ``accuracy`` (a_t), ``seen_classes``
and ``per_class_accuracy`` (aligned with ``seen_classes``). MTIL accuracy matrices are another
kind of result; the two are never mixed (:func:`zscl.settings.result_kind`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Any, Optional, Sequence

from zscl.evaluation.metrics import MatrixError, _percent

METRICS = (("avg", "Avg"), ("last", "Last"))


@dataclass
class IncrementalCurve:
    """Accuracy on the seen classes after each step; ``seen`` counts those classes per step."""

    accuracy: list[float]
    seen: Optional[list[int]] = None
    zero_shot: Optional[list[float]] = None  # the initial model on the same class sets

    def __post_init__(self) -> None:
        if not isinstance(self.accuracy, (list, tuple)) or not self.accuracy:
            raise MatrixError("'accuracy' must be a non-empty list: one accuracy per class-incremental step")
        self.accuracy = [_percent(a, f"accuracy[{t}]") for t, a in enumerate(self.accuracy)]
        if self.seen is not None and len(self.seen) != len(self.accuracy):
            raise MatrixError(f"{len(self.seen)} seen-class counts for {len(self.accuracy)} steps")
        if self.zero_shot is not None:
            if len(self.zero_shot) < len(self.accuracy):
                raise MatrixError(f"{len(self.zero_shot)} zero-shot accuracies for {len(self.accuracy)} steps")
            self.zero_shot = [_percent(a, f"zero_shot[{t}]") for t, a in enumerate(self.zero_shot[:len(self.accuracy)])]

    @classmethod
    def from_results(cls, res: dict[str, Any]) -> "IncrementalCurve":
        seen = res.get("seen_classes")
        zs = res.get("zero_shot")
        return cls(list(res.get("accuracy") or []), [len(s) for s in seen] if seen else None,
                   list(zs) if isinstance(zs, list) else None)

    @classmethod
    def load(cls, path: str | Path) -> "IncrementalCurve":
        return cls.from_results(json.loads(Path(path).read_text(encoding="utf-8")))


def summarize_cil(curve: IncrementalCurve) -> dict[str, Any]:
    """Avg and Last (module docstring) and the per-step accuracies."""
    out = {"avg": fmean(curve.accuracy), "last": curve.accuracy[-1], "steps": len(curve.accuracy),
           "accuracy": list(curve.accuracy)}
    if curve.zero_shot is not None:
        out.update(zero_shot_avg=fmean(curve.zero_shot), zero_shot_last=curve.zero_shot[-1])
    return out


def format_cil_table(curve: IncrementalCurve, summary: dict[str, Any]) -> str:
    zs = curve.zero_shot
    lines = ["step  seen classes  accuracy" + ("  zero-shot" if zs else "")]
    for t, a in enumerate(curve.accuracy):
        seen = curve.seen[t] if curve.seen else "?"
        lines.append(f"{t + 1:>4}  {seen!s:>12}  {a:8.2f}" + (f"  {zs[t]:9.2f}" if zs else ""))
    lines.append(f"Avg {summary['avg']:.2f}   Last {summary['last']:.2f}   ({summary['steps']} steps)")
    if zs:
        lines.append(f"zero-shot: Avg {summary['zero_shot_avg']:.2f}   Last {summary['zero_shot_last']:.2f}")
    return "\n".join(lines)


# -- comparison ------------------------------------------------------------------------------


@dataclass
class CurveRun:
    """One finished class-incremental run (``zscl compare`` of CIL runs)."""

    label: str
    benchmark: str
    curve: IncrementalCurve
    classes: list[list[int]]
    summary: dict[str, Any] = field(init=False)
    path: Optional[Path] = None
    setting: str = "cil"

    def __post_init__(self) -> None:
        self.summary = summarize_cil(self.curve)


def curve_run(res: dict[str, Any], file: Path, label: str) -> CurveRun:
    """A complete CIL run from its results.json content; ValueError if incomplete or malformed."""
    done, total = len(res.get("accuracy") or []), len(res.get("step_classes") or [])
    if done != total or not total:
        raise ValueError(f"{file}: the run is incomplete ({done} of {total} steps); rerun its command to finish it")
    return CurveRun(label, str(res.get("benchmark", "custom")), IncrementalCurve.from_results(res),
                  res["step_classes"], path=file, setting=str(res.get("setting") or "cil"))


def check_curves_comparable(runs: Sequence[CurveRun]) -> None:
    first = runs[0]
    for run in runs[1:]:
        if run.benchmark != first.benchmark or run.classes != first.classes:
            raise ValueError(f"runs of different class-incremental benchmarks: {first.label!r} is {first.benchmark!r} "
                             f"but {run.label!r} is {run.benchmark!r} (or their class steps differ)")


def curve_summary_rows(runs: Sequence[CurveRun], published: Optional[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Methods x Avg / Last, with the published row and Δ = ours − published where known.

    A published value that is unknown is ``null`` in the table file and stays empty here."""
    from zscl.evaluation.published import Delta, published_row

    header = ["method", *(t for _, t in METRICS)]
    if published is not None:
        header += ["paper row", *(f"paper {t}" for _, t in METRICS), *(f"Δ {t}" for _, t in METRICS)]
    rows: list[list[Any]] = []
    if runs and runs[0].curve.zero_shot is not None:  # the initial model: the paper's Continual-CLIP row
        s = runs[0].summary
        rows.append(["zero-shot", s["zero_shot_avg"], s["zero_shot_last"], *([None] * 5 if published is not None else [])])
    for run in runs:
        ours = [run.summary[k] for k, _ in METRICS]
        row: list[Any] = [run.label, *ours]
        if published is not None:
            entry = published_row(published, run.label)
            pub = [None if entry is None else _value(entry["published"].get(k)) for k, _ in METRICS]
            row += [entry and entry["method"], *pub, *(Delta(o - p) if p is not None else None for o, p in zip(ours, pub))]
        rows.append(row)
    return header, rows


def curve_published_rows(published: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    header = ["method", *(t for _, t in METRICS), "source"]
    rows = [[e["method"], *(_value(e["published"].get(k)) for k, _ in METRICS), e.get("source", "")]
            for e in published["results"]]
    return header, rows


def _value(x: Any) -> Optional[float]:
    return None if x is None else float(x)


def write_curve_plots(runs: Sequence[CurveRun], out: Path, title: str = "") -> list[Path]:
    """accuracy_per_step.png (every run's a_t against the number of seen classes) under ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        xs = run.curve.seen or list(range(1, len(run.curve.accuracy) + 1))
        ax.plot(xs, run.curve.accuracy, marker="o", label=f"{run.label} (Avg {run.summary['avg']:.1f})")
    if runs and runs[0].curve.zero_shot is not None:
        first = runs[0]
        xs = first.curve.seen or list(range(1, len(first.curve.accuracy) + 1))
        ax.plot(xs, first.curve.zero_shot, color="grey", linestyle="--",
                label=f"zero-shot (Avg {first.summary['zero_shot_avg']:.1f})")
    ax.set_xlabel("classes seen" if runs and runs[0].curve.seen else "step")
    ax.set_ylabel("top-1 accuracy on seen classes (%)")
    ax.set_title(title or "class-incremental accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = out / "accuracy_per_step.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


# names of these before settings became a registry (a curve of per-step accuracies is what CIL records)
CilRun, cil_run, check_cil_comparable = CurveRun, curve_run, check_curves_comparable
cil_summary_rows, cil_published_rows, write_cil_plots = curve_summary_rows, curve_published_rows, write_curve_plots
