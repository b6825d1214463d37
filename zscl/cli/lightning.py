"""``zscl fit | validate | test``: LightningCLI over the method's LightningModule (``model_class``, default
:class:`ContinualCLIP`) and :class:`ContinualDataModule`.

    zscl fit --config configs/method/zscl.yaml --config configs/task/dtd.yaml \\
             --model.init_from runs/aircraft/Aircraft.safetensors --data.data_root /data
    zscl fit --config method/zscl --config task/dtd --print_config

After ``fit`` the final (averaged) weights are exported as safetensors (``--model.export_path``,
default ``<default_root_dir>/<Dataset>.safetensors``) and the task's test split is evaluated.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from lightning.pytorch.cli import LightningCLI


class ZSCLCLI(LightningCLI):
    """LightningCLI with zscl's defaults: iteration-based training, atomic checkpoints, export after fit."""

    def add_arguments_to_parser(self, parser) -> None:
        from zscl.methods.classes import DEFAULT

        from zscl.runner.hooks import Continual

        parser.add_argument("--model_class", type=str, default=DEFAULT, help="LightningModule of the method (methods.classes)")
        parser.add_argument("--name", type=Optional[str], default=None, help="the method's name (declared by method configs)")
        # Method configs that chain tasks (iCaRL's memory, merge-based methods) carry a ``continual:``
        # section for `zscl sequence`. One task has no chain, so `zscl fit` accepts and ignores it:
        # iCaRL's exemplars then come from --data.reference_images.path (a memory file of a sequence run).
        parser.add_class_arguments(Continual, "continual")

    def instantiate_trainer(self, **kwargs):
        from zscl.utils.checkpoint_io import AtomicCheckpointIO

        from zscl.runner.signals import cluster_plugins

        if not (self._get(self.config_init, "trainer", default={}) or {}).get("plugins"):
            kwargs.setdefault("plugins", [AtomicCheckpointIO(), *cluster_plugins()])
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        from zscl.runner.progress import TaskProgressBar

        for cb in self.trainer.callbacks:
            if isinstance(cb, TaskProgressBar):
                cb.description = f"fit {self.datamodule.spec.name}"
        from zscl.runner.signals import refuse_hpc_checkpoints

        refuse_hpc_checkpoints(self.trainer.default_root_dir)
        if not self.model.hparams.export_path:
            root = Path(self.trainer.default_root_dir)
            self.model.hparams.export_path = str(root / f"{self.datamodule.spec.name}.safetensors")

    def after_fit(self) -> None:
        if self.trainer.is_global_zero:
            print(f"exported the final weights to {self.model.hparams.export_path}")
        self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        if self.trainer.is_global_zero:
            for name, acc in self.model.eval_results.items():
                left_out = len(self.datamodule.excluded_test_images.get(name, []))
                note = f"; {left_out} unreadable excluded" if left_out else ""
                print(f"zero-shot {name}: top-1 {acc.top1:.2f}  top-5 {acc.top5:.2f}  ({acc.n} images{note})")


def _run(subcommand: str, argv: list[str]) -> int:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from zscl.cli.errors import report_errors
    from zscl.utils.quiet import quiet_lightning
    from zscl.runner.build import bad_image_flags, trainer_defaults
    from zscl.methods import ContinualDataModule
    from zscl.methods.classes import model_class, model_class_from_args
    from zscl.runner.configs import resolve_config_args
    from zscl.runner import signals
    from zscl.runner.progress import TaskProgressBar

    from zscl.utils.testing import pause_callback

    hooks = [h for h in [pause_callback(0)] if h is not None]  # test hook: only when ZSCL_PAUSE_AT=0:K is set
    stop = signals.StopOnSignal(f"zscl {subcommand}", resume_hint="rerun the same command with --ckpt_path <checkpoint> to resume")
    defaults = {**trainer_defaults(), "max_epochs": -1, "num_sanity_val_steps": 0, "default_root_dir": "runs/fit",
                "callbacks": [ModelCheckpoint(every_n_train_steps=100, save_top_k=0, save_last=True),
                              TaskProgressBar("fit"), *hooks, stop]}
    quiet_lightning()
    signals.install()
    with report_errors(f"zscl {subcommand}") as status:
        # LightningCLI reads sys.argv, which Lightning's DDP launcher also re-executes on the other ranks.
        argv = resolve_config_args(bad_image_flags(argv))
        sys.argv = [sys.argv[0], subcommand, *argv]
        ZSCLCLI(model_class(model_class_from_args(argv)), ContinualDataModule, trainer_defaults=defaults,
                seed_everything_default=42,
                save_config_kwargs={"overwrite": True})
    return status.code


def fit(argv: list[str]) -> int:
    return _run("fit", argv)


def validate(argv: list[str]) -> int:
    return _run("validate", argv)


def test(argv: list[str]) -> int:
    return _run("test", argv)
