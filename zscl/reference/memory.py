"""iCaRL's exemplar memory: training images of past tasks, replayed as distillation references.

The rules follow the ZSCL reference code's MTIL iCaRL (``mtil/src/dynamic_dataset.py``):

* memory size ``K`` (``size``, reference 10,000);
* after the first task its set holds ``K`` exemplars; after task ``t >= 2`` (``t`` tasks seen so
  far), every older task's set is cut to its first ``K // t`` exemplars, and the new task gets
  ``K - K // t`` exemplars, so the total
  may exceed ``K`` (3 tasks: 2 * 3,333 + 6,667 = 13,333) — the reference's rule;
  ``balanced: true`` gives the new task ``K // t`` too, so the total never exceeds ``K``;
* the new set is chosen by *herding* (Rebuffi et al., iCaRL, CVPR 2017) on the L2-normalised
  image features of the just-trained model over the task's first ``candidates`` training images
  (reference 30,000) under the test transform: exemplar ``k`` is the candidate that brings the
  mean of the chosen features closest to the mean ``mu`` of all candidates,
  ``argmin_i || mu - (s_{k-1} + f_i) / k ||``, without replacement. Exemplars are kept in
  herding order, so cutting a set keeps its best exemplars.

Deviations from the reference, named:

* the reference's herding deletes chosen rows from the feature array but indexes the image
  array with the shifted row number, so after the first pick its exemplars are not the ones
  herding chose; here the chosen indices are the herded ones;
* the reference skips herding on the first task (it keeps the first K images by index); here
  every task, the first included, is herded;
* ``per_class: true`` (not in the reference) herds within every class with an equal share of
  the task's budget, the classic iCaRL rule, for class-balanced sets.

The memory is a JSON file ``{"size", "tasks": [{"dataset", "indices", "labels"}, ...]}`` written
atomically after each task; indices point into the dataset's registered ``train`` split, so a
memory file is small and a resumed run reads exactly the exemplars the interrupted one chose.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch.utils.data import ConcatDataset, Dataset, Subset

from zscl.utils.io import write_json_atomic


@dataclass
class ExemplarMemory:
    """iCaRL's exemplar memory (see the module docstring). ``size`` K, ``candidates`` per task."""

    size: int = 10000
    candidates: int = 30000
    per_class: bool = False
    balanced: bool = False

    def __post_init__(self) -> None:
        if self.size < 1 or self.candidates < 1:
            raise ValueError(f"memory size and candidates must be >= 1, got {self.size} and {self.candidates}")


def herding(features: torch.Tensor, m: int) -> list[int]:
    """Indices of ``m`` rows of ``features`` chosen by herding toward their mean (in pick order).

    ``features`` are L2-normalised here (fp64 for a tie-free, platform-stable order).
    """
    f = torch.nn.functional.normalize(features.double(), dim=-1)
    mu = f.mean(dim=0)
    # ||mu - (s + f_i)/k||^2 expanded; only the terms that depend on i are kept, and s . f_i is
    # updated by one matrix-vector product per pick (no N x d temporaries per step).
    mu_f, sq, s_f = f @ mu, (f * f).sum(dim=1), torch.zeros(len(f), dtype=f.dtype)
    taken = torch.zeros(len(f), dtype=torch.bool)
    chosen: list[int] = []
    for k in range(1, min(m, len(f)) + 1):
        score = -2.0 / k * mu_f + (2.0 * s_f + sq) / (k * k)
        score[taken] = float("inf")
        i = int(torch.argmin(score))
        chosen.append(i)
        taken[i] = True
        s_f += f @ f[i]
    return chosen


def budgets(cfg: ExemplarMemory, tasks_seen: int) -> tuple[int, int]:
    """(exemplars kept per older task, exemplars for the new task) after ``tasks_seen`` tasks."""
    old = cfg.size // tasks_seen
    if tasks_seen == 1:
        return old, cfg.size  # the first task fills the memory (the reference's first round)
    return old, (old if cfg.balanced else cfg.size - old)


def select_exemplars(features: torch.Tensor, labels: Sequence[int], m: int, per_class: bool) -> list[int]:
    """Positions (into ``features``) of the new task's exemplars: herding over the task or per class."""
    if not per_class:
        return herding(features, m)
    labels_t = torch.as_tensor(list(labels))
    classes = sorted(set(labels_t.tolist()))
    share, extra = divmod(m, len(classes))
    picked: list[list[int]] = []
    for rank, c in enumerate(classes):
        rows = torch.nonzero(labels_t == c).flatten()
        picked.append([int(rows[i]) for i in herding(features[rows], share + (rank < extra))])
    # interleave classes so that cutting the set later keeps it balanced
    return [p[i] for i in range(max(map(len, picked), default=0)) for p in picked if i < len(p)]


def update_memory(memory: dict[str, Any], cfg: ExemplarMemory, dataset: str, indices: Sequence[int],
                  labels: Sequence[int], features: torch.Tensor) -> dict[str, Any]:
    """The memory after a task: older sets cut to their budget, the new set herded from candidates.

    ``indices``/``labels``/``features`` describe the new task's candidates (train-split indices).
    """
    tasks = [dict(t) for t in memory.get("tasks", [])]
    if any(t["dataset"] == dataset for t in tasks):
        raise ValueError(f"the exemplar memory already holds task {dataset!r}")
    old, new = budgets(cfg, len(tasks) + 1)
    for t in tasks:
        t["indices"], t["labels"] = t["indices"][:old], t["labels"][:old]
    rows = select_exemplars(features, labels, new, cfg.per_class)
    tasks.append({"dataset": dataset, "indices": [int(indices[r]) for r in rows], "labels": [int(labels[r]) for r in rows]})
    return {"size": cfg.size, "tasks": tasks}


def read_memory(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exemplar memory file {path} does not exist (it is written by `zscl sequence` after each task)")
    with open(path, encoding="utf-8") as f:
        memory = json.load(f)
    if not isinstance(memory, dict) or not isinstance(memory.get("tasks"), list):
        raise ValueError(f"{path} is not an exemplar memory file (expected {{'size', 'tasks': [...]}})")
    return memory


def write_memory(path: str | Path, memory: dict[str, Any]) -> None:
    write_json_atomic(Path(path), memory)


def memory_dataset(memory: dict[str, Any], data_root: str | Path, transform: Optional[Callable]) -> Dataset:
    """The exemplars as one map-style dataset of images (labels dropped), tasks in memory order."""
    from zscl.datasets import build_dataset
    from zscl.datasets.common import DropLabels

    parts = [Subset(DropLabels(build_dataset(t["dataset"], data_root, "train", transform)), list(t["indices"]))
             for t in memory["tasks"] if t["indices"]]
    if not parts:
        raise ValueError("the exemplar memory is empty")
    return ConcatDataset(parts)


@torch.no_grad()
def candidate_features(encode: Callable[[torch.Tensor], torch.Tensor], dataset: Dataset, limit: int,
                       batch_size: int = 128, num_workers: int = 0) -> tuple[list[int], list[int], torch.Tensor]:
    """(indices, labels, features) of the first ``limit`` items of a labelled dataset.

    ``encode`` maps a batch of images (as the dataset yields them) to image features.
    """
    n = min(limit, len(dataset))  # type: ignore[arg-type]
    loader = torch.utils.data.DataLoader(Subset(dataset, range(n)), batch_size=batch_size, num_workers=num_workers)
    feats, labels = [], []
    for images, y in loader:
        feats.append(encode(images).float().cpu())
        labels += [int(v) for v in y]
    return list(range(n)), labels, torch.cat(feats)
