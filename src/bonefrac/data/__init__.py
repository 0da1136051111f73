"""Data: MURA manifest and splits, synthetic MURA, validation, versioning."""
