"""Build an open_clip CLIP with its weights, transforms and tokenizer: :func:`load_clip`.

Weights come from an open_clip tag (needs the hub or its cache), a local file in any format
:func:`zscl.models.checkpoints.read_state_dict` reads, an OpenAI TorchScript archive, or a tag
registered with :func:`register_pretrained`. OpenAI's weights were trained with QuickGELU
(``x * sigmoid(1.702 x)``) instead of GELU; open_clip's plain configs use GELU, so for those
weights the ``-quickgelu`` variant is built (Radford et al. 2021, "Learning Transferable Visual
Models From Natural Language Supervision").

Transforms follow the ZSCL reference code: train = RandomResizedCrop(scale=(0.9, 1.0)), test =
Resize + CenterCrop, both bicubic, RGB, normalised with the weights' mean/std (OpenAI's for CLIP).
"""

from __future__ import annotations

import difflib
import functools
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch

from zscl.models.checkpoints import StateDict, is_jit_archive, load_weights, read_state_dict
from zscl.registry import Registry

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["ClipBundle", "build_transforms", "list_models", "load_clip", "register_pretrained", "tiny_configs_dir"]

_QUICKGELU = "-quickgelu"
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
_configs_added = False


def _load_builtin_pretrained() -> None:
    # Plugins register their weights (the synthetic world's tiny CLIP: zscl.synthetic.registration).
    from zscl.plugins import load_plugins

    load_plugins()


# "<architecture>/<tag>" -> a path, or a callable returning one (resolved at load time).
_PRETRAINED: Registry[Path | Callable[[], Path]] = Registry("pretrained weights", loader=_load_builtin_pretrained)


@dataclass
class ClipBundle:
    """A loaded CLIP with everything needed to feed it."""

    model: torch.nn.Module  # open_clip CLIP in eval() mode, on the requested device
    name: str  # the open_clip architecture actually built, e.g. "ViT-B-16-quickgelu"
    pretrained: str | None  # what was loaded (tag or path), for provenance
    train_transform: Callable  # PIL image -> normalised float tensor [3, S, S]
    test_transform: Callable
    tokenizer: Callable[[Sequence[str]], torch.Tensor]  # -> LongTensor [N, context_length]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def tiny_configs_dir() -> Path:
    """The folder of zscl's open_clip JSON configs (``zscl-tiny-vit``, ``zscl-tiny-rn``, ...)."""
    return Path(__file__).resolve().parent / "model_configs"


def _ensure_configs() -> None:
    global _configs_added
    if not _configs_added:
        import open_clip

        open_clip.add_model_config(tiny_configs_dir())
        _configs_added = True


def list_models() -> list[str]:
    """open_clip's architecture names, zscl's tiny configs included."""
    import open_clip

    _ensure_configs()
    return open_clip.list_models()


def register_pretrained(model: str, tag: str, path: str | Path | Callable[[], Path]) -> None:
    """Make ``load_clip(model, tag)`` load ``path`` (a callable is called at load time). Re-registering replaces."""
    value = path if callable(path) else Path(path)
    _PRETRAINED.register(f"{_normalise(model)}/{tag}", value, overwrite=True)


def is_registered_pretrained(model: str, tag: str) -> bool:
    return f"{_normalise(model)}/{tag}" in _PRETRAINED


def _normalise(name: str) -> str:
    return name.replace("/", "-")  # OpenAI spells "ViT-B/16", open_clip "ViT-B-16"


def _without_quickgelu(name: str) -> str:
    return name[: -len(_QUICKGELU)] if name.endswith(_QUICKGELU) else name


@dataclass
class _Weights:
    state: StateDict | None
    provenance: str | None
    path: Path | None = None
    openai: bool = False  # trained with QuickGELU
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None


def load_clip(
    model: str,
    pretrained: str | None = None,
    *,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    cache_dir: str | None = None,
) -> ClipBundle:
    """Build ``model`` (an open_clip name or an OpenAI JIT file) with ``pretrained`` weights (None: random init)."""
    import open_clip

    _ensure_configs()
    if _looks_like_file(model):
        if pretrained is not None:
            raise ValueError(f"model={model!r} is a weights file; pass pretrained=None (got {pretrained!r})")
        arch, weights = _from_jit_file(Path(model))
    else:
        arch = _resolve_architecture(model)
        weights = _resolve_weights(arch, pretrained, cache_dir)
    # A "<config>-quickgelu" name without its own JSON is built from <config> with force_quick_gelu.
    base = arch if arch in open_clip.list_models() else _without_quickgelu(arch)
    quick = weights.openai or base != arch
    name = arch if arch.endswith(_QUICKGELU) or not quick else arch + _QUICKGELU
    with _quiet_open_clip():
        net = open_clip.create_model(base, precision=precision, device=device, force_quick_gelu=quick)
    if weights.state is not None:
        load_weights(net, weights.state, arch=name, origin=weights.path)
    net.eval()
    return _bundle(net, name, base, weights)


