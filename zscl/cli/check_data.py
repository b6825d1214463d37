"""``zscl check-data``: decode every image a run would read, before a long run.

    zscl check-data --config benchmark/mtil_order1 [--config method/zscl] --data-root /data \\
                    [--workers 8] [--sample 10000] [--json report.json]

The configs are the ones ``zscl sequence`` takes (a single ``task/<name>`` config works too);
any ``zscl sequence`` override can follow (``--data.reference_images.path ...``). Checked: the
train split of every task, the test split of every evaluation dataset and, when the method
distils (or no method config is given), the reference images. Exit status 0 when clean, 2 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional

import yaml


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zscl check-data", description=__doc__.strip().splitlines()[0])
    p.add_argument("-c", "--config", action="append", required=True,
                   help="benchmark, method or task config, as for zscl sequence (repeatable)")
    p.add_argument("--data-root", default=None,
                   help="folder holding the datasets (default: the configs' data.data_root)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decoding processes")
    p.add_argument("--sample", type=int, default=10000,
                   help="reference pools larger than this are checked on a random sample of this many images (0: all)")
    p.add_argument("--json", default=None, metavar="REPORT", help="also write the report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _sets_distill(config: str) -> bool:
    with open(config, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    return isinstance(data, dict) and "distill" in (data.get("model") or {})


def needs_reference(cfg: Any, configs: Optional[list[str]] = None) -> bool:
    """Whether the run reads reference images: its method distils (or, without a method config, maybe)."""
    from zscl.methods.classes import DEFAULT, model_class

    model = cfg.model.as_dict() if hasattr(cfg.model, "as_dict") else dict(cfg.model)
    if model_class(cfg.get("model_class") or DEFAULT).requires_reference(model):
        return True
    return configs is not None and not any(_sets_distill(c) for c in configs)


def run_check(cfg: Any, *, reference: bool, workers: int = 1, sample: int = 10000, progress: bool = True) -> list:
    """Check every image the run configured by ``cfg`` (a parsed ``zscl sequence`` config) would read."""
    from zscl.datasets import load_custom_datasets
    from zscl.datasets.check import check_datasets
    from zscl.reference.check import check_reference
    from zscl.reference import ReferenceImages
    from zscl.runner.configs import task_dataset

    d = cfg.data
    if d.custom_datasets:
        load_custom_datasets(d.custom_datasets, data_root=d.data_root)
    tasks = [task_dataset(t) for t in cfg.benchmark.tasks] or [d.dataset]
    evals = list((cfg.benchmark.eval_datasets if cfg.benchmark.tasks else d.eval_datasets) or tasks)
    reports = check_datasets(tasks, evals, d.data_root, workers, progress)
    if reference:
        images = ReferenceImages(**vars(d.reference_images)) if d.reference_images else ReferenceImages()
        reports.append(check_reference(images, d.data_root, sample, workers, progress))
    return reports


def print_report(reports: list) -> bool:
    """Print the report; True when there is no problem."""
    from zscl.datasets.check import format_report

    for line in format_report(reports):
        print(line, flush=True)
    return all(r.problems == 0 for r in reports)


def main(argv: list[str]) -> int:
    from zscl.cli.errors import report_errors

    args, rest = build_parser().parse_known_args(argv)
    with report_errors("zscl check-data") as status:
        from zscl.runner.build import parse_run
        from zscl.runner.configs import resolve_config_args

        configs = [resolve_config_args(["--config", c])[1] for c in args.config]
        seq_argv = [a for c in configs for a in ("--config", c)] + rest
        if args.data_root is not None:
            seq_argv += ["--data.data_root", args.data_root]
        _, cfg = parse_run(seq_argv, prog="zscl check-data")
        reports = run_check(cfg, reference=needs_reference(cfg, configs), workers=args.workers, sample=args.sample,
                            progress=not args.no_progress)
        ok = print_report(reports)
        if args.json:
            from zscl.datasets.check import report_json
            from zscl.utils.io import write_json_atomic

            write_json_atomic(args.json, report_json(reports))
        status.code = 0 if ok else 2
    return status.code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
