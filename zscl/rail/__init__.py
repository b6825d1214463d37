"""RAIL (Xu et al., NeurIPS 2024): closed-form ridge heads on a frozen CLIP, fused with zero-shot CLIP,
and the union label space of the X-TAIL setting. Self-contained core; see docs/XTAIL_RAIL.md."""

from zscl.rail.fusion import fuse, fuse_columns, fuse_known_domain, restrict_to_domain
from zscl.rail.labelspace import UnionLabelSpace, build_union_classifier, union_label_space
from zscl.rail.ridge import DualRidge, KernelMemoryError, PrimalRidge, check_kernel_memory, kernel_bytes, rbf_kernel

__all__ = [
    "DualRidge",
    "KernelMemoryError",
    "PrimalRidge",
    "UnionLabelSpace",
    "build_union_classifier",
    "check_kernel_memory",
    "fuse",
    "fuse_columns",
    "fuse_known_domain",
    "kernel_bytes",
    "rbf_kernel",
    "restrict_to_domain",
    "union_label_space",
]
