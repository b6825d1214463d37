"""Settings (protocols) as a registry: MTIL, class-incremental, few-shot, X-TAIL; a new setting is one registered class.

A setting owns how its tasks are built, how a task's model is evaluated, the shape of its rows in
``results.json`` and its summary metrics (:class:`~zscl.settings.base.Setting`). The sequence runner,
``zscl metrics``, ``zscl compare`` and ``zscl demo`` ask the setting and know none by name.
"""

from zscl.settings.base import SETTINGS, Setting, result_kind, setting_class, setting_for, setting_of
from zscl.settings.cil import ClassIncremental
from zscl.settings.few_shot import FewShotMTIL
from zscl.settings.xtail import XTAIL

__all__ = ["SETTINGS", "ClassIncremental", "FewShotMTIL", "Setting", "XTAIL", "result_kind", "setting_class", "setting_for", "setting_of"]
