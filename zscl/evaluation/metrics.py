"""The accuracy matrix of a continual run and its metrics (ZSCL, 2023; MTIL benchmark).

``A[i][j]`` is the top-1 accuracy (percent) on dataset ``j`` after training tasks ``0..i``:
an n×n matrix whose rows and columns follow the same task order. With ``n`` tasks,

- Transfer   = mean_{j=1..n-1} ( mean_{i<j} A[i][j] )   zero-shot transfer to not-yet-trained tasks
- Avg        = mean of all entries of A
- Last       = mean_j A[n-1][j]
- BWT        = mean_{j<n-1} ( A[n-1][j] - A[j][j] )                      (Lopez-Paz & Ranzato, 2017)
- Forgetting = mean_{j<n-1} ( max_{l=j..n-2} A[l][j] - A[n-1][j] )       (Chaudhry et al., 2018)

These are the definitions of the paper's results notebook; they reproduce its published
MTIL tables at one decimal. An optional zero-shot row ``z`` (the initial model's accuracy on
each dataset) gives the zero-shot Transfer baseline mean_{j>=1} z[j] and the zero-shot mean.

JSON format (``AccuracyMatrix.load``)::

    {"datasets": ["Aircraft", ...], "accuracy": [[...], ...], "zero_shot": [...] or {name: acc}}

Other keys are ignored. A file of several runs, ``{"results": [{"method": ..., "datasets": ...,
"accuracy": ...}, ...]}`` (the paper's reference file), is read with ``method=NAME``.
"""

from __future__ import annotations

import json
import math
import numbers
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Any, Mapping, Sequence

__all__ = ["AccuracyMatrix", "MatrixError", "summarize", "format_table", "unseen_mean"]

_EXPECTED = "expected a JSON object with 'datasets' (n names) and 'accuracy' (n×n, row i = after task i)"


class MatrixError(ValueError):
    """A malformed accuracy matrix; ``str(err)`` is one sentence saying what is wrong."""


