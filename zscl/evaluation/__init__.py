"""zscl.evaluation."""
