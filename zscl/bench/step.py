"""``zscl bench step``: time the real training step of a method's module (:class:`~zscl.methods.ContinualCLIP`,
or the config's ``model_class``, any method on the contract).

The module users train is built from a method config (``configs/method/<name>.yaml``) with
random weights and run through a real ``lightning.Trainer.fit`` on pre-generated random
batches that already sit on the device, so data loading is excluded (``zscl bench loader``
measures it). A callback records a timestamp at every ``on_train_batch_start`` and
``on_train_batch_end``: CUDA events on a GPU (no host sync until the end), ``perf_counter``
on CPU.

* ``ms_per_step_*``: end-to-end iteration times, ``end_k - end_{k-1}`` (forward, backward,
  WC, optimizer, scheduler, every callback such as WE and the NaN guard, Lightning's loop);
* ``ms_in_hooks_median``: ``end_k - start_k`` (what Lightning runs between the batch hooks);
* the first step (``torch.compile`` happens there) is reported alone as ``first_step_ms``,
  then ``warmup`` steps are dropped and ``steps`` steps are timed;
* ``mfu = tflops_per_step / (ms_per_step_median / 1000) / peak_tflops`` with the analytic
  count of :mod:`zscl.bench.flops`.
"""

from __future__ import annotations

import itertools
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Optional

import lightning as L
import torch

from zscl.bench import device_info, peak_memory_tracker, resolve_device, summarize_ms, synchronize
from zscl.methods.config import resolve_auto

# Dense bf16/fp16 tensor-core peaks (TFLOP/s, SXM parts), matched against the device name.
PEAK_TFLOPS_16BIT = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


