"""``zscl sequence``: a whole continual benchmark with one method; resumable; writes results.json.

    zscl sequence --config configs/benchmark/mtil_order1.yaml --config configs/method/zscl.yaml --out DIR

Configs deep-merge left to right; any key can be overridden after them (``--model.lr``,
``--data.data_root``, ``--trainer.devices 2 --trainer.strategy ddp``, ``--steps 100``).
``--check-data`` runs ``zscl check-data`` on the run's data before the first task;
``--allow-bad-test-images`` (``--data.allow_bad_test_images true``) excludes and counts
unreadable test images instead of stopping.
"""

from __future__ import annotations

import sys
from typing import Optional

from jsonargparse import ActionConfigFile


def trainer_defaults() -> dict:
    """One device, bf16 autocast on GPUs that have it, fp32 on CPU; iteration-based training."""
    import torch

    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return {"accelerator": "auto", "devices": 1, "precision": "bf16-mixed" if bf16 else "32-true",
            "max_steps": 1000, "log_every_n_steps": 10}


def build_parser(argv: Optional[list[str]] = None):
    """The parser; its ``model:`` schema is that of the ``model_class`` chosen in ``argv`` (default ContinualCLIP)."""
    import lightning as L
    from lightning.pytorch.cli import LightningArgumentParser

    from zscl.methods import ContinualDataModule
    from zscl.methods.classes import DEFAULT, model_class, model_class_from_args
    from zscl.runner.configs import Benchmark
    from zscl.runner.sequence import Continual, RunOptions

    p = LightningArgumentParser(prog="zscl sequence", description=__doc__.strip().splitlines()[0])
    p.add_argument("-c", "--config", action=ActionConfigFile, help="YAML config (repeatable; names like method/zscl work)")
    p.add_argument("--seed_everything", type=int, default=42, help="seed of model initialisation and data streams")
    p.add_class_arguments(RunOptions, None)
    p.add_class_arguments(Benchmark, "benchmark")
    p.add_class_arguments(Continual, "continual")
    name = model_class_from_args(argv or [])
    p.add_argument("--model_class", type=str, default=DEFAULT, help="LightningModule of the method (methods.classes)")
    p.add_lightning_class_args(model_class(name), "model")
    p.add_lightning_class_args(ContinualDataModule, "data")
    p.add_lightning_class_args(L.Trainer, "trainer")
    p.set_defaults({f"trainer.{k}": v for k, v in trainer_defaults().items()})
    return p


def bad_image_flags(argv: list[str]) -> list[str]:
    """``--allow-bad-test-images`` -> ``--data.allow_bad_test_images=true``; ``--check-data`` removed."""
    flag = {"--allow-bad-test-images": ["--data.allow_bad_test_images=true"], "--check-data": []}
    return [out for arg in argv for out in flag.get(arg, [arg])]


def check_before_run(cfg, argv: list[str]) -> None:
    """``zscl check-data`` on the run's data, in every process that was not started by Lightning's DDP
    launcher (those start after the check passed in their parent; under torchrun or SLURM every rank
    checks, so that all of them stop together)."""
    import os

    from zscl.cli.check_data import needs_reference, print_report, run_check

    if os.environ.get("LOCAL_RANK", "0") != "0" and "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    configs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config", "-c") and os.path.isfile(argv[i + 1])]
    reports = run_check(cfg, reference=needs_reference(cfg, configs), workers=max(1, cfg.data.num_workers),
                        progress=cfg.progress != "none")
    if not print_report(reports):
        raise ValueError("--check-data found problems in the data (listed above); nothing was run")


def main(argv: list[str]) -> int:
    from zscl.cli.errors import report_errors
    from zscl.runner.configs import resolve_config_args, with_method_overrides

    from zscl.cli.quiet import quiet_lightning

    from zscl.runner import signals

    quiet_lightning()
    signals.install()  # SIGTERM/SIGINT: checkpoint at the next step, exit 75 (zscl.runner.signals)
    with report_errors("zscl sequence") as status:
        check = "--check-data" in argv
        argv = with_method_overrides(resolve_config_args(bad_image_flags(argv)))
        parser = build_parser(argv)
        cfg = parser.parse_args(argv)
        if check:
            check_before_run(cfg, argv)
        from zscl.runner.cil import make_runner

        make_runner(parser, cfg).run()
    return status.code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
