"""The continual sequence runner: zero-shot row, then train -> export -> evaluate per task.

Files under ``out/``:

* ``results.json`` — ``datasets``, ``tasks``, ``accuracy`` (rows so far; row i = after task i,
  percent), ``top5``, ``zero_shot``, ``metrics`` (once complete), the resolved ``config`` and
  ``versions``; rewritten atomically after every row (``zscl metrics`` reads it directly);
* ``checkpoints/NN-<Dataset>.safetensors`` — each task's final (averaged) weights, open_clip layout;
* ``tasks/NN-<Dataset>/last.ckpt`` — Lightning checkpoints every ``checkpoint_every`` steps;
* ``logs/`` — CSV and TensorBoard logs, one version per task.

Rerunning the same command continues where it stopped: finished rows are kept, a task whose
export exists is only evaluated, and an interrupted task resumes from its last checkpoint (the
data streams, optimizer, scheduler and averaging state all resume with it). Under DDP every rank
runs this loop; rank 0 writes files and the others wait at barriers.
"""

from __future__ import annotations

import copy
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from zscl.reference.memory import ExemplarMemory
from zscl.runner.configs import task_dataset, task_overlay
from zscl.runner.hooks import Continual, build_hooks
from zscl.runner.progress import progress_bar
from zscl.utils.checkpoint_io import AtomicCheckpointIO
from zscl.utils.io import write_json_atomic
from zscl.utils.ranks import barrier, is_rank_zero, say
from zscl.utils import signals
from zscl.utils.testing import kill_callback, pause_callback


@dataclass
class RunOptions:
    """Options of ``zscl sequence`` that are not the model's, the data's or the trainer's."""

    out: str = "runs/sequence"
    steps: Optional[int] = None  # override every task's steps
    checkpoint_every: int = 100  # Lightning checkpoint interval (steps) for mid-task resume
    keep_checkpoints: bool = False  # keep each task's Lightning checkpoint after its row is saved
    progress: str = "rich"  # rich | tqdm | none
    label: Optional[str] = None  # the run's name in reports (default: the method config's name)


def versions() -> dict[str, str]:
    import lightning
    import open_clip

    import zscl

    return {"zscl": zscl.__version__, "torch": torch.__version__, "lightning": lightning.__version__,
            "open_clip": open_clip.__version__, "python": platform.python_version()}


def _flatten(prefix: str, obj: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}.{key}" if prefix else key
        out.update(_flatten(name, value) if isinstance(value, dict) and key not in ("init_args",) else {name: value})
    return out


