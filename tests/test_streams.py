"""Resumable, sharded batch streams: the batch of step k is a pure function of (seed, k, rank)."""

import itertools

import pytest
import torch
from torch.utils.data import Dataset

from zscl.datasets.streams import ShardedEval, StepBatchStream, mix_seed, stream_loader


class Noisy(Dataset):
    """Item i is (i, a random draw) so that per-sample seeding of "augmentations" is visible."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.tensor(i), torch.rand(())


def take(stream, k):
    return list(itertools.islice(iter(stream), k))


def test_batches_cover_each_epoch_once_and_reshuffle():
    s = StepBatchStream(Noisy(12), 4, seed=3)
    batches = take(s, 6)  # two epochs of 12
    first = torch.cat([b[0] for b in batches[:3]]).sort().values
    second = torch.cat([b[0] for b in batches[3:]])
    assert first.tolist() == list(range(12))
    assert sorted(second.tolist()) == list(range(12))
    assert second.tolist() != torch.cat([b[0] for b in batches[:3]]).tolist()


def test_resume_at_step_k_gives_the_same_batches_and_augmentations():
    full = take(StepBatchStream(Noisy(10), 3, seed=1), 9)
    resumed = take(StepBatchStream(Noisy(10), 3, seed=1, start_step=5), 4)
    for a, b in zip(full[5:], resumed):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_ranks_split_the_single_process_batch():
    single = take(StepBatchStream(Noisy(16), 4, seed=2), 3)
    ranks = [take(StepBatchStream(Noisy(16), 2, seed=2, rank=r, world_size=2), 3) for r in range(2)]
    for k in range(3):
        merged = torch.cat([ranks[0][k][0], ranks[1][k][0]])
        assert torch.equal(merged, single[k][0])
        assert torch.equal(torch.cat([ranks[0][k][1], ranks[1][k][1]]), single[k][1])


def test_stream_does_not_disturb_the_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    take(StepBatchStream(Noisy(5), 2, seed=0), 2)
    assert torch.equal(torch.rand(3), expected)


def test_worker_count_does_not_change_the_stream():
    ref = take(StepBatchStream(Noisy(20), 3, seed=4), 7)
    loader = stream_loader(StepBatchStream(Noisy(20), 3, seed=4), num_workers=2)
    got = take(loader, 7)
    for a, b in zip(ref, got):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharded_eval_reads_every_item_exactly_once(world):
    data = Noisy(11)
    seen = []
    for r in range(world):
        for ids, _ in ShardedEval(data, 4, r, world):
            seen += ids.tolist()
    assert sorted(seen) == list(range(11))


def test_mix_seed_is_stable_and_distinct():
    assert mix_seed(1, 2) == mix_seed(1, 2)
    assert len({mix_seed(1, k) for k in range(100)}) == 100


def test_empty_dataset_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        StepBatchStream(Noisy(0), 2)
