"""Build Parallels expandable images byte by byte, straight from specs/parallels-image.txt.

Independent of prlnbd.image.format on purpose: every field can take any value,
including the ones the format forbids, so tests can make malformed images.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from pathlib import Path

SECTOR = 512
MAGIC_V1 = b"WithoutFreeSpace"
MAGIC_V2 = b"WithouFreSpacExt"
# "== Header ==": magic, version, heads, cylinders, tracks, nb_bat_entries,
# nb_sectors (u64), in_use, data_off, flags, ext_off (u64); little-endian.
HEADER = struct.Struct("<16sIIIIIQIIIQ")
IN_USE_OPEN = 0x746F6E59
IN_USE_CLOSED = 0x312E3276

# "== Format Extension ==".
EXT_MAGIC = 0xAB234CEF23DCEA87
FEATURE = struct.Struct("<QQII")  # magic, flags, data_size, unused
FEATURE_DIRTY_BITMAP = 0x20385FAE252CB34A
NECESSARY = 1
TRANSIT = 2
BITMAP = struct.Struct("<Q16sII")  # size (sectors), id, granularity (sectors), l1_size


def round_up(value: int, unit: int) -> int:
    """VALUE rounded up to a multiple of UNIT."""
    return -(-value // unit) * unit


@dataclass
class Spec:
    """Every field of an image, plus raw bytes to place anywhere in the file.

    Defaults give a valid, empty image: the BAT follows the header, data_off is
    the first cluster boundary after it (a valid value for v1 and v2).
    """

    version: int = 2  # 1: "WithoutFreeSpace", 2: "WithouFreSpacExt" (selects the magic)
    magic: bytes | None = None  # overrides the magic version selects
    hdr_version: int = 2  # the header's version field
    heads: int = 16
    cylinders: int = 0
    tracks: int = 128  # cluster size in sectors
    bat: list[int] = field(default_factory=list)  # raw BAT entries as stored
    bat_entries: int | None = None  # default: len(bat)
    nb_sectors: int | None = None  # default: bat_entries * tracks
    in_use: int = 0
    data_off: int | None = None  # sectors; default: first cluster boundary after the BAT
    flags: int = 0
    ext_off: int = 0  # sectors
    blobs: dict[int, bytes] = field(default_factory=dict)  # byte offset -> bytes
    file_size: int | None = None  # default: end of the last blob, or the data area start

    @property
    def cluster_size(self) -> int:
        return self.tracks * SECTOR

    @property
    def n_entries(self) -> int:
        return len(self.bat) if self.bat_entries is None else self.bat_entries

    @property
    def bat_end(self) -> int:
        return HEADER.size + 4 * len(self.bat)

    @property
    def data_off_sectors(self) -> int:
        if self.data_off is not None:
            return self.data_off
        cs = max(self.cluster_size, SECTOR)
        return round_up(self.bat_end, cs) // SECTOR

    def header(self) -> bytes:
        """The 64 header bytes."""
        magic = self.magic if self.magic is not None else (MAGIC_V1 if self.version == 1 else MAGIC_V2)
        nb_sectors = self.nb_sectors if self.nb_sectors is not None else self.n_entries * self.tracks
        return HEADER.pack(
            magic,
            self.hdr_version,
            self.heads,
            self.cylinders,
            self.tracks,
            self.n_entries,
            nb_sectors,
            self.in_use,
            self.data_off_sectors,
            self.flags,
            self.ext_off,
        )

    def build(self) -> bytes:
        """The whole file."""
        end = max([self.bat_end, self.data_off_sectors * SECTOR] + [off + len(b) for off, b in self.blobs.items()])
        size = end if self.file_size is None else self.file_size
        buf = bytearray(max(size, end))
        buf[: HEADER.size] = self.header()
        buf[HEADER.size : self.bat_end] = struct.pack(f"<{len(self.bat)}I", *self.bat)
        for off, blob in sorted(self.blobs.items()):
            buf[off : off + len(blob)] = blob
        return bytes(buf[:size])

    def write(self, path: Path) -> Path:
        """Write the file at PATH and return PATH."""
        path.write_bytes(self.build())
        return path

    def entry_for(self, host: int) -> int:
        """The BAT entry value that points at byte HOST (sectors in v1, clusters in v2)."""
        unit = SECTOR if self.version == 1 else self.cluster_size
        if host % unit:
            raise ValueError(f"host offset {host} is not a multiple of {unit}")
        return host // unit


def layout(
    clusters: dict[int, bytes],
    *,
    n_entries: int,
    version: int = 2,
    tracks: int = 128,
    order: list[int] | None = None,
    **kw: object,
) -> Spec:
    """An image whose guest clusters CLUSTERS (index -> data) sit in the data area in ORDER.

    Host clusters are packed from data_off on, in ORDER (default: sorted guest
    index), each padded to the cluster size.
    """
    spec = Spec(version=version, tracks=tracks, bat=[0] * n_entries, **kw)  # type: ignore[arg-type]
    cs = spec.cluster_size
    host = spec.data_off_sectors * SECTOR
    for idx in order if order is not None else sorted(clusters):
        spec.bat[idx] = spec.entry_for(host)
        spec.blobs[host] = clusters[idx].ljust(cs, b"\0")
        host += cs
    return spec


def feature(magic: int, flags: int, data: bytes, *, data_size: int | None = None) -> bytes:
    """One feature section: header, data, padding to 8 bytes."""
    size = len(data) if data_size is None else data_size
    body = FEATURE.pack(magic, flags, size, 0) + data
    return body.ljust(round_up(len(body), 8), b"\0")


END = FEATURE.pack(0, 0, 0, 0)


def bitmap_data(size: int, ident: bytes, granularity: int, l1: list[int], *, l1_size: int | None = None) -> bytes:
    """The data of a dirty bitmap feature."""
    n = len(l1) if l1_size is None else l1_size
    return BITMAP.pack(size, ident, granularity, n) + struct.pack(f"<{len(l1)}Q", *l1)


def extension_cluster(
    sections: list[bytes],
    cluster_size: int,
    *,
    magic: int = EXT_MAGIC,
    checksum: bytes | None = None,
    end: bool = True,
) -> bytes:
    """A format extension cluster: magic, MD5 of bytes 24..end, SECTIONS, the end marker."""
    body = b"".join(sections) + (END if end else b"")
    if 24 + len(body) > cluster_size:
        raise ValueError("extension does not fit in one cluster")
    rest = body.ljust(cluster_size - 24, b"\0")
    digest = hashlib.md5(rest).digest() if checksum is None else checksum
    return struct.pack("<Q16s", magic, digest) + rest


def bits_bytes(bits: set[int], nbytes: int) -> bytes:
    """Bitmap bytes with the given bit numbers set, LSB first within each byte."""
    out = bytearray(nbytes)
    for b in bits:
        out[b >> 3] |= 1 << (b & 7)
    return bytes(out)
