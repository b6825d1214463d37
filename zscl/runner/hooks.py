"""Between-task hooks: what happens around each task of a sequence, picked by a method config.

A hook answers three questions for task ``k`` and nothing else, so the runner knows no method:

* :meth:`TaskHook.trained_path` / :meth:`TaskHook.start_point`: where the task's training writes and
  where it starts from (merge-after-task methods keep trained weights apart from the merged export);
* :meth:`TaskHook.task_overrides`: config keys for the task's training (e.g. where the exemplars are);
* :meth:`TaskHook.after_task`: what to do once the task's training has finished (merge, herd exemplars).

Built-ins (:data:`HOOKS`): ``exemplar_memory`` (iCaRL's replay) and ``merge`` (MagMax, task
arithmetic, TIES over the trained weights). A method config picks them under ``continual:``::

    continual: {memory: {size: 10000}}                 # -> exemplar_memory
    continual: {merge: magmax, hparams: {scale: 0.5}}  # -> merge
    continual: {hooks: [{name: my_hook, ...}]}         # any registered hook, with its arguments
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from zscl.reference.memory import ExemplarMemory
from zscl.plugins import load_plugins
from zscl.registry import Registry


@dataclass
class Continual:
    """How tasks chain, and the between-task hooks of the method (module docstring).

    * ``init``: each task starts from the previous task's *trained* weights (``sequential``) or
      from the initial model (``independent``).
    * ``merge``: a :data:`zscl.merging.MERGE_RULES` name applied after task t to
      ``(base = initial weights, models = trained weights of tasks 0..t)``; the merged model is
      the one evaluated and exported. MagMax (Marczak et al. 2024) is ``sequential`` + ``magmax``;
      task arithmetic / TIES over independent fine-tunes is ``independent`` + ``task_arithmetic``/``ties``.
    * ``hparams``: the rule's hyperparameters (e.g. ``{scale: 0.5}``).
    * ``memory``: an iCaRL exemplar memory (:class:`~zscl.reference.memory.ExemplarMemory`),
      updated after every task with the just-trained model and replayed as the next tasks'
      reference images (``data.reference_images.source: memory``). The first task has no
      exemplars yet, so it trains without distillation.
    * ``hooks``: further hooks by registered name, ``{name: ..., <argument>: ...}``.
    """

    init: Literal["sequential", "independent"] = "sequential"
    merge: Optional[str] = None
    hparams: dict[str, Any] = field(default_factory=dict)
    memory: Optional[ExemplarMemory] = None
    hooks: list[dict[str, Any]] = field(default_factory=list)


class TaskHook:
    """Base of between-task hooks; every method is optional (module docstring)."""

    def check(self, runner: Any) -> None:
        """Refuse a bad configuration before anything runs."""

    def trained_path(self, runner: Any, k: int) -> Optional[Path]:
        """Where task k's training writes its weights, if not the task's export."""
        return None

    def start_point(self, runner: Any, k: int) -> Optional[str]:
        """The weights task k (k >= 1, sequential) starts from, if not the previous trained weights."""
        return None

    def task_overrides(self, runner: Any, k: int) -> dict[str, Any]:
        """Flat config keys (``model.distill``, ``data.reference_images.path``...) for task k's training."""
        return {}

    def after_task(self, runner: Any, k: int) -> None:
        """After task k's training (resumable: do nothing if the work is already on disk)."""


HOOKS: Registry[type[TaskHook]] = Registry("between-task hook", loader=load_plugins)  # + plugins' hooks


