"""CLIP checkpoint files: read any common format into an open_clip state dict, write safetensors.

Formats :func:`read_state_dict` understands (all end up with open_clip's key layout,
``visual.*``, ``transformer.*``, ``token_embedding.weight``, ``logit_scale``, ...):

- ``.safetensors`` (what :func:`save_state_dict` writes);
- ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt`` pickles read with ``torch.load(weights_only=True)``:
  a plain state dict; an open_clip training checkpoint ``{"epoch", "name", "state_dict",
  "optimizer"}`` whose keys carry DDP's ``module.`` prefix; the ZSCL reference code's
  ``{"state_dict": ...}``; a Lightning checkpoint of zscl's LightningModule, whose student lives
  under ``clip.`` (other prefixes, e.g. a frozen teacher, are dropped);
- ``torch.compile`` wrappers (``_orig_mod.`` anywhere in a key) are unwrapped;
- OpenAI's TorchScript archives (``ViT-B-16.pt`` from openaipublic): ``torch.jit.load`` and
  ``.state_dict()``, minus the three non-weight entries OpenAI stores there.
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from zscl.utils.io import atomic_path

StateDict = dict[str, torch.Tensor]

__all__ = [
    "ArchitectureMismatchError",
    "StateDict",
    "is_jit_archive",
    "load_weights",
    "read_state_dict",
    "save_state_dict",
]

# Entries of a TorchScript archive's state dict that are not open_clip weights: OpenAI stores three
# hyper-parameters there, and a traced open_clip model keeps its (non-persistent) causal mask.
_JIT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")
# Top-level names of a CLIP (or CustomTextCLIP: ``text.``) state dict, to recognise one.
_CLIP_ROOTS = ("visual.", "transformer.", "text.", "token_embedding.", "ln_final.")
_CLIP_NAMES = ("logit_scale", "positional_embedding", "text_projection")
# The attribute holding the student CLIP in zscl's LightningModule (docs/ARCHITECTURE.md).
_LIGHTNING_PREFIX = "clip."


class ArchitectureMismatchError(ValueError):
    """A checkpoint's tensors do not fit the model they are loaded into."""


def is_jit_archive(path: str | Path) -> bool:
    """True when ``path`` is a TorchScript archive (a zip holding ``constants.pkl``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        # torch.save zips hold data.pkl only; torch.jit.save adds constants.pkl and code/.
        return any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in archive.namelist())


def read_state_dict(path: str | Path) -> StateDict:
    """Read a CLIP checkpoint in any supported format (module docstring) as an open_clip state dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (or is not a file)")
    if path.suffix == ".safetensors":
        raw: object = _read_safetensors(path)
    elif is_jit_archive(path):
        raw = _read_jit(path)
    else:
        raw = _read_pickle(path)
    return _to_open_clip_layout(raw, path)


def _read_safetensors(path: Path) -> StateDict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"checkpoint {path} is not a readable safetensors file: {err}") from err


def _read_jit(path: Path) -> StateDict:
    archive = torch.jit.load(str(path), map_location="cpu")
    state = dict(archive.state_dict())
    for key in _JIT_EXTRA_KEYS:
        state.pop(key, None)
    return state


def _read_pickle(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises KeyError, UnpicklingError, RuntimeError... on bad input
        if not (isinstance(err, pickle.UnpicklingError) and zipfile.is_zipfile(path)):
            raise ValueError(
                f"checkpoint {path} is neither safetensors, a torch.save file nor a TorchScript archive "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'})"
            ) from err
        # A real torch.save file holding arbitrary Python objects (e.g. custom hyper-parameter
        # classes in a Lightning checkpoint). Unpickling those runs the file's code: refuse.
        blocked = [line.strip() for line in str(err).splitlines() if "Unsupported global" in line]
        what = blocked[0] if blocked else "unsupported pickle content"
        raise ValueError(
            f"checkpoint {path} holds Python objects that torch.load(weights_only=True) refuses ({what}). "
            "If you trust the file, extract its weights: "
            "sd = torch.load(path, weights_only=False)['state_dict']; "
            "zscl.models.save_state_dict(sd, 'weights.safetensors')."
        ) from err


def _to_open_clip_layout(raw: object, path: Path) -> StateDict:
    """Unwrap containers and strip wrapper prefixes until the keys are open_clip's."""
    state = raw
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]  # open_clip training, ZSCL reference and Lightning checkpoints
    if not isinstance(state, Mapping) or not state:
        raise ValueError(f"checkpoint {path} holds {_describe(raw)}, not a state dict of tensors")
    state = {_strip_compile(str(k)): v for k, v in state.items()}
    state = _strip_common_prefix(state, "module.")  # DistributedDataParallel
    if any(k.startswith(_LIGHTNING_PREFIX) for k in state):
        # zscl's LightningModule: keep the student, drop the teacher and anything else.
        state = {k[len(_LIGHTNING_PREFIX):]: v for k, v in state.items() if k.startswith(_LIGHTNING_PREFIX)}
        state = _strip_common_prefix(state, "module.")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"checkpoint {path}: entry {bad[0]!r} is a {type(state[bad[0]]).__name__}, not a tensor")
    if not any(k.startswith(_CLIP_ROOTS) or k in _CLIP_NAMES for k in state):
        raise ValueError(
            f"checkpoint {path} does not look like a CLIP state dict: expected keys such as "
            f"'visual.*' or 'logit_scale', found {_preview(state)}"
        )
    return dict(state)


