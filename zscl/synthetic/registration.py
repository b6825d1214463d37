"""The synthetic world as a plugin (:mod:`zscl.plugins`): its tasks in the dataset registry and its
tiny CLIP's weights as ``load_clip("zscl-synth-tiny", "synthetic")``."""

from __future__ import annotations


def register() -> None:
    from zscl.models.loading import register_pretrained
    from zscl.synthetic.pretrain import synthetic_weights_path
    from zscl.synthetic.tasks import register_datasets

    register_datasets()
    # A registration made before (e.g. a test pointing the tag at other weights) is kept.
    from zscl.models.loading import is_registered_pretrained

    if not is_registered_pretrained("zscl-synth-tiny", "synthetic"):
        register_pretrained("zscl-synth-tiny", "synthetic", synthetic_weights_path)
