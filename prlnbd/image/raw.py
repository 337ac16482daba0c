"""A plain (raw) image: the root layer of some Parallels disks."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prlnbd.image.parallels import Problem, Segment, open_file


@dataclass
class RawImage:
    """A raw file holding every guest byte at the same offset; holes read as zeros."""

    path: Path
    fd: int
    writable: bool
    file_size: int
    problems: list[Problem] = field(default_factory=list)

    kind = "plain"
    cluster_size = 0
    extension = None

    @property
    def size(self) -> int:
        """The guest size this image covers: its file size."""
        return self.file_size

    @property
    def in_use(self) -> bool:
        """Raw images have no in-use flag."""
        return False

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, writable: bool = False) -> RawImage:
        """Open the raw file at PATH."""
        p, fd = open_file(path, writable=writable)
        return cls(path=p, fd=fd, writable=writable, file_size=os.fstat(fd).st_size)

    def close(self) -> None:
        """Close the file."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def segments(self, offset: int, length: int) -> Iterator[Segment]:
        """Split the range into data and holes (via SEEK_DATA) so holes read as zeros cheaply."""
        end = offset + length
        pos = offset
        while pos < end:
            if pos >= self.file_size:
                yield Segment(pos, end - pos, pos, zero=True)
                return
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    # A file system without SEEK_DATA: everything is data.
                    yield Segment(pos, end - pos, pos)
                    return
                data = self.file_size
            if data > pos:
                stop = min(end, data)
                yield Segment(pos, stop - pos, pos, zero=True)
                pos = stop
                continue
            hole = os.lseek(self.fd, pos, os.SEEK_HOLE)
            stop = min(end, hole)
            yield Segment(pos, stop - pos, pos)
            pos = stop

    def allocated_bytes(self) -> int:
        """Bytes of data the file holds (its allocated blocks)."""
        return os.fstat(self.fd).st_blocks * 512
