"""Analytic FLOPs of one continual-CLIP training step, from the open_clip model config.

A pre-LN transformer layer over ``n`` tokens of width ``w`` with MLP ratio ``r`` costs, in the
forward pass (a multiply-add counts 2 FLOPs):

``F_layer = 8 n w^2 (q, k, v, out projections) + 4 r n w^2 (MLP) + 4 n^2 w (QK^T and AV)``

which is ``24 n w^2 + 4 n^2 w`` for ``r = 4``. A ViT image adds its patch embedding
(``2 P (3 p^2) w`` for ``P`` patches of side ``p``, ``n = P + 1`` with the class token) and
the output projection ``2 w d``; a text adds the projection of its pooled token. Text towers
run over the full context length (open_clip does not skip padding). Norms, softmax and
activations are ignored (< 1 %). Backward costs twice the forward (input and weight
gradients), so a trained tower costs ``3 F``.

ZSCL step (Zheng et al., 2023), task batch ``B``, reference batch ``B_r``, ``C`` classes,
``R`` reference texts, embedding width ``d``:

* student image: ``3 (B + B_r) F_img`` (one forward and backward over task + reference images);
* teacher image: ``B_r F_img`` (frozen, forward only);
* class texts: ``3 C F_txt`` (the current text tower; 0 per step when it is frozen);
* logits: ``3 * 2 B C d`` (task) and ``2 * 2 B_r R d + 2 B_r R d`` (student with its input
  gradient, teacher) for the distillation against the cached teacher text embeddings;
* once per task (``setup``, not per step): the teacher encodes the ``R`` reference texts.

For ViT-B/16 with B = B_r = 64, C = 100, R = 13,000: 13.5 + 2.3 + 1.8 ≈ 17.5 TFLOP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional


class FlopsUnsupported(ValueError):
    """The model has a tower this analytic count does not cover (ResNet, timm, Hugging Face)."""


@dataclass(frozen=True)
class Tower:
    """Shape of one transformer tower: what its forward FLOPs depend on."""

    layers: int
    width: int
    mlp_ratio: float
    tokens: int  # sequence length n
    embed_dim: int  # output projection width d (0: no projection)
    patch_flops: float = 0.0  # forward FLOPs of the patch embedding (image towers)

    def forward(self) -> float:
        """Forward FLOPs of one sample (one image or one text)."""
        n, w = self.tokens, self.width
        layer = (8 + 4 * self.mlp_ratio) * n * w * w + 4 * n * n * w
        return self.layers * layer + self.patch_flops + 2 * w * self.embed_dim


@dataclass(frozen=True)
class ClipShape:
    image: Tower
    text: Tower
    embed_dim: int


def _config(model: str) -> dict[str, Any]:
    import open_clip

    from zscl.models import list_models

    list_models()  # registers zscl's tiny configs with open_clip
    name = model.replace("/", "-")
    cfg = open_clip.get_model_config(name)
    if cfg is None and name.endswith("-quickgelu"):
        cfg = open_clip.get_model_config(name[: -len("-quickgelu")])
    if cfg is None:
        raise FlopsUnsupported(f"no open_clip config named {model!r}; the FLOP count needs an architecture name")
    return cfg


def clip_shape(model: str) -> ClipShape:
    """Tower shapes of an open_clip architecture, read from its JSON config (no weights built)."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    cfg = _config(model)
    vision, text = CLIPVisionCfg(**cfg["vision_cfg"]), CLIPTextCfg(**cfg["text_cfg"])
    if not isinstance(vision.layers, int) or vision.timm_model_name:
        raise FlopsUnsupported(f"{model}: the analytic FLOP count covers ViT image towers only (not ResNet/timm)")
    if text.hf_model_name or vision.attentional_pool:
        raise FlopsUnsupported(f"{model}: Hugging Face text towers and attentional pooling are not covered")
    size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
    patches = (size // vision.patch_size) ** 2
    d = int(cfg["embed_dim"])
    image = Tower(vision.layers, vision.width, vision.mlp_ratio, patches + 1, d,
                  patch_flops=2.0 * patches * 3 * vision.patch_size**2 * vision.width)
    txt = Tower(text.layers, text.width, text.mlp_ratio, text.context_length, d)
    return ClipShape(image, txt, d)


@dataclass
class StepFlops:
    """FLOPs of one training step by part; ``setup`` is spent once per task, not per step."""

    parts: dict[str, float]
    setup: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return float(sum(self.parts.values()))

    def as_dict(self, unit: float = 1e12) -> dict[str, Any]:
        return {"total": self.total / unit, "parts": {k: v / unit for k, v in self.parts.items()},
                "setup": {k: v / unit for k, v in self.setup.items()}}


def _passes(trains: bool) -> float:
    """Forward-equivalents of a tower: forward + backward (2x) when it trains, forward only otherwise."""
    return 3.0 if trains else 1.0


def step_flops(
    model: str,
    *,
    batch: int,
    ref_batch: int = 0,
    classes: int,
    ref_texts: int = 0,
    distill: bool = True,
    train_mode: Literal["whole", "image", "text"] = "whole",
    text_mode: Literal["coded", "paper"] = "coded",
    text_batch: Optional[int] = None,
) -> StepFlops:
    """Analytic FLOPs of one step of :class:`~zscl.methods.ContinualCLIP` (see the module docstring).

    ``distill=False`` is plain fine-tuning (no reference images, no teacher). In ``paper`` text
    mode the student text tower also encodes ``text_batch`` (default all ``ref_texts``) reference
    texts per step.
    """
    shape = clip_shape(model)
    img, txt, d = shape.image.forward(), shape.text.forward(), shape.embed_dim
    image_trains, text_trains = train_mode in ("whole", "image"), train_mode in ("whole", "text")
    images = batch + (ref_batch if distill else 0)
    parts = {"student_image": _passes(image_trains) * images * img}
    setup: dict[str, float] = {}
    if text_trains:
        parts["class_text"] = 3.0 * classes * txt
    else:
        setup["class_text"] = classes * txt  # frozen text tower: class embeddings computed once
    parts["logits"] = 3.0 * 2 * batch * classes * d
    if distill:
        parts["teacher_image"] = ref_batch * img
        parts["logits"] += 3.0 * 2 * ref_batch * ref_texts * d
        setup["teacher_ref_text"] = ref_texts * txt
        if text_mode == "paper":
            n = min(text_batch or ref_texts, ref_texts)
            parts["student_ref_text"] = _passes(text_trains) * n * txt
            parts["logits"] += 4.0 * 2 * ref_batch * n * d
    return StepFlops(parts, setup)
