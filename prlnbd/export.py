"""An Export: one open disk as NBD sees it: its contexts, reads and block status.

This module binds the disk layer to NBD meanings (status flags, context
names) without doing any network I/O itself.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import itertools
import operator
import struct
import sys
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Protocol

from prlnbd.disk.chain import Disk
from prlnbd.disk.split import SplitDisk
from prlnbd.errors import PrlNbdError, RequestError
from prlnbd.image.extension import DirtyBitmap, Extension, feature_space, kept_features, new_bitmap
from prlnbd.image.parallels import ParallelsImage
from prlnbd.nbd.connection import ExportInfo
from prlnbd.nbd.constants import (
    ALLOCATION_DEPTH,
    BASE_ALLOCATION,
    DIRTY_BITMAP_PREFIX,
    STATE_DIRTY,
    STATE_HOLE,
    STATE_ZERO,
    Errno,
)

SINCE_PREFIX = DIRTY_BITMAP_PREFIX + "since-"
# As qemu-nbd's --cache: through the page cache, FLUSH syncs (writeback); data I/O with
# O_DIRECT (none); FLUSH ignored (unsafe).
CACHE_MODES = ("writeback", "none", "unsafe")
Buffer = bytes | bytearray | memoryview
# How many extents one BLOCK_STATUS chunk may carry; clients loop for the rest.
MAX_EXTENTS = 64 * 1024
# The same for a bitmap too dense to index, whose replies are scanned from its bytes on the
# event loop (about a microsecond of Python per run): a reply stays a few milliseconds of
# work, and other clients' requests are not held up behind a 64 Ki-extent scan.
SCAN_EXTENTS = 4 * 1024


_pack_one = struct.Struct(">II").pack
_pack_u32 = struct.Struct(">I").pack
_unpack_u32 = struct.Struct(">I").unpack_from
U32_MAX = 0xFFFFFFFF
_LITTLE_ENDIAN = sys.byteorder == "little"
# What a raw top layer's status is recomputed over after a write, around the bytes written:
# the file system allocates blocks, not bytes (a Parallels top changes in whole clusters).
_RAW_GRAIN = 1 << 20
class RingIO(Protocol):
    """What read_via() and write_via() need of what runs their I/O off the event loop's thread of control."""

    def read_all(
        self, ios: Sequence[tuple[int, int, memoryview, int]], callback: Callable[[BaseException | None], None]
    ) -> None: ...

    def write_all(
        self, ios: Sequence[tuple[int, memoryview, int]], callback: Callable[[BaseException | None], None]
    ) -> None: ...


# The depth map's code for "the top layer holds it, as data" (see Disk.depth_runs).
_TOP_DATA = 1 << 1


def final_end(start: int, end: int, known: int) -> int:
    """Where to end a reply's final extent, which starts at START and must reach END.

    The spec lets the final extent of a reply without REQ_ONE run past the
    request when the server knows anyway that the status goes on: that much
    less for a client walking the disk to ask next. It runs on to KNOWN (where
    the extent is known to end), within a u32 length and, when cut short by
    that, at a 512-byte boundary.
    """
    return min(known, max(end, (start + U32_MAX) & ~511))


def _pack(offset: int, ends: Sequence[int], flags: Sequence[int]) -> bytes:
    """The descriptors of extents from OFFSET to each of ENDS in turn, with FLAGS: C-level work only.

    Lengths past a u32 are packed as U32_MAX: only the first or last extent of
    a reply can be that long, and a reply packs those afresh.
    """
    n = len(ends)
    lengths = map(operator.sub, ends, itertools.chain((offset,), ends))
    if n == 1:
        return _pack_one(min(next(lengths), U32_MAX), flags[0])
    pairs = [0, 0] * n
    pairs[0::2] = list(map(min, lengths, itertools.repeat(U32_MAX, n)))
    pairs[1::2] = flags
    words = array("I", pairs)
    if _LITTLE_ENDIAN:
        words.byteswap()
    return words.tobytes()


