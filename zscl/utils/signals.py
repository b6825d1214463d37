"""Stopping cleanly on signals: a checkpoint at the next step boundary, then exit (or a SLURM requeue).

* SIGTERM or SIGINT (``kill``, ``scancel``, Ctrl-C) during ``zscl sequence`` / ``zscl fit``: every rank
  stops at the same step boundary, the task's checkpoint is written (``tasks/NN-<Dataset>/last.ckpt``
  for ``zscl sequence``), one line says how to resume and the process exits with
  :data:`EXIT_INTERRUPTED`. A second SIGINT exits at once (the usual convention).
* SIGUSR1 inside a SLURM job (``sbatch --signal=USR1@<seconds>``, sent before the time limit or a
  preemption): the same checkpoint, then ``scontrol requeue $SLURM_JOB_ID``; the requeued job runs the
  same command, which resumes from that checkpoint and logs
  ``requeued after SIGUSR1 at task 2/5 (01-DTD) step 412; resumed from .../last.ckpt``.

One source of truth on resume: zscl's own checkpoint. Lightning's SLURM auto-requeue (which writes
``hpc_ckpt_*.ckpt`` and would load it on the next start) is switched off (:func:`cluster_plugins`),
and an ``hpc_ckpt_*.ckpt`` found in a run folder stops the run with a message
(:func:`refuse_hpc_checkpoints`) instead of being loaded by Lightning behind our back.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped on request; rerunning the same command resumes

_received: dict[str, Optional[int]] = {"signum": None, "announced": None}


def in_slurm_job() -> bool:
    return "SLURM_JOB_ID" in os.environ


def _handler(signum: int, frame: Any) -> None:
    if signum == signal.SIGINT and _received["signum"] is not None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C: exit at once
        os.kill(os.getpid(), signal.SIGINT)
        return
    if _received["signum"] is None:
        _received["signum"] = signum


def install() -> None:
    """Record SIGTERM / SIGINT (and SIGUSR1 inside a SLURM job) instead of dying; idempotent.

    Called by the CLI at start and again when training starts (Lightning installs its own SIGTERM
    handler in ``fit``, which would end the run without a checkpoint)."""
    signals = [signal.SIGTERM, signal.SIGINT] + ([signal.SIGUSR1] if in_slurm_job() else [])
    for signum in signals:
        signal.signal(signum, _handler)


def received() -> Optional[int]:
    return _received["signum"]


def _agreed(signum: Optional[int]) -> Optional[int]:
    """The signal any rank received (the largest number if they differ), the same on every rank."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return signum
    flag = torch.tensor([signum or 0], dtype=torch.long)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) or None


class Interrupted(BaseException):
    """Raised on every rank after the checkpoint is written; the CLI prints it and exits 75.

    A BaseException, so that no ``except Exception`` on the way turns it into an error report."""

    def __init__(self, message: str, rank_zero: bool = True) -> None:
        super().__init__(message)
        self.rank_zero = rank_zero


def stop_if_requested(where: str) -> None:
    """Between tasks (nothing to checkpoint: results.json holds every finished row): stop if signalled."""
    signum = _agreed(received())
    if signum is not None:
        rank_zero = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
        name = signal.Signals(signum).name
        if signum == signal.SIGUSR1 and in_slurm_job():
            raise Interrupted(f"{name} {where}; {_requeue(rank_zero)}", rank_zero)
        raise Interrupted(f"stopped by {name} {where}; rerun the same command to resume", rank_zero)


def _requeue(rank_zero: bool) -> str:
    """``scontrol requeue`` this job (rank 0 only); what to say about it."""
    job = os.environ["SLURM_JOB_ID"]
    if rank_zero:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"scontrol requeue {job} failed: {done.stderr.strip()}", flush=True)
    return f"requeued SLURM job {job}"


