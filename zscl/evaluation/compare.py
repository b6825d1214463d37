"""Side-by-side comparison of continual runs, with the paper's published numbers beside them.

A *run* is a ``zscl sequence`` output folder or its ``results.json``. All runs compared must be
of one benchmark over one dataset list (the same rows and columns), or the comparison refuses.
For a benchmark whose published matrices ship with the package (``data/published/<name>.json``:
MTIL order I and II of the ZSCL paper), the published Transfer / Avg / Last of the matching
method (matched by the method config's name, e.g. ``lwf`` -> LwF) stand beside ours with a
Δ = ours − published column. Tables render as Markdown, CSV or LaTeX; plots are Transfer/Avg/Last
bars with the zero-shot level as a line, every method's transfer curve on one figure, and the
accuracy matrices as a grid of heatmaps. ``zscl demo`` writes its report with the same code.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from zscl.evaluation.incremental import (
    CurveRun,
    check_curves_comparable,
    curve_pairing_notes,
    curve_published_rows,
    curve_run,
    curve_summary_rows,
)
from zscl.evaluation.metrics import AccuracyMatrix, MatrixError, summarize
from zscl.evaluation.published import (  # noqa: F401  (names of this module before the split)
    CompareError,
    Delta,
    entry_notes,
    load_published,
    published_matrix,
    published_names,
    published_row,
    recipe_mismatches,
)
from zscl.settings import result_kind, setting_of

Format = Literal["md", "csv", "latex"]
METRICS = (("transfer", "Transfer"), ("avg", "Avg"), ("last", "Last"))


@dataclass
class Run:
    """One finished continual run: its label, benchmark, matrix (with zero-shot row) and metrics."""

    label: str
    benchmark: str
    matrix: AccuracyMatrix
    summary: dict[str, Any] = field(init=False)
    path: Optional[Path] = None
    setting: str = "mtil"

    def __post_init__(self) -> None:
        self.summary = summarize(self.matrix)


def load_run(path: str | Path, label: Optional[str] = None) -> Run:
    """A run from a folder holding ``results.json`` or from the file itself (complete runs only)."""
    p = Path(path)
    file = p / "results.json" if p.is_dir() else p
    if not file.is_file():
        raise CompareError(f"{path}: no results.json (expected a `zscl sequence` output folder or its results.json)")
    try:
        res = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CompareError(f"{file}: cannot be read as JSON ({err})") from None
    name = label or res.get("method") or (p.name if p.is_dir() else p.parent.name)
    if result_kind(res) == "curve":  # e.g. class-incremental: a per-step curve, not a matrix
        try:
            return curve_run(res, file, str(name))
        except (ValueError, MatrixError) as err:
            raise CompareError(str(err) if str(file) in str(err) else f"{file}: {err}") from None
    for key in ("datasets", "accuracy"):
        if key not in res:
            raise CompareError(f"{file}: no {key!r}; is it a `zscl sequence` results.json?")
    done, n = len(res["accuracy"]), len(res["datasets"])
    if done != n:
        raise CompareError(f"{file}: the run is incomplete ({done} of {n} tasks); rerun its command to finish it")
    try:
        matrix = AccuracyMatrix(res["datasets"], res["accuracy"], res.get("zero_shot"))
    except MatrixError as err:
        raise CompareError(f"{file}: {err}") from None
    return Run(str(name), str(res.get("benchmark", "custom")), matrix, path=file, setting=setting_of(res))


def check_comparable(runs: Sequence[Run]) -> None:
    """Refuse runs of different benchmarks or dataset lists (their numbers do not compare)."""
    if not runs:
        raise CompareError("no runs to compare")
    first = runs[0]
    for run in runs[1:]:
        if run.benchmark != first.benchmark:
            raise CompareError(f"runs of different benchmarks: {first.label!r} is {first.benchmark!r} but "
                               f"{run.label!r} is {run.benchmark!r}; compare runs of one benchmark")
        if run.matrix.datasets != first.matrix.datasets:
            raise CompareError(f"runs over different dataset lists: {first.label!r} has {first.matrix.datasets} but "
                               f"{run.label!r} has {run.matrix.datasets}")
    labels = [r.label for r in runs]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise CompareError(f"several runs are labelled {', '.join(map(repr, dupes))}; give each a distinct --label")


# -- tables -----------------------------------------------------------------------------------


@dataclass
class Table:
    """A rectangular table of cells (str, float or None) that renders as Markdown, CSV or LaTeX."""

    header: list[str]
    rows: list[list[Any]]
    title: str = ""
    notes: list[str] = field(default_factory=list)  # footnotes printed under the table (md, LaTeX); CSV stays data

    def render(self, fmt: Format = "md") -> str:
        return {"md": _markdown, "csv": _csv, "latex": _latex}[fmt](self)


def _cell(x: Any) -> str:
    if x is None:
        return "–"
    return f"{x:+.1f}" if isinstance(x, Delta) else (f"{x:.1f}" if isinstance(x, float) else str(x))


def _markdown(t: Table) -> str:
    lines = [f"**{t.title}**", ""] if t.title else []
    lines += ["| " + " | ".join(t.header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(t.header))) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in t.rows]
    return "\n".join(lines + ([""] + [f"Note: {n}" for n in t.notes] if t.notes else []))


def _csv(t: Table) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(t.header)
    writer.writerows([["" if c is None else (round(c, 4) if isinstance(c, float) else c) for c in row] for row in t.rows])
    return buf.getvalue().rstrip("\n")


def _latex(t: Table) -> str:
    esc = lambda s: str(s).replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")  # noqa: E731
    lines = [r"\begin{tabular}{l" + "r" * (len(t.header) - 1) + "}", r"\toprule", " & ".join(map(esc, t.header)) + r" \\",
             r"\midrule"]
    lines += [" & ".join(esc(_cell(c)).replace("–", "--") for c in row) + r" \\" for row in t.rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [f"% Note: {n}" for n in t.notes]
    return ("% " + t.title + "\n" if t.title else "") + "\n".join(lines)


def _zero_shot_metrics(run: Run) -> list[Optional[float]]:
    s = run.summary
    return [s.get("zero_shot_transfer"), s.get("zero_shot_avg"), s.get("zero_shot_avg")]


def summary_table(runs: Sequence[Run], published: Optional[dict[str, Any]] = None, delta: bool = True,
                  published_title: str = "paper") -> Table:
    """Methods × Transfer / Avg / Last; with ``published``, the paper's row beside each run (and Δ)."""
    header = ["method", *(t for _, t in METRICS)]
    if published is not None:
        header += [f"{published_title} row", *(f"{published_title} {t}" for _, t in METRICS)]
        header += [f"Δ {t}" for _, t in METRICS] if delta else []
    rows: list[list[Any]] = []
    if runs and runs[0].matrix.zero_shot is not None:
        pub = (published or {}).get("zero_shot_published")
        rows.append(["zero-shot", *_zero_shot_metrics(runs[0]), *_published_cells(pub, "Zero-shot", _zero_shot_metrics(runs[0]),
                                                                                  published, delta)])
    entries = []
    for run in runs:
        ours = [run.summary[k] for k, _ in METRICS]
        entry = published_row(published, run.label) if published is not None else None
        entries += [entry] if entry else []
        rows.append([run.label, *ours, *_published_cells(entry and entry["published"], entry and entry["method"], ours,
                                                         published, delta)])
    return Table(header, rows, "Transfer / Avg / Last (%)", published_notes(entries))


