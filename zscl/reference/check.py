"""The data check of ZSCL's reference images (``zscl check-data``): the pool a run would read, decoded."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from zscl.datasets.badimages import decode_all, image_path
from zscl.datasets.check import SplitReport, check_shards, tally
from zscl.reference.images import reference_files, resolve


def check_reference(cfg: Any, data_root: str | Path, sample: int = 10000, workers: int = 1,
                    progress: bool = True) -> SplitReport:
    """Check ZSCL's reference images (a :class:`~zscl.reference.ReferenceImages`); large pools are sampled."""
    report = SplitReport(f"reference {cfg.source} {cfg.path}", "reference")
    if cfg.source == "wds":
        return check_shards(report, str(resolve(cfg.path, data_root)), sample, progress)
    try:
        pool = reference_files(cfg, data_root, None)
    except (OSError, ValueError) as err:
        report.missing = str(err)
        return report
    report.files = len(pool)  # type: ignore[arg-type]
    chosen = range(report.files)
    if sample and report.files > sample:
        chosen = sorted(random.Random(0).sample(range(report.files), sample))
        report.note = f"checked a random sample of {sample} of {report.files} images (--sample)"
    paths = [p for p in (image_path(pool, i) for i in chosen) if p is not None]
    return tally(report, decode_all(paths, workers, progress, "reference images"))