def _strip_compile(key: str) -> str:
    # torch.compile's OptimizedModule stores the wrapped module as ``_orig_mod``, at any depth.
    return ".".join(part for part in key.split(".") if part != "_orig_mod")


def _strip_common_prefix(state: Mapping[str, object], prefix: str) -> dict[str, object]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def _describe(obj: object) -> str:
    if isinstance(obj, Mapping):
        return f"a dict with keys {_preview(obj)}"
    return f"a {type(obj).__name__}"


def _preview(state: Mapping, n: int = 5) -> str:
    keys = [str(k) for k in list(state)[:n]]
    more = f" ... ({len(state)} in all)" if len(state) > n else ""
    return ", ".join(repr(k) for k in keys) + more if keys else "no keys"


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Write ``state_dict`` as safetensors (contiguous CPU tensors), atomically.

    The file's bytes depend only on the tensors and the metadata's contents: equal weights give
    equal files (and hashes), whatever order ``metadata`` was built in (see :func:`_sort_metadata`).
    """
    from safetensors.torch import save_file

    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError(f"safetensors metadata must map str to str, got {metadata!r}")
    tensors: StateDict = {}
    seen: set[int] = set()
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"cannot save {key!r}: it is a {type(value).__name__}, not a tensor")
        tensor = value.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share storage (tied or viewed weights): copy repeats.
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen and tensor.numel() > 0:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        tensors[key] = tensor
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        _sort_metadata(tmp)


def _sort_metadata(path: Path) -> None:
    """Rewrite a safetensors header with its ``__metadata__`` keys sorted.

    safetensors keeps the metadata in a Rust ``HashMap`` whose iteration order is seeded per process,
    so the same dict is written in a different order by each run. The tensor entries keep their
    (deterministic) order; the header is re-padded with spaces to 8 bytes as safetensors pads it.
    """
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
    if not header.get("__metadata__"):
        return
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    if len(text) == size:  # the usual case: same bytes, other order; patch in place
        with open(path, "r+b") as f:
            f.seek(8)
            f.write(text)
        return
    staged = path.with_name(path.name + ".sorted")
    with open(path, "rb") as src, open(staged, "wb") as dst:
        src.seek(8 + size)
        dst.write(struct.pack("<Q", len(text)) + text)
        shutil.copyfileobj(src, dst)
    staged.replace(path)


def load_weights(
    model: torch.nn.Module,
    source: str | Path | Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    arch: str | None = None,
    origin: str | Path | None = None,
) -> None:
    """Copy a checkpoint (a file in any :func:`read_state_dict` format, or a state dict) into ``model``.

    Shapes must match exactly. With ``strict`` every model tensor must be present and every
    file tensor used; otherwise only shared keys are copied. ``arch`` names the model and
    ``origin`` the file a given state dict came from, in errors.
    """
    origin = source if isinstance(source, (str, Path)) else origin
    where = f"checkpoint {Path(origin).name}" if origin is not None else "the state dict"
    state = read_state_dict(source) if isinstance(source, (str, Path)) else dict(source)
    target = model.state_dict()
    arch = arch or type(model).__name__
    state = _match_scalar_shapes(state, target)
    problems = _shape_problems(state, target)
    if strict:
        problems += _key_problems(state, target)
    if problems:
        raise ArchitectureMismatchError(
            f"{where} does not fit {arch}: {'; '.join(problems)} (was it saved from another architecture?)"
        )
    model.load_state_dict({k: v for k, v in state.items() if k in target}, strict=strict)


def _match_scalar_shapes(state: StateDict, target: Mapping[str, torch.Tensor]) -> StateDict:
    # logit_scale / logit_bias are 0-d in OpenAI's CLIP and 1-d in some open_clip models.
    out = dict(state)
    for key in ("logit_scale", "logit_bias"):
        if key in out and key in target and out[key].numel() == target[key].numel() == 1:
            out[key] = out[key].reshape(target[key].shape)
    return out


def _shape_problems(state: StateDict, target: Mapping[str, torch.Tensor], n: int = 3) -> list[str]:
    bad = [k for k in state if k in target and state[k].shape != target[k].shape]
    return [
        f"{k} has shape {_fmt(state[k].shape)} in the file but {_fmt(target[k].shape)} in the model" for k in bad[:n]
    ] + ([f"and {len(bad) - n} more shape mismatches"] if len(bad) > n else [])


def _key_problems(state: StateDict, target: Mapping[str, torch.Tensor], n: int = 3) -> list[str]:
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    out = []
    if missing:
        out.append(f"{len(missing)} model tensors are missing from the file (e.g. {', '.join(missing[:n])})")
    if unexpected:
        out.append(f"{len(unexpected)} file tensors have no place in the model (e.g. {', '.join(unexpected[:n])})")
    return out


def _fmt(shape: torch.Size) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"
