"""``zscl metrics FILE [--json] [--plot DIR] [--method NAME]``: continual-learning metrics.

FILE is a JSON object with ``datasets`` (n names) and ``accuracy`` (n×n, row i = after task i),
optionally ``zero_shot`` (a list of n, or {name: accuracy}); a sequence run's results.json
qualifies. A class-incremental run's results.json (``"setting": "cil"``) gives Avg and Last over
its steps instead. ``--method NAME`` picks one run of a ``{"results": [{"method", "datasets",
"accuracy"}, ...]}`` file such as the paper's published MTIL matrices.
Exit codes: 0 success, 2 unreadable or malformed input, or plots that cannot be written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from jsonargparse import ArgumentParser

from zscl.evaluation.metrics import AccuracyMatrix, MatrixError, format_table, summarize

PROG = "zscl metrics"


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Transfer, Avg, Last, BWT and forgetting of an accuracy matrix (ZSCL / MTIL definitions).",
    )
    parser.add_argument(
        "file", type=str, help="JSON with 'datasets' (n names) and 'accuracy' (n×n, row i = after task i)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object with the metrics, nothing else")
    parser.add_argument(
        "--plot", type=str, default=None, help="folder to write heatmap.png and accuracy_over_tasks.png into"
    )
    parser.add_argument("--method", type=str, default=None, help="pick this run of a {'results': [...]} file")
    return parser


def _read(file: str, method: str | None) -> AccuracyMatrix:
    """The matrix in ``file``; every failure becomes a MatrixError with a readable sentence."""
    path = Path(file)
    if not path.exists():
        raise MatrixError("no such file")
    if path.is_dir():
        raise MatrixError("is a folder; expected a JSON file")
    try:
        return AccuracyMatrix.load(path, method=method)
    except UnicodeDecodeError:
        raise MatrixError("not a UTF-8 text file; expected JSON") from None
    except OSError as err:
        raise MatrixError(f"cannot be read ({err.strerror or err})") from None


def _plot(m: AccuracyMatrix, folder: Path, title: str) -> list[Path]:
    from zscl.evaluation.plots import plot_accuracy_over_tasks, plot_heatmap

    folder.mkdir(parents=True, exist_ok=True)
    return [
        plot_heatmap(m, folder / "heatmap.png", title=title),
        plot_accuracy_over_tasks(m, folder / "accuracy_over_tasks.png"),
    ]


def _cil(file: str, as_json: bool) -> int | None:
    """Class-incremental results (``"setting": "cil"``): Avg and Last over the steps; None otherwise."""
    from zscl.evaluation.incremental import IncrementalCurve, format_cil_table, summarize_cil
    from zscl.settings import result_kind

    try:
        res = json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None  # the matrix reader explains what is wrong with the file
    if not isinstance(res, dict) or result_kind(res) != "curve":
        return None
    try:
        curve = IncrementalCurve.from_results(res)
    except MatrixError as err:
        print(f"{PROG}: {file}: {err}", file=sys.stderr)
        return 2
    summary = summarize_cil(curve)
    print(json.dumps(summary, indent=1) if as_json else format_cil_table(curve, summary))
    return 0


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    cil = _cil(args.file, args.json)
    if cil is not None:
        if args.plot is not None:
            print(f"{PROG}: --plot draws accuracy matrices; for class-incremental runs use zscl compare --out DIR",
                  file=sys.stderr)
        return cil
    try:
        m = _read(args.file, args.method)
    except MatrixError as err:
        print(f"{PROG}: {args.file}: {err}", file=sys.stderr)
        return 2
    summary = summarize(m)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(format_table(m, summary))
    if args.plot is not None:
        try:
            written = _plot(m, Path(args.plot), args.method or Path(args.file).stem)
        except OSError as err:
            reason = err.strerror or str(err).splitlines()[0]
            print(f"{PROG}: cannot write plots to {args.plot}: {reason}", file=sys.stderr)
            return 2
        # With --json, stdout carries the JSON object only.
        print(f"wrote {' and '.join(map(str, written))}", file=sys.stderr if args.json else sys.stdout)
    return 0
