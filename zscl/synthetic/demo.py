"""``zscl demo``: the synthetic benchmark end to end, on the package's real code paths.

The plan is data (``configs/demo.yaml``): which methods run, their labels, the one scale-down that
maps the paper's recipe to 100-step tasks on a tiny CLIP (the same for every method), and the
acceptance checks. For each method the demo runs exactly what
``zscl sequence --config benchmark/synthetic --config method/<m> --config <scale overrides>`` runs —
world files on disk, the dataset registry, the LightningModule, the runner — then writes:

* ``DIR/<method>/results.json`` (and the runner's checkpoints and logs);
* ``DIR/report.md``: methods x Transfer/Avg/Last, per-dataset tables, the acceptance checks;
* ``DIR/plots/``: an accuracy-matrix heatmap per method, the zero-shot transfer curve of every method,
  and the Transfer/Avg/Last bars.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import yaml

from zscl.resources import configs_dir


@dataclass
class DemoOptions:
    """Options of ``zscl demo``."""

    out: str = "runs/demo"
    quick: bool = False  # a smaller world, fewer steps and methods: under 90 s (the test suite's run)
    methods: Optional[list[str]] = None  # default: the plan's list (quick: its quick list)
    ablations: bool = False  # the plan's ablation list (ZSCL's parts one at a time) instead of its default
    seed: int = 0
    progress: str = "rich"  # rich | tqdm | none
    merging: bool = False  # the merging study instead of the continual comparison
    setting: str = "mtil"  # mtil | cil | fewshot | xtail: which synthetic benchmark (configs/demo.yaml: settings)
    check: bool = True  # a failed acceptance check makes ``zscl demo`` exit non-zero (``--no-check``: print only)


def load_plan(setting: str = "mtil") -> dict[str, Any]:
    """The demo plan; for another setting (``cil``, ``fewshot``, ``xtail``), with its benchmark, methods, quick
    mode and acceptance thresholds (a setting's own: the MTIL thresholds never apply to it)."""
    with open(configs_dir() / "demo.yaml", encoding="utf-8") as f:
        plan = yaml.safe_load(f)
    plan["setting"] = setting
    if setting == "mtil":
        return plan
    if setting not in plan.get("settings", {}):
        raise ValueError(f"unknown demo setting {setting!r}; choose mtil, {', '.join(plan.get('settings', {}))}")
    block = plan["settings"][setting]
    quick = {k: v for k, v in plan["quick"].items() if k != "acceptance"}
    plan.update(benchmark=block["benchmark"], default=block["default"], quick={**quick, **block.get("quick", {})},
                published=block.get("published"), acceptance=block.get("acceptance") or {})
    if block.get("scale") is False:
        plan["scale"] = {}
    return plan


def acceptance_rules(plan: dict, quick: bool) -> dict[str, Any]:
    """The thresholds a run checks: the plan's ``acceptance``, or with ``quick`` its quick block's (the quick world
    is smaller and runs fewer steps, so its bounds are its own, measured on seeds 0-4)."""
    return dict((plan["quick"].get("acceptance") if quick else plan.get("acceptance")) or {})


def scale_overrides(plan: dict, method_config: Path) -> dict:
    """The plan's one scale-down, written for one method config: every averaging rule with an interval
    gets ``scale.averaging_every``; an exemplar memory gets ``scale.memory_size``. Nothing else, so no
    method is tuned on its own."""
    scale = plan.get("scale") or {}
    with open(method_config, encoding="utf-8") as f:
        cfg = yaml.safe_load(f) or {}
    out: dict = {}
    rules = (cfg.get("model") or {}).get("averaging") or []
    if "averaging_every" in scale and any("every" in r for r in rules):
        out["model"] = {"averaging": [{**r, "every": scale["averaging_every"]} if "every" in r else r for r in rules]}
    memory = (cfg.get("continual") or {}).get("memory")
    if "memory_size" in scale and memory:
        out["continual"] = {"memory": {**memory, "size": scale["memory_size"]}}
    return out


def _method_argv(plan: dict, name: str, opts: DemoOptions, world_root: Path, out: Path) -> list[str]:
    """The ``zscl sequence`` arguments of one method, its scale overrides written as a config file."""
    from zscl.utils.io import write_text_atomic

    spec = plan["methods"][name]
    overrides = scale_overrides(plan, configs_dir() / spec["config"])
    if opts.quick:
        overrides = _deep_merge(overrides, plan["quick"].get("overrides") or {})
    override_file = out / "demo_overrides.yaml"
    write_text_atomic(override_file, yaml.safe_dump(overrides or {}, sort_keys=False))
    argv = ["--config", str(configs_dir() / plan["benchmark"]), "--config", str(configs_dir() / spec["config"]),
            "--config", str(override_file), "--out", str(out), "--data.data_root", str(world_root),
            "--progress", opts.progress, "--seed_everything", str(opts.seed)]
    if opts.quick and plan["quick"].get("steps"):
        argv += ["--steps", str(plan["quick"]["steps"])]
    return argv


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def run_method(plan: dict, name: str, opts: DemoOptions, world_root: Path) -> dict:
    """One method's sequence through the real runner (resumes if its folder already has rows)."""
    from zscl.runner.build import build_runner

    out = Path(opts.out) / name
    return build_runner(_method_argv(plan, name, opts, world_root, out)).run()


def _user_method(plan: dict, value: str) -> str:
    """A demo method name, or a method config's path (a user's own method): added to the plan under its ``name:``."""
    if value in plan["methods"] or not value.endswith((".yaml", ".yml")):
        return value
    from zscl.runner.configs import method_name

    path = Path(value).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"method config {value} not found")
    name = method_name(path) or path.stem
    plan["methods"][name] = {"label": name, "config": str(path)}
    return name


