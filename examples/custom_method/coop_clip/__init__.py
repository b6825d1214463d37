"""CoOp-style prompt learning as a zscl method, written only against zscl's public method contract."""

from coop_clip.method import CoOpCLIP

__all__ = ["CoOpCLIP"]
