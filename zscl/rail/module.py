"""RAIL (Xu et al., NeurIPS 2024, arXiv 2406.18868) as a method on the contract (:class:`~zscl.methods.base.CLIPMethod`).

The CLIP is frozen; nothing is backpropagated. A task is **one pass** over its training images:

* the task's stream (:class:`~zscl.datasets.streams.StepBatchStream`, the data module's uint8 batches with the
  CLIP's train transform) visits epoch 0's permutation at stream positions ``0 .. N-1``; step ``k`` holds positions
  ``kB .. kB+B-1``, so the task runs ``ceil(N / B)`` steps and the positions ``>= N`` of the last batch (the next
  epoch) are dropped before encoding: every training image is encoded exactly once;
* each kept image's normalised feature ``x̂ = f(x)/‖f(x)‖`` enters the ridge head's statistics with its head
  column as target (:class:`~zscl.rail.ridge.PrimalRidge`: ``A += ΦᵀΦ``, ``B += ΦᵀY``;
  :class:`~zscl.rail.ridge.DualRidge`: the memory grows);
* at the end of the task the head is solved once in float64 (``W = (A + λI)⁻¹B`` or ``α = (K + λI)⁻¹Y``).

Lightning counts steps by optimizer steps, so a step ends with the step of an optimizer over one dummy scalar that
has no gradient (SGD skips it): the step counter, checkpoints and the stream's resume position advance as for any
method, and the benchmark's ``trainer.max_steps`` is replaced by the pass's ``ceil(N / B)``.

The head's columns are classes ``(dataset, label)`` of ordinary datasets (:func:`~zscl.datasets.views.class_sources`),
appended as tasks arrive. Evaluation (:func:`~zscl.rail.fusion.fuse_columns`, β = 0.8) maps each offered class to
its column: in X-TAIL the offered classes are the union of all domains; in MTIL (the domain is given) they are the
evaluated dataset's own, so the joint head is read on that dataset's columns only (a deviation: the reference has
no MTIL script). Hidden layer, statistics, memory and head are the export's sidecar ``X.rail.safetensors``, which
is also how the next task continues them; the Lightning checkpoint holds them as buffers, so a killed task resumes
to the bit.

Since the CLIP never changes, an evaluation batch's features are the same after every task: they are kept in a
process-wide cache keyed by the CLIP's weights and the batch's pixels (:class:`FeatureCache`), so a sequence
encodes each test image once, as the reference evaluates its 10x10 cells on features extracted once.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

import torch
import torch.nn.functional as F

from zscl.datasets.views import class_sources
from zscl.evaluation.zeroshot import spec_classifier
from zscl.methods.base import CLIPMethod, export_metadata
from zscl.rail.fusion import fuse_columns
from zscl.rail.ridge import DualRidge, PrimalRidge

SUFFIX = ".rail.safetensors"
#: defaults of the reference (``configs/analytic_clip.yaml``; the dual λ is hard-coded in ``dual_RAIL.py``)
DEFAULT_LAMBDA = {"primal": 0.1, "dual": 1e-3}


class FeatureCache:
    """Features of evaluation batches by ``(CLIP fingerprint, batch fingerprint)``, least recently used first out
    once over ``max_bytes``. A hit returns exactly what the same CLIP computed on the same batch."""

    def __init__(self, max_bytes: int = 2 * 1024**3) -> None:
        self.max_bytes, self.used = int(max_bytes), 0
        self._items: "OrderedDict[tuple[str, str], torch.Tensor]" = OrderedDict()

    def get(self, key: tuple[str, str]) -> Optional[torch.Tensor]:
        if key in self._items:
            self._items.move_to_end(key)
        return self._items.get(key)

    def put(self, key: tuple[str, str], value: torch.Tensor) -> None:
        self._items[key] = value
        self.used += value.numel() * value.element_size()
        while self.used > self.max_bytes and self._items:
            _, old = self._items.popitem(last=False)
            self.used -= old.numel() * old.element_size()


FEATURES = FeatureCache()


def fingerprint(tensors: "list[torch.Tensor]") -> str:
    """blake2b of the tensors' shapes, dtypes and bytes (the same weights or pixels give the same string)."""
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def sidecar(path: str) -> Path:
    """``X.safetensors`` -> ``X.rail.safetensors``."""
    p = Path(path)
    return p.with_name(p.name[: -len(".safetensors")] + SUFFIX)


