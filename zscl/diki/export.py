"""DIKI exports: the trained tasks' prefixes and task Gaussians beside the (unchanged) CLIP weights.

``X.safetensors`` -> ``X.diki.safetensors`` holding, for the first ``tasks`` tasks,
``prefixes.blocks.<i>.{keys,values}.<t>`` and ``gaussians.{means,covariances}`` (rows ``0..tasks-1``),
with the task names and the settings that shape the model (prefix configuration, voting,
evaluation templates) in the metadata, so that ``zscl eval`` rebuilds the calibrated model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import torch

from zscl.diki.calibration import TaskGaussians
from zscl.diki.prefix import DIKIPrefixes

SUFFIX = ".diki.safetensors"
FORMAT = "zscl-diki"


def diki_path(clip_weights: Union[str, Path]) -> Path:
    """``X.safetensors`` -> ``X.diki.safetensors``."""
    p = Path(clip_weights)
    return p.with_name(p.name[: -len(".safetensors")] + SUFFIX if p.name.endswith(".safetensors") else p.name + SUFFIX)


def find_export(clip_weights: Optional[str]) -> Optional[Path]:
    """The DIKI file beside ``clip_weights`` if there is one."""
    if not clip_weights or not str(clip_weights).endswith(".safetensors"):
        return None
    path = diki_path(clip_weights)
    return path if path.exists() else None


def save_diki(path: Union[str, Path], prefixes: DIKIPrefixes, gaussians: TaskGaussians, names: list[str],
              meta: dict[str, Any]) -> None:
    """Write the first ``len(names)`` tasks' prefixes and Gaussians (atomically, as every export)."""
    from zscl.models import save_state_dict

    tasks = len(names)
    state = {f"prefixes.{k}": v for k, v in prefixes.state_dict().items() if int(k.rsplit(".", 1)[1]) < tasks}
    state["gaussians.means"] = gaussians.means[:tasks]
    state["gaussians.covariances"] = gaussians.covariances[:tasks]
    save_state_dict({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path),
                    metadata={"format": FORMAT, "tasks": json.dumps(names), "config": json.dumps(meta)})


def read_diki(path: Union[str, Path]) -> tuple[dict[str, torch.Tensor], list[str], dict[str, Any]]:
    """(tensors, task names, the settings written at export)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a DIKI export (format {meta.get('format')!r})")
    return load_file(str(path)), json.loads(meta["tasks"]), json.loads(meta.get("config", "{}"))


def load_diki(state: dict[str, torch.Tensor], prefixes: DIKIPrefixes, gaussians: TaskGaussians) -> None:
    """Copy an export's tasks into modules built for at least as many tasks (the Gaussians' factors are refreshed)."""
    own = prefixes.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            if not key.startswith("prefixes."):
                continue
            name = key[len("prefixes."):]
            if name not in own or own[name].shape != value.shape:
                raise ValueError(f"the DIKI export's {key} does not fit this model (another architecture or prefix config?)")
            own[name].copy_(value)
    tasks = len(state["gaussians.means"])
    g = {k: v.clone() for k, v in gaussians.state_dict().items()}
    g["means"][:tasks] = state["gaussians.means"]
    g["covariances"][:tasks] = state["gaussians.covariances"]
    g["fitted"][:tasks] = True
    gaussians.load_state_dict(g)


__all__ = ["SUFFIX", "diki_path", "find_export", "load_diki", "read_diki", "save_diki"]
