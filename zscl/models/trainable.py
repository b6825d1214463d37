"""Which CLIP parameters a continual-learning run optimises.

The ZSCL reference code (``mtil/src/models/finetune.py``, ``--train_mode``) offers three modes:

- ``"whole"``: every parameter except ``logit_scale`` (both encoders);
- ``"image"``: the image encoder, ``visual.*``;
- ``"text"``: everything except ``visual.*`` and ``logit_scale`` (text tower, token and
  positional embeddings, ``text_projection``).

The temperature ``logit_scale`` (and SigLIP's ``logit_bias``) never trains: ZSCL keeps CLIP's
pretrained temperature fixed.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

__all__ = ["TrainMode", "select_trainable"]

TrainMode = Literal["whole", "image", "text"]
_FROZEN = ("logit_scale", "logit_bias")
_VISUAL = "visual."


def _trains(name: str, mode: TrainMode) -> bool:
    if name in _FROZEN:
        return False
    if mode == "image":
        return name.startswith(_VISUAL)
    if mode == "text":
        return not name.startswith(_VISUAL)
    return True


def select_trainable(model: torch.nn.Module, mode: TrainMode) -> list[tuple[str, torch.nn.Parameter]]:
    """Set ``requires_grad`` for ``mode`` on every parameter; return the ``(name, param)`` pairs to optimise."""
    if mode not in get_args(TrainMode):
        raise ValueError(f"unknown train mode {mode!r}; expected one of {', '.join(get_args(TrainMode))}")
    chosen = []
    for name, param in model.named_parameters():
        train = _trains(name, mode)
        param.requires_grad_(train)
        if train:
            chosen.append((name, param))
    if not chosen:
        raise ValueError(f"train mode {mode!r} selects no parameter of {type(model).__name__}")
    return chosen