class RAILCLIP(CLIPMethod):
    """RAIL-Primal or RAIL-Dual on a frozen CLIP (module docstring).

    Args:
        form: ``primal`` (random ReLU layer + ridge) or ``dual`` (RBF kernel ridge over stored features).
        width: hidden width of the primal form (reference: 15,000).
        lam: ridge penalty λ (default: 0.1 primal, 0.001 dual, as the reference).
        gamma: RBF γ of the dual form (0.1).
        beta: fusion weight β (0.8): ``(1 − β)·softmax(CLIP) + β·ridge`` when CLIP's top class is learned.
        seed: seed of the hidden layer (42).
        kernel_budget_gib: the dual form refuses a task whose float64 kernel matrix would exceed this.
        **kwargs: :class:`~zscl.methods.base.CLIPMethod`'s arguments (lr and the schedule are unused).
    """

    sidecar_suffixes: ClassVar[tuple[str, ...]] = (SUFFIX,)
    plain_clip_evaluation: ClassVar[bool] = False

    def __init__(self, form: Literal["primal", "dual"] = "primal", width: int = 15000, lam: Optional[float] = None,
                 gamma: float = 0.1, beta: float = 0.8, seed: int = 42, kernel_budget_gib: float = 8.0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.clip.requires_grad_(False)
        dim = int(self.clip.text_projection.shape[1])
        lam = DEFAULT_LAMBDA[form] if lam is None else float(lam)
        self.ridge = (PrimalRidge(dim, width, lam, seed) if form == "primal"
                      else DualRidge(dim, gamma, lam, budget_bytes=int(kernel_budget_gib * 1024**3)))
        self.class_keys: list[tuple[str, int]] = []
        prior = _prior_export(self.hparams.init_from, self.hparams.pretrained)
        if prior:
            self._load_sidecar(prior)
        self.register_buffer("task_seen", torch.zeros((), dtype=torch.long))  # this task's images encoded
        self._tick = torch.nn.Parameter(torch.zeros(()), requires_grad=False)  # advances Lightning's step count
        self.trainable = []

    # ----------------------------------------------------------------- training: one pass, then a solve
    def configure_optimizers(self) -> torch.optim.Optimizer:
        """An optimizer over one gradient-free scalar: its (no-op) step is what Lightning counts as a step."""
        return torch.optim.SGD([self._tick], lr=0.0)

    def on_fit_start(self) -> None:
        dm, trainer = self.trainer.datamodule, self.trainer
        if trainer.world_size > 1:
            raise ValueError("RAIL encodes a task's images once on one device; run it with trainer.devices 1")
        self._task_size = _train_size(dm)
        steps = math.ceil(self._task_size / dm.batch_size)
        trainer.fit_loop.epoch_loop.max_steps = steps  # one pass (module docstring)
        self._add_classes(dm.spec.name)
        if isinstance(self.ridge, DualRidge):  # refuse before any image is encoded
            self.ridge.check_room(self._task_size - int(self.task_seen))

    def _add_classes(self, dataset: str) -> None:
        """Append a head column for every class of ``dataset`` not learned yet (idempotent on resume)."""
        known = set(self.class_keys)
        self.class_keys += [key for key in class_sources(dataset) if key not in known]
        self.ridge.grow(len(self.class_keys))
        index = {key: i for i, key in enumerate(self.class_keys)}
        self._train_columns = torch.tensor([index[key] for key in class_sources(dataset)], dtype=torch.long)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``x̂ = f(x)/‖f(x)‖`` of normalised images by the frozen CLIP in eval mode, float32."""
        self.clip.eval()
        return F.normalize(self.clip.encode_image(images).float(), dim=-1)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Stream positions ``kB .. kB+B-1`` of step ``k``; those ``< N`` (epoch 0) enter the statistics."""
        images, labels = batch["task"]
        first = self.global_step * self.trainer.datamodule.batch_size
        keep = max(0, min(len(labels), self._task_size - first))
        if keep:
            feats = self.features(self.normalized(images[:keep]))
            targets = self._train_columns.to(labels.device)[labels[:keep]]
            if isinstance(self.ridge, PrimalRidge):
                self.ridge.accumulate(feats, targets)
            else:
                self.ridge.add(feats, targets)
            self.task_seen += keep
        self.optimizers().step()

    def on_train_end(self) -> None:
        """Solve the head once on everything seen so far (float64), then export if asked."""
        if int(self.task_seen) != self._task_size:
            raise RuntimeError(f"RAIL encoded {int(self.task_seen)} of the task's {self._task_size} images")
        self.ridge.solve()
        super().on_train_end()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rail_class_keys"] = [list(k) for k in self.class_keys]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.class_keys = [(str(d), int(y)) for d, y in checkpoint["rail_class_keys"]]

    # ----------------------------------------------------------------- evaluation
    @torch.no_grad()
    def prepare_evaluation(self) -> None:
        """Per evaluated dataset: CLIP's zero-shot head and the head column of each offered class (-1: unseen)."""
        index = {key: i for i, key in enumerate(self.class_keys)}
        self._clip_print = fingerprint(list(self.clip.state_dict().values()))
        self._classifiers = [self._classifier(s) for s in self._specs]
        self._columns = [torch.tensor([index.get(key, -1) for key in class_sources(s.name)], device=self.device)
                         for s in self._specs]

    def _classifier(self, spec: Any) -> torch.Tensor:
        """CLIP's zero-shot head of ``spec``; like the image features, the same for this CLIP after every task, so
        it is kept in :data:`FEATURES` too, keyed by the prompts themselves (class names and templates)."""
        prompts = (spec.classnames, spec.templates, getattr(spec, "class_templates", None))
        key = (self._clip_print, "classifier:" + hashlib.blake2b(repr(prompts).encode(), digest_size=16).hexdigest())
        cached = FEATURES.get(key)
        if cached is None:
            cached = spec_classifier(self.clip, self.bundle.tokenizer, spec, device=self.device)
            FEATURES.put(key, cached.cpu())
        return cached.to(self.device)

    def eval_features(self, images: torch.Tensor) -> torch.Tensor:
        """:meth:`features` of an evaluation batch, from :data:`FEATURES` when this CLIP has encoded it before."""
        key = (self._clip_print, fingerprint([images]))
        cached = FEATURES.get(key)
        if cached is None:
            cached = self.features(images)
            FEATURES.put(key, cached.cpu())
        return cached.to(images.device)

    @torch.no_grad()
    def eval_logits(self, images: torch.Tensor, dataset: int) -> torch.Tensor:
        """``fuse_columns(100·x̂Tᵀ, ridge(x̂))``: 0.2·CLIP + 0.8·ridge where CLIP's top class is learned."""
        feats = self.eval_features(images)
        clip_logits = 100.0 * feats @ self._classifiers[dataset]
        columns = self._columns[dataset]
        ridge = self.ridge(feats) if bool((columns >= 0).any()) else feats.new_zeros(len(feats), 0)
        return fuse_columns(clip_logits, ridge, columns, self.hparams.beta)

    def describe(self) -> str:
        return f"RAIL-{self.hparams.form} head over {len(self.class_keys)} classes (β = {self.hparams.beta})"

    # ----------------------------------------------------------------- export
    def export_sidecars(self, path: str) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.ridge.state_dict().items()}
        h = self.hparams
        meta = {"class_keys": json.dumps(self.class_keys), "form": h.form, "width": str(h.width),
                "lam": repr(self.ridge.lam), "gamma": str(h.gamma), "beta": str(h.beta), "seed": str(h.seed)}
        save_file(tensors, str(sidecar(path)), metadata=meta)

    def _load_sidecar(self, path: str) -> None:
        from safetensors import safe_open

        with safe_open(str(sidecar(path)), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("form") != self.hparams.form:
                raise ValueError(f"{sidecar(path)} holds a RAIL-{meta.get('form')} head, not {self.hparams.form}")
            self.ridge.load_state_dict({k: f.get_tensor(k) for k in f.keys()})
        self.class_keys = [(str(d), int(y)) for d, y in json.loads(meta["class_keys"])]

    @classmethod
    def load_export(cls, path: str, clip: Optional[str] = None, **overrides: Any) -> "RAILCLIP":
        """The model of an export, with the head's settings read from its sidecar."""
        from safetensors import safe_open

        with safe_open(str(sidecar(path)), framework="pt") as f:
            meta = f.metadata() or {}
        settings = {"form": meta["form"], "width": int(meta["width"]), "lam": float(meta["lam"]),
                    "gamma": float(meta["gamma"]), "beta": float(meta["beta"]), "seed": int(meta["seed"])}
        arch = clip or export_metadata(path).get("clip")
        return cls(clip=arch, pretrained=path, **{**settings, **overrides}).eval()


def _train_size(dm: Any) -> int:
    """Images in the task's training split (the data module's dataset; listed, not decoded)."""
    from zscl.datasets import build_dataset

    return len(build_dataset(dm.spec.name, dm.data_root, "train", None))


def _prior_export(init_from: Optional[str], pretrained: Optional[str]) -> Optional[str]:
    """The export whose head this module continues: ``init_from``, else an export given as ``pretrained``."""
    for path in (init_from, pretrained if not init_from else None):
        if path and str(path).endswith(".safetensors") and sidecar(path).exists():
            return str(path)
    return None
