"""zscl: continual learning of CLIP without losing zero-shot transfer.

Importing the package does nothing but define names; heavy modules (torch, open_clip,
lightning) load when the submodule that needs them is imported.
"""

__version__ = "0.1.0"