@HOOKS.register("merge")
class MergeAfterTask(TaskHook):
    """The export of task t is ``rule(base = initial weights, models = trained weights of tasks 0..t)``."""

    def __init__(self, rule: str, hparams: Optional[dict[str, Any]] = None) -> None:
        self.rule, self.hparams = rule, dict(hparams or {})

    def check(self, runner: Any) -> None:
        from zscl.merging import MERGE_RULES

        MERGE_RULES.get(self.rule)

    def trained_path(self, runner: Any, k: int) -> Path:
        return runner.out / "trained" / f"{runner.slug(k)}.safetensors"

    def start_point(self, runner: Any, k: int) -> str:
        return str(self.trained_path(runner, k - 1))

    def after_task(self, runner: Any, k: int) -> None:
        from zscl.merging import merge, open_state_dict
        from zscl.models import save_state_dict
        from zscl.utils.ranks import barrier, is_rank_zero, say

        if runner.export_path(k).exists():
            return
        base = open_state_dict(runner.initial_weights())
        models = [open_state_dict(self.trained_path(runner, i)) for i in range(k + 1)]
        say(f"  merging {k + 1} task(s) with {self.rule} {self.hparams or ''}")
        if is_rank_zero():
            merged = merge(self.rule, base, models, **self.hparams)
            save_state_dict(merged, runner.export_path(k),
                            metadata={"merge": self.rule, "hparams": json.dumps(self.hparams, sort_keys=True)})
        barrier()


@HOOKS.register("exemplar_memory")
class ExemplarReplay(TaskHook):
    """iCaRL's memory: herded after every task with its trained model, replayed as later tasks' reference images."""

    def __init__(self, memory: ExemplarMemory) -> None:
        self.memory = memory

    def check(self, runner: Any) -> None:
        return None

    def path(self, runner: Any, k: int) -> Path:
        return runner.out / "memory" / f"{runner.slug(k)}.json"

    def task_overrides(self, runner: Any, k: int) -> dict[str, Any]:
        if k == 0:
            return {"model.distill": None}  # no exemplars before the first task: plain fine-tuning
        # absolute: data paths are read relative to the data root, the memory lives under --out
        return {"data.reference_images.path": str(self.path(runner, k - 1).resolve())}

    def after_task(self, runner: Any, k: int) -> None:
        """Herd task k's exemplars with its exported (just-trained) weights; rank 0 writes the file."""
        from zscl.datasets import build_dataset
        from zscl.reference.memory import candidate_features, read_memory, update_memory, write_memory
        from zscl.utils.ranks import barrier, is_rank_zero, say

        if self.path(runner, k).exists():
            return
        if is_rank_zero():
            cfg, name = self.memory, runner.setting.train_dataset(runner, k)
            model, dm, _ = runner.instantiate(runner.task_cfg(k, str(runner.export_path(k)), eval_only=True))
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
            clip = model.clip.to(device).eval()
            dataset = build_dataset(name, dm.data_root, "train", model.bundle.test_transform)
            say(f"  exemplar memory: herding {name} with its trained weights ({min(cfg.candidates, len(dataset))} candidates)")
            indices, labels, feats = candidate_features(lambda x: clip.encode_image(x.to(device)), dataset, cfg.candidates,
                                                        batch_size=dm.eval_batch_size)
            memory = read_memory(self.path(runner, k - 1)) if k > 0 else {}
            write_memory(self.path(runner, k), update_memory(memory, cfg, name, indices, labels, feats))
        barrier()


def build_hooks(continual: Continual) -> list[TaskHook]:
    """The hooks a method's ``continual:`` section picks, in a fixed order (merge first, then memory, then the rest)."""
    hooks: list[TaskHook] = []
    if continual.merge is not None:
        hooks.append(MergeAfterTask(continual.merge, continual.hparams))
    if continual.memory is not None:
        hooks.append(ExemplarReplay(continual.memory))
    for spec in continual.hooks:
        spec = dict(spec)
        if "name" not in spec:
            raise ValueError(f"a continual hook needs a 'name' (one of {HOOKS.names()}), got {spec}")
        hooks.append(HOOKS.get(spec.pop("name"))(**spec))
    return hooks


__all__ = ["Continual", "ExemplarReplay", "HOOKS", "MergeAfterTask", "TaskHook", "build_hooks"]
