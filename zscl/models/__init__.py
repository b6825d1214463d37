"""CLIP models through open_clip: loading with weights, transforms and tokenizer; checkpoint
formats; which parameters train; zscl's tiny JSON configs (``model_configs/``).

Importing this package loads torch but not open_clip; open_clip loads on first use.
"""

from zscl.models.checkpoints import (
    ArchitectureMismatchError,
    StateDict,
    is_jit_archive,
    load_weights,
    read_state_dict,
    save_state_dict,
)
from zscl.models.loading import (
    ClipBundle,
    build_transforms,
    list_models,
    load_clip,
    register_pretrained,
    tiny_configs_dir,
)
from zscl.models.trainable import TrainMode, select_trainable

__all__ = [
    "ArchitectureMismatchError",
    "ClipBundle",
    "StateDict",
    "TrainMode",
    "build_transforms",
    "is_jit_archive",
    "list_models",
    "load_clip",
    "load_weights",
    "read_state_dict",
    "register_pretrained",
    "save_state_dict",
    "select_trainable",
    "tiny_configs_dir",
]