class StopOnSignal(Callback):
    """At each step boundary: if any rank was signalled, write ``ckpt_path`` (every rank together),
    requeue the SLURM job on SIGUSR1, and raise :class:`Interrupted`.

    ``ckpt_path`` None: the ``last.ckpt`` of the trainer's first ModelCheckpoint (``zscl fit``).
    ``resume_hint``: how to resume, for the one line printed at exit.
    Its state in a checkpoint says why the checkpoint was written; a resumed run logs it."""

    def __init__(self, label: str, ckpt_path: Optional[str] = None, resume_hint: str = "rerun the same command to resume") -> None:
        self.label, self.ckpt_path, self.resume_hint = label, ckpt_path, resume_hint
        self._why: Optional[dict[str, Any]] = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not _received.get("announced") and trainer.is_global_zero:  # once per run: who set the ranks
            env = trainer.strategy.cluster_environment if hasattr(trainer.strategy, "cluster_environment") else None
            print(f"cluster environment: {type(env).__name__ if env is not None else 'none'} "
                  f"(world size {trainer.world_size}, {trainer.num_nodes} node(s) x {trainer.num_devices} device(s))", flush=True)
            _received["announced"] = 1

    def on_train_start(self, trainer, pl_module) -> None:
        install()  # replaces the SIGTERM handler Lightning installed at the start of fit

    def state_dict(self) -> dict[str, Any]:
        return {"interrupted": self._why}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from lightning.pytorch.utilities import rank_zero_only

        why = state_dict.get("interrupted")
        if rank_zero_only.rank == 0:
            restart = os.environ.get("SLURM_RESTART_COUNT")
            cause = (f"{'requeued' if why.get('requeued') else 'stopped'} after {why['signal']} at {why['label']} step {why['step']}"
                     if why else f"{self.label}: the previous run ended without a signal (killed or crashed)")
            extra = f" (SLURM job {os.environ.get('SLURM_JOB_ID')}, restart {restart})" if restart else ""
            print(f"{cause}; resumed from {self._path_for_log()}{extra}", flush=True)

    def _path_for_log(self) -> str:
        return self.ckpt_path or "the checkpoint given by --ckpt_path"

    def _target(self, trainer) -> str:
        if self.ckpt_path:
            return self.ckpt_path
        from lightning.pytorch.callbacks import ModelCheckpoint

        for cb in trainer.callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath:
                return str(Path(cb.dirpath) / "last.ckpt")
        return str(Path(trainer.default_root_dir) / "last.ckpt")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        signum = _agreed(received())
        if signum is None:
            return
        name = signal.Signals(signum).name
        requeue = signum == signal.SIGUSR1 and in_slurm_job()
        path = self._target(trainer)
        self._why = {"signal": name, "label": self.label, "step": trainer.global_step, "requeued": requeue}
        trainer.save_checkpoint(path)  # every rank; rank 0 writes, then all wait (strategy barrier)
        trainer.strategy.barrier("zscl-signal-checkpoint")
        self._why = None
        where = f"{self.label} step {trainer.global_step}; checkpoint {path}"
        if requeue:
            raise Interrupted(f"{name} at {where}; {_requeue(trainer.is_global_zero)}", trainer.is_global_zero)
        raise Interrupted(f"stopped by {name} at {where}; {self.resume_hint}", trainer.is_global_zero)


def refuse_hpc_checkpoints(folder: str | Path) -> None:
    """Lightning loads ``hpc_ckpt_*.ckpt`` from ``default_root_dir`` on its own under SLURM; zscl resumes
    only from its own checkpoints, so such a file stops the run instead of being loaded by mistake."""
    found = sorted(Path(folder).glob("hpc_ckpt_*.ckpt"))
    if found:
        raise ValueError(f"{found[0]} is a Lightning SLURM checkpoint; zscl resumes only from its own checkpoints "
                         f"(tasks/NN-<Dataset>/last.ckpt, or --ckpt_path for zscl fit): move it out of {folder}")


def cluster_plugins() -> list:
    """Under SLURM: Lightning's SLURM environment without its auto-requeue (zscl handles SIGUSR1 itself)."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []
