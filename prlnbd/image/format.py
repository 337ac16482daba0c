"""On-disk layouts of a Parallels expandable image (specs/parallels-image.txt)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

SECTOR = 512

# "== Header ==": 64 bytes, little-endian.
HEADER = struct.Struct("<16sIIIIIQIIIQ")
HEADER_SIZE = HEADER.size

MAGIC_V1 = b"WithoutFreeSpace"  # BAT entries are sector offsets
MAGIC_V2 = b"WithouFreSpacExt"  # BAT entries are cluster numbers
VERSION = 2

# "in_use": only this value means the image may be open or unclean.
IN_USE_OPEN = 0x746F6E59
IN_USE_CLOSED = 0x312E3276

FLAG_EMPTY = 0x1

# "== BAT ==": an array of u32 little-endian entries right after the header.
BAT_ENTRY = struct.Struct("<I")

# Generous cap: Parallels uses 1 MiB clusters, old images 63 sectors to 256 KiB.
MAX_CLUSTER_SIZE = 256 * 1024 * 1024
# The largest disk served: QEMU refuses anything larger (its BDRV_MAX_LENGTH, 2^63 - 2^30),
# and NBD carries sizes as u64, which this leaves room for.
MAX_DISK_SIZE = (1 << 63) - (1 << 30)
# A BAT larger than this would need more than 1 GiB of table in memory.
MAX_BAT_ENTRIES = (1 << 30) // BAT_ENTRY.size

# "== Format Extension ==": u64 magic, 16-byte MD5 of bytes 24..end of the cluster.
EXT_HEADER = struct.Struct("<Q16s")
EXT_MAGIC = 0xAB234CEF23DCEA87
EXT_CHECKSUM_START = 24
# Each feature: u64 magic, u64 flags, u32 data_size, u32 unused.
FEATURE_HEADER = struct.Struct("<QQII")
FEATURE_END = 0
FEATURE_DIRTY_BITMAP = 0x20385FAE252CB34A
FEATURE_NECESSARY = 0x1
FEATURE_TRANSIT = 0x2
# "=== Dirty bitmaps feature ===": u64 size, 16-byte id, u32 granularity, u32 l1_size.
BITMAP_HEADER = struct.Struct("<Q16sII")
L1_ENTRY = struct.Struct("<Q")
L1_ALL_CLEAR = 0
L1_ALL_SET = 1


@dataclass
class Header:
    """The decoded fields of an image header."""

    magic: bytes
    version: int
    heads: int
    cylinders: int
    tracks: int
    bat_entries: int
    nb_sectors: int
    in_use: int
    data_off: int
    flags: int
    ext_off: int

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> Header:
        """Decode the first 64 bytes of DATA."""
        return cls(*HEADER.unpack_from(data, 0))

    def pack(self) -> bytes:
        """Encode this header as 64 bytes."""
        return HEADER.pack(
            self.magic,
            self.version,
            self.heads,
            self.cylinders,
            self.tracks,
            self.bat_entries,
            self.nb_sectors,
            self.in_use,
            self.data_off,
            self.flags,
            self.ext_off,
        )

    @property
    def is_v1(self) -> bool:
        """Whether BAT entries are sector offsets ("WithoutFreeSpace")."""
        return self.magic == MAGIC_V1

    @property
    def disk_sectors(self) -> int:
        """The disk size in sectors; v1 images only use the low 32 bits."""
        return self.nb_sectors & 0xFFFFFFFF if self.is_v1 else self.nb_sectors


def round_up(value: int, unit: int) -> int:
    """VALUE rounded up to a multiple of UNIT."""
    return -(-value // unit) * unit
