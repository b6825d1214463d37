"""A tiny two-task world in real on-disk formats, for end-to-end tests of training and the runner.

Task images are ImageFolder trees of class-coloured 32 px PNGs; the reference pool is a folder of
PNGs plus a Conceptual-Captions-style TSV (``filepath``, ``title``). Tasks are registered as user
datasets through the same YAML mechanism users have.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

TASKS = {
    "TinyColors": ["red", "green", "blue"],
    "TinyStripes": ["horizontal", "vertical"],
}
PALETTE = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def _image(task: str, cls: str, rng: np.random.Generator) -> Image.Image:
    arr = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
    if task == "TinyColors":
        arr[8:24, 8:24] = PALETTE[cls]
    else:
        for i in range(0, 32, 4):
            if cls == "horizontal":
                arr[i:i + 2, :] = 230
            else:
                arr[:, i:i + 2] = 230
    return Image.fromarray(arr)


def make_tiny_world(root: Path, per_class: int = 6, seed: int = 0) -> Path:
    """Write the world under ``root`` and return the custom-datasets YAML path."""
    rng = np.random.default_rng(seed)
    for task, classes in TASKS.items():
        for split, n in (("train", per_class), ("test", max(2, per_class // 2))):
            for cls in classes:
                folder = root / "tiny" / task / split / cls
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    _image(task, cls, rng).save(folder / f"{i}.png")
    ref = root / "tiny" / "reference"
    (ref / "images").mkdir(parents=True, exist_ok=True)
    lines = ["filepath\ttitle"]
    for i in range(12):
        task = list(TASKS)[i % 2]
        cls = TASKS[task][i % len(TASKS[task])]
        _image(task, cls, rng).save(ref / "images" / f"{i}.png")
        lines.append(f"images/{i}.png\ta picture of {cls} things")
    (ref / "captions.tsv").write_text("\n".join(lines) + "\n")
    yaml_path = root / "tiny" / "datasets.yaml"
    entries = [f"- name: {t}\n  kind: imagefolder\n  path: tiny/{t}\n  templates: ['a photo of {{c}}.', 'an image of {{c}}.']"
               for t in TASKS]
    yaml_path.write_text("\n".join(entries) + "\n")
    return yaml_path


def _settings(root: Path, dataset: str = "", lr: str = "", trainer: str = "") -> str:
    """The model / data / trainer sections shared by the tiny benchmark and task configs."""
    return f"""model:
  clip: zscl-tiny-vit
  pretrained: null
  warmup_steps: 2{lr}
data:{dataset}
  data_root: {root}
  batch_size: 4
  eval_batch_size: 8
  num_workers: 0
  custom_datasets: {root / 'tiny' / 'datasets.yaml'}
  cache_dir: {root / 'cache'}
  reference_images: {{source: folder, path: tiny/reference/images}}
  reference_texts: {{source: captions, path: tiny/reference/captions.tsv}}
trainer:
  accelerator: cpu
  log_every_n_steps: 2{trainer}
"""


def benchmark_yaml(root: Path, steps: int = 4) -> Path:
    """A benchmark config over the tiny tasks with a tiny random-init CLIP (for ``zscl sequence``)."""
    path = root / "tiny" / "benchmark.yaml"
    path.write_text(f"""benchmark:
  name: tiny
  tasks:
    - {{dataset: TinyColors, lr: 1.0e-3, steps: {steps}}}
    - {{dataset: TinyStripes, lr: 1.0e-3, steps: {steps}}}
  method_overrides:
    rail_primal: {{model: {{width: 256}}}}  # a tiny CLIP needs no 15,000-wide layer (1.8 GB of statistics)
""" + _settings(root))
    return path


def task_yaml(root: Path, path: Path, dataset: str, steps: int, default_root_dir: Path) -> Path:
    """A single-task config of the tiny world (for ``zscl fit``)."""
    path.write_text(_settings(root, dataset=f"\n  dataset: {dataset}", lr="\n  lr: 1.0e-3",
                              trainer=f"\n  max_steps: {steps}\n  default_root_dir: {default_root_dir}"))
    return path


def world_with_start(root: Path, steps: int) -> Path:
    """The tiny world, its benchmark, and ``tiny/start.safetensors``: other weights than the initial (teacher)
    ones, so that a ZSCL run distils with a gradient from the first step on and teacher and WC anchor differ."""
    import torch

    from zscl.models import load_clip, save_state_dict

    make_tiny_world(root)
    benchmark_yaml(root, steps=steps)
    torch.manual_seed(1)
    save_state_dict(load_clip("zscl-tiny-vit").model.state_dict(), root / "tiny" / "start.safetensors")
    return root