def _looks_like_file(model: str) -> bool:
    path = Path(model)
    if path.is_file():
        return True
    if path.suffix in _CHECKPOINT_SUFFIXES:
        raise FileNotFoundError(f"model={model!r} looks like a weights file, but it does not exist")
    return False


def _resolve_architecture(model: str) -> str:
    """An open_clip config name for ``model`` ("ViT-B/16" -> "ViT-B-16"; "<known>-quickgelu" accepted)."""
    name = _normalise(model)
    known = list_models()
    if name.startswith(("hf-hub:", "local-dir:")):
        return name  # open_clip resolves these schemas itself
    base = _without_quickgelu(name)
    by_lower = {k.lower(): k for k in known}
    if name.lower() in by_lower:
        return by_lower[name.lower()]
    if base.lower() in by_lower:  # e.g. "zscl-tiny-vit-quickgelu": built with force_quick_gelu
        return by_lower[base.lower()] + _QUICKGELU
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=5, cutoff=0.6)
    hint = f" Did you mean {', '.join(by_lower[c] for c in close)}?" if close else ""
    raise ValueError(
        f"unknown CLIP architecture {model!r}.{hint} See zscl.models.list_models() for all "
        f"{len(known)} names, or pass the path of an OpenAI JIT .pt file."
    )


def _resolve_weights(arch: str, pretrained: str | None, cache_dir: str | None) -> _Weights:
    if pretrained is None:
        return _Weights(state=None, provenance=None)
    registered = _registered_path(arch, pretrained)
    if registered is not None:
        return _from_file(registered, provenance=pretrained)
    if Path(pretrained).is_file():
        return _from_file(Path(pretrained), provenance=str(pretrained))
    if Path(pretrained).suffix in _CHECKPOINT_SUFFIXES or "/" in pretrained or "\\" in pretrained:
        raise FileNotFoundError(f"pretrained={pretrained!r} looks like a weights file, but it does not exist")
    return _from_open_clip_tag(arch, pretrained, cache_dir)


def _registered_path(arch: str, tag: str) -> Path | None:
    for key in (f"{arch}/{tag}", f"{_without_quickgelu(arch)}/{tag}"):
        if key in _PRETRAINED:
            entry = _PRETRAINED.get(key)
            path = Path(entry() if callable(entry) else entry)
            if not path.is_file():
                raise FileNotFoundError(f"weights registered as {key!r} point to {path}, which does not exist")
            return path
    return None


def _from_file(path: Path, provenance: str) -> _Weights:
    return _Weights(state=read_state_dict(path), provenance=provenance, path=path, openai=is_jit_archive(path))


def _from_jit_file(path: Path) -> tuple[str, _Weights]:
    if not is_jit_archive(path):
        raise ValueError(
            f"model={str(path)!r} is a file but not an OpenAI TorchScript archive; for other weight files "
            "pass the architecture name as model and the file as pretrained"
        )
    weights = _from_file(path, provenance=str(path))
    assert weights.state is not None
    return _infer_architecture(weights.state, source=str(path)), weights


def _infer_architecture(state: StateDict, source: str) -> str:
    """The open_clip config whose tensors have exactly the names and shapes of ``state``."""
    import open_clip
    from open_clip.model import CLIP

    want = {k: tuple(v.shape) for k, v in state.items()}
    embed_dim = want.get("text_projection", (0, 0))[-1]
    text_width = want.get("ln_final.weight", (0,))[0]
    # Plain configs first: "-quickgelu" twins have the same shapes and the suffix is added anyway.
    for name in sorted(list_models(), key=lambda n: n.endswith(_QUICKGELU)):
        cfg = open_clip.get_model_config(name)
        if not _plain_clip_config(cfg) or cfg["embed_dim"] != embed_dim:
            continue
        if cfg["text_cfg"].get("width", 512) != text_width:  # 512: open_clip's CLIPTextCfg default
            continue
        try:
            with torch.device("meta"):  # shapes only: no memory, no init cost
                candidate = CLIP(**cfg)
        except (TypeError, ValueError, AssertionError):
            continue  # a config this open_clip version's CLIP cannot build is no candidate
        if {k: tuple(v.shape) for k, v in candidate.state_dict().items()} == want:
            return name
    raise ValueError(
        f"no open_clip architecture matches the tensors of {source} (embed_dim {embed_dim}, text width "
        f"{text_width}); pass the architecture name as model and the file as pretrained"
    )


