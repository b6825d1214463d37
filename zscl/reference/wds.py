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
worker count changes the stream. A shard that cannot be read is skipped with a warning (the
same shard in both runs); an image that cannot be decoded stops the run.
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
                 start_step: int = 0, rank: int = 0, world_size: int = 1, shuffle: int = 1000) -> None:
        super().__init__()
        if not urls:
            raise FileNotFoundError("no webdataset shards given")
        self.urls, self.transform, self.batch_size = list(urls), transform, batch_size
        self.seed, self.start_step, self.rank, self.world_size, self.shuffle = seed, start_step, rank, world_size, shuffle

    def role_samples(self, role: int, workers: int) -> Iterator[dict[str, Any]]:
        """The endless raw sample stream (undecoded) of one role."""
        from webdataset import warn_and_continue
        from webdataset.tariterators import tarfile_samples

        pick = random.Random(mix_seed(self.seed, self.rank, self.world_size, workers, role, 0))
        shards = ({"url": pick.choice(self.urls)} for _ in itertools.count())
        samples = tarfile_samples(shards, handler=warn_and_continue)
        return _buffer_shuffle(samples, self.shuffle, random.Random(mix_seed(self.seed, self.rank, workers, role, 1)))

    def image(self, sample: dict[str, Any]) -> Any:
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        if key is None:
            raise KeyError(f"webdataset sample {sample.get('__key__')} has no image field ({', '.join(IMAGE_KEYS)})")
        with Image.open(io.BytesIO(sample[key])) as img:
            img = img.convert("RGB")
        return self.transform(img) if self.transform is not None else img

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        first = self.start_step + worker  # this worker's first step
        samples = itertools.islice(self.role_samples(first % workers, workers), (first // workers) * self.batch_size, None)
        while True:
            yield torch.stack([self.image(next(samples)) for _ in range(self.batch_size)])


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
