"""Keeps Lightning's informational chatter (device banners, tips) out of zscl's own output."""

from __future__ import annotations

import logging
import warnings


def quiet_lightning() -> None:
    """Only Lightning warnings and errors reach the console; zscl prints its own progress."""
    import lightning.pytorch  # noqa: F401  (its import sets its loggers to INFO; override after)

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Expected in our setting: infinite iterable loaders, eval-only trainers, few steps in tests. (Mid-task
    # resume needs no silencing: the training loaders have state_dict/load_state_dict, so Lightning
    # knows they resume; see zscl.datasets.badimages.ReportingLoader.)
    for pattern in (".*does not have many workers.*", ".*Found .* module\\(s\\) in eval mode.*",
                    ".*LeafSpec.*", ".*IterableDataset. has .__len__. defined.*",
                    ".*number of training batches.*smaller than the logging interval.*"):
        warnings.filterwarnings("ignore", message=pattern)
    import os

    if "SLURM_JOB_ID" not in os.environ:
        # Lightning's hint is for a SLURM job that forgot srun; outside any job (a login node, a workstation
        # with SLURM installed, torchrun) it does not apply. Inside a job without srun it stays.
        warnings.filterwarnings("ignore", message=".*The `srun` command is available on your system but is not used.*")