def published_notes(entries: Sequence[Optional[dict[str, Any]]]) -> list[str]:
    """Footnotes of the published rows shown (:func:`~zscl.evaluation.published.entry_notes`)."""
    return [n for e in entries for n in entry_notes(e)]


def _published_cells(pub: Optional[dict], name: Optional[str], ours: list, published: Optional[dict], delta: bool) -> list:
    if published is None:
        return []
    if not pub:
        return [None] * (4 + 3 * delta)
    values = _printed(pub)
    diffs = [Delta(o - v) if o is not None and v is not None else None for o, v in zip(ours, values)] if delta else []
    return [name, *values, *diffs]


def _printed(pub: dict[str, Any]) -> list[Optional[float]]:
    """A published row's Transfer / Avg / Last; a null cell (not reported) stays None, never 0."""
    return [None if pub.get(k) is None else float(pub[k]) for k, _ in METRICS]


def published_table(published: dict[str, Any]) -> Table:
    """The paper's rows: Transfer / Avg / Last recomputed from its matrices, beside the printed ones."""
    rows: list[list[Any]] = []
    zs = published.get("zero_shot_published")
    if zs:
        rows.append(["Zero-shot", None, None, None, *(float(zs[k]) for k, _ in METRICS)])
    for entry in published["results"]:
        m = published_matrix(entry, published)
        ours = [summarize(m)[k] for k, _ in METRICS] if m is not None else [None] * 3
        rows.append([entry["method"], *ours, *_printed(entry["published"])])
    header = ["method", *(f"{t} (from matrix)" for _, t in METRICS), *(f"{t} (printed)" for _, t in METRICS)]
    return Table(header, rows, f"published: {published.get('benchmark', '')}", published_notes(published["results"]))


def other_reports_table(published: dict[str, Any]) -> Optional[Table]:
    """Published re-reports that disagree with a row or lack a number (``other_reports``), each with its source."""
    others = published.get("other_reports") or []
    if not others:
        return None
    rows = [[entry["method"], *_printed(entry["published"]), entry.get("source", "")] for entry in others]
    return Table(["method", *(t for _, t in METRICS), "source"], rows,
                 f"other published reports: {published.get('benchmark', '')} (kept apart; – = not reported)")


