"""A test-only Lightning callback that records the student's weights, for checks made outside the run.

``zscl sequence ... --trainer.callbacks '[{"class_path": "tests.snapshots.SaveWeights",
"init_args": {"folder": DIR}}]'`` writes ``DIR/<Dataset>-rank<r>.pt`` per task and rank:

* ``start``: the parameters when training starts (the task-start weights);
* ``steps[k]``: the parameters after global step k (after the optimizer step of iteration k-1);
* ``grads0``: the gradients the optimizer applies at iteration 0 (after DDP's all-reduce);
* ``final``: the parameters when fit ends, after every callback's ``on_train_end`` (averaging).
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback


def _params(pl_module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True) for n, p in pl_module.clip.named_parameters()}


class SaveWeights(Callback):
    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.record: dict = {"steps": {}}

    def on_train_start(self, trainer, pl_module) -> None:
        self.record = {"start": _params(pl_module), "steps": {}}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == 0:
            self.record["grads0"] = {n: p.grad.detach().to("cpu", copy=True)
                                     for n, p in pl_module.clip.named_parameters() if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.record["steps"][trainer.global_step] = _params(pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.record["final"] = _params(pl_module)
        self.folder.mkdir(parents=True, exist_ok=True)
        name = trainer.datamodule.spec.name
        torch.save(self.record, self.folder / f"{name}-rank{trainer.global_rank}.pt")


def load(folder: Path, dataset: str, rank: int = 0) -> dict:
    return torch.load(folder / f"{dataset}-rank{rank}.pt", weights_only=True)
