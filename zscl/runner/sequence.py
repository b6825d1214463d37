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
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from zscl.reference.memory import ExemplarMemory
from zscl.runner.configs import task_dataset, task_overlay
from zscl.runner import signals
from zscl.utils.testing import kill_callback, pause_callback
from zscl.runner.progress import AtomicCheckpointIO, progress_bar
from zscl.utils.io import write_json_atomic


@dataclass
class RunOptions:
    """Options of ``zscl sequence`` that are not the model's, the data's or the trainer's."""

    out: str = "runs/sequence"
    steps: Optional[int] = None  # override every task's steps
    checkpoint_every: int = 100  # Lightning checkpoint interval (steps) for mid-task resume
    keep_checkpoints: bool = False  # keep each task's Lightning checkpoint after its row is saved
    progress: str = "rich"  # rich | tqdm | none
    label: Optional[str] = None  # the run's name in reports (default: the method config's name)


@dataclass
class Continual:
    """How tasks chain, and an optional merge after each task (merge-based continual methods).

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
    """

    init: Literal["sequential", "independent"] = "sequential"
    merge: Optional[str] = None
    hparams: dict[str, Any] = field(default_factory=dict)
    memory: Optional[ExemplarMemory] = None


def is_rank_zero() -> bool:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", os.environ.get("SLURM_PROCID", "0")))) == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def say(text: str) -> None:
    if is_rank_zero():
        print(text, flush=True)


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
    """Runs one benchmark with one method configuration; see the module docstring."""

    def __init__(self, parser, cfg) -> None:
        from zscl.datasets import load_custom_datasets

        self.parser, self.cfg = parser, cfg
        if cfg.data.custom_datasets:  # user datasets must exist before task names are checked
            load_custom_datasets(cfg.data.custom_datasets, data_root=cfg.data.data_root)
        self.opts = RunOptions(**{k: cfg[k] for k in vars(RunOptions())})
        continual = dict(vars(cfg.continual))
        if continual.get("memory") is not None:
            continual["memory"] = ExemplarMemory(**vars(continual["memory"]))
        self.continual = Continual(**continual)
        self.out = Path(self.opts.out)
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
        if self.continual.merge is not None:
            from zscl.merging import MERGE_RULES

            MERGE_RULES.get(self.continual.merge)
        ref = self.cfg.data.reference_images
        if ref is not None and ref.source == "memory" and self.continual.memory is None:
            raise ValueError("data.reference_images.source 'memory' needs an exemplar memory: set continual.memory "
                             "(see configs/method/icarl.yaml)")
        missing = self._missing_inputs()
        if missing:
            raise FileNotFoundError(f"{len(missing)} input(s) of this sequence are missing (nothing was run): "
                                    + " | ".join(missing))

    def _missing_inputs(self) -> list[str]:
        """One line per missing dataset (naming its splits and expected layout) or missing reference data."""
        from zscl.datasets import build_dataset, get_dataset
        from zscl.methods.config import Distillation

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
        distill = self.cfg.model.distill
        if distill is not None and Distillation(**vars(distill)).active:
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
    def _results_path(self) -> Path:
        return self.out / "results.json"

    def _load_results(self) -> dict[str, Any]:
        path = self._results_path()
        if path.exists():
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
            if old.get("tasks") != self.task_names or old.get("datasets") != self.eval_names:
                raise ValueError(f"{path} belongs to another sequence ({old.get('tasks')}); use a new --out")
            return old
        return {"benchmark": self.cfg.benchmark.name, "method": self.method_label(), "tasks": self.task_names,
                "datasets": self.eval_names, "accuracy": [], "top5": [], "zero_shot": None, "zero_shot_top5": None,
                "timing": []}

    def method_label(self) -> str:
        """``--label``, else the name of the last ``configs/method/<name>.yaml`` given, else the out folder's name."""
        if self.opts.label:
            return self.opts.label
        methods = [Path(str(c)).stem for c in (self.cfg.get("config") or []) if Path(str(c)).parent.name == "method"]
        return methods[-1] if methods else self.out.name

    def _save(self) -> None:
        if is_rank_zero():
            self.results["config"] = json.loads(self.parser.dump(self.cfg, format="json", skip_none=False))
            self.results["versions"] = versions()
            write_json_atomic(self._results_path(), self.results)
        barrier()

    def _slug(self, k: int) -> str:
        return f"{k:02d}-{self.task_names[k]}"

    def _export_path(self, k: int) -> Path:
        return self.out / "checkpoints" / f"{self._slug(k)}.safetensors"

    # ------------------------------------------------------------------ building blocks
    def _task_cfg(self, k: int, init_from: Optional[str], eval_only: bool = False):
        cfg = copy.deepcopy(self.cfg)
        for key, value in _flatten("", task_overlay(self.tasks[k])).items():
            cfg[key] = value
        cfg["model.init_from"] = init_from
        cfg["model.export_path"] = None
        cfg["data.eval_datasets"] = self.eval_names
        cfg["data.seed"] = self.cfg.data.seed + k
        if self.opts.steps is not None:
            cfg["trainer.max_steps"] = self.opts.steps
        if eval_only:
            cfg["model.distill"] = None  # no teacher needed to evaluate
            cfg["model.averaging"] = None
        elif self.cfg.data.reference_images is not None and self.cfg.data.reference_images.source == "memory":
            if k == 0:
                cfg["model.distill"] = None  # no exemplars before the first task: plain fine-tuning
            else:
                # absolute: data paths are read relative to the data root, the memory lives under --out
                cfg["data.reference_images.path"] = str(self._memory_path(k - 1).resolve())
        return cfg

    def _instantiate(self, cfg):
        L.seed_everything(int(self.cfg.seed_everything), workers=True, verbose=False)
        init = self.parser.instantiate_classes(cfg)
        return init.model, init.data, dict(init.trainer)

    def _trainer(self, kwargs: dict[str, Any], k: Optional[int], description: str) -> L.Trainer:
        kwargs = dict(kwargs)
        callbacks = list(kwargs.pop("callbacks", None) or [])
        bar = progress_bar(self.opts.progress, description)
        callbacks += [bar] if bar is not None else []
        if k is not None:
            ckpt_dir = self.out / "tasks" / self._slug(k)
            callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=self.opts.checkpoint_every,
                                             save_top_k=0, save_last=True, save_on_exception=False))
            hooks = [kill_callback(k), pause_callback(k)]  # test hooks: only when ZSCL_KILL_AT / ZSCL_PAUSE_AT name task k
            callbacks += [h for h in hooks if h is not None]
            label = f"task {k + 1}/{len(self.tasks)} ({self._slug(k)})"
            callbacks.append(signals.StopOnSignal(label, str(ckpt_dir / "last.ckpt")))  # SIGTERM/SIGINT/SIGUSR1
            kwargs["logger"] = [CSVLogger(self.out / "logs", name="csv", version=self._slug(k)),
                                TensorBoardLogger(self.out / "logs", name="tb", version=self._slug(k))]
        else:
            kwargs["logger"] = False
        kwargs.update(callbacks=callbacks, enable_progress_bar=bar is not None, max_epochs=-1,
                      num_sanity_val_steps=0, enable_model_summary=False, default_root_dir=str(self.out),
                      plugins=[AtomicCheckpointIO(), *signals.cluster_plugins()])
        return L.Trainer(**kwargs)

    def _evaluate(self, trainer: L.Trainer, module, dm) -> tuple[list[float], list[float]]:
        trainer.validate(module, datamodule=dm, verbose=False)
        res = module.eval_results
        excluded = {n: dm.excluded_test_images.get(n, []) for n in self.eval_names}  # --allow-bad-test-images
        self.results["excluded_test_images"] = {n: len(paths) for n, paths in excluded.items()}
        self.results["excluded_test_image_paths"] = {n: paths for n, paths in excluded.items() if paths}
        return [res[n].top1 for n in self.eval_names], [res[n].top5 for n in self.eval_names]

    # ------------------------------------------------------------------ the sequence
    def run(self) -> dict[str, Any]:
        n = len(self.tasks)
        say(f"zscl sequence: {self.cfg.benchmark.name}, {n} tasks -> {self.out}")
        if self.results["zero_shot"] is None:
            self._zero_shot()
        for k in range(n):
            if k < len(self.results["accuracy"]):
                continue
            signals.stop_if_requested(f"before task {k + 1}/{n} ({self._slug(k)})")
            self._task(k)
        self._finish()
        return self.results

    def _zero_shot(self) -> None:
        say("row 0: zero-shot evaluation of the initial model")
        model, dm, kw = self._instantiate(self._task_cfg(0, self.cfg.model.init_from, eval_only=True))
        top1, top5 = self._evaluate(self._trainer(kw, None, "zero-shot"), model, dm)
        self.results["zero_shot"], self.results["zero_shot_top5"] = top1, top5
        self._save()
        say(self._row_text("zero-shot", top1))

    def _trained_path(self, k: int) -> Path:
        """Where a merge-based method keeps task k's fine-tuned (unmerged) weights."""
        return self.out / "trained" / f"{self._slug(k)}.safetensors"

    def _start_point(self, k: int) -> Optional[str]:
        if k == 0 or self.continual.init == "independent":
            return self.cfg.model.init_from
        prev = self._trained_path(k - 1) if self.continual.merge else self._export_path(k - 1)
        return str(prev)

    def _task(self, k: int) -> None:
        name, export = self.task_names[k], self._export_path(k)
        title = f"task {k + 1}/{len(self.tasks)}: {name}"
        trained = self._trained_path(k) if self.continual.merge else export
        t0 = time.time()
        if not trained.exists():
            self._fit(k, title, trained)
        if not export.exists():
            self._merge_up_to(k)
        if self.continual.memory is not None and not self._memory_path(k).exists():
            self._update_memory(k)
        t1 = time.time()
        say(f"{title}: evaluating {export}")
        model, dm, kw = self._instantiate(self._task_cfg(k, str(export), eval_only=True))
        top1, top5 = self._evaluate(self._trainer(kw, None, title), model, dm)
        self.results["accuracy"].append(top1)
        self.results["top5"].append(top5)
        self.results["timing"].append({"task": name, "train_s": round(t1 - t0, 2), "eval_s": round(time.time() - t1, 2)})
        self._save()
        say(self._row_text(f"after {name}", top1))
        if not self.opts.keep_checkpoints and is_rank_zero():
            (self.out / "tasks" / self._slug(k) / "last.ckpt").unlink(missing_ok=True)

    def _fit(self, k: int, title: str, target: Path) -> None:
        """Train task k (resuming from its last Lightning checkpoint if any) and export to ``target``."""
        model, dm, kw = self._instantiate(self._task_cfg(k, self._start_point(k)))
        trainer = self._trainer(kw, k, title)
        ckpt = self.out / "tasks" / self._slug(k) / "last.ckpt"
        resume = str(ckpt) if ckpt.exists() else None
        signals.refuse_hpc_checkpoints(self.out)  # our checkpoint is the only one a task resumes from
        say(f"{title}: {trainer.max_steps} steps, lr {model.hparams.lr:g}" + (f", resuming from {ckpt}" if resume else ""))
        trainer.fit(model, datamodule=dm, ckpt_path=resume)
        model.export_weights(str(target))
        bad = list(dm.bad_images.paths)  # unreadable training/reference images, replaced (data.on_bad_image)
        self.results.setdefault("bad_images", {})[self.task_names[k]] = len(bad)
        self.results.setdefault("bad_image_paths", {})[self.task_names[k]] = bad[:100]
        barrier()

    def _train_dataset(self, k: int) -> str:
        """The dataset task k trains on (a few-shot runner trains on a view of it)."""
        return self.task_names[k]

    def _memory_path(self, k: int) -> Path:
        """iCaRL's exemplar memory after task k (:mod:`zscl.reference.memory`)."""
        return self.out / "memory" / f"{self._slug(k)}.json"

    def _update_memory(self, k: int) -> None:
        """Herd task k's exemplars with its exported (just-trained) weights; rank 0 writes the file."""
        from zscl.datasets import build_dataset
        from zscl.reference.memory import candidate_features, read_memory, update_memory, write_memory

        if is_rank_zero():
            cfg, name = self.continual.memory, self._train_dataset(k)
            model, dm, _ = self._instantiate(self._task_cfg(k, str(self._export_path(k)), eval_only=True))
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
            clip = model.clip.to(device).eval()
            dataset = build_dataset(name, dm.data_root, "train", model.bundle.test_transform)
            say(f"  exemplar memory: herding {name} with its trained weights ({min(cfg.candidates, len(dataset))} candidates)")
            indices, labels, feats = candidate_features(lambda x: clip.encode_image(x.to(device)), dataset, cfg.candidates,
                                                        batch_size=dm.eval_batch_size)
            memory = read_memory(self._memory_path(k - 1)) if k > 0 else {}
            write_memory(self._memory_path(k), update_memory(memory, cfg, name, indices, labels, feats))
        barrier()

    def _initial_weights(self) -> Path:
        """The initial model's state dict as a file (the base of merge-based methods), written once."""
        path = self.out / "trained" / "initial.safetensors"
        if not path.exists():
            model, _, _ = self._instantiate(self._task_cfg(0, self.cfg.model.init_from, eval_only=True))
            model.export_weights(str(path))
            barrier()
        return path

    def _merge_up_to(self, k: int) -> None:
        """Merged export of task k: the rule over the initial weights and the trained weights of tasks 0..k."""
        from zscl.merging import merge, open_state_dict
        from zscl.models import save_state_dict

        c = self.continual
        base = open_state_dict(self._initial_weights())
        models = [open_state_dict(self._trained_path(i)) for i in range(k + 1)]
        say(f"  merging {k + 1} task(s) with {c.merge} {c.hparams or ''}")
        if is_rank_zero():
            merged = merge(c.merge, base, models, **c.hparams)
            save_state_dict(merged, self._export_path(k), metadata={"merge": c.merge, "hparams": json.dumps(c.hparams)})
        barrier()

    def _row_text(self, label: str, row: list[float]) -> str:
        cells = "  ".join(f"{n[:10]}={v:.1f}" for n, v in zip(self.eval_names, row))
        return f"  {label:<24} {cells}"

    def _finish(self) -> None:
        from zscl.evaluation.metrics import AccuracyMatrix, format_table, summarize

        if self.eval_names != self.task_names:
            say("evaluation datasets differ from the task list: Transfer/Avg/Last need a square matrix; skipped")
            return
        m = AccuracyMatrix(self.eval_names, self.results["accuracy"], self.results["zero_shot"])
        summary = summarize(m)
        self.results["metrics"] = summary
        self._save()
        say(format_table(m, summary))
        for key, what in (("excluded_test_images", "unreadable test images excluded (--allow-bad-test-images)"),
                          ("bad_images", "unreadable training/reference images replaced")):
            counts = {n: c for n, c in (self.results.get(key) or {}).items() if c}
            if counts:
                say(f"{what}: " + ", ".join(f"{n} {c}" for n, c in counts.items()))
        say(f"wrote {self._results_path()}")