def per_dataset_tables(runs: Sequence[Run]) -> list[Table]:
    """The paper's per-dataset layout: for Transfer and for Last, methods × datasets (+ mean)."""
    names = runs[0].matrix.datasets
    tables = []
    for key, title in (("transfer", "Transfer"), ("last", "Last")):
        rows: list[list[Any]] = []
        if runs[0].matrix.zero_shot is not None:
            z = runs[0].matrix.zero_shot
            zrow = [None if key == "transfer" and j == 0 else z[j] for j in range(len(names))]
            rows.append(["zero-shot", *zrow, _zero_shot_metrics(runs[0])[0 if key == "transfer" else 2]])
        for run in runs:
            per = run.summary["per_dataset"]
            rows.append([run.label, *(per[n][key] for n in names), run.summary[key]])
        tables.append(Table(["method", *names, "mean"], rows, f"{title} per dataset (%)"))
    return tables


# -- the whole comparison ---------------------------------------------------------------------


def comparison_tables(runs: Sequence[Run], published: Optional[dict[str, Any]] = None,
                      per_dataset: bool = False) -> list[Table]:
    """The summary table (with the paper beside it when known), then the per-dataset tables."""
    tables = [summary_table(runs, published)] if runs else []
    if published is not None and not runs:
        tables.append(published_table(published))
    others = other_reports_table(published) if published is not None else None
    tables += [others] if others is not None else []
    if per_dataset and runs:
        tables += per_dataset_tables(runs)
    return tables


def write_plots(runs: Sequence[Run], out: Path, title: str = "") -> list[Path]:
    """metrics.png (bars + zero-shot line), transfer_curves.png, heatmaps.png under ``out``."""
    from zscl.evaluation.plots import plot_heatmap_grid, plot_metric_bars, plot_transfer_curve

    if runs and isinstance(runs[0], CurveRun):
        from zscl.evaluation.incremental import write_curve_plots

        return write_curve_plots(runs, out, title)
    out.mkdir(parents=True, exist_ok=True)
    first = runs[0].summary
    zero = {"transfer": first.get("zero_shot_transfer"), "avg": first.get("zero_shot_avg"), "last": first.get("zero_shot_avg")}
    paths = [plot_metric_bars({r.label: r.summary for r in runs}, out / "metrics.png",
                              title=f"{title}: Transfer / Avg / Last".strip(": "),
                              reference=zero if first.get("zero_shot_avg") is not None else None)]
    if runs[0].matrix.n >= 2:
        paths.append(plot_transfer_curve({r.label: r.matrix for r in runs}, out / "transfer_curves.png"))
    paths.append(plot_heatmap_grid({r.label: r.matrix for r in runs}, out / "heatmaps.png"))
    return paths


def compare(paths: Sequence[str], labels: Optional[Sequence[str]] = None, published: Optional[str] = None,
            per_dataset: bool = False) -> tuple[list[Run], Optional[dict[str, Any]], list[Table]]:
    """Load and check the runs, find the published table (``published`` or the runs' benchmark)."""
    labels = list(labels or [])
    if len(labels) > len(paths):
        raise CompareError(f"{len(labels)} labels for {len(paths)} runs")
    runs = [load_run(p, labels[i] if i < len(labels) else None) for i, p in enumerate(paths)]
    settings = {r.setting for r in runs}
    if len(settings) > 1:
        raise CompareError(f"cannot compare runs of different settings ({', '.join(sorted(settings))}): their metrics "
                           "and test protocols differ; compare each setting apart")
    name = published or (runs[0].benchmark if runs and runs[0].benchmark in published_names() else None)
    table = load_published(name) if name else None
    if table is not None and runs and (result_kind(table) != _kind(runs[0]) or setting_of(table) != runs[0].setting):
        raise CompareError(f"the published table {name!r} is a {setting_of(table).upper()} table but the runs are "
                           f"{settings.pop().upper()} runs; choose the matching --published table")
    if (runs and _kind(runs[0]) == "curve") or (not runs and table is not None and result_kind(table) == "curve"):
        return runs, table, _curve_tables(runs, table)
    if runs:
        check_comparable(runs)
    if table is not None and runs:
        expected = table.get("datasets")
        if expected and expected != runs[0].matrix.datasets:
            raise CompareError(f"the published table {name!r} is over {expected}, but the runs are over "
                               f"{runs[0].matrix.datasets}; choose the matching --published table")
    return runs, table, comparison_tables(runs, table, per_dataset)


def _kind(run: Run) -> str:
    return "curve" if isinstance(run, CurveRun) else "matrix"


def _curve_tables(runs: Sequence[CurveRun], table: Optional[dict[str, Any]]) -> list[Table]:
    """Class-incremental runs: methods x Avg / Last (and the paper beside them); or the paper's table."""
    if runs:
        try:
            check_curves_comparable(runs)
        except ValueError as err:
            raise CompareError(str(err)) from None
        labels = [r.label for r in runs]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise CompareError(f"several runs are labelled {', '.join(map(repr, dupes))}; give each a distinct --label")
        header, rows = curve_summary_rows(runs, table)
        return [Table(header, rows, "class-incremental Avg / Last (%)", curve_pairing_notes(runs, table))]
    header, rows = curve_published_rows(table)
    return [Table(header, rows, f"published: {table.get('benchmark', '')}")]