def methods_to_run(plan: dict, opts: DemoOptions) -> list[str]:
    if opts.ablations and (opts.methods or plan["setting"] != "mtil"):
        raise ValueError("--ablations picks the methods itself, on the MTIL-style benchmark: "
                         "use it without --methods and without --setting cil/fewshot/xtail")
    if opts.methods:
        names = [_user_method(plan, m) for m in opts.methods]
    elif opts.ablations:
        names = plan["ablations"]
    else:
        names = plan["quick"]["methods"] if opts.quick else plan["default"]
    unknown = [n for n in names if n not in plan["methods"]]
    if unknown:
        raise ValueError(f"unknown demo method(s) {unknown}; the plan has {list(plan['methods'])}")
    return list(names)


def _worker(plan: dict, name: str, opts: DemoOptions, world_root: Path, threads: int) -> dict:
    """One method in a worker process: its own torch threads, its output to ``<out>/<method>/log.txt``."""
    import contextlib

    import torch

    from zscl.utils.quiet import quiet_lightning

    torch.set_num_threads(threads)
    quiet_lightning()
    log = Path(opts.out) / name / "log.txt"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        return run_method(plan, name, opts, world_root)


def _rows_done(out: Path, names: list[str]) -> int:
    import json

    done = 0
    for name in names:
        try:
            res = json.loads((out / name / "results.json").read_text())
            done += len(res["accuracy"]) + (res["zero_shot"] is not None)
        except (FileNotFoundError, ValueError, KeyError):
            pass
    return done


def metric_cells(metrics: dict) -> str:
    """The line "Transfer 44.2  Avg 60.9  Last 73.9"; a metric that is None (Transfer of a one-task run) is left out."""
    return "  ".join(f"{k.title()} {metrics[k]:5.1f}" for k in ("transfer", "avg", "last") if metrics.get(k) is not None)


