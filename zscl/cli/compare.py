"""``zscl compare RUN... [--published NAME] [--per-dataset] [--out DIR] [--format md|csv|latex]``.

Puts finished ``zscl sequence`` runs side by side: methods × Transfer / Avg / Last, with the
paper's published numbers and Δ = ours − published beside each run whose method the paper has
(MTIL order I and II ship with the package). A RUN is a run folder or its results.json.
``--out DIR`` also writes the table(s) and three plots there. Runs of different benchmarks or
dataset lists are refused (exit 2). With no RUN, ``--published NAME`` prints the paper's table.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from jsonargparse import ArgumentParser

PROG = "zscl compare"
SUFFIX = {"md": "md", "csv": "csv", "latex": "tex"}


def build_parser() -> ArgumentParser:
    from zscl.evaluation.compare import published_names

    p = ArgumentParser(prog=PROG, description=__doc__.strip().splitlines()[0])
    p.add_argument("runs", nargs="*", type=str, help="run folders or results.json files")
    p.add_argument("--published", type=Optional[str], default=None,
                   help=f"published table to print beside the runs ({', '.join(published_names())} or a JSON file; "
                        "default: the runs' benchmark, when shipped)")
    p.add_argument("--label", nargs="+", type=str, default=None,
                   help="names for the runs, in order (default: each run's method config name)")
    p.add_argument("--per-dataset", action="store_true", help="add per-dataset Transfer and Last tables")
    p.add_argument("--out", type=Optional[str], default=None, help="folder for the table file(s) and plots")
    p.add_argument("--format", type=str, choices=list(SUFFIX), default="md", help="table format")
    return p


def main(argv: list[str]) -> int:
    from zscl.cli.errors import report_errors
    from zscl.evaluation.compare import CompareError, compare, write_plots
    from zscl.utils.io import write_text_atomic

    args = build_parser().parse_args(argv)
    with report_errors(PROG) as status:
        if not args.runs and not args.published:
            raise CompareError("give at least one run folder or results.json (or --published NAME for the paper's table)")
        runs, _, tables = compare(args.runs, args.label, args.published, args.per_dataset)
        text = "\n\n".join(t.render(args.format) for t in tables)
        print(text)
        if args.out:
            out = Path(args.out)
            try:
                write_text_atomic(out / f"comparison.{SUFFIX[args.format]}", text + "\n")
                written = write_plots(runs, out, runs[0].benchmark) if runs else []
            except OSError as err:
                raise CompareError(f"cannot write to {out}: {err.strerror or err}") from None
            print(f"\nwrote {out / ('comparison.' + SUFFIX[args.format])}" + "".join(f", {p.name}" for p in written),
                  file=sys.stderr)
    return status.code
