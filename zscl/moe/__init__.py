"""MoE-Adapters (Yu et al., CVPR 2024): mixture-of-experts adapters in a frozen CLIP, one router
per task, activate-freeze, and the DDAS test-time selector.

``adapters`` (experts, routers, hooks), ``ddas`` (autoencoders, decision), ``module``
(:class:`MoEAdapterCLIP`, the LightningModule), ``export`` (adapter files beside the CLIP weights).
Importing this package imports torch only; ``MoEAdapterCLIP`` loads Lightning on first use.
"""

from zscl.moe.adapters import MoEAdapters, MoEConfig
from zscl.moe.ddas import DDASConfig, select_routes

__all__ = ["DDASConfig", "MoEAdapters", "MoEConfig", "select_routes"]
