"""Lightning checkpoints written atomically (a checkpoint IO plugin)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from zscl.utils.io import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each Lightning checkpoint to a temporary file in the same folder, then renames it.

    A run killed mid-write leaves the previous checkpoint intact (``os.replace`` is atomic).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None) -> None:
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)