def _alternating(n: int, dirty: bool) -> list[int]:
    """N bitmap flags that alternate, the first dirty or not."""
    pair = [STATE_DIRTY, 0] if dirty else [0, STATE_DIRTY]
    return (pair * ((n + 1) >> 1))[:n]


class _Stretches:
    """One context's block status: where it changes, and each stretch's descriptor packed for the wire.

    Stretch k is [bounds[k], bounds[k+1]); bounds starts at 0 and ends at the
    disk size. descs holds one BLOCK_STATUS descriptor per stretch (u32 length,
    u32 flags, big-endian; a length past a u32 as U32_MAX), and neighbouring
    stretches differ in flags. A reply is two binary searches and one slice of
    descs, its first and last lengths packed afresh; a change is a splice of both.
    """

    __slots__ = ("bounds", "descs")

    def __init__(self, bounds: array[int], descs: bytearray) -> None:
        self.bounds = bounds
        self.descs = descs

    @classmethod
    def of(cls, size: int, starts: list[int], codes: list[int], table: Sequence[int] | None = None) -> _Stretches:
        """The index of stretches starting at STARTS with CODES (mapped through TABLE), up to SIZE.

        Neighbours with equal values after the mapping are joined, with C-level
        iteration only (no Python per stretch).
        """
        values = list(map(table.__getitem__, codes)) if table is not None else codes
        keep = list(itertools.compress(range(len(values)), map(operator.ne, values, itertools.chain((-1,), values))))
        if len(keep) == len(values):
            bounds = array("Q", starts)
        else:
            bounds = array("Q", map(starts.__getitem__, keep))
            values = list(map(values.__getitem__, keep))
        bounds.append(size)
        return cls(bounds, bytearray(_pack(0, bounds[1:], values)) if values else bytearray())

    def value_at(self, offset: int) -> tuple[int, int]:
        """The flags at OFFSET, and where their stretch ends."""
        i = bisect.bisect_right(self.bounds, offset) - 1
        return _unpack_u32(self.descs, 8 * i + 4)[0], self.bounds[i + 1]

    def values(self) -> list[int]:
        """Every stretch's flags, in order."""
        words = array("I", self.descs)
        if _LITTLE_ENDIAN:
            words.byteswap()
        return words[1::2].tolist()

    def payload(self, offset: int, end: int, limit: int) -> bytes:
        """The descriptors of [offset, end), at most LIMIT; the last run on (final_end) unless cut short."""
        bounds = self.bounds
        descs = self.descs
        i = bisect.bisect_right(bounds, offset) - 1
        j = bisect.bisect_left(bounds, end, i + 1)  # stretches i..j-1 overlap the range
        if j - i == 1:
            return _pack_u32(final_end(offset, end, bounds[j]) - offset) + descs[8 * i + 4 : 8 * j]
        head = _pack_u32(bounds[i + 1] - offset)
        if j - i > limit:
            # Cut short: whole stretches, all inside the range (their packed lengths are exact).
            return head + descs[8 * i + 4 : 8 * (i + limit)]
        last = bounds[j - 1]
        tail = _pack_u32(final_end(last, end, bounds[j]) - last)
        return b"".join((head, descs[8 * i + 4 : 8 * j - 8], tail, descs[8 * j - 4 : 8 * j]))

    def span(self, offset: int, end: int, limit: int) -> tuple[list[int], list[int], bool]:
        """The stretches over [offset, end): their true ends, their flags, and whether LIMIT cut them short."""
        bounds = self.bounds
        i = bisect.bisect_right(bounds, offset) - 1
        j = bisect.bisect_left(bounds, end, i + 1)
        capped = j - i > limit
        if capped:
            j = i + limit
        words = array("I", self.descs[8 * i : 8 * j])
        if _LITTLE_ENDIAN:
            words.byteswap()
        return bounds[i + 1 : j + 1].tolist(), words[1::2].tolist(), capped

    def splice(self, start: int, stop: int, starts: Sequence[int], values: Sequence[int]) -> bool:
        """Make [start, stop) the stretches beginning at STARTS (the first at START) with VALUES.

        Neighbours with equal values are joined, also with the stretches
        either side. Returns whether anything changed.
        """
        bounds = self.bounds
        descs = self.descs
        n = len(bounds) - 1
        i = bisect.bisect_right(bounds, start) - 1  # the stretch holding START
        j = bisect.bisect_left(bounds, stop, i + 1)  # the stretch holding stop-1 is j-1
        lo = i - 1 if i else i  # stretches lo..hi-1 are rewritten: one more either side, to join
        hi = j + 1 if j < n else j
        old = array("I", descs[8 * lo : 8 * hi])
        if _LITTLE_ENDIAN:
            old.byteswap()
        old_values = old[1::2].tolist()
        new_starts: list[int] = []
        new_values: list[int] = []

        def add(at: int, value: int) -> None:
            if not new_values or new_values[-1] != value:
                new_starts.append(at)
                new_values.append(value)

        for k in range(lo, i):
            add(bounds[k], old_values[k - lo])
        if bounds[i] < start:
            add(bounds[i], old_values[i - lo])
        for at, value in zip(starts, values, strict=True):
            add(at, value)
        if stop < bounds[j]:
            add(stop, old_values[j - 1 - lo])
        for k in range(j, hi):
            add(bounds[k], old_values[k - lo])
        if bounds[lo:hi].tolist() == new_starts and old_values == new_values:
            return False
        ends = new_starts[1:]
        ends.append(bounds[hi])
        bounds[lo:hi] = array("Q", new_starts)
        descs[8 * lo : 8 * hi] = _pack(new_starts[0], ends, new_values)
        return True


