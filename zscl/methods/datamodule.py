"""The data side of one continual task: the task stream, the reference stream, evaluation sets.

* Batches are uint8 after the geometric transform; the module scales and normalises them on
  the device (bit-identical to ``ToTensor()`` + ``Normalize()``).
* Training batches come from :class:`~zscl.datasets.streams.StepBatchStream`: endless,
  deterministic per step and rank, resumable mid-task (the stream starts at
  ``trainer.global_step``, which Lightning restores before it asks for the loader).
* The reference stream (only when the method distils) is independent of the task stream:
  its own seed, the *test* transform as in the paper, and its own batch size (default: the
  task batch size). Webdataset shards stream with resampling, also resuming at the step. With the
  ``task`` source (LwF) it is a second, independently seeded stream over the task's own train split.
* Evaluation: one loader per evaluation dataset, each rank reading a contiguous shard, from
  the preprocessed uint8 cache by default.
* Unreadable images (:mod:`zscl.datasets.badimages`): in training and reference streams they are
  replaced by the next readable sample (``on_bad_image: skip``), logged and counted in
  ``bad_images``, or stop the run (``error``); in evaluation sets they stop the run before it
  starts, listed, unless ``allow_bad_test_images`` excludes them (``excluded_test_images``).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import replace
from typing import Any, Literal, Optional, Union

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader

from zscl.datasets.badimages import (
    BadImageLog,
    SafeImages,
    UnreadableImageError,
    UnreadableTestImagesError,

)
from zscl.datasets.streams import StepBatchStream, reporting_loader
from zscl.reference import ReferenceImages, ReferenceTexts, reference_image_dataset, reference_text_tokens, reference_wds_stream
from zscl.reference.images import for_task as images_for_task
from zscl.reference.texts import for_task as texts_for_task


class ContinualDataModule(L.LightningDataModule):
    """Data for training one task and for zero-shot evaluation.

    Args:
        dataset: the task's registered dataset name (e.g. ``DTD``).
        data_root: folder holding the datasets in their torchvision layouts.
        batch_size: task batch per device (reference: 64).
        reference_batch_size: reference images per device and step (default: ``batch_size``).
        eval_batch_size: evaluation batch (reference: 128).
        eval_datasets: datasets evaluated by validate/test (default: the task's dataset).
        num_workers: DataLoader workers for each stream.
        seed: seed of the task and reference streams.
        reference_images / reference_texts: ZSCL's reference data (paper: ImageNet train + CC captions).
        custom_datasets: user datasets (ImageFolder or CSV; a YAML file or a list) registered first.
        eval_cache: evaluate from the preprocessed uint8 image cache.
        cache_dir: where the cache lives (default ``~/.cache/zscl/eval`` or ``$ZSCL_CACHE/eval``).
        on_bad_image: an unreadable training or reference image is replaced by the next readable
            sample of its stream (``skip``) or stops the run (``error``).
        allow_bad_test_images: exclude (and count) unreadable evaluation images instead of failing.
    """

    def __init__(
        self,
        dataset: str = "DTD",
        data_root: str = "data",
        batch_size: int = 64,
        reference_batch_size: Optional[int] = None,
        eval_batch_size: int = 128,
        eval_datasets: Optional[list[str]] = None,
        num_workers: int = 4,
        seed: int = 42,
        reference_images: Optional[ReferenceImages] = None,
        reference_texts: Optional[ReferenceTexts] = None,
        custom_datasets: Union[str, list[dict[str, Any]], None] = None,
        eval_cache: bool = True,
        cache_dir: Optional[str] = None,
        on_bad_image: Literal["skip", "error"] = "skip",
        allow_bad_test_images: bool = False,
    ) -> None:
        super().__init__()
        from zscl.datasets import get_dataset, load_custom_datasets

        if custom_datasets:
            load_custom_datasets(custom_datasets, data_root=data_root)
        self.spec = get_dataset(dataset)  # an unknown task fails here, before any training
        self.data_root = data_root
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.reference_batch_size = reference_batch_size or batch_size
        self.eval_names = [get_dataset(n).name for n in (eval_datasets or [self.spec.name])]
        self.num_workers, self.seed = num_workers, seed
        self.reference_images = reference_images or ReferenceImages()
        self.reference_texts = reference_texts or ReferenceTexts()
        self.eval_cache, self.cache_dir = eval_cache, cache_dir
        self.skip_bad, self.allow_bad_test_images = on_bad_image == "skip", allow_bad_test_images
        self.bad_images = BadImageLog()  # unreadable training/reference images met by this task
        self.excluded_test_images: dict[str, list[str]] = {}  # dataset -> unreadable test files left out

    # ------------------------------------------------------------------ helpers
    @property
    def _bundle(self):
        return self.trainer.lightning_module.bundle

    def _rank(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    @staticmethod
    def _uint8(transform):
        """The transform minus ToTensor/Normalize: batches travel as uint8 (4x less host-to-device
        traffic) and the module normalises them on the device, bit-identically."""
        from zscl.datasets.cache import split_normalize

        try:
            return split_normalize(transform)[0]
        except ValueError:
            return transform  # an unusual transform: ship it as is (floats)

    @property
    def ref_images(self) -> ReferenceImages:
        """The reference-image source with ``task`` resolved to this task's train split."""
        return images_for_task(self.reference_images, self.spec.name)

    @property
    def ref_texts(self) -> ReferenceTexts:
        """The reference-text source with ``task`` resolved to this task's class prompts."""
        return texts_for_task(self.reference_texts, self.spec.name, self.seed)

    def reference_tokens(self, tokenizer) -> torch.Tensor:
        """Token ids of all reference texts (the teacher encodes them once per task)."""
        return reference_text_tokens(self.ref_texts, self.data_root, tokenizer)

    def check_reference(self) -> None:
        """Fail early, with the expected location, if the reference data is missing."""
        try:
            if self.ref_images.source not in ("wds", "memory"):  # a memory is written by the run itself
                reference_image_dataset(replace(self.ref_images, cache=False), self.data_root, None)
            from zscl.reference import reference_texts

            if self.ref_texts.source != "random":
                reference_texts(self.ref_texts, self.data_root)
        except (FileNotFoundError, ValueError) as err:
            raise FileNotFoundError(
                f"ZSCL needs reference data, which is missing: {err}. Configure it with "
                "--data.reference_images.{source,path} and --data.reference_texts.{source,path} "
                f"(paths relative to data_root={self.data_root})."
            ) from err

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.trainer.lightning_module.needs_reference:
            self.check_reference()
        self.check_test_images()  # every rank: before any training or evaluation starts

    def train_dataloader(self) -> CombinedLoader:
        from zscl.datasets import build_dataset

        rank, world = self._rank()
        step = self.trainer.global_step if self.trainer is not None else 0
        transform = self._uint8(self._bundle.train_transform)
        name = self.trainer.lightning_module.training_dataset(self.spec.name, self.data_root)  # the method may hold some out
        task = SafeImages(build_dataset(name, self.data_root, "train", transform))
        pin = torch.cuda.is_available()
        stream = StepBatchStream(task, self.batch_size, seed=self.seed, start_step=step, rank=rank, world_size=world,
                                 skip_unreadable=self.skip_bad)
        loaders = {"task": reporting_loader(stream, stream.unreadable, self.bad_images, "training",
                                            self.num_workers, pin)}
        if self.trainer.lightning_module.needs_reference:
            loaders["ref"] = self._reference_loader(step, rank, world, pin)
        return CombinedLoader(loaders, mode="max_size_cycle")

    def _reference_loader(self, step: int, rank: int, world: int, pin: bool):
        cfg, tf = self.ref_images, self._uint8(self._bundle.test_transform)
        if cfg.source == "wds":
            records: list = []
            stream = reference_wds_stream(cfg, self.data_root, tf, self.reference_batch_size, seed=self.seed + 1,
                                          start_step=step, rank=rank, world_size=world, records=records,
                                          skip_unreadable=self.skip_bad)
            return reporting_loader(stream, records, self.bad_images, "reference", self.num_workers, pin)
        dataset = SafeImages(reference_image_dataset(cfg, self.data_root, tf, cache_dir=self.cache_dir))
        left_out = getattr(dataset.dataset, "excluded", [])  # a cached pool leaves unreadable images out
        if left_out and not self.skip_bad:
            raise UnreadableImageError(f"unreadable image {left_out[0][0]} ({left_out[0][1]})", *left_out[0])
        self.bad_images.add(left_out, "reference")
        stream = StepBatchStream(dataset, self.reference_batch_size, seed=self.seed + 1, start_step=step,
                                 rank=rank, world_size=world, skip_unreadable=self.skip_bad)
        return reporting_loader(stream, stream.unreadable, self.bad_images, "reference", self.num_workers, pin)

    def teardown(self, stage: str) -> None:
        if stage != "fit" or self.trainer is None:
            return
        if self.trainer.world_size > 1:  # every rank met its own share of the files
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                gathered: list = [None] * self.trainer.world_size
                dist.all_gather_object(gathered, self.bad_images.paths)
                for paths in gathered:
                    self.bad_images.merge(paths)
        line = self.bad_images.summary(self.spec.name)
        if line and self.trainer.is_global_zero:
            print(line, file=sys.stderr, flush=True)

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node: build the evaluation caches there once.
        if self.eval_cache and self.trainer is not None:
            for name in self.eval_names:
                with contextlib.suppress(UnreadableTestImagesError):  # raised in setup, on every rank
                    self._eval_loader(name, rank=0, world=1)

    def check_test_images(self) -> None:
        """Fail with every unreadable test image of every evaluation dataset in one message, unless
        ``allow_bad_test_images`` (then they are left out and listed in ``excluded_test_images``)."""
        found: dict[str, list] = {}
        for name in self.eval_names:
            try:
                self._eval_loader(name, rank=0, world=1)
            except UnreadableTestImagesError as err:
                found.update(err.found)
        if found:
            raise UnreadableTestImagesError(found)

    def _eval_loader(self, name: str, rank: int, world: int):
        from zscl.evaluation.zeroshot import dataset_batches

        loader, _, _ = dataset_batches(name, self.data_root, self._bundle.test_transform, batch_size=self.eval_batch_size,
                                       num_workers=self.num_workers, cache=self.eval_cache, cache_dir=self.cache_dir,
                                       rank=rank, world_size=world, allow_bad=self.allow_bad_test_images)
        self.excluded_test_images[name] = [path for path, _ in loader.dataset.excluded]
        return loader

    def val_dataloader(self) -> list:
        rank, world = self._rank()
        return [self._eval_loader(n, rank, world) for n in self.eval_names]

    def test_dataloader(self) -> list:
        return self.val_dataloader()
