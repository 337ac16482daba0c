"""Parallels image files: the expandable format and plain (raw) images. Knows nothing of NBD."""
