"""Reference images from webdataset shards as an endless batch stream that resumes exactly.

webdataset's resampled shard list seeds itself from the clock and the process id, so two runs (or
a run and its resumption) draw different images. This stream is a pure function of
``(seed, rank, worker count)`` instead, and resuming at step ``k`` continues it where the
uninterrupted run would be:

* a *role* is one deterministic sample stream: shards drawn with replacement by
  ``Random(seed, rank, role)``, their samples in tar order through a seeded shuffle buffer;
* with ``W`` loader workers, role ``ρ`` makes the batches of steps ``ρ, ρ + W, ρ + 2W, ...``
  (the DataLoader takes batches from its workers in turn), ``batch_size`` samples each;
* resuming at step ``k``, worker ``w`` plays role ``(k + w) mod W`` and skips the
  ``(k + w) div W`` batches that role had made; the skipped samples are read from the tar
  files but not decoded.

Guarantee: with the same shards, seed, batch size, number of ranks and number of workers, the
reference batch of every step is the same whether or not the run was interrupted. Changing the
worker count changes the stream.

Bad data: a sample whose image cannot be decoded is skipped (the batch takes the next sample of
the same role's stream) and a shard that cannot be read is skipped; both are recorded in
``records`` as ``(where, reason)`` and reported by the data module. Because a batch is made of
``batch_size`` *readable* samples, the skip on resume counts readable samples too (it decodes
the skipped region once, without the transform), so resume stays exact on corrupt shards.
``skip_unreadable=False`` raises instead.
"""

from __future__ import annotations

import io
import itertools
import random
from typing import Any, Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from zscl.datasets.streams import mix_seed

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")


class WdsBatchStream(IterableDataset):
    """Batches of ``batch_size`` transformed reference images for steps ``start_step, start_step + 1, ...``."""

    def __init__(self, urls: list[str], transform: Callable | None, batch_size: int, *, seed: int = 0,
                 start_step: int = 0, rank: int = 0, world_size: int = 1, shuffle: int = 1000,
                 records: list | None = None, skip_unreadable: bool = True) -> None:
        super().__init__()
        if not urls:
            raise FileNotFoundError("no webdataset shards given")
        self.urls, self.transform, self.batch_size = list(urls), transform, batch_size
        self.seed, self.start_step, self.rank, self.world_size, self.shuffle = seed, start_step, rank, world_size, shuffle
        self.records = [] if records is None else records
        self.skip_unreadable = skip_unreadable

    def role_samples(self, role: int, workers: int) -> Iterator[dict[str, Any]]:
        """The endless raw sample stream (undecoded) of one role."""
        from webdataset.tariterators import tarfile_samples

        pick = random.Random(mix_seed(self.seed, self.rank, self.world_size, workers, role, 0))
        shards = ({"url": pick.choice(self.urls)} for _ in itertools.count())
        samples = tarfile_samples(shards, handler=_ShardHandler(self.records, self.skip_unreadable))
        return _buffer_shuffle(samples, self.shuffle, random.Random(mix_seed(self.seed, self.rank, workers, role, 1)))

    def image(self, sample: dict[str, Any]) -> Any:
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        if key is None:
            raise KeyError(f"webdataset sample {sample.get('__key__')} has no image field ({', '.join(IMAGE_KEYS)})")
        with Image.open(io.BytesIO(sample[key])) as img:
            img = img.convert("RGB")
        return self.transform(img) if self.transform is not None else img

    def _readable(self, samples: Iterator[dict[str, Any]], transform: bool) -> Iterator[Any]:
        """Decoded images of ``samples``, the undecodable ones skipped and recorded (or raised)."""
        from zscl.datasets.badimages import UNREADABLE, UnreadableImageError

        for sample in samples:
            try:
                yield self.image(sample) if transform else self.image_unchanged(sample)
            except UNREADABLE as err:
                bad = UnreadableImageError.of(f"{sample.get('__url__')}#{sample.get('__key__')}", err)
                if not self.skip_unreadable:
                    raise bad from err
                self.records.append((bad.path, bad.reason))

    def image_unchanged(self, sample: dict[str, Any]) -> None:
        """Decode only (the resume skip): proves the sample readable without transforming it."""
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        if key is None:
            raise KeyError(f"webdataset sample {sample.get('__key__')} has no image field ({', '.join(IMAGE_KEYS)})")
        with Image.open(io.BytesIO(sample[key])) as img:
            img.convert("RGB")

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        first = self.start_step + worker  # this worker's first step
        raw = self.role_samples(first % workers, workers)
        skip = (first // workers) * self.batch_size
        if skip:  # count readable samples, as the uninterrupted run's batches did
            for _ in itertools.islice(self._readable(raw, transform=False), skip):
                pass
            self.records.clear()  # met (and reported) before the interruption
        images = self._readable(raw, transform=True)
        while True:
            yield torch.stack([next(images) for _ in range(self.batch_size)])


class _ShardHandler:
    """webdataset's error handler: a shard that cannot be opened or read is skipped and named."""

    def __init__(self, records: list, skip: bool = True) -> None:
        self.records, self.skip = records, skip

    def __call__(self, exn: BaseException) -> bool:
        url = next((a for a in reversed(exn.args) if isinstance(a, str)), "?") if exn.args else "?"
        reason = str(exn.args[0]).split(" @ ")[0] if exn.args else type(exn).__name__
        # Records are drained with every batch: this many without a batch means no shard can be read.
        if not self.skip or len(self.records) > 1000:
            raise FileNotFoundError(f"unreadable webdataset shard {url} ({reason})") from exn
        self.records.append((f"shard {url}", reason))
        return True


def _buffer_shuffle(samples: Iterator[dict[str, Any]], size: int, rng: random.Random) -> Iterator[dict[str, Any]]:
    """webdataset's shuffle: fill a buffer of ``size`` samples, then emit a random one per new sample."""
    buffer: list[dict[str, Any]] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        k = rng.randrange(len(buffer))
        buffer[k], sample = sample, buffer[k]
        yield sample
    yield from buffer  # only reached if the sample stream ends (it does not: shards are resampled)
