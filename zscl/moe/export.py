"""MoE-Adapters exports: the adapters, routers, frozen-expert sets and DDAS autoencoders of the
trained tasks as one safetensors file beside the CLIP weights (``X.safetensors`` ->
``X.moe.safetensors``), and the loader that rebuilds the routed model from them.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Union

import torch

SUFFIX = ".moe.safetensors"


def moe_path(clip_weights: Union[str, Path]) -> Path:
    """Where the adapters of a CLIP weights file live: ``<stem>.moe.safetensors`` beside it."""
    path = Path(clip_weights)
    return path.with_name(path.name[: -len(path.suffix)] + SUFFIX if path.suffix else path.name + SUFFIX)


def _trained_state(module: torch.nn.Module, tasks: int, per_task: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The state dict without per-task entries of tasks >= ``tasks`` (``routers.3``, ``autoencoders.3``...)."""
    out = {}
    for key, value in module.state_dict().items():
        parts = key.split(".")
        skip = any(p in per_task and i + 1 < len(parts) and parts[i + 1].isdigit() and int(parts[i + 1]) >= tasks
                   for i, p in enumerate(parts))
        if not skip:
            out[key] = value
    return out


PER_TASK = ("routers", "noise", "autoencoders")


def save_moe(path: Union[str, Path], moe: torch.nn.Module, bank: torch.nn.Module, tasks: int,
             meta: dict[str, Any]) -> None:
    """Write the first ``tasks`` tasks' adapters and autoencoders (``moe.*``, ``ddas.*``) atomically."""
    from zscl.models import save_state_dict

    state = {f"moe.{k}": v for k, v in _trained_state(moe, tasks, PER_TASK).items() if not k.endswith(".usage")}
    bank_state = _trained_state(bank, tasks, PER_TASK)
    bank_state["thresholds"] = bank_state["thresholds"][:tasks]
    state.update({f"ddas.{k}": v for k, v in bank_state.items() if not k.startswith("calibration")})
    save_state_dict({k: v.detach().contiguous() for k, v in state.items()}, str(path),
                    metadata={"format": "zscl-moe-adapters", "tasks": str(tasks), "config": json.dumps(meta)})


def read_moe(path: Union[str, Path]) -> tuple[dict[str, torch.Tensor], int, dict[str, Any]]:
    """(tensors, number of trained tasks, the config written at export)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "zscl-moe-adapters":
        raise ValueError(f"{path} is not a MoE-Adapters export (format {meta.get('format')!r})")
    return load_file(str(path)), int(meta["tasks"]), json.loads(meta.get("config", "{}"))


def load_moe(state: dict[str, torch.Tensor], moe: torch.nn.Module, bank: torch.nn.Module) -> None:
    """Copy an export's tensors into modules built for at least as many tasks."""
    own = {**{f"moe.{k}": v for k, v in moe.state_dict().items()}, **{f"ddas.{k}": v for k, v in bank.state_dict().items()}}
    for key, value in state.items():
        if key not in own:
            raise ValueError(f"the MoE export has {key!r}, which this model does not (another architecture or config?)")
        target = own[key]
        if key == "ddas.thresholds":
            target[: len(value)].copy_(value)
        elif target.shape != value.shape:
            raise ValueError(f"MoE export: {key} has shape {tuple(value.shape)}, the model {tuple(target.shape)}")
        else:
            with torch.no_grad():
                target.copy_(value)


def export_meta(hparams: dict[str, Any], moe_cfg: Any, ddas_cfg: Any) -> dict[str, Any]:
    return {"clip": str(hparams.get("clip")), "pretrained": str(hparams.get("pretrained")),
            "moe": asdict(moe_cfg), "ddas": asdict(ddas_cfg)}


def find_export(clip_weights: Optional[str]) -> Optional[Path]:
    """The adapters file beside ``clip_weights`` if there is one."""
    if not clip_weights:
        return None
    path = moe_path(clip_weights)
    return path if path.exists() else None
