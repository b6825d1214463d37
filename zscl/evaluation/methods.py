"""A method's model evaluated outside Lightning, exactly as the runner evaluates it (``zscl eval`` of an export).

The same :meth:`~zscl.methods.base.CLIPMethod.validation_step` and counters run over the cached
uint8 test batches, so a method with its own inference (MoE-Adapters' routing, prompts, heads) is
scored the way its sequence run scored it.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from zscl.evaluation.zeroshot import Accuracy, autocast


@torch.no_grad()
def evaluate_module(module: Any, name: str, data_root: str, *, split: str = "test", batch_size: int = 128,
                    num_workers: int = 0, amp_dtype: Optional[torch.dtype] = None, cache: bool = True,
                    cache_dir: Optional[str] = None, progress: bool = True) -> tuple[Accuracy, int, dict[str, Any]]:
    """(accuracy, number of classes, the method's extras such as routing fractions) on one dataset."""
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
    return Accuracy(c1, c5, n), spec.num_classes, module.evaluation_extras(0)
