"""Dataset registry: the 11 MTIL datasets, CIFAR10 and ImageNet, user datasets from config, and
their class names and prompt templates (data files under the top-level ``data/``)."""

from zscl.datasets.badimages import SafeImages, UnreadableImageError, UnreadableTestImagesError
from zscl.datasets.common import DatasetNotFoundError, LabeledImages, dataset_labels
from zscl.datasets.custom import (
    CustomDataset,
    csv_builder,
    imagefolder_builder,
    load_custom_datasets,
    register_custom,
)
from zscl.datasets.registry import (
    DATASETS,
    Builder,
    DatasetSpec,
    build_dataset,
    get_dataset,
    register_dataset,
)
from zscl.datasets.text import fill_template, load_classnames, load_templates

__all__ = [
    "DATASETS",
    "Builder",
    "CustomDataset",
    "DatasetNotFoundError",
    "DatasetSpec",
    "LabeledImages",
    "SafeImages",
    "UnreadableImageError",
    "UnreadableTestImagesError",
    "build_dataset",
    "csv_builder",
    "dataset_labels",
    "fill_template",
    "get_dataset",
    "imagefolder_builder",
    "load_classnames",
    "load_custom_datasets",
    "load_templates",
    "register_custom",
    "register_dataset",
]
