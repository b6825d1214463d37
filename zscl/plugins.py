"""Packages that add entries to zscl's registries (datasets, pretrained weights, methods, settings, hooks).

A plugin is a module with a ``register()`` function. zscl's own optional parts are plugins
(:data:`BUILTIN`: the synthetic world registers its tasks and its tiny CLIP's weights), and so is a
user's package that declares an entry point in the ``zscl.plugins`` group::

    [project.entry-points."zscl.plugins"]
    mypackage = "mypackage.zscl_plugin"

The registries call :func:`load_plugins` on their first lookup, so the core packages never import
a plugin, and a plugin is loaded only when a registry is used.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

BUILTIN: tuple[str, ...] = ("zscl.synthetic.registration",)
GROUP = "zscl.plugins"
_state = {"loaded": False}


def plugin_modules() -> list[str]:
    """The built-in plugin modules, then those of installed packages' ``zscl.plugins`` entry points."""
    return list(BUILTIN) + [ep.value for ep in entry_points(group=GROUP)]


def load_plugins() -> None:
    """Import every plugin module and call its ``register()``, once per process."""
    if _state["loaded"]:
        return
    _state["loaded"] = True  # first: a plugin's registrations look up the registries, which call back here
    for name in plugin_modules():
        module = importlib.import_module(name.split(":")[0])
        register = getattr(module, "register", None)
        if callable(register):
            register()
