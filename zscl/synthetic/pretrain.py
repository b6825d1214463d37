"""Contrastive pretraining of the tiny CLIP ``zscl-synth-tiny`` on the synthetic world's captions.

The corpus is broad: every object kind, colour, count, size, position and background, each
image paired with a caption freshly drawn (at every use) from :func:`zscl.synthetic.world.caption`.
It is drawn from its own random stream ("pretrain"), separate from the tasks and the reference
pool. The loss is CLIP's symmetric InfoNCE (Radford et al. 2021) with multi-positive targets,
because short captions repeat inside a batch ("something red."):

    L = 1/2 [ CE(s * I T^T, P) + CE(s * T I^T, P) ],   P_ij ∝ [caption_i == caption_j]

with I, T the L2-normalised image / text embeddings and s = exp(logit_scale) <= 100.
The shipped weights (``weights/zscl-synth-tiny.safetensors``, fp16) come from
``scripts/pretrain_synthetic.sh``, i.e. :func:`pretrain` with the defaults of :class:`PretrainConfig`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from zscl.synthetic.render import render_array
from zscl.synthetic.world import IMAGE_SIZE, Attributes, caption, make_scene, sample_attributes, stream_rng

MODEL_NAME = "zscl-synth-tiny"
PRETRAINED_TAG = "synthetic"  # zscl.models.load_clip("zscl-synth-tiny", "synthetic") loads the shipped weights


def synthetic_weights_path() -> Path:
    """The shipped pretrained weights of ``zscl-synth-tiny`` (open_clip layout, fp16 safetensors)."""
    return Path(__file__).resolve().parent / "weights" / f"{MODEL_NAME}.safetensors"


@dataclass(frozen=True)
class PretrainConfig:
    """Hyperparameters of :func:`pretrain` (the defaults made the shipped weights)."""

    steps: int = 2000
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup: int = 150
    pool_size: int = 30_000  # distinct rendered images; each use draws a new caption
    seed: int = 0
    log_every: int = 100


@dataclass
class PretrainResult:
    model: torch.nn.Module
    losses: list[float] = field(default_factory=list)  # one per step
    seconds: float = 0.0


class CaptionedPool:
    """Pre-rendered images of the broad world (uint8 [N, 3, S, S]) with their attributes.

    Rendering is the slow part, so images are rendered once; captions are cheap and are drawn
    anew at every use, so the pool's N images meet many more than N distinct captions.
    """

    def __init__(self, size: int, seed: int, stream: str = "pretrain") -> None:
        rng = stream_rng(seed, stream)
        self.attributes: list[Attributes] = []
        images = np.empty((size, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        for i in range(size):
            attrs = sample_attributes(rng)
            images[i] = render_array(make_scene(attrs, rng), IMAGE_SIZE)
            self.attributes.append(attrs)
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

    def __len__(self) -> int:
        return len(self.attributes)

    def batch(self, rng: np.random.Generator, batch_size: int) -> tuple[torch.Tensor, list[str]]:
        idx = rng.choice(len(self), size=batch_size, replace=False)
        return self.images[torch.from_numpy(idx)], [caption(self.attributes[i], rng) for i in idx]


def contrastive_loss(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor,
                     texts: list[str]) -> torch.Tensor:
    """Symmetric InfoNCE with identical captions counted as positives of each other (module docstring)."""
    img = F.normalize(model.encode_image(images), dim=-1)
    txt = F.normalize(model.encode_text(tokens), dim=-1)
    logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
    ids = {t: i for i, t in enumerate(dict.fromkeys(texts))}
    key = torch.tensor([ids[t] for t in texts])
    target = (key[:, None] == key[None, :]).float()
    target = target / target.sum(dim=1, keepdim=True)  # symmetric, so the same for both directions
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # CLIP's recipe: no decay on gains, biases, embeddings and the temperature.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        flat = p.ndim < 2 or "embedding" in name or "logit_scale" in name
        (no_decay if flat else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_lr(step: int, steps: int, warmup: int) -> float:
    """Multiplier: linear warm-up over ``warmup`` steps, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def build_model(seed: int = 0) -> tuple[torch.nn.Module, Callable, tuple, tuple]:
    """A randomly initialised ``zscl-synth-tiny`` with its tokenizer and normalisation constants."""
    from zscl.models import load_clip

    torch.manual_seed(seed)
    bundle = load_clip(MODEL_NAME, None)
    return bundle.model, bundle.tokenizer, bundle.mean, bundle.std


def pretrain(config: PretrainConfig = PretrainConfig(), out: str | Path | None = None,
             log: Callable[[str], None] = print) -> PretrainResult:
    """Train ``zscl-synth-tiny`` from scratch; save fp16 weights to ``out`` if given."""
    from zscl.datasets.pixels import normalize_images

    start = time.perf_counter()
    model, tokenizer, mean, std = build_model(config.seed)
    model.train()
    pool = CaptionedPool(config.pool_size, config.seed)
    log(f"rendered {len(pool)} pretraining images in {time.perf_counter() - start:.1f}s")
    opt = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, config.steps, config.warmup))
    rng = stream_rng(config.seed, "pretrain/batches")
    result = PretrainResult(model)
    for step in range(config.steps):
        images, texts = pool.batch(rng, config.batch_size)
        loss = contrastive_loss(model, normalize_images(images, mean, std), tokenizer(texts), texts)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        result.losses.append(loss.item())
        if config.log_every and (step + 1) % config.log_every == 0:
            recent = np.mean(result.losses[-config.log_every:])
            log(f"step {step + 1}/{config.steps}  loss {recent:.3f}  {time.perf_counter() - start:.0f}s")
    model.eval()
    result.seconds = time.perf_counter() - start
    if out is not None:
        save_weights(model, out)
    return result


def save_weights(model: torch.nn.Module, path: str | Path) -> None:
    """fp16 safetensors in open_clip's layout (half the size; the tiny model loses nothing measurable)."""
    from zscl.models import save_state_dict

    state = {k: v.detach().to(torch.float16) for k, v in model.state_dict().items()}
    # One metadata key: safetensors writes several in hash-map order, which varies between runs.
    save_state_dict(state, path, metadata={"architecture": MODEL_NAME})
