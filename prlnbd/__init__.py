"""prlnbd: an NBD server for Parallels disks and their snapshot chains."""

__version__ = "0.1.0"
