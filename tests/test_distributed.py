"""ZSCL's distillation under DDP: gathered reference features give the single-process gradient exactly."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from zscl.methods.distributed import gather_features
from zscl.methods.losses import distillation_logits, kd_loss

B, D, N_TXT = 6, 8, 5


def problem():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(D, D, generator=g)
    ref = torch.randn(B, D, generator=g)
    teacher = F.normalize(torch.randn(B, D, generator=g), dim=-1)
    texts = F.normalize(torch.randn(N_TXT, D, generator=g), dim=-1)
    return weight, ref, teacher, texts


def loss_fn(weight, ref, teacher, texts):
    student = F.normalize(ref @ weight, dim=-1)
    s, t = distillation_logits(student, teacher, texts, torch.tensor(10.0))
    return kd_loss(t, s) + kd_loss(t.t(), s.t())


def _worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    weight, ref, teacher, texts = problem()
    weight = weight.clone().requires_grad_(True)
    shard = slice(rank * B // world, (rank + 1) * B // world)
    student = F.normalize(ref[shard] @ weight, dim=-1)
    s_all = gather_features(student, with_grad=True)
    t_all = gather_features(teacher[shard].contiguous(), with_grad=False)
    s, t = distillation_logits(s_all, t_all, texts, torch.tensor(10.0))
    (kd_loss(t, s) + kd_loss(t.t(), s.t())).backward()
    grad = weight.grad.clone()
    dist.all_reduce(grad)  # what DDP does: the mean over ranks
    queue.put((rank, (grad / world).numpy()))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_gathered_distillation_gradient_equals_single_process():
    weight, ref, teacher, texts = problem()
    weight = weight.clone().requires_grad_(True)
    loss_fn(weight, ref, teacher, texts).backward()
    expected = weight.grad
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_worker, args=(2, free_port(), queue), nprocs=2, start_method="spawn")
    grads = dict(queue.get() for _ in range(2))
    for rank in (0, 1):
        torch.testing.assert_close(torch.from_numpy(grads[rank]), expected, rtol=1e-5, atol=1e-6)


def test_gather_is_the_identity_on_one_process():
    x = torch.randn(3, 4)
    assert gather_features(x, with_grad=True) is x


@pytest.mark.slow
def test_two_process_sequence_log_has_no_sync_dist_or_srun_hints(tmp_path):
    """Lightning's launcher, 2 ranks: the evaluation logs already-reduced values (no `sync_dist=True` hint per
    dataset and evaluation), and outside a SLURM job its "`srun` is available but not used" hint is not printed
    (it can only appear where SLURM is installed: the cluster lane's machines)."""
    from tests.test_sequence import run_zscl
    from tests.tiny_world import benchmark_yaml, make_tiny_world

    make_tiny_world(tmp_path)
    benchmark_yaml(tmp_path, steps=2)
    proc = run_zscl("sequence", "--config", str(tmp_path / "tiny" / "benchmark.yaml"), "--config", "method/finetune",
                    "--out", str(tmp_path / "run"), "--progress", "none", "--trainer.devices", "2",
                    "--trainer.strategy", "ddp", "--data.batch_size", "2")
    log = proc.stdout + proc.stderr
    assert "after TinyStripes" in log and "world size 2" in log, log[-3000:]
    assert "sync_dist" not in log and "`srun` command is available" not in log, log[-3000:]
