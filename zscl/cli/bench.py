"""``zscl bench``: benchmarks that print one JSON object on stdout.

    zscl bench step   [--model ViT-B-16] [--batch 64] [--ref-batch 64] [--classes 100] [--ref-texts 13000] ...
    zscl bench eval   [--images 2000] [--batch 128] [--num-workers 8] ...
    zscl bench loader [--images 2000] [--batch 64] [--num-workers 8] [--decode cpu|gpu] [--step-ms 50] ...

Every subcommand's options are the fields of its settings dataclass (``zscl.bench.step.StepBench``,
``zscl.bench.eval.EvalBench``, ``zscl.bench.loader.LoaderBench``), spelled with dashes, plus
``--json FILE`` to also write the result there.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
import typing
from typing import Any, NamedTuple, Optional

from jsonargparse import ArgumentParser


class Bench(NamedTuple):
    module: str
    settings: str  # the settings dataclass
    run: str  # settings -> JSON-ready dict
    summary: str


BENCHES: dict[str, Bench] = {
    "step": Bench("zscl.bench.step", "StepBench", "run_step",
                  "time the real ContinualCLIP training step (Lightning fit on random on-device batches)"),
    "eval": Bench("zscl.bench.eval", "EvalBench", "run_eval",
                  "zero-shot evaluation images/s from JPEG files and from the uint8 cache"),
    "loader": Bench("zscl.bench.loader", "LoaderBench", "run_loader",
                    "training-loader images/s from JPEG files (CPU workers or GPU nvJPEG decoding)"),
}


def add_dataclass_flags(parser: ArgumentParser, cls: type) -> None:
    """One ``--field-name`` flag per dataclass field, with its type, default and ``metadata["help"]``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        parser.add_argument("--" + f.name.replace("_", "-"), type=hints[f.name], default=f.default,
                            help=f.metadata.get("help", ""))


def _settings_class(bench: Bench) -> type:
    return getattr(importlib.import_module(bench.module), bench.settings)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="zscl bench", description="Benchmarks; each prints one JSON object on stdout.")
    subcommands = parser.add_subcommands(required=True)
    for name, bench in BENCHES.items():
        sub = ArgumentParser(prog=f"zscl bench {name}", description=bench.summary)
        add_dataclass_flags(sub, _settings_class(bench))
        sub.add_argument("--json", type=Optional[str], default=None, help="also write the result to this JSON file")
        subcommands.add_subcommand(name, sub, help=bench.summary)
    return parser


def run(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Run benchmark ``name`` with ``options`` (settings fields); returns its result dict."""
    bench = BENCHES[name]
    settings = _settings_class(bench)(**options)
    return getattr(importlib.import_module(bench.module), bench.run)(settings)


def main(argv: list[str]) -> int:
    from zscl.cli.errors import report_errors
    from zscl.utils.io import write_json_atomic

    cfg = build_parser().parse_args(argv)
    name = cfg.subcommand
    options = cfg[name].as_dict()
    json_path = options.pop("json")
    with report_errors(f"zscl bench {name}") as status:
        result = run(name, options)
    if status.code:
        return status.code
    print(json.dumps(result, indent=1))
    if json_path:
        write_json_atomic(json_path, result)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
