"""Weight averaging and model merging: pure functions on state dicts, registered by name.

``merge(name, base, models, weights=None, **hparams)`` runs a rule of :data:`MERGE_RULES`
(``average``, ``greedy_soup``, ``wise``, ``task_arithmetic``, ``ties``, ``dare_linear``,
``dare_ties``, ``fisher``, ``mwa``, ``magmax``, ``sparse_soup``). The Lightning averaging
callbacks (:data:`AVERAGING_CALLBACKS`) live in :mod:`zscl.merging.callbacks`, imported on
first access so that merging alone does not import Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

from zscl.merging.base import MERGE_RULES, MergeError, MergeRule, StateDict, merge, open_state_dict
from zscl.merging.fisher import estimate_fisher, zero_shot_logits_fn
from zscl.merging.mwa import mwa_weights
from zscl.merging.running import ema_update_, uniform_update_
from zscl.merging.soups import average, greedy_soup, sparse_soup, wise, wise_last
from zscl.merging.task_arithmetic import generalized_task_arithmetic

_CALLBACK_NAMES = ("AVERAGING_CALLBACKS", "CheckpointAveraging", "EMA", "UniformAveraging", "WiSEFT")

__all__ = [
    "MERGE_RULES",
    "MergeError",
    "MergeRule",
    "StateDict",
    "average",
    "ema_update_",
    "estimate_fisher",
    "generalized_task_arithmetic",
    "greedy_soup",
    "merge",
    "mwa_weights",
    "open_state_dict",
    "sparse_soup",
    "uniform_update_",
    "wise",
    "wise_last",
    "zero_shot_logits_fn",
    *_CALLBACK_NAMES,
]


def __getattr__(name: str) -> Any:
    if name in _CALLBACK_NAMES:
        return getattr(importlib.import_module("zscl.merging.callbacks"), name)
    raise AttributeError(f"module 'zscl.merging' has no attribute {name!r}")