class _BitmapStatus:
    """A stored bitmap's context: its change index (DirtyBitmap.index) as stretches, kept true by changed().

    A bitmap too dense to index is scanned instead, only as far as each reply reaches.
    """

    __slots__ = ("bitmap", "size", "stretches")

    def __init__(self, bitmap: DirtyBitmap, size: int) -> None:
        self.bitmap = bitmap
        self.size = size
        self.stretches: _Stretches | None = None
        flips = bitmap.index()
        if flips is not None:
            starts = flips.tolist()
            dirty = bool(starts) and starts[0] == 0
            if not dirty:
                starts.insert(0, 0)
            if len(starts) > 1 and starts[-1] == size:
                del starts[-1]  # a run that ends at the disk's end
            self.stretches = _Stretches.of(size, starts, _alternating(len(starts), dirty))

    def marked(self, offset: int, length: int) -> None:
        """After DirtyBitmap.set_range(offset, length): its granules are one dirty stretch now."""
        stretches = self.stretches
        if stretches is None:
            return
        if self.bitmap.index() is None:
            self.stretches = None  # too dense to index now: scanned from here on
            return
        g = self.bitmap.granularity
        start = offset - offset % g
        stop = min(self.size, offset + length + -(offset + length) % g)
        value, known = stretches.value_at(start)
        if value != STATE_DIRTY or known < stop:
            stretches.splice(start, stop, (start,), (STATE_DIRTY,))

    def payload(self, offset: int, end: int, limit: int) -> bytes:
        """As _Stretches.payload() (at most SCAN_EXTENTS extents when scanned)."""
        if self.stretches is not None:
            return self.stretches.payload(offset, end, limit)
        ends, flags, capped = self.span(offset, end, limit)
        if not capped:
            last = len(ends) - 1
            ends[last] = final_end(ends[last - 1] if last else offset, end, ends[last])
        return _pack(offset, ends, flags)

    def span(self, offset: int, end: int, limit: int) -> tuple[list[int], list[int], bool]:
        """As _Stretches.span() (at most SCAN_EXTENTS stretches when scanned)."""
        if self.stretches is not None:
            return self.stretches.span(offset, end, limit)
        # No index: scan for the changes this reply needs, and for where its last extent ends.
        limit = min(limit, SCAN_EXTENTS)
        horizon = min(self.size, end + U32_MAX)
        dirty, found = self.bitmap.changes(offset, end - 1, horizon, limit)
        ends = found.tolist()
        capped = len(ends) > limit
        if capped:
            del ends[limit:]
        return ends, _alternating(len(ends), dirty), capped


