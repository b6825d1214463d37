"""The ``zscl`` command: a thin dispatcher over subcommand modules.

``fit``, ``validate`` and ``test`` are Lightning's (LightningCLI); the others are zscl's own.
Each subcommand lives in ``zscl.cli.<module>`` and exposes ``main(argv) -> int | None``; it is
imported only when called, so ``zscl --help`` stays fast.
"""

from __future__ import annotations

import importlib
import sys
from typing import NamedTuple


class Subcommand(NamedTuple):
    target: str  # "module:function"
    summary: str


SUBCOMMANDS: dict[str, Subcommand] = {
    "fit": Subcommand("zscl.cli.lightning:fit", "train one task (LightningCLI; --config method + task YAML)"),
    "validate": Subcommand("zscl.cli.lightning:validate", "zero-shot accuracy on a task's test split (LightningCLI)"),
    "test": Subcommand("zscl.cli.lightning:test", "same as validate, under Lightning's test loop (LightningCLI)"),
    "sequence": Subcommand("zscl.cli.sequence:main", "run a whole continual benchmark; resumable; writes results.json"),
    "check-data": Subcommand("zscl.cli.check_data:main", "decode every image a run would read; report unreadable files"),
    "eval": Subcommand("zscl.cli.eval:main", "zero-shot top-1/top-5 of a CLIP on registered datasets"),
    "metrics": Subcommand("zscl.cli.metrics:main", "Transfer / Avg / Last / BWT / forgetting of an accuracy matrix"),
    "compare": Subcommand("zscl.cli.compare:main", "runs side by side (Transfer / Avg / Last), beside the paper's numbers"),
    "demo": Subcommand("zscl.cli.demo:main", "the synthetic benchmark end to end: finetune vs ZSCL (+ablations)"),
    "merge": Subcommand("zscl.cli.merge:main", "merge CLIP checkpoints (soups, TIES, DARE, Fisher, MagMax, ...)"),
    "fisher": Subcommand("zscl.cli.merge:fisher_main", "estimate a diagonal Fisher for Fisher merging"),
    "bench": Subcommand("zscl.cli.bench:main", "benchmarks: training step, evaluation, data loader"),
    "synthetic": Subcommand("zscl.cli.synthetic:main", "generate the synthetic world or re-pretrain its tiny CLIP"),
}


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = [
        "usage: zscl <command> [options]   (zscl <command> --help for its options)",
        "",
        "Continual learning of CLIP without losing zero-shot transfer (ZSCL, 2023).",
        "",
        "commands:",
    ]
    lines += [f"  {name.ljust(width)}  {sub.summary}" for name, sub in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        sys.exit(0 if argv else 2)
    if argv[0] in {"-V", "--version"}:
        from zscl import __version__

        print(f"zscl {__version__}")
        return
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"zscl: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        sys.exit(2)
    module_name, func_name = SUBCOMMANDS[name].target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    code = func(rest)
    sys.exit(code or 0)
