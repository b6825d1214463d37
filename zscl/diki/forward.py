"""DIKI's forward passes on a frozen open_clip CLIP with :class:`DIKIPrefixes` hooked in.

* Training (task ``t`` known): both towers use task ``t``'s prefixes with ``w = 1``.
* Test (no task id): the frozen CLIP's image features (prefixes off) go to the calibration
  (:class:`TaskGaussians`), which picks each image's task and weight; the image tower then runs
  with them, and the text tower runs once per distinct selected task with the batch-mean weight.

``logits = exp(logit_scale) * normalise(image) . normalise(text)^T`` as open_clip's ``get_logits``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from zscl.diki.calibration import Selection, TaskGaussians
from zscl.diki.prefix import DIKIPrefixes, Route


def _scaled_cosine(clip: nn.Module, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    return clip.logit_scale.exp() * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T


def task_logits(clip: nn.Module, prefixes: DIKIPrefixes, images: torch.Tensor, tokens: torch.Tensor,
                task: int, weight: float = 1.0) -> torch.Tensor:
    """Logits ``[B, C]`` with task ``task``'s prefixes in both towers at weight ``weight`` (training: 1)."""
    with prefixes.routing(image=Route(task, weight), text=Route(task, weight)):
        return _scaled_cosine(clip, clip.encode_image(images), clip.encode_text(tokens))


def frozen_image_features(clip: nn.Module, prefixes: DIKIPrefixes, images: torch.Tensor) -> torch.Tensor:
    """The frozen CLIP's (unnormalised) image features, prefixes off: what the task Gaussians are fitted on and scored with."""
    with torch.no_grad(), prefixes.routing():
        return clip.encode_image(images)


def select_tasks(clip: nn.Module, prefixes: DIKIPrefixes, gaussians: TaskGaussians, images: torch.Tensor,
                 voting: bool = True) -> Selection:
    """The calibration's decision for ``images``, from the frozen CLIP's features (prefixes off)."""
    return gaussians.select(frozen_image_features(clip, prefixes, images), voting=voting)


def class_text_features(clip: nn.Module, tokens: torch.Tensor, templates: int = 1) -> torch.Tensor:
    """Class embeddings ``[C, D]`` of ``tokens`` ``[C * templates]`` (class-major): with one template the
    text tower's output, else the mean of the normalised embeddings of a class's prompts (CLIP's
    prompt ensembling, as :func:`zscl.evaluation.zeroshot.build_classifier`). The active routing applies."""
    text = clip.encode_text(tokens)
    if templates == 1:
        return text
    return F.normalize(text, dim=-1).view(tokens.shape[0] // templates, templates, -1).mean(1)


def zero_shot_logits(clip: nn.Module, prefixes: DIKIPrefixes, images: torch.Tensor, tokens: torch.Tensor,
                     templates: int = 1) -> torch.Tensor:
    """The frozen CLIP's logits ``[B, C]`` (prefixes off in both towers): DIKI before any task is learned."""
    with prefixes.routing():
        return _scaled_cosine(clip, clip.encode_image(images), class_text_features(clip, tokens, templates))


def calibrated_logits(clip: nn.Module, prefixes: DIKIPrefixes, gaussians: TaskGaussians, images: torch.Tensor,
                      tokens: torch.Tensor, voting: bool = True, templates: int = 1,
                      selection: Optional[Selection] = None) -> torch.Tensor:
    """Test-time logits ``[B, C]`` without task ids (module docstring); ``tokens`` hold ``templates``
    prompts per class (:func:`class_text_features`); ``selection``: the calibration's decision if already made.

    With voting off, images of different selected tasks score against text features encoded with
    their own task's prefixes; the text weight is the mean ``w`` of the whole batch either way.
    """
    sel = selection if selection is not None else select_tasks(clip, prefixes, gaussians, images, voting)
    with prefixes.routing(image=Route(sel.tasks, sel.weights.to(images.dtype))):
        image = clip.encode_image(images)
    logits = image.new_empty(images.shape[0], tokens.shape[0] // templates)
    for task in sel.tasks.unique().tolist():
        with prefixes.routing(text=Route(int(task), sel.text_weight)):
            text = class_text_features(clip, tokens, templates)
        rows = sel.tasks == task
        logits[rows] = _scaled_cosine(clip, image[rows], text)
    return logits
