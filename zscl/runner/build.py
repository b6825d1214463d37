"""One parse pipeline: argv -> resolved config -> runner (or method). Every entry point builds a run here.

``zscl sequence``, ``zscl check-data``, ``zscl demo``, the merging study, ``zscl bench`` and the
tests all go through :func:`parse_run` / :func:`build_runner`, so a run means the same thing
wherever it starts:

1. :func:`prepare_argv`: ``--allow-bad-test-images`` becomes its config key, every ``--config``
   value becomes an existing file (names like ``method/zscl`` resolve in the packaged configs), and
   the benchmark's ``method_overrides`` for the run's method are inserted after the method's config
   (:func:`~zscl.runner.configs.with_method_overrides`);
2. :func:`build_parser`: the schema, whose ``model:`` section is that of the ``model_class`` the
   configs choose (any :class:`~zscl.methods.base.CLIPMethod`, also from the user's own package);
3. :func:`parse_run` parses; :func:`build_runner` makes the :class:`~zscl.runner.sequence.SequenceRunner`.
"""

from __future__ import annotations

from typing import Any, Optional

from jsonargparse import ActionConfigFile


def trainer_defaults() -> dict[str, Any]:
    """One device, bf16 autocast on GPUs that have it, fp32 on CPU; iteration-based training."""
    import torch

    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return {"accelerator": "auto", "devices": 1, "precision": "bf16-mixed" if bf16 else "32-true",
            "max_steps": 1000, "log_every_n_steps": 10}


def build_parser(argv: Optional[list[str]] = None, prog: str = "zscl sequence", description: str = ""):
    """The sequence parser; its ``model:`` schema is that of the ``model_class`` chosen in ``argv`` (default ContinualCLIP)."""
    import lightning as L
    from lightning.pytorch.cli import LightningArgumentParser

    from zscl.methods.datamodule import ContinualDataModule
    from zscl.methods.classes import DEFAULT, model_class, model_class_from_args
    from zscl.runner.configs import Benchmark
    from zscl.runner.hooks import Continual
    from zscl.runner.sequence import RunOptions

    p = LightningArgumentParser(prog=prog, description=description or "A continual benchmark with one method.")
    p.add_argument("-c", "--config", action=ActionConfigFile, help="YAML config (repeatable; names like method/zscl work)")
    p.add_argument("--seed_everything", type=int, default=42, help="seed of model initialisation and data streams")
    p.add_argument("--name", type=Optional[str], default=None,
                   help="the method's name (declared by method configs; keys benchmark.method_overrides and labels runs)")
    p.add_class_arguments(RunOptions, None)
    p.add_class_arguments(Benchmark, "benchmark")
    p.add_class_arguments(Continual, "continual")
    p.add_argument("--model_class", type=str, default=DEFAULT, help="LightningModule of the method (methods.classes)")
    p.add_lightning_class_args(model_class(model_class_from_args(argv or [])), "model")
    p.add_lightning_class_args(ContinualDataModule, "data")
    p.add_lightning_class_args(L.Trainer, "trainer")
    p.set_defaults({f"trainer.{k}": v for k, v in trainer_defaults().items()})
    return p


def bad_image_flags(argv: list[str]) -> list[str]:
    """``--allow-bad-test-images`` -> ``--data.allow_bad_test_images=true``; ``--check-data`` removed."""
    flag = {"--allow-bad-test-images": ["--data.allow_bad_test_images=true"], "--check-data": []}
    return [out for arg in argv for out in flag.get(arg, [arg])]


def prepare_argv(argv: list[str]) -> list[str]:
    """Step 1 of the pipeline (module docstring)."""
    from zscl.runner.configs import resolve_config_args, with_method_overrides

    return with_method_overrides(resolve_config_args(bad_image_flags(list(argv))))


def parse_run(argv: list[str], prog: str = "zscl sequence"):
    """``(parser, cfg)`` of a sequence run from its command-line arguments."""
    argv = prepare_argv(argv)
    parser = build_parser(argv, prog=prog)
    return parser, parser.parse_args(argv)


def build_runner(argv: list[str]):
    """The :class:`~zscl.runner.sequence.SequenceRunner` of a sequence run's command-line arguments."""
    from zscl.runner.sequence import SequenceRunner

    parser, cfg = parse_run(argv)
    return SequenceRunner(parser, cfg)


def method_config(name_or_path: str) -> dict[str, Any]:
    """A method config as plain data: a registered name (``zscl``), ``method/zscl`` or a YAML path."""
    import yaml

    from zscl.runner.configs import resolve_config_path

    value = name_or_path if ("/" in name_or_path or name_or_path.endswith((".yaml", ".yml"))) else f"method/{name_or_path}"
    with open(resolve_config_path(value), encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def create_method(name_or_path: str, **overrides: Any):
    """The LightningModule of a method config with ``model:`` overrides (e.g. ``clip=..., pretrained=None``).

    Uses the config's ``model_class`` (any :class:`~zscl.methods.base.CLIPMethod`) and its typed
    signature: nested sections (``distill``, ``speed``...) are built as their dataclasses.
    """
    from jsonargparse import ArgumentParser

    from zscl.methods.classes import DEFAULT, model_class

    data = method_config(name_or_path)
    cls = model_class(data.get("model_class") or DEFAULT)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "model")
    cfg = parser.parse_object({"model": {**(data.get("model") or {}), **overrides}})
    return parser.instantiate_classes(cfg).model


__all__ = ["bad_image_flags", "build_parser", "build_runner", "create_method", "method_config", "parse_run",
           "prepare_argv", "trainer_defaults"]
