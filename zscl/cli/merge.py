"""``zscl merge`` (merge CLIP checkpoints) and ``zscl fisher`` (estimate a diagonal Fisher).

    zscl merge --method ties --base pre.safetensors --models a.safetensors b.pt --out m.safetensors --density 0.2
    zscl fisher --model ViT-B-16 --pretrained ft.safetensors --dataset DTD --data-root /data --n 256 --out F.safetensors

Inputs are read lazily, one tensor at a time, when they are plain safetensors files; other
formats (.pt state dicts, open_clip / ZSCL / Lightning checkpoints) go through
``zscl.models.read_state_dict``. Outputs are safetensors whose metadata records the method,
its hyper-parameters and the inputs.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from typing import Any, Optional

from jsonargparse import ArgumentParser

# flag (argparse dest) -> hyper-parameter name of the merge rules
HPARAM_FLAGS = {
    "scale": "scale",
    "density": "density",
    "drop_rate": "drop_rate",
    "alpha": "alpha",
    "seed": "seed",
    "trim_scope": "trim_scope",
    "fisher": "fishers",
    "metrics": "metrics",
    "metric_kind": "metric_kind",
    "penalty": "penalty",
}


def build_merge_parser() -> ArgumentParser:
    from zscl.merging import MERGE_RULES

    methods = "; ".join(f"{n}: {r.description}" for n, r in MERGE_RULES.items())
    p = ArgumentParser(prog="zscl merge", description="Merge CLIP checkpoints into one safetensors file.")
    p.add_argument("--method", type=str, required=True, help=f"merge rule. {methods}")
    p.add_argument("--models", type=str, nargs="+", required=True, help="checkpoints to merge (in task order)")
    p.add_argument("--out", type=str, required=True, help="output .safetensors file")
    p.add_argument("--base", type=Optional[str], default=None, help="base θ0 (pretrained) for task-vector rules")
    p.add_argument("--weights", type=float, nargs="+", help="one weight per model")
    p.add_argument("--scale", type=float, help="λ, the task-vector scale (task_arithmetic/ties/dare_*/magmax)")
    p.add_argument("--density", type=float, help="fraction of each task vector TIES keeps (default 0.2)")
    p.add_argument("--trim-scope", type=str, choices=["tensor", "global"], help="TIES trimming per tensor or global")
    p.add_argument("--drop-rate", type=float, help="DARE drop probability p (default 0.9)")
    p.add_argument("--alpha", type=float, help="WiSE-FT α: (1−α)θ0 + αθft")
    p.add_argument("--seed", type=int, help="DARE seed")
    p.add_argument("--fisher", type=str, nargs="+", help="one diagonal-Fisher file per model (zscl fisher)")
    p.add_argument("--metrics", type=float, nargs="+", help="one metric per model for mwa (loss or step)")
    p.add_argument("--metric-kind", type=str, choices=["loss", "step"], help="mwa: what --metrics hold (default loss)")
    p.add_argument("--penalty", type=float, help="mwa penalty factor p ≥ 0 (default 1)")
    return p


def _rule_arguments(args: Any) -> tuple[str, dict[str, Any]]:
    """The canonical method name and its hparams from the flags; MergeError if they do not fit."""
    from zscl.merging import MERGE_RULES, MergeError
    from zscl.merging.base import check_call

    name = MERGE_RULES.canonical(args.method)
    rule = MERGE_RULES.get(name)
    given = {flag: getattr(args, flag) for flag in HPARAM_FLAGS if getattr(args, flag) is not None}
    unused = [flag for flag in given if HPARAM_FLAGS[flag] not in rule.hparams]
    if unused:
        flags = ", ".join("--" + f.replace("_", "-") for f in unused)
        usable = [f"--{f.replace('_', '-')}" for f, h in HPARAM_FLAGS.items() if h in rule.hparams]
        raise MergeError(f"{flags} not used by method {name!r} (it takes: {', '.join(usable) or 'no options'})")
    cli_only = [h for h in rule.required if h not in HPARAM_FLAGS.values()]
    if cli_only:
        raise MergeError(f"method {name!r} needs {', '.join(cli_only)}, which the command line cannot give; "
                         "call zscl.merging.merge from Python")
    if rule.needs_base != (args.base is not None):
        need = "needs --base (the pretrained θ0)" if rule.needs_base else "does not use --base"
        raise MergeError(f"method {name!r} {need}")
    hparams = {HPARAM_FLAGS[f]: v for f, v in given.items()}
    check_call(name, rule, has_base=args.base is not None, n_models=len(args.models), weights=args.weights,
               hparams=hparams)
    return name, hparams


def peak_memory() -> str:
    """Peak resident memory of this process (and peak CUDA allocation, when CUDA is in use)."""
    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mib = rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux
    text = f"peak RSS {rss_mib:.0f} MiB"
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        text += f", peak CUDA {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
    return text


def main(argv: list[str] | None = None) -> int:
    from zscl.merging import MergeError, merge, open_state_dict
    from zscl.models import save_state_dict
    from zscl.registry import RegistryError

    parser = build_merge_parser()
    args = parser.parse_args(argv)
    try:
        name, hparams = _rule_arguments(args)
    except (MergeError, RegistryError) as err:
        parser.error(str(err))  # exits with status 2
    start = time.perf_counter()
    try:
        base = open_state_dict(args.base) if args.base else None
        models = [open_state_dict(m) for m in args.models]
        if "fishers" in hparams:
            hparams["fishers"] = [open_state_dict(f) for f in hparams["fishers"]]
        merged = merge(name, base, models, args.weights, **hparams)
    except (MergeError, FileNotFoundError, ValueError) as err:
        print(f"zscl merge: error: {err}", file=sys.stderr)
        return 2
    shown = {k: ([str(getattr(v, "name", v)) for v in hparams[k]] if k == "fishers" else v) for k, v in hparams.items()}
    metadata = {
        "zscl.merge.method": name,
        "zscl.merge.hparams": json.dumps(shown),
        "zscl.merge.base": args.base or "",
        "zscl.merge.models": json.dumps(args.models),
        "zscl.merge.weights": json.dumps(args.weights),
    }
    save_state_dict(merged, args.out, metadata=metadata)
    n_values = sum(t.numel() for t in merged.values())
    options = ", ".join(f"{k}={v}" for k, v in shown.items())
    print(f"merged {len(models)} models with {name}" + (f" ({options})" if options else "")
          + f" -> {args.out}: {len(merged)} tensors, {n_values:,} values, "
          f"{time.perf_counter() - start:.1f} s, {peak_memory()}")
    return 0


def build_fisher_parser() -> ArgumentParser:
    p = ArgumentParser(prog="zscl fisher", description="Estimate the diagonal Fisher of a CLIP's zero-shot "
                       "classifier on a dataset's train split (for zscl merge --method fisher).")
    p.add_argument("--model", type=str, required=True, help="open_clip architecture, e.g. ViT-B-16")
    p.add_argument("--pretrained", type=str, required=True, help="weights: an open_clip tag or a checkpoint file")
    p.add_argument("--dataset", type=str, required=True, help="registered dataset name")
    p.add_argument("--data-root", type=str, required=True, help="folder holding the dataset")
    p.add_argument("--n", type=int, default=256, help="number of training examples")
    p.add_argument("--out", type=str, required=True, help="output .safetensors file")
    p.add_argument("--mode", type=str, default="sampled", choices=["sampled", "empirical"],
                   help="sampled: y drawn from the model (true Fisher); empirical: gold labels")
    p.add_argument("--batch-size", type=int, default=32, help="loader batch size (gradients are per example)")
    p.add_argument("--device", type=str, default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seeds the example order and the sampled labels")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--custom-datasets", type=Optional[str], default=None,
                   help="YAML/JSON list of user datasets to register first (as for zscl eval)")
    return p


def fisher_main(argv: list[str] | None = None) -> int:
    import torch
    from torch.utils.data import DataLoader

    from zscl import datasets
    from zscl.merging import estimate_fisher, zero_shot_logits_fn
    from zscl.models import load_clip, save_state_dict

    args = build_fisher_parser().parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    start = time.perf_counter()
    try:
        if args.custom_datasets:
            datasets.load_custom_datasets(args.custom_datasets, data_root=args.data_root)
        spec = datasets.get_dataset(args.dataset)
        bundle = load_clip(args.model, args.pretrained, device=device)
        data = datasets.build_dataset(spec.name, args.data_root, "train", bundle.test_transform)
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f"zscl fisher: error: {err}", file=sys.stderr)
        return 2
    tokens = bundle.tokenizer([spec.train_template.replace("{c}", c) for c in spec.classnames])
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers,
                        generator=torch.Generator().manual_seed(args.seed))
    fisher = estimate_fisher(bundle.model, loader, args.n, args.mode, zero_shot_logits_fn(tokens), seed=args.seed)
    metadata = {"zscl.fisher.model": bundle.name, "zscl.fisher.pretrained": args.pretrained,
                "zscl.fisher.dataset": spec.name, "zscl.fisher.mode": args.mode,
                "zscl.fisher.n": str(min(args.n, len(data)))}
    save_state_dict(fisher, args.out, metadata=metadata)
    mean = sum(float(f.sum()) for f in fisher.values()) / max(1, sum(f.numel() for f in fisher.values()))
    print(f"{args.mode} Fisher of {bundle.name} on {spec.name} ({metadata['zscl.fisher.n']} examples) -> "
          f"{args.out}: {len(fisher)} tensors, mean {mean:.3e}, {time.perf_counter() - start:.1f} s, {peak_memory()}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
