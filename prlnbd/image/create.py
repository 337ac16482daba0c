"""Write new Parallels expandable images (empty, or with given clusters) from scratch."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from prlnbd.errors import ImageError
from prlnbd.image import format as fmt

DEFAULT_CLUSTER_SIZE = 1024 * 1024
# Geometry Parallels writes for new disks: 16 heads, 32 sectors per track.
HEADS = 16
SECTORS_PER_TRACK = 32


def geometry(size: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors) for a disk of SIZE bytes."""
    sectors = size // fmt.SECTOR
    return max(1, sectors // (HEADS * SECTORS_PER_TRACK)), HEADS, SECTORS_PER_TRACK


def check_geometry(size: int, cluster_size: int) -> None:
    """Refuse sizes and cluster sizes the format cannot hold."""
    if size <= 0 or size % fmt.SECTOR:
        raise ImageError(f"disk size {size} must be a positive multiple of {fmt.SECTOR}")
    if size > fmt.MAX_DISK_SIZE:
        raise ImageError(f"disk size {size} is more than {fmt.MAX_DISK_SIZE}, the largest QEMU and NBD clients accept")
    if cluster_size <= 0 or cluster_size % fmt.SECTOR or cluster_size > fmt.MAX_CLUSTER_SIZE:
        raise ImageError(
            f"cluster size {cluster_size} must be a multiple of {fmt.SECTOR} up to {fmt.MAX_CLUSTER_SIZE}"
        )
    entries = -(-size // cluster_size)
    if entries > fmt.MAX_BAT_ENTRIES or entries > 0xFFFFFFFF:
        raise ImageError(f"a {size}-byte disk needs {entries} BAT entries with {cluster_size}-byte clusters")


def write_image(
    path: str | os.PathLike[str],
    size: int,
    *,
    cluster_size: int = DEFAULT_CLUSTER_SIZE,
    clusters: Mapping[int, bytes] | None = None,
    exclusive: bool = True,
) -> None:
    """Write a v2 ("WithouFreSpacExt") image of SIZE bytes holding CLUSTERS (guest index -> bytes).

    Data goes first and the header last, then the file is synced, so a
    crash never leaves a header that maps unwritten clusters.
    """
    check_geometry(size, cluster_size)
    clusters = clusters or {}
    entries = -(-size // cluster_size)
    data_off = fmt.round_up(fmt.HEADER_SIZE + 4 * entries, cluster_size)
    cyl, heads, _ = geometry(size)
    header = fmt.Header(
        magic=fmt.MAGIC_V2,
        version=fmt.VERSION,
        heads=heads,
        cylinders=cyl,
        tracks=cluster_size // fmt.SECTOR,
        bat_entries=entries,
        nb_sectors=size // fmt.SECTOR,
        in_use=0,
        data_off=data_off // fmt.SECTOR,
        flags=0,
        ext_off=0,
    )
    bat = bytearray(4 * entries)
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_EXCL if exclusive else os.O_TRUNC)
    p = Path(path)
    try:
        fd = os.open(p, flags, 0o644)
    except OSError as e:
        raise ImageError(f"{p}: cannot create image: {e.strerror}") from e
    try:
        host = data_off
        for index in sorted(clusters):
            if not 0 <= index < entries:
                raise ImageError(f"{p}: cluster {index} is outside the disk's {entries} clusters")
            data = clusters[index]
            if len(data) > cluster_size:
                raise ImageError(f"{p}: cluster {index} data is longer than {cluster_size}")
            os.pwrite(fd, data.ljust(cluster_size, b"\0"), host)
            fmt.BAT_ENTRY.pack_into(bat, 4 * index, host // cluster_size)
            host += cluster_size
        os.ftruncate(fd, host)
        os.pwrite(fd, bytes(bat), fmt.HEADER_SIZE)
        os.pwrite(fd, header.pack(), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
