"""Continual-learning methods: the method contract (:class:`CLIPMethod`), ZSCL and the paper's
baselines (:class:`ContinualCLIP`, configured by ``configs/method/*.yaml``), and the data module.

A new method is one :class:`CLIPMethod` subclass and one YAML naming it as ``model_class``
(``docs/ADDING_A_METHOD.md``); :func:`zscl.runner.build.create_method` builds any method config's module.
"""

from zscl.methods.base import CLIPMethod
from zscl.methods.classes import load_export
from zscl.methods.config import Distillation, Speed
from zscl.methods.datamodule import ContinualDataModule
from zscl.methods.module import ContinualCLIP


__all__ = ["CLIPMethod", "ContinualCLIP", "ContinualDataModule", "Distillation", "Speed", "load_export"]
