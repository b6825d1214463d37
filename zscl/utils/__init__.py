"""Small helpers shared across zscl (atomic file writes, seeding)."""
