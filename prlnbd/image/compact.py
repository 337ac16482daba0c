"""Offline compaction of one expandable image: move clusters down into holes, then cut the file short."""

from __future__ import annotations

import bisect
import heapq
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prlnbd.errors import ImageBusy, ImageError
from prlnbd.image import format as fmt
from prlnbd.image.extension import encode_extension, kept_features
from prlnbd.image.locking import lock_image
from prlnbd.image.parallels import ParallelsImage
from prlnbd.killpoints import KillPoints

# Clusters copied before one fdatasync and one round of BAT updates.
BATCH = 64


@dataclass
class CompactResult:
    """What a compaction did."""

    path: str
    moved: int
    size_before: int
    size_after: int
    allocated_before: int
    allocated_after: int
    pieces: list[CompactResult] = field(default_factory=list)  # a split disk's: one per piece's top image

    @property
    def given_back(self) -> int:
        """Bytes of storage the file system got back (st_blocks)."""
        return max(0, self.allocated_before - self.allocated_after)

    def as_dict(self) -> dict[str, object]:
        """The JSON form."""
        return {
            "path": self.path,
            "moved-clusters": self.moved,
            "size-before": self.size_before,
            "size-after": self.size_after,
            "allocated-before": self.allocated_before,
            "allocated-after": self.allocated_after,
            "given-back": self.given_back,
            **({"pieces": [p.as_dict() for p in self.pieces]} if self.pieces else {}),
        }


