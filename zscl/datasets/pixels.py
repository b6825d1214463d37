"""Pixels as loaders ship them: uint8 ``[B, 3, H, W]`` batches, normalised on the device.

Training streams and the evaluation cache both carry uint8 images (4x less memory and host-to-device
traffic than float32); every consumer normalises them with the CLIP's mean and std here.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import torch


@lru_cache(maxsize=16)
def _channel_stats(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Built once per device: a fresh torch.tensor(..., device=cuda) is a blocking copy every call.
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1).to(device)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1).to(device)
    return m, s


def normalize_images(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [B,3,H,W] -> ``(x / 255 - mean) / std`` in float32, on the images' device; float input passes through."""
    if images.dtype != torch.uint8:
        return images
    m, s = _channel_stats(tuple(mean), tuple(std), images.device)
    return images.to(torch.float32).div(255).sub(m).div(s)
