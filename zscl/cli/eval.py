"""``zscl eval``: zero-shot top-1/top-5 of one CLIP on registered datasets.

    zscl eval --model ViT-B-16 --pretrained openai --datasets DTD,MNIST --data-root /data [--json out.json]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal, Optional

from jsonargparse import ActionConfigFile, ArgumentParser

MTIL_ORDER1 = "Aircraft,Caltech101,CIFAR100,DTD,EuroSAT,Flowers,Food,MNIST,OxfordPet,StanfordCars,SUN397"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="zscl eval", description="Zero-shot accuracy of a CLIP on registered datasets.")
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("--model", type=str, required=True, help="open_clip architecture (e.g. ViT-B-16) or an OpenAI JIT .pt file")
    p.add_argument("--pretrained", type=Optional[str], default=None,
                   help="open_clip tag, local checkpoint file (state dict / open_clip / ZSCL / Lightning / safetensors / JIT)")
    p.add_argument("--datasets", type=str, default=MTIL_ORDER1, help="comma-separated dataset names ('mtil' = the 11 MTIL datasets)")
    p.add_argument("--data-root", type=str, default="data", help="folder holding the datasets in their torchvision layouts")
    p.add_argument("--split", type=Literal["train", "test"], default="test")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-workers", type=int, default=default_workers(),
                   help="loader worker processes (default: min(4, the CPU cores this process may use))")
    p.add_argument("--device", type=str, default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", type=Literal["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="autocast dtype (auto: bf16 on GPUs that support it, fp32 on CPU)")
    p.add_argument("--cache", type=bool, default=True, help="use the preprocessed uint8 image cache")
    p.add_argument("--cache-dir", type=Optional[str], default=None)
    p.add_argument("--allow-bad-test-images", type=bool, default=False,
                   help="leave unreadable test images out (n counts the rest) instead of stopping with their list")
    p.add_argument("--custom-datasets", type=Optional[str], default=None,
                   help="YAML/JSON list of user datasets (zscl.datasets.CustomDataset fields) to register first")
    p.add_argument("--json", type=Optional[str], default=None, help="also write the results to this JSON file")
    p.add_argument("--progress", type=bool, default=True)
    return p


def default_workers(most: int = 4) -> int:
    """``min(most, usable cores)``: more workers than cores only add start-up cost (and a torch warning)."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(most, cores))


from zscl.evaluation.zeroshot import resolve_amp, resolve_device  # noqa: E402,F401  (names of this CLI)


def parse_dataset_list(text: str) -> list[str]:
    from zscl.datasets import get_dataset

    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["mtil"]:
        names = MTIL_ORDER1.split(",")
    return [get_dataset(n).name for n in names]  # canonical spelling; unknown names raise with suggestions


def format_results(results: dict[str, dict]) -> str:
    rows = [f"{'dataset':<16} {'classes':>7} {'images':>8} {'top-1':>7} {'top-5':>7}"]
    for name, r in results.items():
        rows.append(f"{name:<16} {r['classes']:>7} {r['n']:>8} {r['top1']:>7.2f} {r['top5']:>7.2f}")
    if len(results) > 1:
        mean1 = sum(r["top1"] for r in results.values()) / len(results)
        mean5 = sum(r["top5"] for r in results.values()) / len(results)
        rows.append(f"{'mean':<16} {'':>7} {'':>8} {mean1:>7.2f} {mean5:>7.2f}")
    return "\n".join(rows)


def run(cfg) -> dict:
    from zscl.datasets import load_custom_datasets
    from zscl.evaluation.zeroshot import evaluate_dataset
    from zscl.models import load_clip

    if cfg.custom_datasets:
        load_custom_datasets(cfg.custom_datasets, data_root=cfg.data_root)
    names = parse_dataset_list(cfg.datasets)
    device = resolve_device(cfg.device)
    amp = resolve_amp(cfg.precision, device)
    method = _method_export(cfg.pretrained)
    if method is not None:  # a method with its own inference (routing, prompts, heads): rebuilt from its export
        return _run_method(method, cfg, names, device, amp)
    bundle = load_clip(cfg.model, cfg.pretrained, device=device)
    results = {}
    for name in names:
        acc, classes = evaluate_dataset(
            bundle, name, cfg.data_root, split=cfg.split, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
            device=device, amp_dtype=amp, cache=cfg.cache, cache_dir=cfg.cache_dir, progress=cfg.progress,
            allow_bad=cfg.allow_bad_test_images,
        )
        results[name] = {"classes": classes, **acc.as_dict()}
    return {"model": bundle.name, "pretrained": cfg.pretrained, "split": cfg.split, "results": results}


def _method_export(pretrained: Optional[str]):
    """The method class of an export whose inference is more than its CLIP's zero-shot head, else None."""
    from zscl.methods.classes import method_of_export

    if not pretrained or not Path(pretrained).is_file():
        return None
    cls = method_of_export(pretrained)
    return None if cls.plain_clip_evaluation else cls


def _run_method(cls, cfg, names: list[str], device, amp) -> dict:
    from zscl.evaluation.methods import evaluate_module

    module = cls.load_export(cfg.pretrained, clip=cfg.model).to(device)
    results = {}
    for name in names:
        acc, classes, extras = evaluate_module(module, name, cfg.data_root, split=cfg.split, batch_size=cfg.batch_size,
                                               num_workers=cfg.num_workers, amp_dtype=amp, cache=cfg.cache,
                                               cache_dir=cfg.cache_dir, progress=cfg.progress)
        results[name] = {"classes": classes, **acc.as_dict(), **extras}
    return {"model": module.bundle.name, "pretrained": cfg.pretrained, "split": cfg.split, "results": results,
            "method": f"{cls.__module__}.{cls.__qualname__}", "method_summary": module.describe()}


def main(argv: list[str]) -> int:
    parser = build_parser()
    cfg = parser.parse_args(argv)
    try:
        out = run(cfg)
    except (FileNotFoundError, KeyError, ValueError, RuntimeError) as err:
        print(f"zscl eval: {err}", file=sys.stderr)
        return 2
    print(f"zero-shot {out['split']} accuracy of {out['model']} ({out['pretrained'] or 'random init'})")
    print(format_results(out["results"]))
    if cfg.json:
        from zscl.utils.io import write_json_atomic

        write_json_atomic(Path(cfg.json), out)
        print(f"wrote {cfg.json}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
