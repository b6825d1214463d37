"""zscl.runner."""
