"""Zero-shot classification with CLIP (Radford et al. 2021), as ZSCL evaluates it.

Classifier: for class c with prompts ``t(c)`` over all templates t,
``w_c = normalize(mean_t normalize(E_text(t(c))))``; logits ``100 * normalize(E_img(x)) @ W``
(the scale does not change top-k). Accuracy is top-1 (the paper's number) and top-5.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Accuracy:
    """Correct counts and the number of examples; percentages as properties."""

    correct1: int
    correct5: int
    n: int

    @property
    def top1(self) -> float:
        return 100.0 * self.correct1 / max(self.n, 1)

    @property
    def top5(self) -> float:
        return 100.0 * self.correct5 / max(self.n, 1)

    def as_dict(self) -> dict[str, float | int]:
        return {"top1": self.top1, "top5": self.top5, "n": self.n}


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype`` on ``device``; a no-op for None/float32."""
    device = torch.device(device)
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def default_amp_dtype(device: torch.device | str) -> torch.dtype | None:
    """bf16 where the GPU supports it, fp16 on older GPUs, none on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA if available, else CPU; anything else as ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_amp(precision: str, device: torch.device | str) -> torch.dtype | None:
    """``auto`` | ``fp32`` | ``bf16`` | ``fp16`` -> the autocast dtype (``auto``: bf16 on GPUs that have it)."""
    table = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    return default_amp_dtype(device) if precision == "auto" else table[precision]


def fill_template(template: str, classname: str) -> str:
    return template.replace("{c}", classname)


@torch.no_grad()
def encode_texts(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """L2-normalised text embeddings, float32, computed in chunks."""
    out = [F.normalize(model.encode_text(tokens[i:i + batch_size]).float(), dim=-1)
           for i in range(0, len(tokens), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def build_classifier(
    model: torch.nn.Module,
    tokenizer: Callable[[Sequence[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Zero-shot head ``W`` [D, C]: per class, the renormalised mean of normalised prompt embeddings."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    prompts = [fill_template(t, c) for c in classnames for t in templates]
    with autocast(device, amp_dtype):
        emb = encode_texts(model, tokenizer(prompts).to(device))
    emb = emb.view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(emb, dim=-1).t().contiguous()


@torch.no_grad()
def spec_classifier(
    model: torch.nn.Module,
    tokenizer: Callable[[Sequence[str]], torch.Tensor],
    spec: Any,
    *,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The zero-shot head [D, C] of a dataset spec: :func:`build_classifier` over its class names, each class
    prompted with ``spec.templates_of(label)`` (one shared template list for an ordinary dataset; per class
    for a label space made of several datasets). Class columns do not depend on one another, so classes
    sharing a template list are encoded together and their columns scattered into label order."""
    per_class = getattr(spec, "class_templates", None)
    if per_class is None:
        return build_classifier(model, tokenizer, spec.classnames, spec.templates, device=device, amp_dtype=amp_dtype)
    groups: dict[tuple[str, ...], list[int]] = {}
    for label, templates in enumerate(per_class):
        groups.setdefault(tuple(templates), []).append(label)
    columns: list[torch.Tensor] = [torch.empty(0)] * len(per_class)
    for templates, labels in groups.items():
        head = build_classifier(model, tokenizer, [spec.classnames[j] for j in labels], templates,
                                device=device, amp_dtype=amp_dtype)
        for i, j in enumerate(labels):
            columns[j] = head[:, i]
    return torch.stack(columns, dim=1)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> torch.Tensor:
    """Number of rows whose label is among the top-k logits, for each k (a tensor, no host sync)."""
    kmax = min(max(ks), logits.shape[1])
    pred = logits.topk(kmax, dim=1).indices
    hit = pred.eq(labels.view(-1, 1))
    return torch.stack([hit[:, :min(k, kmax)].any(dim=1).sum() for k in ks])


def image_logits(model: torch.nn.Module, images: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    feats = F.normalize(model.encode_image(images).float(), dim=-1)
    return 100.0 * feats @ classifier


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    classifier: torch.Tensor,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device | str,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
    desc: str = "eval",
    total: int | None = None,
) -> Accuracy:
    """Top-1/top-5 of ``classifier`` over ``batches`` of (images, labels).

    uint8 batches (from the cache) are normalised on the device with ``mean``/``std``.
    """
    from tqdm.auto import tqdm

    from zscl.datasets.pixels import normalize_images

    device = torch.device(device)
    counts = torch.zeros(2, dtype=torch.long, device=device)
    n = 0
    for images, labels in tqdm(batches, desc=desc, disable=not progress, leave=False, total=total):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if images.dtype == torch.uint8:
            images = normalize_images(images, mean or (), std or ())
        with autocast(device, amp_dtype):
            counts += topk_correct(image_logits(model, images, classifier), labels)
        n += len(labels)
    c1, c5 = counts.tolist()
    return Accuracy(c1, c5, n)


