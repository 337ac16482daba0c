"""One Parallels expandable image file: header, BAT, and the guest-to-host map."""

from __future__ import annotations

import bisect
import ctypes
import errno
import itertools
import logging
import os
import stat
import struct
import sys
import threading
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prlnbd.errors import CorruptImage, ExtensionError, ImageBusy, ImageError, InvalidHeader
from prlnbd.image import format as fmt
from prlnbd.image.extension import (
    DirtyBitmap,
    Extension,
    bitmap_chunks,
    encode_extension,
    feature_space,
    kept_features,
    read_extension,
)
from prlnbd.image.locking import downgrade_to_reader, lock_image

log = logging.getLogger(__name__)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = getattr(_libc, "fallocate64", None) or _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int
_no_punch_lock = threading.Lock()  # so that a refusal is logged once, whichever worker sees it first

# How far the file grows ahead of the clusters handed out (QEMU's parallels prealloc-size): one
# fallocate per 128 MiB of new data instead of a size change and an extent per cluster, and the
# size is durable after the next sync, so later fresh clusters need no sync of their own before
# their BAT entry (flush_io). The unused tail is cut off at a clean stop.
PREALLOC = 128 << 20


def reserve(fd: int, offset: int, length: int) -> None:
    """Allocate [offset, offset+length) of FD, growing the file: it reads as zeros.

    Raises OSError (EOPNOTSUPP where the file system cannot; no emulation by
    writing zeros, as posix_fallocate() would do). ctypes drops the GIL for the call.
    """
    if _fallocate(fd, 0, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate [offset, offset+length) of FD, keeping its size: it reads as zeros after.

    Raises OSError (EOPNOTSUPP where the file system cannot). ctypes drops the GIL for the call.
    """
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


@dataclass
class Problem:
    """Something wrong in an image that opening tolerates but `check` reports."""

    kind: str  # "outside", "duplicate", "leak", "in_use", "data_off", "below_data"
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


def open_file(path: str | os.PathLike[str], *, writable: bool) -> tuple[Path, int]:
    """Open an image file (a regular file only); raise ImageError naming it when that fails.

    O_NONBLOCK keeps open(2) from waiting forever on a FIFO with no writer; anything
    but a regular file (FIFO, socket, device, directory) is then refused. The file
    is locked as QEMU locks it (prlnbd.image.locking): ImageLocked when another
    program holds it for writing and WRITABLE is asked for.
    """
    p = Path(path)
    try:
        fd = os.open(p, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise ImageError(f"{p}: cannot open image: {e.strerror}") from e
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        what = "a directory" if stat.S_ISDIR(mode) else _file_kind(mode)
        raise ImageError(f"{p}: is {what}, not an image file (only regular files are served)")
    os.set_blocking(fd, True)
    try:
        # QEMU's lock bytes: a writer forbids other writers, a reader shares everything (qemu-io -r -U).
        lock_image(fd, p, write=writable)
    except BaseException:
        os.close(fd)
        raise
    return p, fd


def _file_kind(mode: int) -> str:
    """What kind of file MODE describes, for messages."""
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISCHR, "a character device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


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
    _writer: _WriteState | None = None

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

    @property
    def min_data_off(self) -> int:
        """The lowest valid data_off in bytes: the end of the BAT, rounded up to a sector (v1) or a cluster (v2).

        That is the value QEMU's check repairs a wrong data_off to.
        """
        bat_end = fmt.HEADER_SIZE + len(self.bat) * fmt.BAT_ENTRY.size
        return fmt.round_up(bat_end, fmt.SECTOR if self.header.is_v1 else self.cluster_size)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, writable: bool = False, for_check: bool = False) -> ParallelsImage:
        """Open and validate the image at PATH; raise ImageError naming what is wrong.

        FOR_CHECK (read-only, for `check`): a wrong data_off and clusters before it are
        problems to report and repair instead of errors.
        """
        p, fd = open_file(path, writable=writable)
        try:
            img = cls._load(p, fd, writable, for_check)
            if writable:
                img._start_writing()
            return img
        except OSError as e:
            os.close(fd)
            raise ImageError(f"{p}: cannot read image: {e.strerror}") from e
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def _load(cls, p: Path, fd: int, writable: bool, for_check: bool = False) -> ParallelsImage:
        file_size = os.fstat(fd).st_size
        raw = _read_exact(fd, fmt.HEADER_SIZE, 0)
        if len(raw) < fmt.HEADER_SIZE:
            raise InvalidHeader(f"{p}: truncated: {len(raw)} bytes, a header needs {fmt.HEADER_SIZE}")
        h = fmt.Header.unpack(raw)
        if h.magic not in (fmt.MAGIC_V1, fmt.MAGIC_V2):
            # The bytes are not quoted: the file may be anything (a descriptor can name any file).
            raise InvalidHeader(
                f"{p}: not a Parallels expandable image (the magic is neither WithoutFreeSpace nor WithouFreSpacExt)"
            )
        if h.version != fmt.VERSION:
            raise InvalidHeader(f"{p}: version is {h.version}, must be {fmt.VERSION}")
        if h.disk_sectors * fmt.SECTOR > fmt.MAX_DISK_SIZE:
            raise InvalidHeader(
                f"{p}: nb_sectors {h.disk_sectors} gives a disk of {h.disk_sectors * fmt.SECTOR} bytes,"
                f" more than {fmt.MAX_DISK_SIZE} (the largest QEMU and NBD clients accept)"
            )
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
        # What QEMU's check repairs a wrong data_off to: the end of the BAT, rounded up.
        min_off = fmt.round_up(bat_end, fmt.SECTOR if h.is_v1 else cluster_size)
        problems: list[Problem] = []
        if h.data_off == 0 and h.is_v1:
            data_off = fmt.round_up(bat_end, fmt.SECTOR)
        else:
            data_off = h.data_off * fmt.SECTOR
            wrong = None
            if h.data_off == 0:
                wrong = f"data_off is 0, not allowed in a {h.magic.decode()} image"
            elif data_off < bat_end:
                wrong = f"data_off {h.data_off} (byte {data_off}) lies inside the BAT, which ends at byte {bat_end}"
            elif data_off > file_size:
                wrong = (
                    f"truncated: data_off {h.data_off} (byte {data_off}) is past the end of the {file_size}-byte file"
                )
            if wrong is not None and (not for_check or min_off > file_size):
                hint = (
                    f"; `prlnbd check --repair {p}` sets it to {min_off // fmt.SECTOR}, the end of the BAT"
                    if min_off <= file_size
                    else ""
                )
                raise InvalidHeader(f"{p}: {wrong}{hint}")
            if wrong is not None:
                problems.append(Problem("data_off", f"{wrong}; it should be {min_off // fmt.SECTOR} (byte {min_off})"))
                data_off = min_off
            elif not h.is_v1 and data_off % cluster_size:
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
                msg = (
                    f"BAT entry {idx} is {entry} (byte {host}), inside the header and BAT"
                    f" before data_off (byte {data_off})"
                )
                if not for_check:
                    raise CorruptImage(f"{p}: {msg}; `prlnbd check --repair {p}` copies that cluster past them")
                problems.append(Problem("below_data", msg, idx))
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
        # Clusters that overlap without sharing a start (v1 entries off the cluster grid) are
        # as corrupt as duplicates: writing one changes the other.
        by_host = sorted((int(bat[c]), c) for c in allocated)
        for (h1, c1), (h2, c2) in itertools.pairwise(by_host):
            if h1 != h2 and h2 < h1 + cluster_size:
                problems.append(
                    Problem("duplicate", f"BAT entries {c1} and {c2} overlap (bytes {h1} and {h2})", c2)
                )
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
                    f" [{data_off}, {file_size}) (cut off by `qemu-img check -r`?); `prlnbd check --repair {p}`"
                    " clears it, dropping the bitmaps it held"
                )
            img.extension = read_extension(p, fd, ext_at, cluster_size, img.size, data_off)
            # The extension's clusters must not be guest data: a write there would destroy them.
            owned = sorted(img.extension.clusters())
            for host, c in by_host:
                for ext_host in owned:
                    if host < ext_host + cluster_size and ext_host < host + cluster_size:
                        raise CorruptImage(
                            f"{p}: BAT entry {c} (byte {host}) overlaps the format extension's cluster at"
                            f" byte {ext_host}"
                        )
        return img

    def close(self) -> None:
        """Close the file; a writable image first syncs its BAT and clears in_use (a clean stop)."""
        if self.fd < 0:
            return
        try:
            if self.writable and self._writer is not None:
                self._finish_writing()
        finally:
            os.close(self.fd)
            self.fd = -1

    def seal(self) -> None:
        """Freeze an image open for writing while keeping it open for reading (an online snapshot).

        What close() does for a clean stop (BAT and bitmaps stored, in_use
        restored), after which the image takes no more writes and holds only a
        reader's lock, so another program may read it, and nothing may write it.
        """
        if not self.writable or self._writer is None:
            raise ImageError(f"{self.path}: image is not open for writing: nothing to freeze")
        self._finish_writing()
        self.writable = False
        downgrade_to_reader(self.fd)

    def unseal(self) -> None:
        """Undo seal(): take the writer's lock again and go on writing (an online snapshot that failed)."""
        lock_image(self.fd, self.path, write=True)
        self.writable = True
        self._start_writing()

    def host_offset(self, cluster: int) -> int:
        """The host byte offset of guest CLUSTER, or 0 where it is not allocated."""
        if cluster < len(self.bat):
            return int(self.bat[cluster])
        return 0

    def next_allocated(self, cluster: int) -> int | None:
        """The first allocated guest cluster at or after CLUSTER, if any."""
        i = bisect.bisect_left(self.allocated, cluster)
        return self.allocated[i] if i < len(self.allocated) else None

    def allocated_runs(self, first: int, last: int) -> Iterator[tuple[int, int]]:
        """The runs [start, end) of consecutive guest clusters this image maps, within clusters [first, last).

        Read-only. Cluster allocated[k] continues the run that allocated[i] starts
        exactly when allocated[k] - k == allocated[i] - i, and that difference
        never falls as k grows: each run's end is found by a galloping binary
        search, so the cost follows the number of runs (times the log of their
        length), not the number of clusters.
        """
        alloc = self.allocated
        n = len(alloc)
        k = bisect.bisect_left(alloc, first)
        while k < n:
            start = alloc[k]
            if start >= last:
                return
            base = start - k
            # Gallop: lo is in the run, hi is past it (or the list's end); then halve between.
            lo, hi, step = k, k + 1, 1
            while hi < n and alloc[hi] - hi == base:
                lo = hi
                step <<= 1
                hi = lo + step
            hi = min(hi, n)
            while hi - lo > 1:
                mid = (lo + hi) >> 1
                if alloc[mid] - mid == base:
                    lo = mid
                else:
                    hi = mid
            yield start, min(alloc[lo] + 1, last)
            k = lo + 1

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
                # From the next cluster on: a writer in another thread may map C meanwhile,
                # and this piece must still move forward.
                nxt = self.next_allocated(c + 1)
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

    def unreferenced(self) -> list[int]:
        """Host offsets of the cluster slots before the last used cluster that nothing references.

        Slots lie on the data area's cluster grid (as allocate() places clusters);
        a slot any BAT entry or extension cluster overlaps is in use.
        """
        cs = self.cluster_size
        first = self._align_host(self.data_off)
        used_hosts = [int(self.bat[c]) for c in self.allocated]
        if self.extension is not None:
            used_hosts += self.extension.clusters()
        if not used_hosts:
            return []
        end = max(used_hosts) + cs
        slots = max(0, -(-(end - first) // cs))
        used = bytearray(slots)
        for host in used_hosts:
            lo = max(0, (host - first) // cs)
            hi = min(slots, -(-(host + cs - first) // cs))
            used[lo:hi] = b"\1" * (hi - lo)
        out: list[int] = []
        pos = used.find(0)
        while pos >= 0:
            out.append(first + pos * cs)
            pos = used.find(0, pos + 1)
        return out

    def allocated_bytes(self) -> int:
        """How many guest bytes this image maps."""
        return len(self.allocated) * self.cluster_size

    # ---- writing (only ever the top image of a chain)

    def _start_writing(self) -> None:
        """Check the image may be changed, then mark it in use on disk before any write."""
        p = self.path
        # open_file took the writer's lock bytes: no other prlnbd or QEMU writes this file now.
        if self.in_use:
            raise ImageBusy(
                f"{p}: image is marked in use (in_use flag set) but no program holds it: it was not closed"
                f" cleanly, or another program has it open; if none has, run `prlnbd check --repair {p}`"
                " (or open it read-only)"
            )
        bad = [pr for pr in self.problems if pr.kind in ("outside", "duplicate")]
        if bad:
            raise CorruptImage(
                f"{p}: refusing to write to a corrupt image ({bad[0].message});"
                f" run `prlnbd check --repair {p}`"
            )
        if self.header.disk_sectors * fmt.SECTOR > len(self.bat) * self.cluster_size:
            raise CorruptImage(
                f"{p}: nb_sectors {self.header.disk_sectors} covers more than the BAT's"
                f" {len(self.bat)} clusters; such an image can only be opened read-only"
            )
        ext = self.extension
        if ext is not None and ext.necessary_unknown:
            raise ExtensionError(f"{p}: the format extension holds an unknown NECESSARY feature; open it read-only")
        used_end = self.data_off
        for c in self.allocated:
            used_end = max(used_end, int(self.bat[c]) + self.cluster_size)
        if ext is not None:
            for host in ext.clusters():
                used_end = max(used_end, host + self.cluster_size)
        self._writer = _WriteState(
            data_end=self._align_host(used_end),
            closed_in_use=self.header.in_use,
            zero_from=self.file_size,
            durable_end=self.file_size,
        )
        # Clusters no BAT entry or extension references (freed by an earlier writer, or left by a
        # crash) are reusable now, lowest first.
        self._writer.free = sorted(self.unreferenced(), reverse=True)
        if ext is not None and ext.bitmaps:
            self._invalidate_bitmaps(ext)
        self._set_in_use(fmt.IN_USE_OPEN)

    def _invalidate_bitmaps(self, ext: Extension) -> None:
        """Mark every stored bitmap all-dirty on disk while the image is open for writing.

        The true bitmaps live in memory and are stored at a clean stop; if the
        writer dies, readers find bitmaps that are entirely dirty, never stale.
        """
        old = [e * fmt.SECTOR for bm in ext.bitmaps for e in bm.l1 if e > fmt.L1_ALL_SET]
        invalid = [(bm, [fmt.L1_ALL_SET] * len(bm.l1)) for bm in ext.bitmaps]
        os.pwrite(self.fd, encode_extension(invalid, kept_features(ext), self.cluster_size), ext.offset)
        os.fsync(self.fd)
        for bm, l1 in invalid:
            bm.l1 = l1
        # The old bitmap clusters are unreferenced on disk now: reusable at once.
        self._state().free.extend(old)

    def _store_extension(self) -> None:
        """Write the in-memory bitmaps and kept features back: data clusters, then the extension cluster."""
        ext = self.extension
        if ext is None:
            return
        w = self._state()
        cs = self.cluster_size
        features = kept_features(ext)
        if not ext.bitmaps and not features:
            if self.header.ext_off:
                w.free.append(ext.offset)
                self.header.ext_off = 0
            self.extension = None
            return
        if feature_space(ext.bitmaps, features, cs) > cs:
            raise ExtensionError(f"{self.path}: the bitmaps do not fit in one {cs}-byte extension cluster")
        pairs: list[tuple[DirtyBitmap, list[int]]] = []
        for bm in ext.bitmaps:
            l1: list[int] = []
            for entry, data in bitmap_chunks(bm, cs):
                if data is None:
                    l1.append(entry)
                    continue
                host, _ = self.allocate()
                os.pwrite(self.fd, data, host)
                l1.append(host // fmt.SECTOR)
            pairs.append((bm, l1))
        if not self.header.ext_off:
            ext.offset, _ = self.allocate()
        os.fdatasync(self.fd)
        os.pwrite(self.fd, encode_extension(pairs, features, cs), ext.offset)
        os.fdatasync(self.fd)
        self.header.ext_off = ext.offset // fmt.SECTOR
        for bm, l1 in pairs:
            bm.l1 = l1

    def _align_host(self, pos: int) -> int:
        """The first host offset at or after POS where a cluster may start."""
        cs = self.cluster_size
        if self.header.is_v1:
            # Keep clusters on the data area's cluster grid, as the spec recommends.
            return self.data_off + fmt.round_up(max(0, pos - self.data_off), cs)
        return fmt.round_up(pos, cs)

    def _set_in_use(self, value: int) -> None:
        self.header.in_use = value
        os.pwrite(self.fd, self.header.pack(), 0)
        os.fsync(self.fd)

    def _state(self) -> _WriteState:
        if self._writer is None:
            raise ImageError(f"{self.path}: image is not open for writing")
        return self._writer

    def allocate(self) -> tuple[int, bool]:
        """Reserve a host cluster for new data: (host offset, whether it is known to read as zeros).

        Clusters freed by an earlier, already durable release are reused first;
        otherwise the cluster is appended at the end of the data area, from
        space the file was grown by ahead (_grow): it has never held data.
        """
        w = self._state()
        if w.free:
            return w.free.pop(), False
        host = w.data_end
        end = host + self.cluster_size
        if end > self.file_size:
            # Grow the file first: if that fails, nothing has been reserved.
            self._grow(end)
        w.data_end = end
        return host, host >= w.zero_from

    def make_room(self) -> None:
        """Grow the file now if the next appended cluster would need it (safe in a worker thread).

        For callers that hold a lock allocate() is called under: growing here,
        outside it, keeps a slow fallocate (tmpfs zeroes the pages) from holding it.
        """
        w = self._state()
        if not w.free and w.data_end + self.cluster_size > self.file_size:
            self._grow(w.data_end + self.cluster_size)

    def _grow(self, end: int) -> None:
        """Grow the file to at least END, by PREALLOC where there is room for it (see there)."""
        w = self._state()
        cs = self.cluster_size
        with w.grow_lock:
            if end <= self.file_size:
                return  # another thread grew it meanwhile
            # Never past the space the whole disk's clusters could take.
            full = self._align_host(self.data_off) + len(self.bat) * cs
            target = max(end, min(self.file_size + PREALLOC, full))
            try:
                reserve(self.fd, self.file_size, target - self.file_size)
            except OSError:
                # No fallocate here, or no room for the whole step (a full disk, a quota, a file
                # size limit): grow sparsely by what is needed, as the file always could.
                target = max(end, os.fstat(self.fd).st_size)
                os.ftruncate(self.fd, target)
            else:
                w.reserved_end = target
            self.file_size = target

    def reserved(self, host: int) -> bool:
        """Whether the file system has allocated the cluster at HOST ahead (_grow), zeros and all."""
        return host + self.cluster_size <= self._state().reserved_end

    def clear_cluster(self, host: int) -> bool:
        """Make a cluster from allocate() read as zeros by punching it; False where that cannot be done.

        For a reused cluster about to take a partial write: nothing maps it, on disk or in
        memory, and no I/O still uses it, so punching it changes nothing anyone reads.
        """
        w = self._state()
        if w.no_punch:
            return False
        try:
            punch_hole(self.fd, host, self.cluster_size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            return False
        return True

    def unallocate(self, host: int) -> None:
        """Give back a cluster from allocate() whose data could not be written.

        It may hold part of that data now, so it is reused like a released one,
        never handed out again as fresh.
        """
        self._state().free.append(host)

    def map_cluster(self, cluster: int, host: int, *, zeros_under: bool = False) -> None:
        """Point guest CLUSTER at HOST; the BAT entry reaches the file at the next flush.

        ZEROS_UNDER: HOST came fresh from allocate() and nothing below the image shows
        through the cluster, so where its data did not land it reads as zeros, which is
        what the guest saw there before: its entry may reach the disk in the same sync as
        its data. Otherwise the data is synced first (flush_io).
        """
        if not 0 <= cluster < len(self.bat):
            raise ImageError(f"{self.path}: cluster {cluster} is beyond the BAT's {len(self.bat)} entries")
        w = self._state()
        was = self.bat[cluster]
        # BAT entry first, allocation list second (release_cluster the other way round): a
        # reader in another thread then never finds a listed cluster without its entry.
        self.bat[cluster] = host
        if not was:
            bisect.insort(self.allocated, cluster)
        w.dirty.add(cluster)
        if not (zeros_under and host >= w.zero_from):
            w.ordered.add(cluster)

    def release_cluster(self, cluster: int) -> int:
        """Unmap guest CLUSTER; its host cluster is reused once the unmapping is durable.

        Returns the host offset it was mapped to (0 when it was not).
        """
        w = self._state()
        host = int(self.bat[cluster])
        if not host:
            return 0
        i = bisect.bisect_left(self.allocated, cluster)
        del self.allocated[i]
        self.bat[cluster] = 0
        w.dirty.add(cluster)
        w.pending_free.append(host)
        return host

    def punch(self, hosts: list[int]) -> None:
        """Give the space of released host clusters back to the file system (safe in a worker thread).

        Only for clusters just released by a TRIM or WRITE_ZEROES of the very guest
        cluster they held, before they can be reused: after a crash, a BAT entry on
        disk may still map one, and it then reads as zeros, as the guest asked.
        Where the file system cannot punch holes, the clusters stay allocated (logged once).
        """
        w = self._state()
        if w.no_punch:
            return
        cs = self.cluster_size
        runs: list[list[int]] = []
        for host in sorted(hosts):
            if runs and runs[-1][1] == host:
                runs[-1][1] = host + cs
            else:
                runs.append([host, host + cs])
        for start, end in runs:
            try:
                punch_hole(self.fd, start, end - start)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                with _no_punch_lock:
                    first = not w.no_punch
                    w.no_punch = True
                if first:
                    log.warning("%s: the file system cannot punch holes (%s): released clusters stay"
                                " allocated until they are reused", self.path, e.strerror)
                return

    def reuse(self, hosts: list[int]) -> None:
        """Let allocate() hand out HOSTS again: clusters whose release is durable and no longer read."""
        self._state().free.extend(hosts)

    def begin_flush(self) -> FlushToken:
        """Take the BAT changes a flush must make durable (call from the owning thread)."""
        w = self._state()
        unit = fmt.SECTOR if self.header.is_v1 else self.cluster_size
        cs = self.cluster_size
        entries = sorted((c, int(self.bat[c]) // unit) for c in w.dirty)
        # An entry may share its data's sync only where the cluster reads as zeros after a crash
        # whatever landed: fresh space (map_cluster) whose size an earlier sync made durable.
        ordered = bool(w.ordered) or any(
            int(self.bat[c]) + cs > w.durable_end for c in w.dirty if self.bat[c]
        )
        token = FlushToken(entries, w.pending_free, ordered=ordered, size=self.file_size)
        w.dirty = set()
        w.ordered = set()
        w.pending_free = []
        return token

    def flush_io(self, token: FlushToken) -> None:
        """Make the data and the BAT entries that map it durable (safe in a worker thread).

        Where an entry maps a cluster that held other bytes, or copies of the layers
        below, the data is synced before the entry is written, so a crash never
        leaves an entry pointing at a cluster of garbage; entries of fresh clusters
        alone go out with their data in one sync (map_cluster).
        """
        if token.entries:
            if token.ordered:
                os.fdatasync(self.fd)
            self._write_entries(token.entries)
        os.fdatasync(self.fd)

    def _write_entries(self, entries: list[tuple[int, int]]) -> None:
        """Write BAT ENTRIES (sorted by cluster), one pwrite per run of consecutive clusters."""
        run_start = entries[0][0]
        values: list[int] = []
        prev = run_start - 1
        for cluster, value in [*entries, (-2, 0)]:
            if cluster != prev + 1 and values:
                os.pwrite(self.fd, struct.pack(f"<{len(values)}I", *values), fmt.HEADER_SIZE + 4 * run_start)
                values = []
                run_start = cluster
            values.append(value)
            prev = cluster

    def end_flush(self, token: FlushToken, ok: bool) -> None:
        """Record the flush's outcome (call from the owning thread)."""
        w = self._state()
        if ok:
            w.free.extend(token.pending_free)
            # Its last sync made the file's size at begin_flush() durable.
            w.durable_end = max(w.durable_end, token.size)
        else:
            w.dirty.update(c for c, _ in token.entries)
            if token.ordered:
                w.ordered.update(c for c, _ in token.entries)
            w.pending_free.extend(token.pending_free)

    def flush(self) -> None:
        """Make every write so far durable, synchronously."""
        token = self.begin_flush()
        try:
            self.flush_io(token)
        except BaseException:
            self.end_flush(token, False)
            raise
        self.end_flush(token, True)

    def _finish_writing(self) -> None:
        """Clean stop: BAT durable, free tail cut off, in_use restored to its closed value.

        When the bitmaps cannot be stored (the file cannot grow: disk full, quota, file
        size limit), the image is still closed consistently, with the bitmaps left as
        they have been on disk since the open (all dirty, which is safe), and then an
        ImageError says what happened.
        """
        w = self._state()
        self.flush()
        had_extension = bool(self.header.ext_off)
        data_end, saved_free = w.data_end, list(w.free)
        failed: OSError | None = None
        try:
            self._store_extension()
        except OSError as e:
            failed = e
            # Whatever was appended for the bitmaps is cut off below, so make sure the extension
            # cluster on disk is the invalidated one again (it may have been rewritten already).
            w.data_end, w.free = data_end, saved_free
            ext = self.extension
            if had_extension and ext is not None:
                self.header.ext_off = ext.offset // fmt.SECTOR
                pairs = [(bm, [fmt.L1_ALL_SET] * len(bm.l1)) for bm in ext.bitmaps]
                os.pwrite(self.fd, encode_extension(pairs, kept_features(ext), self.cluster_size), ext.offset)
                os.fdatasync(self.fd)
            else:
                self.header.ext_off = 0
        # Freed clusters at the very end are space leaked past the last cluster: cut them off.
        free = set(w.free)
        end = w.data_end
        while end - self.cluster_size in free:
            end -= self.cluster_size
        if end < self.file_size:
            os.ftruncate(self.fd, end)
            self.file_size = end
        self._set_in_use(w.closed_in_use)
        self._writer = None
        if failed is not None:
            kept = (
                "left marked all dirty (the next backup from them copies everything)"
                if had_extension
                else "not stored"
            )
            raise ImageError(
                f"{self.path}: closed cleanly, but the dirty bitmaps could not be stored"
                f" ({failed.strerror or failed}): they are {kept}"
            ) from failed


@dataclass
class _WriteState:
    """Allocation and durability bookkeeping of an image open for writing."""

    data_end: int  # where the next appended cluster goes
    closed_in_use: int  # the in_use value to restore on a clean stop
    zero_from: int  # the file's size at the open: clusters appended past it never held data
    durable_end: int  # how much of the file's size a sync has made durable
    reserved_end: int = 0  # space allocated ahead by _grow() ends here
    grow_lock: threading.Lock = field(default_factory=threading.Lock)  # one _grow() at a time
    dirty: set[int] = field(default_factory=set)  # guest clusters whose BAT entry is not yet on disk
    ordered: set[int] = field(default_factory=set)  # dirty entries whose data must be synced before them
    pending_free: list[int] = field(default_factory=list)  # released, not yet durable: not reusable
    free: list[int] = field(default_factory=list)  # released and durable: reusable
    no_punch: bool = False  # the file system refused PUNCH_HOLE: stop trying


@dataclass
class FlushToken:
    """What one flush writes: BAT entries (cluster, on-disk value) and clusters it frees.

    ORDERED: an entry needs its data synced before it; SIZE: the file's size when
    the flush began, durable once it succeeds.
    """

    entries: list[tuple[int, int]]
    pending_free: list[int]
    ordered: bool = True
    size: int = 0
