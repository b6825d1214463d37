"""``zscl synthetic``: the synthetic world and its tiny CLIP.

* ``zscl synthetic generate --root DIR [--seed 0] [--quick] [--overwrite]`` writes the world's
  task ImageFolders, reference images, captions TSV and webdataset shards under ``DIR/synthetic``.
* ``zscl synthetic pretrain --out FILE [--steps N] [--seed S] [...]`` pretrains ``zscl-synth-tiny``
  from scratch and writes fp16 safetensors (the shipped weights come from the defaults).

Exit codes: 0 success, 2 bad arguments or a world that exists with other settings.
"""

from __future__ import annotations

import dataclasses
import sys
import typing

from jsonargparse import ArgumentParser

PROG = "zscl synthetic"


def _generate_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=f"{PROG} generate", description="Write the synthetic world under ROOT/synthetic.")
    parser.add_argument("--root", type=str, required=True, help="data root; the world goes to ROOT/synthetic")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives byte-identical files")
    parser.add_argument("--quick", action="store_true", help="a small world (for tests)")
    parser.add_argument("--overwrite", action="store_true", help="replace a world made with other settings")
    return parser


def _pretrain_parser() -> ArgumentParser:
    from zscl.synthetic.pretrain import PretrainConfig

    parser = ArgumentParser(prog=f"{PROG} pretrain", description="Contrastively pretrain zscl-synth-tiny.")
    parser.add_argument("--out", type=str, required=True, help="where to write the weights (.safetensors)")
    hints = typing.get_type_hints(PretrainConfig)
    for f in dataclasses.fields(PretrainConfig):  # the config dataclass is the schema
        parser.add_argument(f"--{f.name}", type=hints[f.name], default=f.default)
    return parser


def _generate(argv: list[str]) -> int:
    from zscl.synthetic.world import generate_world

    args = _generate_parser().parse_args(argv)
    try:
        info = generate_world(args.root, args.seed, quick=args.quick, overwrite=args.overwrite)
    except FileExistsError as err:
        print(f"{PROG} generate: {err}", file=sys.stderr)
        return 2
    verb = "reused" if info.reused else "generated"
    print(f"{verb} the synthetic world (seed {info.seed}{', quick' if info.quick else ''}) at {info.root}")
    for key, n in info.counts.items():
        print(f"  {key:24s} {n:6d} images")
    print(f"  captions: {info.captions}\n  shards:   {len(info.shards)} under {info.shards[0].parent}")
    return 0


def _pretrain(argv: list[str]) -> int:
    from zscl.synthetic.pretrain import PretrainConfig, pretrain

    args = _pretrain_parser().parse_args(argv)
    config = PretrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainConfig)})
    result = pretrain(config, out=args.out)
    print(f"wrote {args.out} after {config.steps} steps in {result.seconds:.0f}s (final loss {result.losses[-1]:.3f})")
    return 0


COMMANDS = {"generate": _generate, "pretrain": _pretrain}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: {PROG} {{{','.join(COMMANDS)}}} [options]   ({PROG} <command> --help)", file=sys.stderr)
        return 0 if argv and argv[0] in {"-h", "--help"} else 2
    return COMMANDS[argv[0]](argv[1:])
