"""ZSCL's unlabeled reference data: images (ImageNet in the paper) and texts (CC captions)."""

from zscl.reference.images import ReferenceImages, reference_image_dataset, reference_wds_stream
from zscl.reference.texts import ReferenceTexts, reference_text_tokens, reference_texts

__all__ = [
    "ReferenceImages",
    "ReferenceTexts",
    "reference_image_dataset",
    "reference_text_tokens",
    "reference_texts",
    "reference_wds_stream",
]