def _percent(value: Any, where: str) -> float:
    """``value`` as a float percentage, or a MatrixError naming ``where`` it was found."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise MatrixError(f"{where} is {value!r} ({type(value).__name__}); expected a number (accuracy in percent)")
    x = float(value)
    if not math.isfinite(x):
        raise MatrixError(f"{where} is {x}; expected a finite accuracy in percent (0..100)")
    if not 0.0 <= x <= 100.0:
        raise MatrixError(
            f"{where} is {x:g}, outside 0..100; accuracies are percentages (multiply fractions by 100)"
        )
    return x


def _check_names(datasets: Any) -> list[str]:
    if not isinstance(datasets, (list, tuple)):
        raise MatrixError(f"'datasets' must be a list of dataset names, got {type(datasets).__name__}")
    for k, name in enumerate(datasets):
        if not isinstance(name, str) or not name:
            raise MatrixError(f"datasets[{k}] is {name!r}; expected a non-empty dataset name")
    repeated = [name for name, count in Counter(datasets).items() if count > 1]
    if repeated:
        raise MatrixError(f"dataset names must be unique, but {', '.join(map(repr, repeated))} appear more than once")
    return list(datasets)


def _check_shape(accuracy: Any, n_names: int) -> int:
    """The side n of a square ``accuracy`` with one row and column per dataset name."""
    if not isinstance(accuracy, (list, tuple)) or not all(isinstance(r, (list, tuple)) for r in accuracy):
        raise MatrixError("'accuracy' must be a list of rows, each a list of numbers (row i = after task i)")
    if not accuracy or not accuracy[0]:
        raise MatrixError("the accuracy matrix is empty; expected n rows of n accuracies, one row per trained task")
    width = len(accuracy[0])
    for i, row in enumerate(accuracy):
        if len(row) != width:
            raise MatrixError(
                f"accuracy row {i} has {len(row)} entries but row 0 has {width}; rows must be equally long"
            )
    n = len(accuracy)
    if width != n:
        raise MatrixError(f"accuracy is {n}×{width} but must be square: one row per task and one column per dataset")
    if n_names != n:
        raise MatrixError(
            f"'datasets' lists {n_names} names but accuracy is {n}×{n}; expected one name per row/column"
        )
    return n


def _check_zero_shot(zero_shot: Any, datasets: list[str]) -> list[float] | None:
    """Zero-shot accuracies as a list in ``datasets`` order (a list of n, or a {name: acc} mapping)."""
    if zero_shot is None:
        return None
    if isinstance(zero_shot, Mapping):
        missing = [name for name in datasets if name not in zero_shot]
        if missing:
            raise MatrixError(f"'zero_shot' has no accuracy for {', '.join(map(repr, missing))}")
        return [_percent(zero_shot[name], f"zero_shot[{name!r}]") for name in datasets]
    if not isinstance(zero_shot, (list, tuple)) or len(zero_shot) != len(datasets):
        raise MatrixError(
            f"'zero_shot' must be a list of {len(datasets)} accuracies (one per dataset) or a {{name: accuracy}} object"
        )
    return [_percent(x, f"zero_shot[{j}] ({datasets[j]!r})") for j, x in enumerate(zero_shot)]


def _select_method(obj: Mapping, method: str | None) -> tuple[Mapping, Any]:
    """The run entry and its zero-shot accuracies; ``method`` picks one of ``obj["results"]``."""
    if method is None:
        if "accuracy" not in obj and isinstance(obj.get("results"), list):
            names = [str(r.get("method")) for r in obj["results"] if isinstance(r, Mapping)]
            raise MatrixError(
                f"this file holds several runs ({', '.join(names)}); "
                "choose one with --method NAME (method=NAME in Python)"
            )
        return obj, obj.get("zero_shot")
    runs = obj.get("results")
    if not isinstance(runs, list):
        raise MatrixError("method was given but there is no 'results' list of {'method', 'datasets', 'accuracy'} runs")
    for run in runs:
        if isinstance(run, Mapping) and str(run.get("method", "")).lower() == method.lower():
            # The paper's reference file keeps the shared zero-shot row at top level.
            zero_shot = run.get("zero_shot", obj.get("zero_shot", obj.get("zero_shot_clip")))
            return run, zero_shot
    names = [str(r.get("method")) for r in runs if isinstance(r, Mapping)]
    raise MatrixError(f"no run named {method!r}; available: {', '.join(names)}")


@dataclass
class AccuracyMatrix:
    """``accuracy[i][j]``: percent top-1 on ``datasets[j]`` after training tasks ``0..i``.

    Validated on construction (shape, names, finite values in 0..100); entries become floats.
    ``zero_shot`` (the initial model's accuracy per dataset) is optional.
    """

    datasets: list[str]
    accuracy: list[list[float]]
    zero_shot: list[float] | None = None

    def __post_init__(self) -> None:
        # numpy arrays and torch tensors come in as nested lists
        self.accuracy = getattr(self.accuracy, "tolist", lambda: self.accuracy)()
        self.zero_shot = getattr(self.zero_shot, "tolist", lambda: self.zero_shot)()
        self.datasets = _check_names(self.datasets)
        n = _check_shape(self.accuracy, len(self.datasets))
        names = self.datasets
        self.accuracy = [
            [_percent(x, f"accuracy[{i}][{j}] (after task {names[i]!r}, on {names[j]!r})") for j, x in enumerate(row)]
            for i, row in enumerate(self.accuracy)
        ]
        self.zero_shot = _check_zero_shot(self.zero_shot, names)

    @property
    def n(self) -> int:
        return len(self.datasets)

    @classmethod
    def from_dict(cls, obj: Mapping, method: str | None = None) -> "AccuracyMatrix":
        """From ``{"datasets", "accuracy", "zero_shot"?}``; other keys are ignored."""
        if not isinstance(obj, Mapping):
            raise MatrixError(f"{_EXPECTED}, got {type(obj).__name__}")
        run, zero_shot = _select_method(obj, method)
        for key in ("datasets", "accuracy"):
            if key not in run:
                raise MatrixError(f"missing key {key!r}; {_EXPECTED}")
        return cls(datasets=run["datasets"], accuracy=run["accuracy"], zero_shot=zero_shot)

    @classmethod
    def load(cls, path: str | Path, method: str | None = None) -> "AccuracyMatrix":
        """Read a JSON file (see the module docstring). Invalid JSON raises MatrixError."""
        text = Path(path).read_text(encoding="utf-8")
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise MatrixError(f"not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
        return cls.from_dict(obj, method=method)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"datasets": list(self.datasets), "accuracy": [list(r) for r in self.accuracy]}
        if self.zero_shot is not None:
            out["zero_shot"] = list(self.zero_shot)
        return out

    def column(self, j: int) -> list[float]:
        return [row[j] for row in self.accuracy]


def _mean_or_none(values: Sequence[float]) -> float | None:
    return fmean(values) if values else None


def unseen_mean(row: Sequence[float], i: int) -> float | None:
    """Mean accuracy of ``row`` over the datasets not yet trained after task ``i`` (columns j > i)."""
    return _mean_or_none(row[i + 1 :])


def summarize(m: AccuracyMatrix) -> dict:
    """Transfer, Avg, Last, BWT, forgetting, and per-dataset Transfer/Avg/Last (all in percent).

    A metric with no terms (Transfer, BWT or forgetting of a 1-task run) is ``None``.
    ``zero_shot_transfer`` = mean_{j>=1} z[j] and ``zero_shot_avg`` = mean_j z[j], if z is known.
    """
    A, n = m.accuracy, m.n
    per_dataset: dict[str, dict[str, float | None]] = {}
    for j, name in enumerate(m.datasets):
        col = m.column(j)
        entry: dict[str, float | None] = {"transfer": _mean_or_none(col[:j]), "avg": fmean(col), "last": col[-1]}
        if m.zero_shot is not None:
            entry["zero_shot"] = m.zero_shot[j]
        per_dataset[name] = entry
    old = range(n - 1)  # datasets trained before the last task
    out: dict[str, Any] = {
        "transfer": _mean_or_none([per_dataset[name]["transfer"] for name in m.datasets[1:]]),
        "avg": fmean(x for row in A for x in row),
        "last": fmean(A[-1]),
        "bwt": _mean_or_none([A[-1][j] - A[j][j] for j in old]),
        "forgetting": _mean_or_none([max(A[l][j] for l in range(j, n - 1)) - A[-1][j] for j in old]),
    }
    if m.zero_shot is not None:
        out["zero_shot_transfer"] = _mean_or_none(m.zero_shot[1:])
        out["zero_shot_avg"] = fmean(m.zero_shot)
    out["per_dataset"] = per_dataset
    return out


def _cell(x: float | None, width: int) -> str:
    return ("-" if x is None else f"{x:.1f}").rjust(width)


def format_table(m: AccuracyMatrix, summary: dict | None = None) -> str:
    """A fixed-width text table: the matrix, per-dataset Transfer/Avg/Last, then the totals."""
    s = summarize(m) if summary is None else summary
    widths = [max(5, len(name)) for name in m.datasets]
    labels = [f"{i + 1:>2} {name}" for i, name in enumerate(m.datasets)]
    label_w = max(len(" 0 zero-shot"), *map(len, labels))

    def line(label: str, values: Sequence[float | None]) -> str:
        return "  ".join([label.ljust(label_w), *(_cell(x, w) for x, w in zip(values, widths))])

    header = "  ".join(["after task".ljust(label_w), *(n.rjust(w) for n, w in zip(m.datasets, widths))])
    out = ["accuracy (%) on each dataset (columns) after each task (rows)", header]
    if m.zero_shot is not None:
        out.append(line(" 0 zero-shot", m.zero_shot))
    out += [line(label, row) for label, row in zip(labels, m.accuracy)]
    out += ["", "per dataset"]
    keys = [("transfer", "Transfer"), ("avg", "Avg"), ("last", "Last")]
    keys += [("zero_shot", "zero-shot")] if m.zero_shot is not None else []
    for key, title in keys:
        out.append(line(title, [s["per_dataset"][name].get(key) for name in m.datasets]))
    out += ["", "overall"]
    zs = {"transfer": s.get("zero_shot_transfer"), "avg": s.get("zero_shot_avg"), "last": s.get("zero_shot_avg")}
    for key, title in keys[:3] + [("bwt", "BWT"), ("forgetting", "Forgetting")]:
        note = f"   (zero-shot: {zs[key]:.1f})" if zs.get(key) is not None else ""
        out.append(f"{title.ljust(label_w)}  {_cell(s[key], 6)}{note}")
    return "\n".join(out)
