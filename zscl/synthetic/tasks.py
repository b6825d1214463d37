"""The synthetic benchmark's tasks in the dataset registry (``SynthShape``, ``SynthColor``, ...).

Each task is an ImageFolder tree written by :func:`zscl.synthetic.world.generate_world` at
``<root>/synthetic/<Task>/{train,test}/<class name>/<n>.png``; class names and prompt templates
are data, in ``data/classnames/<Task>.json`` and ``data/templates/<Task>.json``.
The registry imports this module lazily and calls :func:`register_datasets`.
"""

from __future__ import annotations

from zscl.datasets import DatasetSpec, load_classnames, load_templates, register_dataset
from zscl.datasets.custom import imagefolder_builder
from zscl.synthetic.world import TASKS, WORLD_DIR

SYNTHETIC_TASKS: tuple[str, ...] = tuple(TASKS)
"""Task names in the benchmark's default order."""


def register_datasets() -> None:
    """Register every synthetic task (reads its class-name and template files)."""
    for name in SYNTHETIC_TASKS:
        register_dataset(DatasetSpec(
            name=name,
            classnames=load_classnames(name),
            templates=load_templates(name),
            builder=imagefolder_builder(f"{WORLD_DIR}/{name}"),
            layout=f"<root>/{WORLD_DIR}/{name}/{{train,test}}/<class name>/*.png "
                   "(zscl synthetic generate --root <root>)",
        ))
