"""Continual-learning methods as one LightningModule configured by ``configs/method/*.yaml``."""

from zscl.methods.config import Distillation, Speed
from zscl.methods.datamodule import ContinualDataModule
from zscl.methods.module import ContinualCLIP

__all__ = ["ContinualCLIP", "ContinualDataModule", "Distillation", "Speed"]
