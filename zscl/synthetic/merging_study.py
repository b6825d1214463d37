"""``zscl demo --merging``: every merge rule on the synthetic benchmark.

One model is fine-tuned per held-in task from the tiny pretrained CLIP (the runner with
``continual.init: independent``), then the fine-tunes are merged with every rule of
:data:`zscl.merging.MERGE_RULES` that applies to dense, independently fine-tuned models, and
each merge is scored by (a) its mean accuracy over the held-in tasks and (b) its zero-shot
accuracy on held-out tasks it never saw. The plan (tasks, steps, rules and their
hyperparameters) is ``merging:`` in ``configs/demo.yaml``.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any, Callable

import torch

from zscl.synthetic.demo import DemoOptions, demo_world, load_plan


def _finetune_each(plan: dict, opts: DemoOptions, world_root: Path, out: Path) -> dict:
    """One independent fine-tune per held-in task through the real runner; returns its results."""
    from zscl.runner.build import build_runner
    from zscl.utils.io import write_text_atomic

    import yaml

    study = plan["merging"]
    steps = study["quick_steps"] if opts.quick else study["steps"]
    bench = {"benchmark": {"name": "synthetic-merging",
                           "tasks": [{"dataset": t, "lr": study["lr"], "steps": steps} for t in study["held_in"]],
                           "eval_datasets": study["held_in"] + study["held_out"]},
             "continual": {"init": "independent"}}
    bench_file = out / "finetunes.yaml"
    write_text_atomic(bench_file, yaml.safe_dump(bench, sort_keys=False))
    from zscl.resources import configs_dir

    argv = ["--config", str(configs_dir() / plan["benchmark"]), "--config", str(configs_dir() / "method/finetune.yaml"),
            "--config", str(bench_file), "--out", str(out / "finetunes"), "--data.data_root", str(world_root),
            "--progress", opts.progress, "--seed_everything", str(opts.seed)]
    return build_runner(argv).run()


def _final_losses(run_dir: Path, slugs: list[str]) -> list[float]:
    """Each fine-tune's last logged training loss (the metric of metric-weighted averaging)."""
    losses = []
    for slug in slugs:
        rows = [r for r in csv.DictReader(open(run_dir / "logs" / "csv" / slug / "metrics.csv")) if r.get("train/loss")]
        losses.append(float(rows[-1]["train/loss"]))
    return losses


class Scorer:
    """Zero-shot accuracy of state dicts on synthetic tasks (one reusable tiny CLIP, cached test images)."""

    def __init__(self, world_root: Path, cache_dir: Path, model: str, pretrained: str) -> None:
        from zscl.models import load_clip

        self.bundle = load_clip(model, pretrained)
        self.initial = {k: v.clone() for k, v in self.bundle.model.state_dict().items()}
        self.world_root, self.cache_dir = world_root, cache_dir

    def accuracy(self, state: dict[str, torch.Tensor], datasets: list[str], split: str = "test") -> dict[str, float]:
        from zscl.evaluation.zeroshot import evaluate_dataset
        from zscl.models import load_weights

        load_weights(self.bundle.model, state)
        return {d: evaluate_dataset(self.bundle, d, str(self.world_root), split=split, batch_size=256,
                                    cache_dir=str(self.cache_dir), progress=False)[0].top1 for d in datasets}


def _fishers(scorer: Scorer, models: list[dict], tasks: list[str], n: int) -> list[dict]:
    """A diagonal Fisher per fine-tune on its own task's training images (true Fisher, sampled labels)."""
    from zscl.datasets import build_dataset, get_dataset
    from zscl.merging import estimate_fisher, zero_shot_logits_fn
    from zscl.models import load_weights

    fishers = []
    for state, task in zip(models, tasks):
        model = scorer.bundle.model
        load_weights(model, state)
        ds = build_dataset(task, scorer.world_root, "train", scorer.bundle.test_transform)
        loader = torch.utils.data.DataLoader(ds, batch_size=16, shuffle=False)
        tokens = scorer.bundle.tokenizer(get_dataset(task).prompts())
        fishers.append(estimate_fisher(model.requires_grad_(True), loader, n, "sampled", zero_shot_logits_fn(tokens)))
    return fishers


