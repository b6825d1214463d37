"""The machinery every merge rule shares: the rule registry, argument checks, key-by-key streaming.

A merge rule is a pure function ``rule(base, models, weights=None, **hparams) -> state_dict``
on mappings from tensor names to tensors. Inputs may be lazy mappings over files
(:func:`open_state_dict`), so rules never materialise a whole input: :func:`stream_merge` reads
ONE key at a time from every input, combines the tensors in fp32 and casts the result back to
the input dtype. Peak memory is therefore the output plus a few copies of the largest tensor.

Tensors that are not floating point (integer buffers such as BatchNorm's
``num_batches_tracked``) are copied from the base, or from the first model, never averaged.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from zscl.registry import Registry

StateDict = dict[str, Tensor]
#: ``combine(key, base_fp32_or_None, [model_fp32, ...]) -> fp32 tensor`` for one float tensor.
Combine = Callable[[str, "Tensor | None", list[Tensor]], Tensor]

__all__ = [
    "MERGE_RULES",
    "MergeError",
    "MergeRule",
    "StateDict",
    "check_call",
    "check_inputs",
    "input_label",
    "iter_inputs",
    "merge",
    "open_state_dict",
    "register_rule",
    "resolve_weights",
    "stream_merge",
]


class MergeError(ValueError):
    """Inputs or arguments that a merge rule cannot work with; the message names the culprit."""


@dataclass(frozen=True)
class MergeRule:
    """A registered merge rule and what it accepts (the CLI validates flags against this)."""

    fn: Callable[..., StateDict]
    needs_base: bool  # False: the rule ignores ``base``
    uses_weights: bool  # False: passing ``weights`` is an error
    hparams: tuple[str, ...]  # keyword hyper-parameters, from the function's signature
    required: tuple[str, ...]  # hparams without a default
    per_model: tuple[str, ...]  # hparams that are sequences with one entry per model
    exact_models: int | None  # the number of models the rule takes (None: any number ≥ 1)
    description: str
    paper: str


def _load_builtin_rules() -> None:
    # Importing these modules registers their rules (see Registry's loader).
    from zscl.merging import fisher, magmax, mwa, soups, task_arithmetic  # noqa: F401


MERGE_RULES: Registry[MergeRule] = Registry("merge rule", loader=_load_builtin_rules)


def register_rule(
    name: str,
    *,
    needs_base: bool,
    uses_weights: bool = True,
    per_model: tuple[str, ...] = (),
    exact_models: int | None = None,
    description: str,
    paper: str,
) -> Callable[[Callable[..., StateDict]], Callable[..., StateDict]]:
    """Decorator: register ``fn`` in :data:`MERGE_RULES`; its keyword-only parameters are its hparams."""

    def decorate(fn: Callable[..., StateDict]) -> Callable[..., StateDict]:
        params = [p for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]
        rule = MergeRule(
            fn=fn,
            needs_base=needs_base,
            uses_weights=uses_weights,
            hparams=tuple(p.name for p in params),
            required=tuple(p.name for p in params if p.default is p.empty),
            per_model=per_model,
            exact_models=exact_models,
            description=description,
            paper=paper,
        )
        MERGE_RULES.register(name, rule)
        return fn

    return decorate


def check_call(
    name: str, rule: MergeRule, *, has_base: bool, n_models: int, weights: Sequence[float] | None, hparams: Mapping
) -> None:
    """Validate a call of ``rule`` without reading any tensor; raise :class:`MergeError` if wrong."""
    if n_models < 1:
        raise MergeError(f"merge rule {name!r} needs at least one model, got none")
    if rule.exact_models is not None and n_models != rule.exact_models:
        raise MergeError(f"merge rule {name!r} takes exactly {rule.exact_models} model(s), got {n_models}")
    if rule.needs_base and not has_base:
        raise MergeError(f"merge rule {name!r} needs a base model (the pretrained weights θ0); none was given")
    if weights is not None and not rule.uses_weights:
        raise MergeError(f"merge rule {name!r} takes no per-model weights")
    if weights is not None and len(weights) != n_models:
        raise MergeError(f"got {len(weights)} weights for {n_models} models; give one weight per model")
    unknown = sorted(set(hparams) - set(rule.hparams))
    if unknown:
        takes = ", ".join(rule.hparams) or "no hyper-parameters"
        raise MergeError(f"merge rule {name!r} does not use {', '.join(unknown)}; it takes: {takes}")
    missing = [h for h in rule.required if h not in hparams]
    if missing:
        raise MergeError(f"merge rule {name!r} needs the hyper-parameter(s) {', '.join(missing)}")
    for h in rule.per_model:
        if h in hparams and len(hparams[h]) != n_models:
            raise MergeError(f"got {len(hparams[h])} entries in {h!r} for {n_models} models; give one per model")


def merge(
    name: str,
    base: Mapping[str, Tensor] | None,
    models: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float] | None = None,
    **hparams: Any,
) -> StateDict:
    """Merge ``models`` (relative to ``base``) with the registered rule ``name``."""
    rule = MERGE_RULES.get(name)
    check_call(name, rule, has_base=base is not None, n_models=len(models), weights=weights, hparams=hparams)
    return rule.fn(base if rule.needs_base else None, models, weights, **hparams)


def resolve_weights(weights: Sequence[float] | None, n: int, *, normalize: bool) -> list[float]:
    """Per-model weights (1 each by default); with ``normalize`` they must be ≥ 0 and are scaled to sum 1."""
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    if len(w) != n:
        raise MergeError(f"got {len(w)} weights for {n} models; give one weight per model")
    if not all(math.isfinite(x) for x in w):
        raise MergeError(f"weights must be finite numbers, got {w}")
    if not normalize:
        return w
    if any(x < 0 for x in w) or sum(w) <= 0:
        raise MergeError(f"weights must be non-negative with a positive sum, got {w}")
    total = sum(w)
    return [x / total for x in w]


def input_label(models: Sequence[Mapping], i: int) -> str:
    """``models[i]``, plus the file name when the mapping knows it (for error messages)."""
    name = getattr(models[i], "name", None)
    return f"models[{i}]" + (f" ({name})" if name else "")


def _check_keys(reference: Mapping, ref_label: str, others: Sequence[tuple[str, Mapping]]) -> list[str]:
    keys = list(reference.keys())
    wanted = set(keys)
    for label, mapping in others:
        have = set(mapping.keys())
        missing, extra = sorted(wanted - have), sorted(have - wanted)
        if missing or extra:
            parts = [f"lacks {_preview(missing)}" if missing else "", f"has extra {_preview(extra)}" if extra else ""]
            detail = " and ".join(p for p in parts if p)
            raise MergeError(f"{label} does not have the same tensors as {ref_label}: it {detail}")
    return keys


def _preview(keys: list[str], n: int = 4) -> str:
    shown = ", ".join(repr(k) for k in keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


def iter_inputs(
    base: Mapping[str, Tensor] | None, models: Sequence[Mapping[str, Tensor]]
) -> Iterator[tuple[str, Tensor | None, list[Tensor]]]:
    """Yield ``(key, base_tensor, model_tensors)`` key by key after checking keys and shapes.

    Keys follow the base's order (else the first model's). Each key is read once from every
    input, and nothing is kept after the caller moves on to the next key.
    """
    labelled = [(input_label(models, i), m) for i, m in enumerate(models)]
    ref_label, reference = ("the base", base) if base is not None else labelled[0]
    for key in _check_keys(reference, ref_label, [x for x in labelled if x[1] is not reference]):
        b = base[key] if base is not None else None
        tensors = [m[key] for m in models]
        _check_tensors(key, b, tensors, [lab for lab, _ in labelled])
        yield key, b, tensors
        del b, tensors  # drop this key's tensors before reading the next key's


def check_inputs(base: Mapping[str, Tensor] | None, models: Sequence[Mapping[str, Tensor]]) -> None:
    """Check the keys and shapes of every input (reading one key at a time) without merging."""
    for item in iter_inputs(base, models):
        del item  # release this key's tensors before the next key is read


def _check_tensors(key: str, base: Tensor | None, tensors: list[Tensor], labels: list[str]) -> None:
    pairs = ([("the base", base)] if base is not None else []) + list(zip(labels, tensors))
    ref_label, ref = pairs[0]
    for label, t in pairs[1:]:
        if t.shape != ref.shape:
            raise MergeError(
                f"tensor {key!r} has shape {list(t.shape)} in {label} but {list(ref.shape)} in {ref_label}"
            )
        if t.is_floating_point() != ref.is_floating_point():
            raise MergeError(f"tensor {key!r} is {t.dtype} in {label} but {ref.dtype} in {ref_label}")


def stream_merge(
    base: Mapping[str, Tensor] | None, models: Sequence[Mapping[str, Tensor]], combine: Combine
) -> StateDict:
    """Apply ``combine`` key by key in fp32; the result has the first model's dtype per tensor.

    Non-float tensors are copied from the base (or the first model). ``combine`` must return a
    new tensor (never one of its inputs) so that outputs never alias the inputs.
    """
    out: StateDict = {}
    for key, b, tensors in iter_inputs(base, models):
        if tensors[0].is_floating_point():
            merged = combine(key, None if b is None else b.float(), [t.float() for t in tensors])
            out[key] = merged.to(tensors[0].dtype)
            del merged
        else:
            out[key] = (b if b is not None else tensors[0]).clone()
        del b, tensors  # bounded memory: hold one key's inputs at a time
    return out


class _SafetensorsFile(Mapping[str, Tensor]):
    """A read-only mapping over a safetensors file that loads a tensor only when it is indexed."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.name = str(path)
        self._file = safe_open(str(path), framework="pt", device="cpu")
        self._keys = list(self._file.keys())
        self._key_set = set(self._keys)

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._key_set:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __contains__(self, key: object) -> bool:  # Mapping's default would load the tensor
        return key in self._key_set

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class _NamedStateDict(dict):
    """A loaded state dict that remembers its file name (for error messages)."""

    name: str = ""


# Key prefixes that only read_state_dict knows how to strip (DDP, zscl's LightningModule, compile).
_WRAPPED = ("module.", "clip.")


def open_state_dict(path: str | Path) -> Mapping[str, Tensor]:
    """A state dict from ``path``: lazy for plain safetensors, else ``read_state_dict`` (any format)."""
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        lazy = _SafetensorsFile(path)
        if not any(k.startswith(_WRAPPED) or "_orig_mod" in k for k in lazy):
            return lazy
    from zscl.models.checkpoints import read_state_dict

    loaded = _NamedStateDict(read_state_dict(path))
    loaded.name = str(path)
    return loaded