@dataclass
class StepBench:
    """Settings of ``zscl bench step``; the defaults are the issue's H100 setup (ViT-B/16, 64 + 64)."""

    model: Optional[str] = field(default=None, metadata={"help": "open_clip architecture (default: ViT-B-16 on CUDA, zscl-tiny-vit on CPU)"})
    method: str = field(default="zscl", metadata={"help": "method config name or YAML path (configs/method: zscl, finetune, ...)"})
    batch: int = field(default=64, metadata={"help": "task images per step"})
    ref_batch: int = field(default=64, metadata={"help": "reference images per step (distilling methods)"})
    classes: int = field(default=100, metadata={"help": "classes of the task (class-text forward per step)"})
    ref_texts: int = field(default=13000, metadata={"help": "reference texts (teacher embeddings cached once)"})
    train_mode: Optional[Literal["whole", "image", "text"]] = field(default=None, metadata={"help": "which tower trains (default: the method's)"})
    text_mode: Optional[Literal["coded", "paper"]] = field(default=None, metadata={"help": "override the method's text-KD mode"})
    text_batch: Optional[int] = field(default=None, metadata={"help": "paper text mode: reference texts per step"})
    precision: Optional[str] = field(default=None, metadata={"help": "Lightning precision (default bf16-mixed on CUDA, 32-true on CPU)"})
    compile: Literal["auto", "on", "off"] = field(default="auto", metadata={"help": "torch.compile (auto: on for CUDA)"})
    steps: int = field(default=50, metadata={"help": "timed steps"})
    warmup: int = field(default=5, metadata={"help": "untimed steps after the first one"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    peak_tflops: Optional[float] = field(default=None, metadata={"help": "peak TFLOP/s for MFU (default: device table; none on CPU)"})
    seed: int = field(default=0, metadata={"help": "seed of the weights and the random batches"})
    baseline: Optional[str] = field(default=None, metadata={"help": "also time this method config in the same run "
                                                                    "(e.g. zscl) and report the step-time ratio"})
    rounds: int = field(default=1, metadata={"help": "with --baseline: alternate method / baseline this many times "
                                                     "(the ratio is of the medians over all rounds; robust to load)"})


# ---------------------------------------------------------------------------- the module under test
def build_module(model: str, method: str = "zscl", *, train_mode: Optional[str] = None, text_mode: Optional[str] = None,
                 text_batch: Optional[int] = None, compile: str = "auto", **overrides: Any):
    """A randomly initialised module of a method config (its ``model_class``), through :func:`~zscl.runner.build.create_method`.

    ``train_mode``, ``text_mode`` and ``text_batch`` override the config's ``model.train_mode`` and
    ``model.distill.*`` when given (a method without those arguments refuses them).
    """
    from zscl.runner.build import method_config

    section = dict(method_config(method).get("model") or {})
    extra: dict[str, Any] = {"clip": model, "pretrained": None,
                             "speed": {**(section.get("speed") or {}), "compile": {"auto": "auto", "on": True, "off": False}[compile]}}
    if train_mode is not None:
        extra["train_mode"] = train_mode
    distill = {k: v for k, v in (("text_mode", text_mode), ("text_batch", text_batch)) if v is not None}
    if distill:
        extra["distill"] = {**(section.get("distill") or {}), **distill}
    from dataclasses import asdict, is_dataclass

    from zscl.runner.build import create_method

    given = {k: asdict(v) if is_dataclass(v) else v for k, v in overrides.items()}  # e.g. speed=Speed(...)
    return create_method(method, **{**extra, **given})


class RandomBatches(L.LightningDataModule):
    """Endless pre-generated random batches, created on the training device at ``setup``.

    Provides what ContinualCLIP reads from its datamodule: ``spec.prompts()`` (``classes`` fake
    class names), ``reference_tokens(tokenizer)`` (random token sentences) and train batches
    ``{"task": (images, labels), "ref": ref_images}``; ``distinct`` batches are cycled.
    """

    def __init__(self, image_size: int, batch: int, ref_batch: int, classes: int, ref_texts: int,
                 *, with_ref: bool = True, distinct: int = 2, seed: int = 0) -> None:
        super().__init__()
        from zscl.datasets import DatasetSpec

        names = tuple(f"object kind {k}" for k in range(classes))
        self.spec = DatasetSpec("BenchClasses", names, ("a photo of a {c}.",), _no_images, "random batches")
        self.image_size, self.batch, self.ref_batch = image_size, batch, ref_batch
        self.ref_texts, self.with_ref, self.distinct, self.seed = ref_texts, with_ref, distinct, seed
        self.batches: list[dict[str, Any]] = []

    def reference_tokens(self, tokenizer) -> torch.Tensor:
        from zscl.reference.texts import random_tokens

        return random_tokens(self.ref_texts, min(16, tokenizer.context_length - 2), tokenizer, self.seed)

    def setup(self, stage: str) -> None:
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        g = torch.Generator().manual_seed(self.seed)
        shape = (3, self.image_size, self.image_size)
        self.batches = []
        for _ in range(self.distinct):
            batch: dict[str, Any] = {"task": (torch.randn(self.batch, *shape, generator=g).to(device),
                                              torch.randint(0, self.spec.num_classes, (self.batch,), generator=g).to(device))}
            if self.with_ref:
                batch["ref"] = torch.randn(self.ref_batch, *shape, generator=g).to(device)
            self.batches.append(batch)

    def train_dataloader(self):
        return _Endless(self.batches)


class _Endless:
    """An iterable that cycles a list forever (Lightning accepts any iterable as a loader)."""

    def __init__(self, items: list) -> None:
        self.items = items

    def __iter__(self):
        return itertools.cycle(self.items)


def _no_images(root, split, transform):
    raise ValueError("the step benchmark's classes have no images (its batches are random tensors)")


# ---------------------------------------------------------------------------- timing
class StepTimer(L.Callback):
    """Timestamps at every train batch start and end: CUDA events (no host sync), or perf_counter."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.starts: list[Any] = []
        self.ends: list[Any] = []
        self.fit_start = 0.0
        self.setup_s: Optional[float] = None

    def _stamp(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def on_fit_start(self, trainer, pl_module) -> None:
        self.fit_start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.setup_s is None:  # teacher text cache, optimizer, compile wrapping: once per task
            synchronize(pl_module.device)
            self.setup_s = time.perf_counter() - self.fit_start
        self.starts.append(self._stamp())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(self._stamp())

    def _ms(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def durations(self) -> tuple[list[float], list[float]]:
        """(end-to-end iteration times, in-hook times) in ms; iteration 0 is ``end_0 - start_0``."""
        if self.cuda:
            torch.cuda.synchronize()  # every event has been reached
        if not self.ends:
            return [], []
        iters = [self._ms(self.starts[0], self.ends[0])]
        iters += [self._ms(a, b) for a, b in zip(self.ends, self.ends[1:])]
        return iters, [self._ms(a, b) for a, b in zip(self.starts, self.ends)]


def make_trainer(device: torch.device, precision: str, max_steps: int, callbacks: list[L.Callback]) -> L.Trainer:
    """A bare single-device Trainer: no logger, checkpoints, progress bar, summary or validation."""
    from zscl.utils.quiet import quiet_lightning

    quiet_lightning()
    # ContinualCLIP defines validation_step; the benchmark trains only.
    warnings.filterwarnings("ignore", message=".*validation_step. but have no .val_dataloader.*")
    index = [device.index] if device.type == "cuda" and device.index is not None else 1
    return L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=index, precision=precision,
                     max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks)


def default_precision(device: torch.device) -> str:
    if device.type != "cuda":
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def default_peak_tflops(device: torch.device, precision: str) -> Optional[float]:
    """Dense 16-bit peak of known GPUs under 16-bit mixed precision; None otherwise (give --peak-tflops)."""
    if device.type != "cuda" or not precision.startswith(("bf16", "16")):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS_16BIT.items() if key in name), None)


# ---------------------------------------------------------------------------- the benchmark
def run_step(cfg: StepBench) -> dict[str, Any]:
    """Time ``cfg.steps`` training steps of the method's module on random data; one JSON-ready dict.

    With ``baseline``, the baseline method runs after it with the same settings (``rounds`` times,
    alternating); the result (the first round's) gains ``baseline`` (the baseline's first result),
    the per-round medians, and ``step_time_ratio`` = median of this method's per-round medians /
    median of the baseline's.
    """
    if not cfg.baseline:
        return _run_one(cfg)
    from dataclasses import replace

    runs, bases = [], []
    for _ in range(max(cfg.rounds, 1)):  # alternating, so that a change of machine load hits both
        runs.append(_run_one(cfg))
        bases.append(_run_one(replace(cfg, method=cfg.baseline, baseline=None)))
    out, base = runs[0], bases[0]
    medians = [r["ms_per_step_median"] for r in runs]
    base_medians = [b["ms_per_step_median"] for b in bases]
    out["baseline"] = base
    out["rounds_ms_per_step_median"] = {"method": medians, "baseline": base_medians}
    out["step_time_ratio"] = statistics.median(medians) / statistics.median(base_medians)
    return out


def _run_one(cfg: StepBench) -> dict[str, Any]:
    device = resolve_device(cfg.device)
    model = cfg.model or ("ViT-B-16" if device.type == "cuda" else "zscl-tiny-vit")
    precision = cfg.precision or default_precision(device)
    checks = {"steps >= 1": cfg.steps >= 1, "warmup >= 0": cfg.warmup >= 0, "batch >= 1": cfg.batch >= 1,
              "ref_batch >= 1": cfg.ref_batch >= 1, "classes >= 2": cfg.classes >= 2, "ref_texts >= 1": cfg.ref_texts >= 1}
    failed = [rule for rule, ok in checks.items() if not ok]
    if failed:
        raise ValueError(f"invalid settings: need {', '.join(failed)} (got steps={cfg.steps}, warmup={cfg.warmup}, "
                         f"batch={cfg.batch}, ref_batch={cfg.ref_batch}, classes={cfg.classes}, ref_texts={cfg.ref_texts})")
    torch.manual_seed(cfg.seed)
    module = build_module(model, cfg.method, train_mode=cfg.train_mode, text_mode=cfg.text_mode,
                          text_batch=cfg.text_batch, compile=cfg.compile)
    data = RandomBatches(module.bundle.image_size, cfg.batch, cfg.ref_batch, cfg.classes, cfg.ref_texts,
                         with_ref=module.needs_reference, seed=cfg.seed)
    timer = StepTimer(cuda=device.type == "cuda")
    trainer = make_trainer(device, precision, 1 + cfg.warmup + cfg.steps, [timer])
    with peak_memory_tracker(device) as memory:
        trainer.fit(module, datamodule=data)
    iters, hooks = timer.durations()
    skip = 1 + cfg.warmup
    out: dict[str, Any] = summarize_ms(iters[skip:], "ms_per_step")
    compiled = resolve_auto(module.speed.compile, device.type == "cuda")
    out.update(ms_in_hooks_median=statistics.median(hooks[skip:]), first_step_ms=iters[0],
               compile_s=(iters[0] - out["ms_per_step_median"]) / 1e3 if compiled else None,
               setup_s=timer.setup_s, compiled=compiled, **memory)
    profile = module.analytic_step_profile()  # None: the analytic count does not describe this method's step
    if profile is None:
        out.update(tflops_per_step=None, tflops_parts=None, achieved_tflops=None, peak_tflops=None, mfu=None)
    else:
        out.update(_flops_report(cfg, model, profile["distill"], profile["train_mode"], out["ms_per_step_median"],
                                 device, precision))
    distill = profile["distill"] if profile else None
    settings = {**asdict(cfg), "model": model, "precision": precision,
                "text_mode": distill.text_mode if distill is not None and distill.active else None}
    return {"bench": "step", **out, **device_info(device), "settings": settings}


def _flops_report(cfg: StepBench, model: str, distill, train_mode: str, ms: float, device: torch.device, precision: str) -> dict[str, Any]:
    """Analytic TFLOP per step, achieved TFLOP/s and MFU (nulls where the count or the peak is unknown)."""
    from zscl.bench.flops import FlopsUnsupported, step_flops

    try:
        flops = step_flops(model, batch=cfg.batch, ref_batch=cfg.ref_batch, classes=cfg.classes,
                           ref_texts=cfg.ref_texts, distill=distill.active, train_mode=train_mode,
                           text_mode=distill.text_mode, text_batch=distill.text_batch).as_dict()
    except FlopsUnsupported:
        flops = None
    peak = cfg.peak_tflops if cfg.peak_tflops is not None else default_peak_tflops(device, precision)
    achieved = flops["total"] / (ms / 1e3) if flops else None
    return {"tflops_per_step": flops["total"] if flops else None, "tflops_parts": flops["parts"] if flops else None,
            "achieved_tflops": achieved, "peak_tflops": peak,
            "mfu": achieved / peak if achieved is not None and peak else None}