def _merges(study: dict, scorer: Scorer, models: list[dict], losses: list[float]) -> dict[str, Callable[[], dict]]:
    """Rule name -> a thunk producing the merged state dict (each rule with the plan's hyperparameters)."""
    from zscl.merging import merge

    base, held_in = scorer.initial, study["held_in"]
    rules: dict[str, Callable[[], dict]] = {}
    for name, hp in study["rules"].items():
        hp = dict(hp or {})
        if name == "greedy_soup":
            # held-out-of-test selection: mean accuracy on the held-in tasks' *training* images
            hp["score"] = lambda sd: sum(scorer.accuracy(sd, held_in, split="train").values())
        elif name == "fisher":
            rules[name] = lambda hp=hp: merge("fisher", None, models, fishers=_fishers(scorer, models, held_in, hp["n"]))
            continue
        elif name == "mwa":
            hp["metrics"] = losses
        elif name == "wise":  # WiSE-FT of the uniform soup against the initial model
            rules[name] = lambda hp=hp: merge("wise", base, [merge("average", None, models)], **hp)
            continue
        rules[name] = lambda name=name, hp=hp: merge(name, base, models, **hp)
    return rules


def _row(scorer: Scorer, state: dict, study: dict) -> dict[str, float]:
    acc = scorer.accuracy(state, study["held_in"] + study["held_out"])
    held_in = sum(acc[d] for d in study["held_in"]) / len(study["held_in"])
    held_out = sum(acc[d] for d in study["held_out"]) / len(study["held_out"])
    return {"held_in": held_in, "held_out": held_out, **acc}


def _write(rows: dict[str, dict], study: dict, out: Path, elapsed: float) -> None:
    from zscl.evaluation.plots import plot_metric_panels
    from zscl.utils.io import write_json_atomic, write_text_atomic

    cols = study["held_in"] + study["held_out"]
    head = "| model | held-in mean | held-out mean (zero-shot) | " + " | ".join(cols) + " |"
    lines = [head, "|" + "---|" * (3 + len(cols))]
    lines += [f"| {n} | {r['held_in']:.1f} | {r['held_out']:.1f} | " + " | ".join(f"{r[c]:.1f}" for c in cols) + " |"
              for n, r in rows.items()]
    table = "\n".join(lines)
    text = ["# zscl demo --merging: merge rules on the synthetic benchmark", "",
            f"Fine-tuned independently from the tiny pretrained CLIP on {', '.join(study['held_in'])}; "
            f"held-out tasks (never trained): {', '.join(study['held_out'])}. Total time {elapsed:.0f} s.", "",
            table, "", "![merging](merging.png)", "",
            "`sparse_soup` is not run: it needs models that share a pruning mask, and these fine-tunes are dense."]
    write_text_atomic(out / "report.md", "\n".join(text) + "\n")
    write_json_atomic(out / "results.json", rows)
    panels = {"held_in": f"held-in tasks ({', '.join(study['held_in'])})",
              "held_out": f"held-out tasks, zero-shot ({', '.join(study['held_out'])})"}
    plot_metric_panels(rows, out / "merging.png", panels, title="merging independent fine-tunes of the tiny CLIP")
    print("\n" + table + f"\n\nwrote {out / 'report.md'}, {out / 'results.json'}, {out / 'merging.png'}")


def run_merging_study(opts: DemoOptions) -> dict[str, Any]:
    from zscl.utils.quiet import quiet_lightning

    quiet_lightning()
    plan, t0 = load_plan(), time.time()
    study = plan["merging"]
    out = Path(opts.out) / "merging"
    world = demo_world(opts.out, opts, [*study["held_in"], *study["held_out"]])
    print(f"synthetic world {'reused' if world.reused else 'generated'} at {world.root}")
    results = _finetune_each(plan, opts, Path(opts.out) / "world", out)
    slugs = [f"{k:02d}-{t}" for k, t in enumerate(study["held_in"])]
    from zscl.merging import open_state_dict

    models = [dict(open_state_dict(out / "finetunes" / "checkpoints" / f"{s}.safetensors")) for s in slugs]
    scorer = Scorer(Path(opts.out) / "world", out / "cache", "zscl-synth-tiny", "synthetic")
    rows = {"zero-shot (initial)": _row(scorer, scorer.initial, study)}
    rows.update({f"fine-tuned on {t}": _row(scorer, m, study) for t, m in zip(study["held_in"], models)})
    for name, make in _merges(study, scorer, models, _final_losses(out / "finetunes", slugs)).items():
        print(f"merging with {name} ...")
        rows[name] = _row(scorer, make(), study)
    _write(rows, study, out, time.time() - t0)
    return {"rows": rows, "finetunes": results}
