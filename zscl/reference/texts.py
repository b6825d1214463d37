"""Reference texts for ZSCL's distillation, returned as token ids.

The paper distils over all Conceptual Captions validation captions. Sources:

* ``captions``: a CSV/TSV column (default: the CC validation file, column ``title``);
* ``wds``: the ``txt`` field of every sample in webdataset shards (one pass, all shards);
* ``classnames``: the training-template prompts of registered datasets' classes
  (the reference code's ``--text-datasets``);
* ``task``: the training-template prompts of the current task's classes (LwF, iCaRL); the
  data module resolves it to ``classnames`` of the task's dataset;
* ``random``: "virtual vocabulary" sentences of uniformly random token ids (LwF-VR; the
  reference's ``virtual_vocab()``): ``n_random`` (1000) rows ``[SOT, t_1..t_L, EOT, 0, ...]``
  with L = ``random_length`` (10) ids uniform over the whole vocabulary, special tokens
  included. The data module seeds them with ``(seed, data seed)``, and the sequence runner
  gives every task its own data seed, so they are drawn anew once per task, as the reference.

The teacher's embeddings of these texts never change during a task, so the LightningModule
encodes them once (the reference code re-encodes them every step, its main cost).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

import torch

from zscl.reference.images import read_table, resolve


@dataclass
class ReferenceTexts:
    """Where ZSCL's reference texts come from (default: the CC validation captions)."""

    source: Literal["captions", "wds", "classnames", "classnames_so_far", "task", "random"] = "captions"
    path: str = "Validation_GCC-1.1.0-Validation_output.csv"  # captions file or shard pattern
    column: str = "title"  # for source=captions
    datasets: list[str] = field(default_factory=list)  # for source=classnames; classnames_so_far: the task order
    limit: Optional[int] = None  # keep only the first N texts
    n_random: int = 1000  # for source=random
    random_length: int = 10
    seed: int = 0  # for source=random: the seed of the draw
    # for source=random: false (default) = the same sentences for every task, as the reference (each task's
    # process runs seed_all(42) and then the same code before virtual_vocab()); true = new ones per task
    random_per_task: bool = False


def caption_texts(path: Path, column: str) -> list[str]:
    rows = read_table(path)
    if rows and column not in rows[0]:
        raise ValueError(f"{path} has no column {column!r}; columns: {', '.join(rows[0])}")
    return [str(row[column]) for row in rows]


def wds_texts(pattern: str) -> list[str]:
    import webdataset as wds

    dataset = wds.WebDataset(pattern, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
    return [s["txt"].decode("utf-8") if isinstance(s["txt"], bytes) else str(s["txt"]) for s in dataset if "txt" in s]


def classname_texts(datasets: Sequence[str]) -> list[str]:
    from zscl.datasets import get_dataset

    if not datasets:
        raise ValueError("reference texts from class names need at least one dataset name (datasets: [...])")
    return [p for name in datasets for p in get_dataset(name).prompts()]


def random_tokens(n: int, length: int, tokenizer, seed: int) -> torch.Tensor:
    """``[SOT, random ids, EOT, 0...]`` rows, ids uniform over the whole vocabulary (as the reference)."""
    ctx = tokenizer.context_length
    if length + 2 > ctx:
        raise ValueError(f"random_length {length} does not fit the context length {ctx}")
    g = torch.Generator().manual_seed(seed)
    body = torch.randint(0, tokenizer.vocab_size, (n, length), generator=g)
    out = torch.zeros(n, ctx, dtype=torch.long)
    out[:, 0] = tokenizer.sot_token_id
    out[:, 1:length + 1] = body
    out[:, length + 1] = tokenizer.eot_token_id
    return out


def for_task(cfg: ReferenceTexts, dataset: str, data_seed: int) -> ReferenceTexts:
    """``source: task`` made concrete (the task's class prompts); random sentences drawn from ``cfg.seed``
    alone (the same every task), or, with ``random_per_task``, from it mixed with the task's ``data_seed``."""
    if cfg.source == "task":
        return replace(cfg, source="classnames", datasets=[dataset])
    if cfg.source == "classnames_so_far":
        return replace(cfg, source="classnames", datasets=datasets_so_far(cfg.datasets, dataset))
    if cfg.source == "random" and cfg.random_per_task:
        from zscl.datasets.streams import mix_seed

        return replace(cfg, seed=mix_seed(cfg.seed, data_seed))
    return cfg


def datasets_so_far(order: Sequence[str], dataset: str) -> list[str]:
    """The tasks of ``order`` up to and including ``dataset``: reference texts that accumulate per task, the
    class prompts of every task trained so far (the reference's growing ``--text-datasets`` lists)."""
    if dataset not in order:
        raise ValueError(f"reference_texts.datasets (the task order for classnames_so_far) lacks the task {dataset!r}: "
                         f"{list(order)}")
    return list(order[: list(order).index(dataset) + 1])


def reference_texts(cfg: ReferenceTexts, data_root: str | Path) -> list[str]:
    """The reference sentences for every source but ``random`` (which has no strings)."""
    if cfg.source == "captions":
        texts = caption_texts(resolve(cfg.path, data_root), cfg.column)
    elif cfg.source == "wds":
        texts = wds_texts(cfg.path if "://" in cfg.path else str(resolve(cfg.path, data_root)))
    elif cfg.source == "classnames":
        texts = classname_texts(cfg.datasets)
    elif cfg.source in ("task", "classnames_so_far"):
        raise ValueError(f"source {cfg.source!r} depends on the current task; resolve it with for_task(cfg, dataset, seed)")
    else:
        raise ValueError(f"source {cfg.source!r} has no strings; use reference_text_tokens")
    if not texts:
        raise ValueError(f"no reference texts found ({cfg.source}: {cfg.path})")
    return texts[: cfg.limit] if cfg.limit is not None else texts


def reference_text_tokens(cfg: ReferenceTexts, data_root: str | Path, tokenizer: Callable) -> torch.Tensor:
    """Token ids [N, context_length] of the reference texts."""
    if cfg.source == "random":
        n = cfg.n_random if cfg.limit is None else min(cfg.n_random, cfg.limit)
        return random_tokens(n, cfg.random_length, tokenizer, cfg.seed)
    return tokenizer(reference_texts(cfg, data_root))
