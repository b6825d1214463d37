"""The routed model rebuilt from an export, and its evaluation outside Lightning (``zscl eval``).

``zscl eval --model ARCH --pretrained runs/x/checkpoints/03-DTD.safetensors`` finds
``03-DTD.moe.safetensors`` beside the CLIP weights and evaluates with DDAS routing per image,
exactly as the runner's evaluation does (same module, same ``validation_step``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from zscl.evaluation.zeroshot import Accuracy, autocast
from zscl.moe.export import moe_path, read_moe


def load_routed(model: str, weights: str, device: torch.device | str = "cpu"):
    """A :class:`~zscl.moe.module.MoEAdapterCLIP` in eval mode: CLIP ``weights`` + the adapters and
    autoencoders beside them, with the MoE/DDAS settings the export was written with."""
    from zscl.moe.module import MoEAdapterCLIP

    _, _, meta = read_moe(moe_path(weights))
    module = MoEAdapterCLIP(clip=model, pretrained=weights, moe=meta.get("moe"), ddas=meta.get("ddas"))
    return module.to(device).eval()


@torch.no_grad()
def evaluate_routed(module, name: str, data_root: str, *, split: str = "test", batch_size: int = 128,
                    num_workers: int = 0, amp_dtype: Optional[torch.dtype] = None, cache: bool = True,
                    cache_dir: Optional[str] = None, progress: bool = True) -> tuple[Accuracy, int, list[float]]:
    """(accuracy, classes, fraction of images sent to [zero-shot, task 0, task 1, ...]) on one dataset."""
    from tqdm.auto import tqdm

    from zscl.datasets import get_dataset
    from zscl.evaluation.zeroshot import dataset_batches

    spec = get_dataset(name)
    loader, _, _ = dataset_batches(spec.name, data_root, module.bundle.test_transform, split=split,
                                   batch_size=batch_size, num_workers=num_workers, cache=cache,
                                   cache_dir=cache_dir, progress=progress)
    module.start_evaluation([spec.name])
    for i, (images, labels) in enumerate(tqdm(loader, desc=f"eval {spec.name}", disable=not progress, leave=False)):
        with autocast(module.device, amp_dtype):
            module.validation_step((images.to(module.device), labels.to(module.device)), i, 0)
    c1, c5, n = module._counts[0].tolist()
    routed = module._routed[0]
    return Accuracy(c1, c5, n), spec.num_classes, (routed / max(int(routed.sum()), 1)).tolist()


def run_routed(cfg: Any, names: list[str], device: torch.device, amp: Optional[torch.dtype]) -> dict[str, Any]:
    """``zscl eval`` of a MoE-Adapters export (``cfg``: the eval parser's namespace)."""
    module = load_routed(cfg.model, cfg.pretrained, device)
    results = {}
    for name in names:
        acc, classes, routed = evaluate_routed(module, name, cfg.data_root, split=cfg.split, batch_size=cfg.batch_size,
                                               num_workers=cfg.num_workers, amp_dtype=amp, cache=cfg.cache,
                                               cache_dir=cfg.cache_dir, progress=cfg.progress)
        results[name] = {"classes": classes, **acc.as_dict(), "routed": routed}
    return {"model": module.bundle.name, "pretrained": cfg.pretrained, "split": cfg.split, "results": results,
            "routing": f"MoE-Adapters + DDAS over {int(module.tasks_done)} trained task(s)"}