def _plain_clip_config(cfg: dict | None) -> bool:
    # Only open_clip's own CLIP class can hold OpenAI-layout weights.
    return bool(cfg) and not (
        cfg.get("custom_text") or "multimodal_cfg" in cfg
        or "timm_model_name" in cfg.get("vision_cfg", {}) or "hf_model_name" in cfg.get("text_cfg", {})
    )


def _from_open_clip_tag(arch: str, tag: str, cache_dir: str | None) -> _Weights:
    import open_clip
    from open_clip.pretrained import download_pretrained

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        cfg = open_clip.get_pretrained_cfg(_without_quickgelu(arch), tag)
    if not cfg:
        raise ValueError(
            f"pretrained={tag!r} is neither a file, a zscl-registered tag nor an open_clip tag for {arch}. "
            f"open_clip tags for {arch}: {', '.join(open_clip.list_pretrained_tags_by_model(arch)) or 'none'}; "
            f"zscl tags: {', '.join(_PRETRAINED.names()) or 'none'}"
        )
    try:
        path = download_pretrained(cfg, cache_dir=cache_dir)
    except Exception as err:  # hub/HTTP errors come in many types; all mean "not available here"
        raise RuntimeError(
            f"could not fetch open_clip weights {arch}/{tag} ({type(err).__name__}: {err}). Without network "
            "access or a filled cache, pass a local file instead: load_clip(model, pretrained='/path/to/weights') "
            "(an OpenAI JIT .pt, a .safetensors or a .pt/.bin state dict). Set HF_HUB_OFFLINE=1 to fail "
            "without retries when offline."
        ) from err
    if not path:
        raise RuntimeError(f"open_clip found no download source for {arch}/{tag}; pass a local file instead")
    weights = _from_file(Path(path), provenance=tag)
    weights.openai = weights.openai or bool(cfg.get("quick_gelu", False))
    weights.mean, weights.std = cfg.get("mean"), cfg.get("std")
    return weights


@contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """Drop open_clip's "initialized randomly" warning: load_clip copies the weights in afterwards."""

    def keep(record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _bundle(net: torch.nn.Module, name: str, config_name: str, weights: _Weights) -> ClipBundle:
    import open_clip

    cfg = getattr(net.visual, "preprocess_cfg", {})
    mean = tuple(weights.mean or cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(weights.std or cfg.get("std", open_clip.OPENAI_DATASET_STD))
    size = net.visual.image_size
    if not isinstance(size, int):
        if size[0] != size[1]:
            raise ValueError(f"{name} has non-square input {tuple(size)}; zscl's transforms expect square images")
        size = int(size[0])
    train, test = build_transforms(size, mean, std)
    return ClipBundle(
        model=net,
        name=name,
        pretrained=weights.provenance,
        train_transform=train,
        test_transform=test,
        tokenizer=_tokenizer(config_name),
        image_size=size,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
    )


@functools.lru_cache(maxsize=None)
def _tokenizer(config_name: str) -> Callable[[Sequence[str]], torch.Tensor]:
    """open_clip's tokenizer of a config, built once per process: building one parses the BPE merges (~0.1 s),
    and a sequence loads its CLIP twice per task. Tokenizing is a pure function of the text, so one is shared."""
    import open_clip

    return open_clip.get_tokenizer(config_name)


def _to_rgb(image: Image.Image) -> Image.Image:
    # A module-level function, not a lambda, so that DataLoader workers can pickle the transform.
    return image.convert("RGB")


def build_transforms(
    size: int, mean: Sequence[float], std: Sequence[float]
) -> tuple[Callable, Callable]:
    """(train, test) PIL -> tensor transforms of the ZSCL reference code, bicubic throughout.

    train: RandomResizedCrop(size, scale=(0.9, 1.0)); test: Resize(size) (shorter side) + CenterCrop(size).
    """
    from torchvision import transforms as T

    bicubic = T.InterpolationMode.BICUBIC
    tail = [T.Lambda(_to_rgb), T.ToTensor(), T.Normalize(mean=tuple(mean), std=tuple(std))]
    train = T.Compose([T.RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=bicubic), *tail])
    test = T.Compose([T.Resize(size, interpolation=bicubic), T.CenterCrop(size), *tail])
    return train, test
