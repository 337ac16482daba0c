"""Parallels disks: DiskDescriptor.xml and the snapshot chain. Knows nothing of NBD."""
