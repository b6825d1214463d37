"""Keeps Lightning's informational chatter (device banners, tips) out of zscl's own output."""

from __future__ import annotations

import logging
import warnings


def quiet_lightning() -> None:
    """Only Lightning warnings and errors reach the console; zscl prints its own progress."""
    import lightning.pytorch  # noqa: F401  (its import sets its loggers to INFO; override after)

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Expected in our setting: infinite iterable loaders, eval-only trainers, few steps in tests, and
    # mid-task resume (our streams restart at trainer.global_step, which Lightning cannot see).
    for pattern in (".*does not have many workers.*", ".*Found .* module\\(s\\) in eval mode.*",
                    ".*LeafSpec.*", ".*IterableDataset. has .__len__. defined.*",
                    ".*resuming from a checkpoint that ended before the epoch ended.*",
                    ".*number of training batches.*smaller than the logging interval.*"):
        warnings.filterwarnings("ignore", message=pattern)