class SequenceRunner:
    """Runs one benchmark with one method configuration; see the module docstring.

    The benchmark's setting (:mod:`zscl.settings`) decides how tasks are built, evaluated and
    summarised; the method's between-task hooks (:mod:`zscl.runner.hooks`) what happens around each
    task; the method's class (:class:`~zscl.methods.base.CLIPMethod`) what it needs. The runner knows none by name.
    """

    def __init__(self, parser, cfg) -> None:
        from zscl.datasets import load_custom_datasets
        from zscl.methods.classes import model_class
        from zscl.settings import setting_for

        self.parser, self.cfg = parser, cfg
        if cfg.data.custom_datasets:  # user datasets must exist before task names are checked
            load_custom_datasets(cfg.data.custom_datasets, data_root=cfg.data.data_root)
        self.method_class = model_class(cfg.get("model_class") or "continual_clip")
        self.opts = RunOptions(**{k: cfg[k] for k in vars(RunOptions())})
        continual = dict(vars(cfg.continual))
        if continual.get("memory") is not None:
            continual["memory"] = ExemplarMemory(**vars(continual["memory"]))
        self.continual = Continual(**continual)
        self.hooks = build_hooks(self.continual)
        self.out = Path(self.opts.out)
        self.setting = setting_for(cfg.benchmark)
        self.setting.prepare(self)
        self.tasks = list(cfg.benchmark.tasks)
        if not self.tasks:
            raise ValueError("the benchmark has no tasks: pass --config benchmark/<name> or set benchmark.tasks")
        self.task_names = [task_dataset(t) for t in self.tasks]
        self.eval_names = list(cfg.benchmark.eval_datasets or self.task_names)
        self.results = self._load_results()
        self._preflight()

    def _preflight(self) -> None:
        """Bad inputs fail here, before any evaluation, caching or training.

        Unknown names fail first (with suggestions); then every split the sequence will read (each
        task's train split, each evaluated dataset's test split) is built and the reference data is
        looked up, and everything that is missing is reported in one message.
        """
        from zscl.datasets import get_dataset

        for name in self.task_names + self.eval_names:
            get_dataset(name)  # RegistryError with suggestions
        for hook in self.hooks:
            hook.check(self)
        ref = self.cfg.data.reference_images
        if ref is not None and ref.source == "memory" and self.continual.memory is None:
            raise ValueError("data.reference_images.source 'memory' needs an exemplar memory: set continual.memory "
                             "(an exemplar_memory hook; see the README's methods table)")
        missing = self._missing_inputs()
        if missing:
            raise FileNotFoundError(f"{len(missing)} input(s) of this sequence are missing (nothing was run): "
                                    + " | ".join(missing))

    def _missing_inputs(self) -> list[str]:
        """One line per missing dataset (naming its splits and expected layout) or missing reference data."""
        from zscl.datasets import build_dataset, get_dataset

        splits: dict[str, list[str]] = {}
        for name, split in [(n, "train") for n in self.task_names] + [(n, "test") for n in self.eval_names]:
            needed = splits.setdefault(get_dataset(name).name, [])
            needed += [split] if split not in needed else []
        missing = []
        for name, needed in splits.items():
            errors = {}
            for split in needed:
                try:
                    build_dataset(name, self.cfg.data.data_root, split, None)  # lists files; decodes no image
                except (FileNotFoundError, ValueError) as err:
                    errors[split] = str(err)
            if errors:
                missing.append(f"{name} ({', '.join(errors)}): {next(iter(errors.values()))}")
        if self.method_class.requires_reference(_plain(self.cfg.model)):
            try:
                self._datamodule_only().check_reference()
            except FileNotFoundError as err:
                missing.append(str(err))
        return missing

    def _datamodule_only(self):
        from zscl.methods.datamodule import ContinualDataModule
        from zscl.reference import ReferenceImages, ReferenceTexts

        d = self.cfg.data
        images = ReferenceImages(**vars(d.reference_images)) if d.reference_images else None
        texts = ReferenceTexts(**vars(d.reference_texts)) if d.reference_texts else None
        return ContinualDataModule(dataset=self.task_names[0], data_root=d.data_root, reference_images=images,
                                   reference_texts=texts, custom_datasets=d.custom_datasets)

    # ------------------------------------------------------------------ bookkeeping
    def results_path(self) -> Path:
        return self.out / "results.json"

    def _load_results(self) -> dict[str, Any]:
        path = self.results_path()
        if path.exists():
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
            self.setting.check_results(self, old)
            return old
        return {"setting": self.setting.name, "benchmark": self.cfg.benchmark.name, "method": self.method_label(),
                "tasks": self.task_names, **self.setting.results_fields(self), "timing": []}

    def method_label(self) -> str:
        """``--label``, else the method config's ``name``, else the out folder's name."""
        return self.opts.label or self.cfg.get("name") or self.out.name

    def save(self) -> None:
        if is_rank_zero():
            self.results["config"] = json.loads(self.parser.dump(self.cfg, format="json", skip_none=False))
            self.results["versions"] = versions()
            write_json_atomic(self.results_path(), self.results)
        barrier()

    def slug(self, k: int) -> str:
        return self.setting.slug(self, k)

    def export_path(self, k: int) -> Path:
        return self.out / "checkpoints" / f"{self.slug(k)}.safetensors"

    def trained_path(self, k: int) -> Path:
        """Where task k's training writes: the export, unless a hook keeps trained weights apart (merging)."""
        paths = [p for p in (h.trained_path(self, k) for h in self.hooks) if p is not None]
        return paths[-1] if paths else self.export_path(k)

    # ------------------------------------------------------------------ building blocks
    def task_cfg(self, k: int, init_from: Optional[str], eval_only: bool = False):
        cfg = copy.deepcopy(self.cfg)
        for key, value in _flatten("", task_overlay(self.tasks[k])).items():
            cfg[key] = value
        cfg["model.init_from"] = init_from
        cfg["model.export_path"] = None
        cfg["data.seed"] = self.cfg.data.seed + k
        if self.opts.steps is not None:
            cfg["trainer.max_steps"] = self.opts.steps
        self.setting.task_cfg(self, k, cfg, eval_only)
        if eval_only:
            for key, value in self.method_class.evaluation_overrides().items():
                cfg[f"model.{key}"] = value
        else:
            for hook in self.hooks:
                for key, value in hook.task_overrides(self, k).items():
                    cfg[key] = value
        return cfg

    def instantiate(self, cfg):
        L.seed_everything(int(self.cfg.seed_everything), workers=True, verbose=False)
        init = self.parser.instantiate_classes(cfg)
        return init.model, init.data, dict(init.trainer)

    def trainer(self, kwargs: dict[str, Any], k: Optional[int], description: str) -> L.Trainer:
        kwargs = dict(kwargs)
        callbacks = list(kwargs.pop("callbacks", None) or [])
        bar = progress_bar(self.opts.progress, description)
        callbacks += [bar] if bar is not None else []
        if k is not None:
            ckpt_dir = self.out / "tasks" / self.slug(k)
            callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=self.opts.checkpoint_every,
                                             save_top_k=0, save_last=True, save_on_exception=False))
            hooks = [kill_callback(k), pause_callback(k)]  # test hooks: only when ZSCL_KILL_AT / ZSCL_PAUSE_AT name task k
            callbacks += [h for h in hooks if h is not None]
            label = f"task {k + 1}/{len(self.tasks)} ({self.slug(k)})"
            callbacks.append(signals.StopOnSignal(label, str(ckpt_dir / "last.ckpt")))  # SIGTERM/SIGINT/SIGUSR1
            kwargs["logger"] = [CSVLogger(self.out / "logs", name="csv", version=self.slug(k)),
                                TensorBoardLogger(self.out / "logs", name="tb", version=self.slug(k))]
        else:
            kwargs["logger"] = False
        kwargs.update(callbacks=callbacks, enable_progress_bar=bar is not None, max_epochs=-1,
                      num_sanity_val_steps=0, enable_model_summary=False, default_root_dir=str(self.out),
                      plugins=[AtomicCheckpointIO(), *signals.cluster_plugins()])
        return L.Trainer(**kwargs)

    # ------------------------------------------------------------------ the sequence
    def run(self) -> dict[str, Any]:
        n = len(self.tasks)
        say(f"zscl sequence: {self.cfg.benchmark.name}, {n} tasks -> {self.out}")
        self.setting.zero_shot(self)
        for k in range(n):
            if k < len(self.results["accuracy"]):
                continue
            signals.stop_if_requested(f"before task {k + 1}/{n} ({self.slug(k)})")
            self._task(k)
        self._finish()
        return self.results

    def start_point(self, k: int) -> Optional[str]:
        if k == 0 or self.continual.init == "independent":
            return self.cfg.model.init_from
        points = [p for p in (h.start_point(self, k) for h in self.hooks) if p is not None]
        return points[-1] if points else str(self.export_path(k - 1))

    def _task(self, k: int) -> None:
        name, export = self.task_names[k], self.export_path(k)
        title = f"task {k + 1}/{len(self.tasks)}: {name}"
        t0, c0 = time.time(), time.process_time()
        if not self.trained_path(k).exists():
            self._fit(k, title, self.trained_path(k))
        for hook in self.hooks:
            hook.after_task(self, k)
        t1, c1 = time.time(), time.process_time()
        say(f"{title}: evaluating {export}")
        model, dm, kw = self.instantiate(self.task_cfg(k, str(export), eval_only=True))
        top1, top5 = self.setting.evaluate(self, self.trainer(kw, None, title), model, dm)
        self.results["accuracy"].append(top1)
        self.results["top5"].append(top5)
        # wall seconds, and this process's CPU seconds (all its threads): on a shared machine the latter does not
        # count the time other jobs held the cores
        self.results["timing"].append({"task": name, "train_s": round(t1 - t0, 2), "eval_s": round(time.time() - t1, 2),
                                       "train_cpu_s": round(c1 - c0, 2), "eval_cpu_s": round(time.process_time() - c1, 2)})
        self.save()
        say(self.setting.row_text(self, f"after {name}", top1))
        if not self.opts.keep_checkpoints and is_rank_zero():
            (self.out / "tasks" / self.slug(k) / "last.ckpt").unlink(missing_ok=True)

    def _fit(self, k: int, title: str, target: Path) -> None:
        """Train task k (resuming from its last Lightning checkpoint if any) and export to ``target``."""
        model, dm, kw = self.instantiate(self.task_cfg(k, self.start_point(k)))
        trainer = self.trainer(kw, k, title)
        ckpt = self.out / "tasks" / self.slug(k) / "last.ckpt"
        resume = str(ckpt) if ckpt.exists() else None
        signals.refuse_hpc_checkpoints(self.out)  # our checkpoint is the only one a task resumes from
        say(f"{title}: {trainer.max_steps} steps, lr {model.hparams.lr:g}" + (f", resuming from {ckpt}" if resume else ""))
        trainer.fit(model, datamodule=dm, ckpt_path=resume)
        model.export(str(target))
        bad = list(dm.bad_images.paths)  # unreadable training/reference images, replaced (data.on_bad_image)
        self.results.setdefault("bad_images", {})[self.task_names[k]] = len(bad)
        self.results.setdefault("bad_image_paths", {})[self.task_names[k]] = bad[:100]
        barrier()

    def initial_weights(self) -> Path:
        """The initial model's state dict as a file (the base of merge-based methods), written once."""
        path = self.out / "trained" / "initial.safetensors"
        if not path.exists():
            model, _, _ = self.instantiate(self.task_cfg(0, self.cfg.model.init_from, eval_only=True))
            model.export(str(path))
            barrier()
        return path

    def _finish(self) -> None:
        self.setting.finish(self)
        for key, what in (("excluded_test_images", "unreadable test images excluded (--allow-bad-test-images)"),
                          ("bad_images", "unreadable training/reference images replaced")):
            counts = {n: c for n, c in (self.results.get(key) or {}).items() if c}
            if counts:
                say(f"{what}: " + ", ".join(f"{n} {c}" for n, c in counts.items()))
        say(f"wrote {self.results_path()}")


def _plain(namespace: Any) -> dict[str, Any]:
    """A jsonargparse Namespace (or dict) as nested plain dicts."""
    if hasattr(namespace, "as_dict"):
        return namespace.as_dict()
    return dict(namespace or {})
