"""Endless, resumable, rank- and worker-sharded batch streams.

Continual CLIP fine-tuning is measured in iterations, not epochs, and a sequence that dies
mid-task must resume to the bit. :class:`StepBatchStream` therefore makes the batch of
training step ``k`` on rank ``r`` a pure function of ``(seed, k, r)``:

* the dataset is visited as an endless concatenation of seeded permutations
  (epoch ``e`` uses ``randperm(N, seed=(seed, e))``);
* global sample position ``p = (k * world_size + r) * batch_size + i`` picks
  ``perm_{p // N}[p % N]``, so the ranks of one step together read exactly the samples a
  single process with ``batch_size * world_size`` would read;
* random augmentations draw from a generator seeded by ``(seed, p)``, so they do not depend on
  worker count, resume point or the global RNG;
* worker ``w`` of ``W`` produces steps ``start + w, start + w + W, ...``; the DataLoader's
  round-robin over workers then yields steps in order.

Resuming at step ``k`` is ``stream.start_step = k`` before the DataLoader is built.

With ``skip_unreadable`` an unreadable image (a
:class:`~zscl.datasets.badimages.UnreadableImageError` from the dataset) at position ``p`` is
replaced by the sample at the next position ``p + 1, p + 2, ...`` that is readable, drawn with
position ``p``'s augmentation seed. The substitute depends only on ``(seed, p)`` and the data, so
batches stay pure functions of ``(seed, step, rank)``; the ``(path, reason)`` of each replaced
image is appended to ``stream.unreadable``.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate, get_worker_info

if TYPE_CHECKING:  # pragma: no cover
    from zscl.datasets.badimages import BadImageLog, ReportingLoader


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python versions."""
    digest = hashlib.blake2b(",".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class StepBatchStream(IterableDataset):
    """Yields collated batches for steps ``start_step, start_step + 1, ...`` forever.

    ``dataset[i]`` is called inside ``torch.random.fork_rng`` with the torch RNG seeded per
    sample, which makes torchvision's random transforms reproducible per sample.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        seed: int = 0,
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
        collate: Callable[[list[Any]], Any] = default_collate,
        skip_unreadable: bool = False,
    ) -> None:
        super().__init__()
        n = len(dataset)  # type: ignore[arg-type]
        if n == 0:
            raise ValueError("cannot stream batches from an empty dataset")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset, self.n, self.batch_size = dataset, n, batch_size
        self.seed, self.start_step = seed, start_step
        self.rank, self.world_size = rank, world_size
        self.collate = collate
        self.skip_unreadable = skip_unreadable
        self.unreadable: list[tuple[str, str]] = []
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:  # positions only move forward; keep a small window
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def positions(self, step: int) -> range:
        first = (step * self.world_size + self.rank) * self.batch_size
        return range(first, first + self.batch_size)

    def indices(self, step: int) -> list[int]:
        return [int(self._perm(p // self.n)[p % self.n]) for p in self.positions(step)]

    def _sample(self, position: int) -> Any:
        if not self.skip_unreadable:
            return self._read(position, position)
        from zscl.datasets.badimages import UnreadableImageError

        for offset in range(self.n):
            try:
                return self._read(position, position + offset)
            except UnreadableImageError as err:
                self.unreadable.append((err.path, err.reason))
        raise ValueError(f"every one of the {self.n} images of the stream is unreadable: {self.unreadable[-1][0]}, ...")

    def _read(self, position: int, source: int) -> Any:
        """The sample at stream position ``source``, with position ``position``'s random augmentation."""
        index = int(self._perm(source // self.n)[source % self.n])
        with torch.random.fork_rng(devices=[]):
            # The generator's own method: torch.manual_seed also records Python stack traces
            # (about 1 ms per call in torch 2.14), which would dominate a small image's loading.
            torch.default_generator.manual_seed(mix_seed(self.seed, 1, position))
            return self.dataset[index]

    def batch(self, step: int) -> Any:
        return self.collate([self._sample(p) for p in self.positions(step)])

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        step = self.start_step + worker
        while True:
            yield self.batch(step)
            step += workers


def stream_loader(stream: IterableDataset, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over a stream that already yields collated batches."""
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )


class ShardedEval(IterableDataset):
    """One rank's contiguous shard of an evaluation dataset, in batches, without padding.

    Lightning pads DistributedSampler shards with duplicates, which would miscount accuracy;
    an IterableDataset is left alone, and the per-rank counts are summed afterwards.
    ``excluded`` lists the ``(path, reason)`` of unreadable images left out of ``dataset``.
    """

    def __init__(self, dataset: Dataset, batch_size: int, rank: int = 0, world_size: int = 1,
                 collate: Callable[[list[Any]], Any] = default_collate,
                 excluded: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__()
        self.excluded = list(excluded)
        n = len(dataset)  # type: ignore[arg-type]
        lo, hi = n * rank // world_size, n * (rank + 1) // world_size
        self.dataset, self.lo, self.hi, self.batch_size, self.collate = dataset, lo, hi, batch_size, collate

    def batch_ranges(self) -> Sequence[range]:
        return [range(s, min(s + self.batch_size, self.hi)) for s in range(self.lo, self.hi, self.batch_size)]

    def __len__(self) -> int:
        return len(self.batch_ranges())

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        getter = getattr(self.dataset, "get_batch", None)
        for r in self.batch_ranges()[worker::workers]:
            yield getter(r) if getter is not None else self.collate([self.dataset[i] for i in r])


def reporting_loader(stream: IterableDataset, records: list[tuple[str, str]], log: "BadImageLog", name: str,
                     num_workers: int = 0, pin_memory: bool = False) -> "ReportingLoader":
    """The loader of a batch stream whose unreadable images end up in ``log`` (see the module docstring)."""
    from zscl.datasets.badimages import ReportingLoader, ReportUnreadable

    return ReportingLoader(stream_loader(ReportUnreadable(stream, records), num_workers, pin_memory), log, name)