def dataset_batches(
    name: str,
    data_root: str,
    test_transform: Callable,
    *,
    split: str = "test",
    batch_size: int = 128,
    num_workers: int = 0,
    cache: bool = True,
    cache_dir: str | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    allow_bad: bool = False,
):
    """A DataLoader of (images, labels) for one rank's shard of ``name``'s ``split``.

    With ``cache`` the images are uint8 from the preprocessed cache (normalise them on the
    device with the returned mean/std); without it they are fully transformed floats.
    Returns ``(loader, mean, std)``; mean/std are None when the images are already normalised.
    Unreadable images raise :class:`~zscl.datasets.badimages.UnreadableTestImagesError` listing
    them all, or with ``allow_bad`` are left out (``loader.dataset.excluded`` lists them).
    """
    from torch.utils.data import Subset

    from zscl.datasets import build_dataset
    from zscl.datasets.badimages import UnreadableTestImagesError
    from zscl.datasets.streams import ShardedEval, stream_loader
    from zscl.datasets.views import view_of
    from zscl.datasets.cache import cached_dataset

    mean = std = None
    view = view_of(name)
    if cache and view is not None:  # a class/image view slices its base dataset's cache
        base, mean, std = cached_dataset(view.base, split, data_root, test_transform, cache_dir, num_workers, progress)
        dataset = view.restrict(base, split)
        excluded = base.excluded  # the base's unreadable images (not in the cache), whichever class they hold
    elif cache:
        dataset, mean, std = cached_dataset(name, split, data_root, test_transform, cache_dir, num_workers, progress)
        excluded = dataset.excluded
    else:
        dataset = build_dataset(name, data_root, split, test_transform)
        bad = _unreadable_items(name, str(data_root), split, max(num_workers, 1))
        excluded = [(path, reason) for _, path, reason in bad]
        if bad:
            rows = {i for i, _, _ in bad}
            dataset = Subset(dataset, [i for i in range(len(dataset)) if i not in rows])
    if excluded and not allow_bad:
        raise UnreadableTestImagesError({name: excluded})
    shard = ShardedEval(dataset, batch_size, rank, world_size, excluded=excluded)
    workers = 0 if cache else num_workers  # cached batches are memory-map slices: workers only add IPC
    return stream_loader(shard, num_workers=workers), mean, std


@functools.lru_cache(maxsize=64)
def _unreadable_items(name: str, data_root: str, split: str, num_workers: int) -> tuple[tuple[int, str, str], ...]:
    """Unreadable images of a split read without the cache (decoded once per process)."""
    from zscl.datasets import build_dataset
    from zscl.datasets.badimages import find_unreadable

    return tuple(find_unreadable(build_dataset(name, data_root, split), num_workers))


def evaluate_dataset(
    bundle,
    name: str,
    data_root: str,
    *,
    split: str = "test",
    batch_size: int = 128,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    cache: bool = True,
    cache_dir: str | None = None,
    progress: bool = True,
    allow_bad: bool = False,
) -> tuple[Accuracy, int]:
    """Zero-shot accuracy of ``bundle`` (a :class:`zscl.models.ClipBundle`) on one registered dataset.

    Returns the accuracy and the number of classes.
    """
    from zscl.datasets import get_dataset

    spec = get_dataset(name)
    classifier = spec_classifier(bundle.model, bundle.tokenizer, spec, device=device, amp_dtype=amp_dtype)
    loader, mean, std = dataset_batches(spec.name, data_root, bundle.test_transform, split=split,
                                        batch_size=batch_size, num_workers=num_workers, cache=cache,
                                        cache_dir=cache_dir, progress=progress, allow_bad=allow_bad)
    acc = evaluate(bundle.model, classifier, loader, device=device, mean=mean, std=std, amp_dtype=amp_dtype,
                   progress=progress, desc=f"eval {spec.name}", total=len(loader.dataset))
    return acc, spec.num_classes
