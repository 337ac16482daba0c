"""One exception tree for prlnbd: the class of an error decides what happens next."""

from __future__ import annotations


class PrlNbdError(Exception):
    """Base of every error prlnbd raises on purpose."""


class ProtocolError(PrlNbdError):
    """The client broke the NBD protocol: the connection is closed."""


class RequestError(PrlNbdError):
    """One request fails with an NBD errno; the connection goes on."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno


class ImageError(PrlNbdError):
    """A Parallels image file is invalid or unusable."""


class InvalidHeader(ImageError):
    """The image header holds a value the format does not allow."""


class CorruptImage(ImageError):
    """The image's tables point where they must not (outside the file, duplicates)."""


class ExtensionError(ImageError):
    """The format extension or a dirty bitmap in it is invalid."""


class ImageBusy(ImageError):
    """The image is marked in use (unclean) and cannot be opened for writing."""


class ImageLocked(ImageBusy):
    """Another process holds the image file's locks (QEMU's lock bytes) in a way that forbids this open."""

    def __init__(self, message: str, holder: object | None = None) -> None:
        super().__init__(message)
        self.holder = holder


class DescriptorError(PrlNbdError):
    """DiskDescriptor.xml is invalid."""


class SnapshotChainError(DescriptorError):
    """The snapshot tree in DiskDescriptor.xml does not form one chain."""
