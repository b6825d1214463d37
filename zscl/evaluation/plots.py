"""Figures of continual-learning results: heatmap, per-dataset curves, transfer curve, metric bars.

Each ``plot_*`` function writes one image (format from the file suffix, PNG by default,
written atomically) and returns its path; the matching ``*_figure`` function returns the
:class:`matplotlib.figure.Figure` for embedding or inspection. Figures are drawn on an
explicit Agg canvas, never through ``pyplot``, so no global backend or figure state is touched
and nothing needs a display. matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from zscl.evaluation.metrics import AccuracyMatrix, MatrixError, unseen_mean
from zscl.utils.io import atomic_path

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "heatmap_figure",
    "plot_heatmap",
    "heatmap_grid_figure",
    "plot_heatmap_grid",
    "accuracy_over_tasks_figure",
    "plot_accuracy_over_tasks",
    "transfer_curve_figure",
    "plot_transfer_curve",
    "metric_bars_figure",
    "plot_metric_bars",
    "metric_panels_figure",
    "plot_metric_panels",
]

ACCURACY_LABEL = "top-1 accuracy (%)"
METRIC_TITLES = {"transfer": "Transfer", "avg": "Avg", "last": "Last", "bwt": "BWT", "forgetting": "Forgetting"}


def _new_figure(width: float, height: float) -> "Figure":
    """A Figure on its own Agg canvas (the 'Agg backend', chosen here and not at import)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: "Figure", path: str | Path) -> Path:
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt)
    return path


def _colors(count: int) -> list:
    """Distinct colours: tab20's 10 strong hues first, then their light partners (and repeat)."""
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    order = [*range(0, 20, 2), *range(1, 20, 2)]
    return [cmap(order[k % 20]) for k in range(count)]


def _task_axis(ax: "Axes", names: Sequence[str], start: int, label: str = "tasks seen") -> None:
    """x ticks at start, start+1, ... labelled by ``names`` (tasks seen so far)."""
    ax.set_xticks(range(start, start + len(names)), list(names), rotation=40, ha="right")
    ax.set_xlabel(label)
    ax.set_ylabel(ACCURACY_LABEL)
    ax.grid(alpha=0.3)


# -- heatmap ----------------------------------------------------------------------------------


