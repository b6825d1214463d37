"""DIKI (Tang et al., ECCV 2024): residual prefix attention in a frozen CLIP, one prefix set per
task, chosen at test time by per-task Gaussians on frozen image features (docs/DIKI.md).

``prefix`` (prefixes and their attention hooks), ``calibration`` (task Gaussians, selection,
batch voting), ``forward`` (training and calibrated test logits), ``holdout`` (model selection),
``export`` (the sidecar file), ``module`` (:class:`~zscl.diki.module.DIKICLIP`, the method; imported
on use, as the registry does).
"""

from zscl.diki.calibration import Selection, TaskGaussians, majority
from zscl.diki.forward import (calibrated_logits, class_text_features, frozen_image_features, select_tasks, task_logits,
                               zero_shot_logits)
from zscl.diki.prefix import DIKIPrefixes, PrefixConfig, Route, prefix_attention

__all__ = ["DIKIPrefixes", "PrefixConfig", "Route", "Selection", "TaskGaussians", "calibrated_logits",
           "class_text_features", "frozen_image_features", "majority", "prefix_attention", "select_tasks",
           "task_logits", "zero_shot_logits"]