_Status = _Stretches | _BitmapStatus


class Export:
    """A named disk served over NBD."""

    def __init__(self, name: str, disk: Disk, *, read_only: bool, cache: str = "writeback") -> None:
        if cache not in CACHE_MODES:
            raise ValueError(f"cache mode {cache!r} is not one of {', '.join(CACHE_MODES)}")
        self.name = name
        self.disk = disk
        self.read_only = read_only or not disk.writable
        self.cache = cache
        if cache == "none":
            disk.open_direct()
        self._flush_lock = asyncio.Lock()
        # Writes that ended (changed()) so far, and how many of them the last flush that
        # succeeded covered: a flush with nothing new to cover needs no sync.
        self._write_gen = 0
        self._flushed_gen = 0
        self.bitmaps: dict[str, DirtyBitmap] = {DIRTY_BITMAP_PREFIX + b.name: b for b in disk.bitmaps()}
        for bitmap in self.bitmaps.values():
            # Index where each bitmap changes now, before serving, as QEMU summarises a bitmap
            # when it loads one: its context's replies are slices of that index (_BitmapStatus).
            bitmap.index()
        self._marked = [_BitmapStatus(bitmap, disk.size) for bitmap in self.bitmaps.values()]
        self._status: dict[str, _Status] = dict(zip(self.bitmaps, self._marked, strict=True))
        self._index_chain()
        self.writing = 0  # write requests in the I/O pool (see writes_paused)
        self.failed: str | None = None  # why FLUSH can no longer promise durability (a broken chain change)
        self.held: list[Callable[[], None]] | None = None  # writes waiting while paused; None: not paused
        self._drained: asyncio.Future[None] | None = None
        self.info = ExportInfo(
            name=name,
            size=disk.size,
            read_only=self.read_only,
            description=self._description(),
            contexts=self._contexts(),
        )

    def _index_chain(self) -> None:
        """Build the block status indexes of the chain's contexts from the disk's layers as they are now."""
        disk = self.disk
        # "What changed since snapshot GUID": every cluster a layer above that snapshot holds.
        # The layer at index i (depth i+1) is snapshot GUID; layers 0..i-1 sit above it.
        self.since: dict[str, int] = {
            SINCE_PREFIX + guid.strip("{}").lower(): index
            for index, guid in enumerate(disk.guids)
            if index > 0 and guid
        }
        # Block status, one index per context. The chain's contexts derive from one disk-wide
        # depth map (where the layer holding the data changes, and whether it reads as zeros),
        # each through a table from its codes (Disk.depth_runs) to the context's flags.
        size = disk.size
        starts, codes = disk.depth_runs(0, size)
        self._depth = _Stretches.of(size, starts, codes)
        most = 2 * len(disk.layers) + 2
        tables: dict[str, list[int]] = {
            BASE_ALLOCATION: [(STATE_HOLE | STATE_ZERO) if code & 1 else 0 for code in range(most)],
            ALLOCATION_DEPTH: [code >> 1 for code in range(most)],
        }
        for context, above in self.since.items():
            tables[context] = [STATE_DIRTY if 1 <= code >> 1 <= above else 0 for code in range(most)]
        self._derived = [(_Stretches.of(size, starts, codes, table), table) for table in tables.values()]
        status: dict[str, _Status] = dict(zip(tables, (index for index, _ in self._derived), strict=True))
        # The bitmaps' indexes do not depend on the layers: kept as they are.
        status.update((name, index) for name, index in self._status.items() if name in self.bitmaps)
        self._status = status
        # A write changes status in whole clusters of the top layer: recomputed over those.
        top = disk.top
        self._top = top if isinstance(top, ParallelsImage) else None
        self._grain = top.cluster_size if isinstance(top, ParallelsImage) else _RAW_GRAIN

    def _description(self) -> str:
        # What a remote client may learn: no server paths (they stay in the log and in `info`).
        layers = len(self.disk.layers)
        return f"{self.name}: Parallels disk, {layers} layer{'s' if layers != 1 else ''}, {_format_name(self.disk)}"

    def _contexts(self) -> list[str]:
        return [BASE_ALLOCATION, ALLOCATION_DEPTH, *self.bitmaps, *self.since]

    def chain_changed(self) -> None:
        """The disk's layers changed (an online snapshot or merge): index them again, offer the new contexts.

        Connections keep the contexts they chose: a since-GUID context of a snapshot merged away
        answers EINVAL from then on.
        """
        self._index_chain()
        self.info.description = self._description()
        self._publish()

    # ---- pausing writes: the chain changes between requests

    @contextlib.asynccontextmanager
    async def flushes_held(self) -> AsyncIterator[None]:
        """Hold flushes (after any running one): none completes, so none claims durability, until the block ends."""
        async with self._flush_lock:
            yield

    @contextlib.asynccontextmanager
    async def writes_paused(self) -> AsyncIterator[None]:
        """Hold new writes and wait for those in flight: the layer they go to may change meanwhile.

        Reads go on. The writes held are started, in order, when the block ends.
        """
        self.held = []
        try:
            while self.writing:
                self._drained = asyncio.get_running_loop().create_future()
                await self._drained
            yield
        finally:
            held, self.held = self.held, None
            for go in held:
                go()

    def write_started(self) -> None:
        """A write request went to the I/O pool."""
        self.writing += 1

    def write_ended(self) -> None:
        """A write request's I/O ended (with or without success)."""
        self.writing -= 1
        drained = self._drained
        if not self.writing and drained is not None and not drained.done():
            drained.set_result(None)

    # ---- I/O: read(), write(), zero() and prefetch() may wait on storage and run in worker
    # threads; read_nowait() and changed() run on the event loop.

    def read_nowait(
        self, offset: int, length: int, cached: bool = False
    ) -> tuple[Buffer, list[tuple[int, int]]] | None:
        """read(), if it can be done without waiting on storage (the data is cached); else None.

        CACHED: the range was found cached a moment ago (file_run()): try even while reads keep
        missing the cache (Disk.read_nowait())."""
        try:
            got = self.disk.read_nowait(offset, length, cached)
        except OSError as e:
            raise RequestError(Errno.EIO, f"read of {length} bytes at {offset} failed: {e.strerror}") from e
        if got is None:
            return None
        buf, runs = got
        return buf, [(r.offset, r.length) for r in runs if r.zero]

    def file_run(self, offset: int, length: int) -> tuple[int, int, bool] | None:
        """(fd, host offset, all cached) of bytes that may be lent to a socket by reference (sendfile)
        once cached, for the event loop: one run of one frozen layer's file (Disk.file_run()).
        Else None."""
        return self.disk.file_run(offset, length)

    def fill_cache(self, offset: int, length: int) -> bool:
        """Bring bytes that file_run() would lend into the page cache, copying nothing out; False when
        they are not one run of one file (read() them then). For a worker thread."""
        try:
            return self.disk.fill_cache(offset, length)
        except OSError as e:
            raise RequestError(Errno.EIO, f"read of {length} bytes at {offset} failed: {e.strerror}") from e

    def read(self, offset: int, length: int) -> tuple[Buffer, list[tuple[int, int]]]:
        """Read guest bytes; also return the (offset, length) stretches that are holes."""
        try:
            buf, runs = self.disk.read(offset, length)
        except OSError as e:
            raise RequestError(Errno.EIO, f"read of {length} bytes at {offset} failed: {e.strerror}") from e
        return buf, [(r.offset, r.length) for r in runs if r.zero]

    def read_via(
        self,
        reader: RingIO,
        offset: int,
        length: int,
        callback: Callable[[tuple[Buffer, list[tuple[int, int]]] | None, BaseException | None], None],
    ) -> None:
        """read(), its data runs run by READER (io_uring, on the event loop); then CALLBACK(result, None)
        or CALLBACK(None, error), as the I/O pool calls back."""
        try:
            plan = self.disk.read_begin(offset, length)
        except OSError as e:
            raise RequestError(Errno.EIO, f"read of {length} bytes at {offset} failed: {e.strerror}") from e

        def done(error: BaseException | None) -> None:
            plan.release()
            if isinstance(error, OSError):
                callback(None, RequestError(Errno.EIO, f"read of {length} bytes at {offset} failed: {error.strerror}"))
            elif error is not None:
                callback(None, error)
            else:
                callback((plan.buf, [(r.offset, r.length) for r in plan.runs if r.zero]), None)

        try:
            reader.read_all(plan.ios, done)
        except BaseException:
            plan.release()
            raise

    def prefetch(self, offset: int, length: int) -> None:
        """Ask the kernel to read the host ranges behind [offset, offset+length) into its cache (NBD CACHE)."""
        self.disk.prefetch(offset, length)

    def write_via(
        self, ring: RingIO, offset: int, data: memoryview, callback: Callable[[None, BaseException | None], None]
    ) -> bool:
        """write() run by RING (io_uring, on the event loop), when the top layer holds every cluster
        of the range already; then CALLBACK(None, None) or CALLBACK(None, error), as the I/O pool
        calls back. False, and nothing done, when the write must allocate: that is write()'s work
        (copy-on-write under the disk's lock), for the pool.
        """
        try:
            plan = self.disk.write_begin(offset, data)
        except OSError as e:
            raise _write_error("WRITE", len(data), offset, e) from e
        if plan is None:
            return False

        def done(error: BaseException | None) -> None:
            plan.release()
            if isinstance(error, OSError):
                callback(None, _write_error("WRITE", len(data), offset, error))
            else:
                callback(None, error)

        try:
            ring.write_all(plan.ios, done)
        except BaseException:
            plan.release()
            raise
        return True

    def write(self, offset: int, data: memoryview) -> None:
        """Write DATA at OFFSET (copy-on-write into the top layer). The caller then calls changed()."""
        try:
            self.disk.write(offset, data)
        except OSError as e:
            raise _write_error("WRITE", len(data), offset, e) from e

    def zero(self, offset: int, length: int, *, trim: bool, no_hole: bool = False, fast: bool = False) -> None:
        """WRITE_ZEROES or TRIM over the range. The caller then calls changed()."""
        name = "TRIM" if trim else "WRITE_ZEROES"
        try:
            self.disk.zero(offset, length, trim=trim, no_hole=no_hole, fast=fast)
        except NotImplementedError as e:
            raise RequestError(Errno.ENOTSUP, f"FAST_ZERO: {e}") from e
        except OSError as e:
            raise _write_error(name, length, offset, e) from e

    def changed(self, offset: int, length: int) -> None:
        """Keep block status true after a write, zeroing or trim of the range (before the reply goes out).

        Called on the event loop once the I/O finished (or failed part-way), so
        the bitmaps and the indexes never change under a status request.

        Marks the range in every bitmap of the top image, and recomputes the
        depth map over the top layer's clusters the range touches, splicing
        the result into it and into each context derived from it.
        """
        self._write_gen += 1
        size = self.disk.size
        end = min(offset + length, size)
        if end <= offset:
            return
        for status in self._marked:
            status.bitmap.set_range(offset, length)
            status.marked(offset, length)
        depth = self._depth
        code, known = depth.value_at(offset)
        if code == _TOP_DATA and known >= end and self._top_holds(offset, end):
            return  # the commonest write: into data the top layer held already, and still holds
        grain = self._grain
        start = offset - offset % grain
        stop = min(size, end + -end % grain)
        starts, codes = self.disk.depth_runs(start, stop)
        if not depth.splice(start, stop, starts, codes):
            return
        for index, table in self._derived:
            index.splice(start, stop, starts, list(map(table.__getitem__, codes)))

    def _top_holds(self, offset: int, end: int) -> bool:
        """Whether the top layer holds every cluster of [offset, end) (a raw top holds everything, for good)."""
        top = self._top
        if top is None:
            return True  # a raw file never gives data back: zeroing it writes zeros
        cs = top.cluster_size
        first = offset // cs
        last = (end - 1) // cs
        bat = top.bat
        if last >= len(bat) or not bat[first] or not bat[last]:
            return False
        if last - first < 2:
            return True
        alloc = top.allocated
        k = bisect.bisect_left(alloc, first)
        # Cluster indexes are distinct and sorted: LAST sits that far on only if all between are there.
        return k + last - first < len(alloc) and alloc[k + last - first] == last

    async def flush(self, run: Callable[..., Awaitable[None]]) -> None:
        """Make every write answered so far durable, across all connections (CAN_MULTI_CONN).

        RUN(fn, *args) runs the blocking part in a worker thread. Flushes run
        one at a time: a flush that finished early must not claim durability
        for BAT entries another flush is still writing. A flush must cover the
        writes that ended before it arrived; when a successful flush began after
        all of them had ended (it maps their clusters too), this one has nothing
        to make durable and syncs nothing, as QEMU's block layer does: flushes
        that queue behind a running sync, from one client flushing every few
        writes or from several connections, are covered by the next sync that
        starts, not each by a sync of its own. With cache mode "unsafe" nothing is done.
        """
        if self.read_only or self.cache == "unsafe":
            return
        arrived = self._write_gen
        async with self._flush_lock:
            if self.failed is not None:
                raise RequestError(Errno.EIO, f"FLUSH failed: {self.failed}")
            if arrived <= self._flushed_gen:
                return
            gen = self._write_gen
            token = self.disk.begin_flush()
            try:
                await run(self.disk.flush_io, token)
            except OSError as e:
                self.disk.end_flush(token, False)
                raise RequestError(Errno.EIO, f"FLUSH failed: {e.strerror}") from e
            except BaseException:
                self.disk.end_flush(token, False)
                raise
            self.disk.end_flush(token, True)
            self._flushed_gen = gen

    def extents(self, context: str, offset: int, length: int, *, req_one: bool = False) -> list[tuple[int, int]]:
        """Block status of CONTEXT over the range as merged (length, flags) extents, none past its end.

        At most MAX_EXTENTS of them (one with REQ_ONE); clients ask again for the rest.
        """
        end = offset + length
        ends, flags, capped = self._index(context).span(offset, end, 1 if req_one else MAX_EXTENTS)
        if not capped:
            ends[-1] = min(ends[-1], end)
        lengths = map(operator.sub, ends, itertools.chain((offset,), ends))
        return list(zip(lengths, flags, strict=False))

    def status_payload(self, context: str, offset: int, length: int, *, req_one: bool = False) -> bytes:
        """Block status of CONTEXT as the wire-ready descriptors of one BLOCK_STATUS chunk.

        Two binary searches in the context's index and one slice of its packed
        descriptors, the first and last packed afresh: the cost follows the
        number of extents returned. Without REQ_ONE the final extent runs on as
        far as its status is known to go (final_end()).
        """
        end = offset + length
        if req_one:
            ends, flags, _ = self._index(context).span(offset, end, 1)
            return _pack_one(min(ends[0], end) - offset, flags[0])
        return self._index(context).payload(offset, end, MAX_EXTENTS)

    def _index(self, context: str) -> _Status:
        try:
            return self._status[context]
        except KeyError:  # a bitmap removed (control socket) after this connection chose its context
            raise RequestError(Errno.EINVAL, f"no metadata context {context}") from None

    # ---- bitmaps changed while serving (the control socket); on the event loop, in memory only:
    # the top image stores its bitmaps at the clean stop, as it stores those it was opened with.

    def add_bitmap(self, name: str | None, granularity: int) -> DirtyBitmap:
        """Add a clean bitmap to the top image: writes mark it from now on; new connections see its context."""
        top = self._writable_top("add a bitmap")
        if isinstance(self.disk, SplitDisk):  # a part in every piece's top image
            return self._track(self.disk.add_bitmap(name, granularity))
        bm = new_bitmap(top.size, granularity, name, chunk=top.cluster_size)
        ext = top.extension if top.extension is not None else Extension(offset=0)
        if any(b.id == bm.id for b in ext.bitmaps):
            raise PrlNbdError(f"export {self.name!r}: bitmap {bm.name} already exists")
        if feature_space([*ext.bitmaps, bm], kept_features(ext), top.cluster_size) > top.cluster_size:
            raise PrlNbdError(
                f"export {self.name!r}: no room for another bitmap in {top.path}'s"
                f" {top.cluster_size}-byte extension cluster"
            )
        ext.bitmaps.append(bm)
        top.extension = ext
        return self._track(bm)

    def _track(self, bm: DirtyBitmap) -> DirtyBitmap:
        """Serve a bitmap just added: writes mark it; new connections see its context."""
        bm.index()
        context = DIRTY_BITMAP_PREFIX + bm.name
        self.bitmaps[context] = bm
        status = _BitmapStatus(bm, self.disk.size)
        self._marked.append(status)
        self._status[context] = status
        self._publish()
        return bm

    def remove_bitmap(self, name: str) -> DirtyBitmap:
        """Remove a bitmap from the top image; connections that chose its context get EINVAL for it."""
        top = self._writable_top("remove a bitmap")
        context, bm = self._bitmap(name)
        if isinstance(self.disk, SplitDisk):
            self.disk.remove_bitmap(bm)
        elif top.extension is not None:
            top.extension.bitmaps.remove(bm)
        del self.bitmaps[context]
        status = self._status.pop(context)
        self._marked.remove(status)  # type: ignore[arg-type]
        self._publish()
        return bm

    def clear_bitmap(self, name: str) -> DirtyBitmap:
        """Mark a bitmap of the top image all clean (writes go on marking it)."""
        self._writable_top("clear a bitmap")
        context, bm = self._bitmap(name)
        bm.clear()
        old = self._status[context]
        status = _BitmapStatus(bm, self.disk.size)
        self._marked[self._marked.index(old)] = status  # type: ignore[arg-type]
        self._status[context] = status
        return bm

    def _writable_top(self, what: str) -> ParallelsImage:
        if self.read_only:
            raise PrlNbdError(f"export {self.name!r} is read-only: cannot {what}")
        top = self._top
        if top is None:
            raise PrlNbdError(f"export {self.name!r}: its top image is a plain image, which holds no bitmaps")
        return top

    def _bitmap(self, name: str) -> tuple[str, DirtyBitmap]:
        context = DIRTY_BITMAP_PREFIX + name.lower()
        bm = self.bitmaps.get(context)
        if bm is None:
            raise PrlNbdError(f"export {self.name!r}: no dirty bitmap named {name}")
        return context, bm

    def _publish(self) -> None:
        """Offer the contexts as they are now to connections that negotiate from now on."""
        self.info.contexts = self._contexts()

    def close(self) -> None:
        """Close the disk (a clean stop for a writable one)."""
        self.disk.close()


_NO_SPACE = frozenset((errno.ENOSPC, errno.EDQUOT, errno.EFBIG))


def _write_error(name: str, length: int, offset: int, e: OSError) -> RequestError:
    """The NBD error for a failed write: ENOSPC for a full file system (as the spec asks), else EIO."""
    code = Errno.ENOSPC if e.errno in _NO_SPACE else Errno.EIO
    return RequestError(code, f"{name} of {length} bytes at {offset} failed: {e.strerror}")


def _format_name(disk: Disk) -> str:
    """The kind of image the disk's top layer is, for the export description."""
    top = disk.top
    if isinstance(top, ParallelsImage):
        return f"expandable image v{top.version}"
    return "plain image"
