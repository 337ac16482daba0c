"""One Parallels expandable image file: header, BAT, and the guest-to-host map."""

from __future__ import annotations

import bisect
import os
import sys
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prlnbd.errors import CorruptImage, ImageError, InvalidHeader
from prlnbd.image import format as fmt
from prlnbd.image.extension import Extension, read_extension


@dataclass
class Problem:
    """Something wrong in an image that opening tolerates but `check` reports."""

    kind: str  # "outside", "duplicate", "leak", "in_use", "data_off"
    message: str
    cluster: int | None = None


@dataclass
class Segment:
    """A piece of a guest range as one layer sees it.

    host is the byte offset in the layer's file, or None where the layer holds
    nothing and the parent layer shows through; zero marks bytes the layer
    holds but knows to read as zeros (a hole in a raw file).
    """

    offset: int
    length: int
    host: int | None
    zero: bool = False


def _read_exact(fd: int, length: int, offset: int) -> bytes:
    """Read LENGTH bytes at OFFSET, shorter only at end of file."""
    chunks = []
    while length > 0:
        data = os.pread(fd, length, offset)
        if not data:
            break
        chunks.append(data)
        length -= len(data)
        offset += len(data)
    return b"".join(chunks)


@dataclass
class ParallelsImage:
    """An open expandable image: its geometry, BAT and format extension."""

    path: Path
    fd: int
    writable: bool
    header: fmt.Header
    cluster_size: int
    data_off: int  # bytes
    file_size: int
    bat: array  # type: ignore[type-arg]  # host byte offset per guest cluster, 0 = none
    allocated: list[int]  # sorted guest cluster indices with a BAT entry
    extension: Extension | None = None
    problems: list[Problem] = field(default_factory=list)

    kind = "expandable"

    @property
    def size(self) -> int:
        """The disk size in bytes, as the header says."""
        return self.header.disk_sectors * fmt.SECTOR

    @property
    def version(self) -> int:
        """1 for "WithoutFreeSpace" images, 2 for "WithouFreSpacExt"."""
        return 1 if self.header.is_v1 else 2

    @property
    def format_name(self) -> str:
        """The magic string naming this image's variant."""
        return self.header.magic.decode("ascii")

    @property
    def in_use(self) -> bool:
        """Whether the header says the image is open or was not closed cleanly."""
        return self.header.in_use == fmt.IN_USE_OPEN

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, writable: bool = False) -> ParallelsImage:
        """Open and validate the image at PATH; raise ImageError naming what is wrong."""
        p = Path(path)
        try:
            fd = os.open(p, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        except OSError as e:
            raise ImageError(f"{p}: cannot open image: {e.strerror}") from e
        try:
            return cls._load(p, fd, writable)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def _load(cls, p: Path, fd: int, writable: bool) -> ParallelsImage:
        file_size = os.fstat(fd).st_size
        raw = _read_exact(fd, fmt.HEADER_SIZE, 0)
        if len(raw) < fmt.HEADER_SIZE:
            raise InvalidHeader(f"{p}: truncated: {len(raw)} bytes, a header needs {fmt.HEADER_SIZE}")
        h = fmt.Header.unpack(raw)
        if h.magic not in (fmt.MAGIC_V1, fmt.MAGIC_V2):
            raise InvalidHeader(f"{p}: bad magic {h.magic!r}: not a Parallels expandable image")
        if h.version != fmt.VERSION:
            raise InvalidHeader(f"{p}: version is {h.version}, must be {fmt.VERSION}")
        cluster_size = h.tracks * fmt.SECTOR
        if h.tracks == 0:
            raise InvalidHeader(f"{p}: tracks (cluster size in sectors) is 0")
        if cluster_size > fmt.MAX_CLUSTER_SIZE:
            raise InvalidHeader(
                f"{p}: tracks {h.tracks} gives a cluster of {cluster_size} bytes,"
                f" more than {fmt.MAX_CLUSTER_SIZE}"
            )
        if h.bat_entries > fmt.MAX_BAT_ENTRIES:
            raise InvalidHeader(f"{p}: nb_bat_entries {h.bat_entries} is larger than {fmt.MAX_BAT_ENTRIES}")
        bat_end = fmt.HEADER_SIZE + h.bat_entries * fmt.BAT_ENTRY.size
        if file_size < bat_end:
            raise InvalidHeader(
                f"{p}: truncated: file is {file_size} bytes, header and BAT of"
                f" {h.bat_entries} entries need {bat_end}"
            )
        if h.data_off == 0:
            if not h.is_v1:
                raise InvalidHeader(f"{p}: data_off is 0, not allowed in a {h.magic.decode()} image")
            data_off = fmt.round_up(bat_end, fmt.SECTOR)
        else:
            data_off = h.data_off * fmt.SECTOR
            if data_off < bat_end:
                raise InvalidHeader(
                    f"{p}: data_off {h.data_off} (byte {data_off}) lies inside the BAT, which ends at byte {bat_end}"
                )
        if data_off > file_size:
            raise InvalidHeader(
                f"{p}: truncated: data_off {h.data_off} (byte {data_off}) is past the end of the"
                f" {file_size}-byte file"
            )
        problems: list[Problem] = []
        if not h.is_v1 and data_off % cluster_size:
            problems.append(
                Problem("data_off", f"data_off {h.data_off} is not aligned to the cluster size {cluster_size}")
            )
        if h.in_use == fmt.IN_USE_OPEN:
            problems.append(Problem("in_use", "image was not closed cleanly (in_use flag set)"))

        bat_bytes = _read_exact(fd, h.bat_entries * fmt.BAT_ENTRY.size, fmt.HEADER_SIZE)
        entries = array("I")
        entries.frombytes(bat_bytes)
        if entries.itemsize != fmt.BAT_ENTRY.size:  # pragma: no cover - exotic platforms
            raise ImageError("array('I') is not 32 bits on this platform")
        if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
            entries.byteswap()
        unit = fmt.SECTOR if h.is_v1 else cluster_size
        bat = array("q", bytes(8 * h.bat_entries))
        allocated: list[int] = []
        owners: dict[int, int] = {}
        for idx, entry in enumerate(entries):
            if entry == 0:
                continue
            host = entry * unit
            if host < data_off:
                raise CorruptImage(
                    f"{p}: BAT entry {idx} is {entry} (byte {host}), inside the header and BAT"
                    f" before data_off (byte {data_off})"
                )
            if host + cluster_size > file_size:
                problems.append(
                    Problem("outside", f"cluster {idx} is outside image (byte {host}, file is {file_size})", idx)
                )
            first = owners.setdefault(host, idx)
            if first != idx:
                problems.append(
                    Problem("duplicate", f"BAT entries {first} and {idx} share the host cluster at byte {host}", idx)
                )
            bat[idx] = host
            allocated.append(idx)
        img = cls(
            path=p,
            fd=fd,
            writable=writable,
            header=h,
            cluster_size=cluster_size,
            data_off=data_off,
            file_size=file_size,
            bat=bat,
            allocated=allocated,
            problems=problems,
        )
        if h.ext_off:
            ext_at = h.ext_off * fmt.SECTOR
            if ext_at < data_off or ext_at + cluster_size > file_size:
                raise CorruptImage(
                    f"{p}: ext_off {h.ext_off} (byte {ext_at}) is outside the data area"
                    f" [{data_off}, {file_size})"
                )
            img.extension = read_extension(p, fd, ext_at, cluster_size, img.size)
        return img

    def close(self) -> None:
        """Close the file."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def host_offset(self, cluster: int) -> int:
        """The host byte offset of guest CLUSTER, or 0 where it is not allocated."""
        if cluster < len(self.bat):
            return int(self.bat[cluster])
        return 0

    def next_allocated(self, cluster: int) -> int | None:
        """The first allocated guest cluster at or after CLUSTER, if any."""
        i = bisect.bisect_left(self.allocated, cluster)
        return self.allocated[i] if i < len(self.allocated) else None

    def segments(self, offset: int, length: int) -> Iterator[Segment]:
        """Split the guest range into allocated and unallocated pieces.

        Cost follows the number of pieces, not the length: unallocated spans
        are skipped with a binary search in the sorted allocation list.
        """
        cs = self.cluster_size
        bat = self.bat
        nbat = len(bat)
        end = offset + length
        pos = offset
        while pos < end:
            c = pos // cs
            host = bat[c] if c < nbat else 0
            if not host:
                nxt = self.next_allocated(c)
                stop = end if nxt is None else min(end, nxt * cs)
                yield Segment(pos, stop - pos, None)
                pos = stop
                continue
            start_host = host + (pos - c * cs)
            stop = min(end, (c + 1) * cs)
            while stop < end:
                c2 = stop // cs
                h2 = bat[c2] if c2 < nbat else 0
                if h2 != start_host + (stop - pos):
                    break
                stop = min(end, stop + cs)
            yield Segment(pos, stop - pos, start_host)
            pos = stop

    def allocated_bytes(self) -> int:
        """How many guest bytes this image maps."""
        return len(self.allocated) * self.cluster_size