def _run_parallel(plan: dict, names: list[str], opts: DemoOptions, world_root: Path, jobs: int) -> dict[str, dict]:
    """Methods in ``jobs`` processes, one torch thread each: tiny models use one core poorly with two
    threads, and two processes keep both cores busy. A progress bar follows the rows written."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    out = Path(opts.out)
    total = len(names) * (1 + len(plan_tasks(plan)))
    results: dict[str, dict] = {}
    print(f"running {', '.join(names)} in {jobs} processes (logs: {out}/<method>/log.txt)")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_worker, plan, n, opts, world_root, 1): n for n in names}
        with tqdm(total=total, desc="rows of the accuracy matrices", unit="row", disable=opts.progress == "none") as bar:
            while len(results) < len(names):
                for fut, name in futures.items():
                    if name not in results and fut.done():
                        results[name] = fut.result()  # re-raises a worker's error here
                        m = results[name]["metrics"]
                        tqdm.write(f"  {plan['methods'][name]['label']:<20} {metric_cells(m)}")
                bar.update(_rows_done(out, names) - bar.n)
                time.sleep(0.5)
    return {n: results[n] for n in names}


def _benchmark(plan: dict) -> dict:
    with open(configs_dir() / plan["benchmark"], encoding="utf-8") as f:
        return yaml.safe_load(f)["benchmark"]


def world_tasks(plan: dict) -> list[str]:
    """The synthetic tasks the plan's benchmark reads (the world writes only these)."""
    from zscl.settings import setting_class

    bench = _benchmark(plan)
    return setting_class(bench).datasets_read(bench)


def plan_tasks(plan: dict) -> list:
    """The benchmark's tasks (for a class-incremental one: one per class step)."""
    from zscl.settings import setting_class

    bench = _benchmark(plan)
    return setting_class(bench).planned_tasks(bench)


def demo_world(out: str, opts: DemoOptions, tasks: list[str]) -> Any:
    """The WorldInfo of the world under ``OUT/world`` (generated or reused). One of another seed, size or version there means
    OUT holds another run, whose results the runner would resume: say so, and never overwrite it."""
    from zscl.synthetic.world import WorldMismatch, describe_world, generate_world

    try:
        return generate_world(Path(out) / "world", opts.seed, quick=opts.quick, tasks=tasks)
    except WorldMismatch as err:
        raise FileExistsError(
            f"{out} holds a demo run on another synthetic world ({describe_world(err.found)}); this run needs "
            f"{describe_world(err.wanted)}. Its results would be mixed with this run's: pass another --out, "
            f"or delete {out} to start over.") from None


def run_demo(opts: DemoOptions, jobs: Optional[int] = None) -> dict[str, Any]:
    """Generate (or reuse) the world, run every method, write the report and plots; returns the summary.

    ``jobs``: methods run at once (default: one per CPU core, at most 2 — and 1 when only one core).
    """
    import os

    from zscl.settings import setting_class
    from zscl.synthetic.report import REPORTS
    from zscl.utils.quiet import quiet_lightning

    quiet_lightning()
    plan = load_plan(opts.setting)
    names = methods_to_run(plan, opts)
    n_tasks = len(plan_tasks(plan))
    setting = setting_class(_benchmark(plan))
    kind = setting.result_kind
    if kind == "matrix" and n_tasks < 2:
        raise ValueError(f"the demo's benchmark ({plan['benchmark']}) has {n_tasks} task(s); Transfer and "
                         "the acceptance checks need at least two")
    world_root = Path(opts.out) / "world"  # one world for every setting
    t0 = time.time()
    world = demo_world(opts.out, opts, world_tasks(plan))
    if opts.setting != "mtil":  # each setting's runs and report in their own folder
        opts = replace(opts, out=str(Path(opts.out) / opts.setting))
    out = Path(opts.out)
    print(f"synthetic world {'reused' if world.reused else 'generated'} at {world.root} ({time.time() - t0:.1f} s)")
    jobs = jobs or max(1, min(2, len(names), os.cpu_count() or 1))
    if jobs > 1:
        results = _run_parallel(plan, names, opts, world_root, jobs)
    else:
        results = {}
        for i, name in enumerate(names):
            print(f"\n=== method {i + 1}/{len(names)}: {plan['methods'][name]['label']} ({name}) ===")
            results[name] = run_method(plan, name, opts, world_root)
    return REPORTS[kind](plan, names, results, out, time.time() - t0, quick=opts.quick, setting=setting,
                         rules=acceptance_rules(plan, opts.quick))
