"""Benchmarks of the training step, zero-shot evaluation and the training data loader.

``zscl bench step | eval | loader`` (``zscl.cli.bench``) run :func:`zscl.bench.step.run_step`,
:func:`zscl.bench.eval.run_eval` and :func:`zscl.bench.loader.run_loader`; each returns one
JSON-ready dict. :mod:`zscl.bench.flops` counts the FLOPs of a step analytically and
:mod:`zscl.bench.jpegs` writes photo-like test JPEGs. This module holds what they share:
device description, timing summaries, peak-memory measurement.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch

T = TypeVar("T")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA if available, else CPU; anything else as ``torch.device``."""
    from zscl.evaluation.zeroshot import resolve_device as resolve

    device = resolve(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for CUDA, but torch.cuda.is_available() is False")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU, where work is synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """``fn()`` and its wall time in seconds, the device drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def device_info(device: torch.device) -> dict[str, Any]:
    """What ran the benchmark: device name, torch/CUDA versions, CPU count."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"device": f"{device.type}: {name}", "torch": torch.__version__,
            "cuda": torch.version.cuda if device.type == "cuda" else None, "cpu_count": os.cpu_count()}


def summarize_ms(times_ms: Sequence[float], prefix: str) -> dict[str, float]:
    """``<prefix>_median/_min/_max/_mean`` of a list of durations in milliseconds."""
    if not times_ms:
        raise ValueError(f"no timings for {prefix}: run at least one timed step")
    return {f"{prefix}_median": statistics.median(times_ms), f"{prefix}_min": min(times_ms),
            f"{prefix}_max": max(times_ms), f"{prefix}_mean": statistics.fmean(times_ms)}


def _rss_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


@contextmanager
def peak_memory_tracker(device: torch.device) -> Iterator[dict[str, Any]]:
    """Yields a dict that holds ``peak_mem_gib`` and ``peak_mem_kind`` after the block.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset (tensors only, not the allocator's
    cache; ``peak_mem_reserved_gib`` adds that). CPU: the rise of the process's resident set
    over the block (``VmHWM`` after resetting it through ``/proc/self/clear_refs``, minus
    ``VmRSS`` before); null where /proc is unavailable.
    """
    out: dict[str, Any] = {"peak_mem_gib": None, "peak_mem_kind": None}
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        synchronize(device)
        out.update(peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2**30,
                   peak_mem_reserved_gib=torch.cuda.max_memory_reserved(device) / 2**30,
                   peak_mem_kind="cuda max_memory_allocated")
        return
    before = _rss_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # resets VmHWM (the peak RSS) to the current RSS
        reset = True
    except OSError:
        reset = False
    yield out
    peak = _rss_kib("VmHWM")
    if reset and before is not None and peak is not None:
        out.update(peak_mem_gib=max(peak - before, 0) / 2**20, peak_mem_kind="cpu peak RSS rise (VmHWM - VmRSS before)")