def compact_image(path: Path, progress: Callable[[int, int], None] | None = None) -> CompactResult:
    """Move the clusters at the end of the image at PATH into the free slots before them; truncate.

    Offline only: refused when the image is marked in use or another process holds the
    writer's lock. Each moved cluster goes: copy to the free slot, fdatasync, reference
    (BAT entry, bitmap L1 entry in the extension cluster, or the header's ext_off) updated,
    fdatasync; copies are batched, that order kept for each. The file is cut short and
    synced last. A crash at any step leaves an image that reads the same, at worst with
    an unreferenced copy (free space) or the old tail (a leak).
    """
    img = ParallelsImage.open(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        img.close()
        raise ImageError(f"{path}: cannot open for writing: {e.strerror}") from e
    try:
        # The writer's lock bytes, as QEMU takes them: refused while prlnbd or QEMU writes the image.
        lock_image(fd, Path(path), write=True)
        if img.in_use:
            raise ImageBusy(
                f"{path}: image is marked in use: it is being served, or was not closed cleanly"
                f" (then run `prlnbd check --repair {path}` first)"
            )
        bad = [p for p in img.problems if p.kind in ("outside", "duplicate", "below_data", "data_off")]
        if bad:
            raise ImageError(f"{path}: {bad[0].message}; run `prlnbd check --repair {path}` first")
        ext = img.extension
        if ext is not None and ext.necessary_unknown:
            raise ImageError(f"{path}: the format extension holds an unknown NECESSARY feature: not compacted")
        return _compact(img, fd, path, progress)
    finally:
        os.close(fd)
        img.close()


def _plan(owners: dict[int, tuple[str, object]], free: list[int]) -> list[tuple[int, int]]:
    """The moves (from, to): extension and bitmap clusters into the lowest holes first, then the
    highest used cluster into the lowest hole while that lies below it.

    The extension's clusters go first so that, where data lies above them, they end up below the
    last data cluster: QEMU 7.2 counts everything past the last BAT-mapped cluster as leaked.
    """
    holes = list(free)
    heapq.heapify(holes)
    used = sorted(owners)
    moves: list[tuple[int, int]] = []
    for src in sorted((h for h, (kind, _) in owners.items() if kind != "bat"), reverse=True):
        if holes and holes[0] < src:
            dst = heapq.heappop(holes)
            moves.append((src, dst))
            del used[bisect.bisect_left(used, src)]
            bisect.insort(used, dst)
            heapq.heappush(holes, src)
    while holes and used and holes[0] < used[-1]:
        dst = heapq.heappop(holes)
        moves.append((used.pop(), dst))
        bisect.insort(used, dst)
    return moves


def _owners(img: ParallelsImage, path: Path) -> dict[int, tuple[str, object]]:
    """Every used cluster and what references it: ("bat", guest cluster), ("ext", 0), ("bm", (bitmap, l1 index))."""
    cs = img.cluster_size
    first = img._align_host(img.data_off)
    owners: dict[int, tuple[str, object]] = {}
    for c in img.allocated:
        owners[int(img.bat[c])] = ("bat", c)
    ext = img.extension
    if ext is not None:
        owners[ext.offset] = ("ext", 0)
        for b, bm in enumerate(ext.bitmaps):
            for i, e in enumerate(bm.l1):
                if e > fmt.L1_ALL_SET:
                    owners[e * fmt.SECTOR] = ("bm", (b, i))
    if any((h - first) % cs for h in owners):
        raise ImageError(f"{path}: clusters lie off the cluster grid: not compacted")
    return owners


def planned_moves(path: Path) -> int:
    """How many clusters compact_image(PATH) would move now (for progress over several images)."""
    img = ParallelsImage.open(path)
    try:
        return len(_plan(_owners(img, path), img.unreferenced()))
    finally:
        img.close()


def _compact(
    img: ParallelsImage, fd: int, path: Path, progress: Callable[[int, int], None] | None
) -> CompactResult:
    cs = img.cluster_size
    unit = fmt.SECTOR if img.header.is_v1 else cs
    st = os.fstat(fd)
    size_before, alloc_before = st.st_size, st.st_blocks * 512
    step = KillPoints("PRLNBD_COMPACT_KILL_AT")  # crash tests: SIGKILL before the Nth write or sync
    owners = _owners(img, path)
    ext = img.extension
    moves = _plan(owners, img.unreferenced())
    total = len(moves)
    done = 0
    if progress is not None:
        progress(0, total)
    k = 0
    while k < total:
        # Bitmap and extension clusters one at a time: each rewrites the extension cluster.
        if owners[moves[k][0]][0] != "bat":
            batch = [moves[k]]
        else:
            batch = []
            while k + len(batch) < total and len(batch) < BATCH and owners[moves[k + len(batch)][0]][0] == "bat":
                batch.append(moves[k + len(batch)])
        for src, dst in batch:
            data = os.pread(fd, cs, src).ljust(cs, b"\0")
            step()
            os.pwrite(fd, data, dst)
        step()
        os.fdatasync(fd)
        for src, dst in batch:
            kind, key = owners.pop(src)
            owners[dst] = (kind, key)
            step()
            if kind == "bat":
                assert isinstance(key, int)
                img.bat[key] = dst
                os.pwrite(fd, fmt.BAT_ENTRY.pack(dst // unit), fmt.HEADER_SIZE + 4 * key)
            elif kind == "ext":
                assert ext is not None
                ext.offset = dst
                img.header.ext_off = dst // fmt.SECTOR
                os.pwrite(fd, img.header.pack(), 0)
            else:
                assert ext is not None and isinstance(key, tuple)
                b, i = key
                ext.bitmaps[b].l1[i] = dst // fmt.SECTOR
                pairs = [(bm, list(bm.l1)) for bm in ext.bitmaps]
                os.pwrite(fd, encode_extension(pairs, kept_features(ext), cs), ext.offset)
        step()
        os.fdatasync(fd)
        k += len(batch)
        done += len(batch)
        if progress is not None:
            progress(done, total)
    end = max(owners) + cs if owners else img.data_off
    end = max(end, img.data_off)
    if end < size_before:
        step()
        os.ftruncate(fd, end)
        step()
        os.fsync(fd)
    st = os.fstat(fd)
    return CompactResult(str(path), total, size_before, st.st_size, alloc_before, st.st_blocks * 512)