def _outline_regions(ax: "Axes", n: int, offset: int) -> list:
    """Box the diagonal (each dataset right after its own task) and draw the staircase that
    bounds the transfer region (j > i: datasets not trained yet); return legend handles."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    for i in range(n):
        ax.add_patch(Rectangle((i - 0.5, i + offset - 0.5), 1, 1, fill=False, edgecolor="white", linewidth=2.5))
    xs, ys = [0.5], [offset - 0.5]
    for i in range(n - 1):  # walk down-right along the upper triangle's lower edge
        xs += [i + 0.5, i + 1.5]
        ys += [i + offset + 0.5, i + offset + 0.5]
    ax.plot(xs, ys, color="red", linestyle="--", linewidth=1.8)
    return [
        Rectangle((0, 0), 1, 1, facecolor="#3b528b", edgecolor="white", linewidth=2,
                  label="white box: dataset just trained (diagonal)"),
        Line2D([], [], color="red", linestyle="--", label="above the red line: not trained yet (transfer)"),
    ]


def _draw_heatmap(ax: "Axes", m: AccuracyMatrix, title: str, font: float, row_labels: bool = True):
    """Draw ``m`` (zero-shot row on top when known) on ``ax``; returns (image, legend handles)."""
    n, names = m.n, m.datasets
    rows = ([list(m.zero_shot)] if m.zero_shot is not None else []) + m.accuracy
    offset = len(rows) - n
    image = ax.imshow(rows, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for r, row in enumerate(rows):
        for j, value in enumerate(row):
            color = "white" if value < 60 else "black"  # viridis is dark below ~60
            ax.text(j, r, f"{value:.1f}", ha="center", va="center", fontsize=font, color=color)
    if offset:
        ax.axhline(offset - 0.5, color="white", linewidth=3)
    handles = _outline_regions(ax, n, offset)
    ax.set_xticks(range(n), names, rotation=40, ha="right")
    ylabels = ["zero-shot"] * offset + [f"after task {i + 1}: {name}" for i, name in enumerate(names)]
    ax.set_yticks(range(len(rows)), ylabels if row_labels else [""] * len(rows))
    ax.set_title(title)
    return image, handles


def heatmap_figure(m: AccuracyMatrix, title: str | None = None) -> "Figure":
    """The matrix as a heatmap; a zero-shot row on top when known."""
    n = m.n
    fig = _new_figure(max(6.0, 0.7 * n + 3.5), max(4.0, 0.45 * (n + 1) + 2.6))
    ax = fig.add_subplot()
    image, handles = _draw_heatmap(ax, m, title or "accuracy after each task", 8.5 if n <= 8 else 7.5)
    fig.colorbar(image, ax=ax, label=ACCURACY_LABEL)
    ax.set_xlabel("evaluated on")
    fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    return fig


def heatmap_grid_figure(matrices: Mapping[str, AccuracyMatrix], columns: int = 3) -> "Figure":
    """Every method's accuracy matrix as one heatmap in a grid (row labels on the first column)."""
    _same_tasks_any(matrices)
    n, count = next(iter(matrices.values())).n, len(matrices)
    cols = min(columns, count)
    grid_rows = math.ceil(count / cols)
    cell = max(3.2, 0.55 * n + 1.2)
    fig = _new_figure(cell * cols + 3.0, (cell * 0.85 + 0.6) * grid_rows + 0.8)
    axes = fig.subplots(grid_rows, cols, squeeze=False)
    handles, image = [], None
    for k, (method, m) in enumerate(matrices.items()):
        ax = axes[k // cols][k % cols]
        image, handles = _draw_heatmap(ax, m, method, 7.0 if n <= 6 else 5.5, row_labels=k % cols == 0)
    for k in range(count, grid_rows * cols):
        axes[k // cols][k % cols].set_axis_off()
    fig.colorbar(image, ax=axes, label=ACCURACY_LABEL, shrink=0.8)
    fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    return fig


def plot_heatmap_grid(matrices: Mapping[str, AccuracyMatrix], path: str | Path, columns: int = 3) -> Path:
    return _save(heatmap_grid_figure(matrices, columns), path)


def plot_heatmap(m: AccuracyMatrix, path: str | Path, title: str | None = None) -> Path:
    return _save(heatmap_figure(m, title), path)


# -- per-dataset accuracy over tasks ----------------------------------------------------------


def accuracy_over_tasks_figure(m: AccuracyMatrix) -> "Figure":
    """One line per dataset against tasks seen (0 = zero-shot if known); a star where it is trained."""
    n, names = m.n, m.datasets
    start = 0 if m.zero_shot is not None else 1
    fig = _new_figure(max(7.0, 0.55 * n + 5.0), 4.8)
    ax = fig.add_subplot()
    for j, (name, color) in enumerate(zip(names, _colors(n))):
        ys = ([m.zero_shot[j]] if m.zero_shot is not None else []) + m.column(j)
        ax.plot(range(start, n + 1), ys, color=color, marker=".", label=name)
        ax.plot([j + 1], [m.accuracy[j][j]], color=color, marker="*", markersize=13, markeredgecolor="black",
                linestyle="none")
    _task_axis(ax, ["zero-shot"] * (1 - start) + list(names), start, "tasks seen (last trained task)")
    ax.set_ylim(0, 102)
    ax.legend(title="evaluated on (★ = its own task)", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.set_title("accuracy on each dataset during the sequence")
    return fig


def plot_accuracy_over_tasks(m: AccuracyMatrix, path: str | Path) -> Path:
    return _save(accuracy_over_tasks_figure(m), path)


# -- transfer curve -------------------------------------------------------------------------


def _same_tasks_any(results: Mapping[str, AccuracyMatrix]) -> list[str]:
    if not results:
        raise MatrixError("a comparison plot needs at least one method's accuracy matrix")
    names = next(iter(results.values())).datasets
    for method, m in results.items():
        if m.datasets != names:
            raise MatrixError(f"{method!r} has tasks {m.datasets}, but the first method has {names}; "
                              "a comparison plot needs runs over the same task sequence")
    return names


def _same_tasks(results: Mapping[str, AccuracyMatrix]) -> list[str]:
    names = _same_tasks_any(results)
    if len(names) < 2:
        raise MatrixError("a transfer curve needs at least 2 tasks (there is nothing untrained after the last one)")
    return names


def transfer_curve_figure(results: Mapping[str, AccuracyMatrix]) -> "Figure":
    """Per method: after task i, the mean accuracy on datasets j > i (not trained yet).

    The dashed line is the initial model on the same datasets (mean_{j>i} z[j]), if known.
    """
    names = _same_tasks(results)
    n = len(names)
    fig = _new_figure(max(6.5, 0.5 * n + 4.5), 4.5)
    ax = fig.add_subplot()
    xs = range(1, n)
    zero_shots: list[tuple[str, list[float]]] = []
    for (method, m), color in zip(results.items(), _colors(len(results))):
        ax.plot(xs, [unseen_mean(m.accuracy[i], i) for i in range(n - 1)], marker="o", color=color, label=method)
        if m.zero_shot is not None and all(m.zero_shot != z for _, z in zero_shots):
            zero_shots.append((method, m.zero_shot))
    for k, (method, z) in enumerate(zero_shots):
        label = "zero-shot (initial model)" if len(zero_shots) == 1 else f"zero-shot ({method})"
        ax.plot(xs, [unseen_mean(z, i) for i in range(n - 1)], color="gray", linestyle="--",
                dashes=(4, 2 + 2 * k), label=label)
    _task_axis(ax, names[: n - 1], 1, "tasks seen (last trained task)")
    ax.set_ylabel("mean accuracy on not-yet-trained datasets (%)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    ax.set_title("zero-shot transfer during the sequence")
    return fig


def plot_transfer_curve(results: Mapping[str, AccuracyMatrix], path: str | Path) -> Path:
    return _save(transfer_curve_figure(results), path)


# -- metric bars ------------------------------------------------------------------------------


def _metric_values(table: Mapping[str, Mapping[str, float]], metrics: Sequence[str]) -> dict[str, list[float]]:
    if not table or not metrics:
        raise ValueError("plot_metric_bars needs at least one method and one metric")
    values: dict[str, list[float]] = {}
    for method, row in table.items():
        for key in metrics:
            x = row.get(key) if isinstance(row, Mapping) else None
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                raise ValueError(f"method {method!r} has no finite number for metric {key!r} (got {x!r})")
        values[method] = [float(row[key]) for key in metrics]
    return values


def metric_bars_figure(
    table: Mapping[str, Mapping[str, float]],
    metrics: Sequence[str] = ("transfer", "avg", "last"),
    title: str | None = None,
    reference: Mapping[str, float] | None = None,
    reference_label: str = "zero-shot (initial model)",
) -> "Figure":
    """Grouped bars: one group per metric, one bar per method, each bar labelled with its value.

    ``reference`` (e.g. the zero-shot model's Transfer/Avg/Last) is drawn as a dashed line across
    each metric's group.
    """
    values = _metric_values(table, metrics)
    count = len(values)
    width = 0.8 / count
    fig = _new_figure(min(11.0, max(5.5, 0.3 * count * len(metrics) + 4.0)), 4.5)
    ax = fig.add_subplot()
    for k, ((method, ys), color) in enumerate(zip(values.items(), _colors(count))):
        xs = [g + (k - (count - 1) / 2) * width for g in range(len(metrics))]
        bars = ax.bar(xs, ys, width, color=color, label=method)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    for g, key in enumerate(metrics):
        if reference is not None and reference.get(key) is not None:
            ax.hlines(reference[key], g - 0.45, g + 0.45, colors="black", linestyles="--", linewidth=1.4,
                      label=reference_label if g == 0 else None)
    ax.set_xticks(range(len(metrics)), [METRIC_TITLES.get(key, key) for key in metrics])
    ax.set_ylabel("percent")
    top = max(max(ys) for ys in values.values())
    top = max([top, *(v for v in (reference or {}).values() if isinstance(v, (int, float)))])
    low = min(0.0, min(min(ys) for ys in values.values()))
    ax.set_ylim(low * 1.3, max(top * 1.12, 1.0))  # room for the value labels
    ax.axhline(0, color="black", linewidth=0.8)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    if title:
        ax.set_title(title)
    return fig


def plot_metric_bars(
    table: Mapping[str, Mapping[str, float]],
    path: str | Path,
    metrics: Sequence[str] = ("transfer", "avg", "last"),
    title: str | None = None,
    reference: Mapping[str, float] | None = None,
) -> Path:
    return _save(metric_bars_figure(table, metrics, title, reference), path)


# -- many models, few metrics: one horizontal-bar panel per metric ----------------------------


def metric_panels_figure(
    table: Mapping[str, Mapping[str, float]],
    metrics: Mapping[str, str],
    title: str | None = None,
) -> "Figure":
    """One panel per metric (``{key: panel title}``), one labelled horizontal bar per model.

    For comparisons of many models (e.g. every merge rule), where grouped vertical bars crowd.
    The first model is drawn as a dashed reference line in every panel.
    """
    values = _metric_values(table, list(metrics))
    names = list(values)
    fig = _new_figure(4.0 * len(metrics) + 2.5, max(3.0, 0.32 * len(names) + 1.4))
    axes = fig.subplots(1, len(metrics), sharey=True, squeeze=False)[0]
    colors = _colors(len(names))
    for col, (ax, (key, label)) in enumerate(zip(axes, metrics.items())):
        ys = [values[n][col] for n in names]
        bars = ax.barh(range(len(names)), ys, color=colors)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
        ax.axvline(ys[0], color="grey", linestyle="--", linewidth=1)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel(ACCURACY_LABEL)
        ax.set_xlim(0, max(max(ys) * 1.15, 1.0))
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()  # first model on top
    if title:
        fig.suptitle(title)
    return fig


def plot_metric_panels(
    table: Mapping[str, Mapping[str, float]], path: str | Path, metrics: Mapping[str, str], title: str | None = None
) -> Path:
    return _save(metric_panels_figure(table, metrics, title), path)
