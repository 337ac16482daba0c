"""An Export: one open disk as NBD sees it: its contexts, reads and block status.

This module binds the disk layer to NBD meanings (status flags, context
names) without doing any network I/O itself.
"""

from __future__ import annotations

import asyncio
import bisect
import errno
import itertools
import operator
import struct
import sys
from array import array
from collections.abc import Awaitable, Callable, Iterable, Iterator

from prlnbd.disk.chain import Disk
from prlnbd.errors import RequestError
from prlnbd.image.extension import DirtyBitmap
from prlnbd.image.parallels import ParallelsImage
from prlnbd.nbd.connection import ExportInfo, pack_extents
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


def merge_extents(items: Iterable[tuple[int, int]], *, limit: int = MAX_EXTENTS) -> list[tuple[int, int]]:
    """Merge adjacent (length, flags) items with equal flags, stopping once LIMIT extents are complete.

    The source is consumed lazily, so the work done follows the number of
    extents returned, not the size of the range asked about.
    """
    out: list[tuple[int, int]] = []
    cur_len = 0
    cur_flags = -1
    for length, flags in items:
        if flags == cur_flags:
            cur_len += length
            continue
        if cur_len:
            out.append((cur_len, cur_flags))
            if len(out) >= limit:
                return out
        cur_len, cur_flags = length, flags
    if cur_len:
        out.append((cur_len, cur_flags))
    return out


# Block status is cached per window of this many bytes, as packed descriptors: a request
# inside one window is answered with one slice of them, its two ends re-packed. The size is
# about the largest request a client can send (nbdinfo asks for 4 GiB less one byte), so one
# window is never much more work to compute than one request.
STATUS_WINDOW = (1 << 32) - 512
# A window with more extents than this is not kept (it would cost too much memory and time
# to build): requests there are computed directly, each as far as its reply reaches.
MAX_WINDOW_EXTENTS = 2 * 64 * 1024
_U32 = struct.Struct(">I")
_pack_u32 = _U32.pack
U32_MAX = 0xFFFFFFFF
_LITTLE_ENDIAN = sys.byteorder == "little"


def final_end(start: int, end: int, known: int) -> int:
    """Where to end a reply's final extent, which starts at START and must reach END.

    The spec lets the final extent of a reply without REQ_ONE run past the
    request when the server knows anyway that the status goes on: that much
    less for a client walking the disk to ask next. It runs on to KNOWN (where
    the extent is known to end), within a u32 length and, when cut short by
    that, at a 512-byte boundary.
    """
    return min(known, max(end, (start + U32_MAX) & ~511))


class _PackedWindow:
    """One window's extents for one context: wire-ready (length, flags) pairs and where each ends."""

    __slots__ = ("data", "ends")

    def __init__(self, data: bytes, ends: array[int]) -> None:
        self.data = data
        self.ends = ends

    @classmethod
    def of(cls, start: int, extents: list[tuple[int, int]]) -> _PackedWindow:
        """The window of EXTENTS, (length, flags) pairs from START on."""
        # An extent too long for a u32 can only be the first or last of a reply, whose
        # lengths are packed afresh from `ends`: its packed length is never sent.
        data = pack_extents([(min(length, U32_MAX), flags) for length, flags in extents])
        ends = array("Q", itertools.accumulate((length for length, _ in extents), initial=start))[1:]
        return cls(data, ends)

    @classmethod
    def alternating(cls, start: int, ends: array[int], flags: int, other: int) -> _PackedWindow:
        """The window of extents from START to each of ENDS in turn, of FLAGS, OTHER, FLAGS, ..."""
        n = len(ends)
        lengths = list(map(operator.sub, ends, itertools.chain((start,), ends)))
        # Only the last extent, the one past the window, can be longer than a u32 (see of()).
        lengths[-1] = min(lengths[-1], U32_MAX)
        pairs = ([0, flags, 0, other] * ((n + 1) // 2))[: 2 * n]
        pairs[0::2] = lengths
        words = array("I", pairs)
        if _LITTLE_ENDIAN:
            words.byteswap()
        return cls(words.tobytes(), ends)

    def joined(self, following: _PackedWindow) -> _PackedWindow:
        """This window with the next one's extents after its own last: one slice reaches both.

        This window's last extent is the next one's first (the look-ahead), and
        must end where the status changes.
        """
        i = bisect.bisect_right(following.ends, self.ends[-1])
        return _PackedWindow(self.data + following.data[8 * i :], self.ends + following.ends[i:])

    def slice(self, offset: int, end: int) -> bytes | None:
        """The descriptors of [offset, end), the first clipped, the last run on (final_end).

        None past MAX_EXTENTS of them. The range must start in this window and
        end by its last extent's end.
        """
        ends = self.ends
        data = self.data
        i = bisect.bisect_right(ends, offset)
        j = bisect.bisect_left(ends, end, i)
        if i == j:
            return _pack_u32(final_end(offset, end, ends[i]) - offset) + data[8 * i + 4 : 8 * i + 8]
        if j - i >= MAX_EXTENTS:
            return None
        # Descriptors i..j: re-pack the first length and the last, keep the bytes in between.
        head = _pack_u32(ends[i] - offset)
        tail = _pack_u32(final_end(ends[j - 1], end, ends[j]) - ends[j - 1])
        return b"".join((head, data[8 * i + 4 : 8 * j], tail, data[8 * j + 4 : 8 * j + 8]))


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
        self.bitmaps: dict[str, DirtyBitmap] = {DIRTY_BITMAP_PREFIX + b.name: b for b in disk.bitmaps()}
        for bitmap in self.bitmaps.values():
            # Index where each bitmap changes now, before serving, as QEMU summarises a bitmap
            # when it loads one: each status window is then a slice of the index (warm_up()).
            bitmap.index()
        # "What changed since snapshot GUID": every cluster a layer above that snapshot holds.
        # The layer at index i (depth i+1) is snapshot GUID; layers 0..i-1 sit above it.
        self.since: dict[str, int] = {
            SINCE_PREFIX + guid.strip("{}").lower(): index
            for index, guid in enumerate(disk.guids)
            if index > 0 and guid
        }
        contexts = [BASE_ALLOCATION, ALLOCATION_DEPTH, *self.bitmaps, *self.since]
        # context -> window index -> packed extents; dropped for the windows a write touches.
        self._status_cache: dict[str, dict[int, _PackedWindow]] = {context: {} for context in contexts}
        # context -> indexes of windows found to hold more than MAX_WINDOW_EXTENTS extents.
        self._dense: dict[str, set[int]] = {context: set() for context in contexts}
        # A write changes status in whole clusters of the top image and whole granules of
        # each bitmap, so past the bytes it was given: by at most this much either side.
        top = disk.top
        self._touch_margin = max(
            [top.cluster_size if isinstance(top, ParallelsImage) else 0]
            + [b.granularity for b in self.bitmaps.values()]
        )
        layers = len(disk.layers)
        self.info = ExportInfo(
            name=name,
            size=disk.size,
            read_only=self.read_only,
            # What a remote client may learn: no server paths (they stay in the log and in `info`).
            description=f"{name}: Parallels disk, {layers} layer{'s' if layers != 1 else ''}, {_format_name(disk)}",
            contexts=contexts,
        )

    # ---- I/O: read(), write(), zero() and prefetch() may wait on storage and run in worker
    # threads; read_nowait() and changed() run on the event loop.

    def read_nowait(self, offset: int, length: int) -> tuple[Buffer, list[tuple[int, int]]] | None:
        """read(), if it can be done without waiting on storage (the data is cached); else None."""
        try:
            got = self.disk.read_nowait(offset, length)
        except OSError as e:
            raise RequestError(Errno.EIO, f"read of {length} bytes at {offset} failed: {e.strerror}") from e
        if got is None:
            return None
        buf, runs = got
        return buf, [(r.offset, r.length) for r in runs if r.zero]

    def read(self, offset: int, length: int) -> tuple[Buffer, list[tuple[int, int]]]:
        """Read guest bytes; also return the (offset, length) stretches that are holes."""
        try:
            buf, runs = self.disk.read(offset, length)
        except OSError as e:
            raise RequestError(Errno.EIO, f"read of {length} bytes at {offset} failed: {e.strerror}") from e
        return buf, [(r.offset, r.length) for r in runs if r.zero]

    def prefetch(self, offset: int, length: int) -> None:
        """Ask the kernel to read the host ranges behind [offset, offset+length) into its cache (NBD CACHE)."""
        self.disk.prefetch(offset, length)

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
        """Note that a write, zeroing or trim of the range finished (or failed part-way): before its reply.

        On the event loop, so the bitmaps and the block status never change
        under a status request being answered.
        """
        self._touched(offset, length)

    def _touched(self, offset: int, length: int) -> None:
        """Mark a changed range in every bitmap of the top image (before the reply goes out)."""
        for bitmap in self.bitmaps.values():
            bitmap.set_range(offset, length)
        if length:
            # The two windows before the first may hold its extents: the one just before holds
            # its first extent, and may have been joined with the one before that.
            margin = self._touch_margin
            first = (offset - margin) // STATUS_WINDOW - 2
            last = (offset + length - 1 + margin) // STATUS_WINDOW
            for windows in self._status_cache.values():
                if windows:
                    for index in range(first, last + 1):
                        windows.pop(index, None)
            for dense in self._dense.values():
                if dense:
                    dense.difference_update(range(first, last + 1))

    async def flush(self, run: Callable[..., Awaitable[None]]) -> None:
        """Make every write answered so far durable, across all connections (CAN_MULTI_CONN).

        RUN(fn, *args) runs the blocking part in a worker thread. Flushes run
        one at a time: a flush that finished early must not claim durability
        for BAT entries another flush is still writing. With cache mode
        "unsafe" nothing is done.
        """
        if self.read_only or self.cache == "unsafe":
            return
        async with self._flush_lock:
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

    def extents(self, context: str, offset: int, length: int, *, req_one: bool = False) -> list[tuple[int, int]]:
        """Block status of CONTEXT over the range as merged (length, flags) extents."""
        limit = 1 if req_one else MAX_EXTENTS
        return merge_extents(self._status(context, offset, length), limit=limit)

    def status_payload(self, context: str, offset: int, length: int, *, req_one: bool = False) -> bytes:
        """Block status of CONTEXT as the wire-ready descriptors of a BLOCK_STATUS chunk."""
        if req_one:
            return pack_extents(self.extents(context, offset, length, req_one=True))
        return self.packed_status(context, offset, length)

    def packed_status(self, context: str, offset: int, length: int) -> bytes:
        """The descriptors of CONTEXT from OFFSET, at most MAX_EXTENTS, packed for the wire.

        Whole windows of extents are computed once and kept packed: a request
        inside one costs two binary searches and one slice however many
        extents it returns. The protocol core calls this for every step of a
        client walking the disk (see ServerConnection.set_status_sources).
        """
        end = offset + length
        windows = self._status_cache[context]
        index = offset // STATUS_WINDOW
        window = windows.get(index)
        if window is None:
            window = self._window(context, index)
        if window is not None:
            reach = window.ends[-1]
            if end <= reach:
                payload = window.slice(offset, end)
                if payload is not None:
                    return payload
            elif reach < (index + 2) * STATUS_WINDOW:
                # Into the next window, as a walk's steps soon are once final extents run on:
                # keep this window joined with the next, so such steps are one slice too. Its
                # last extent ends short of the window after, so where the status changes.
                following = self._window(context, index + 1)
                if (
                    following is not None
                    and end <= following.ends[-1]
                    and len(window.ends) + len(following.ends) <= MAX_WINDOW_EXTENTS
                ):
                    window = windows[index] = window.joined(following)
                    payload = window.slice(offset, end)
                    if payload is not None:
                        return payload
        return self._pack_across(context, offset, end)

    def warm_up(self) -> Iterator[None]:
        """Build each bitmap context's status windows ahead of need, one window per step.

        A server runs these steps while it is idle after starting, so that the
        backup tool that connects next finds its first map as quick as later
        ones. Only bitmaps with an index (see DirtyBitmap.index) are done: for
        those a window costs a few microseconds; the other contexts read the
        disk's maps, which is better left to when a client asks.
        """
        count = -(-self.disk.size // STATUS_WINDOW)
        for context, bitmap in self.bitmaps.items():
            if bitmap.index() is None:
                continue
            for index in range(count):
                self._window(context, index)  # kept, or built now
                yield

    def _pack_across(self, context: str, offset: int, end: int) -> bytes:
        """packed_status() for a range over several windows, or a window not computed yet."""
        out = bytearray()
        count = 0
        last_flags = -1
        pos = known = offset
        # One extent more than a reply holds: only the next one shows where the last one ends,
        # when it goes on past a window boundary.
        limit = MAX_EXTENTS + 1
        while pos < end and count < limit:
            index = pos // STATUS_WINDOW
            stop = min(end, (index + 1) * STATUS_WINDOW)
            window = self._window(context, index)
            if window is None:
                # Too many extents to keep: just those this reply can hold, and one more.
                extents = merge_extents(self._status(context, pos, stop - pos), limit=limit - count + 1)
                window = _PackedWindow.of(pos, extents)
            ends = window.ends
            # Extents i..j of the window overlap [pos, stop): a whole window reaches stop,
            # one computed for this reply reaches it or holds more extents than are wanted.
            i = bisect.bisect_right(ends, pos)
            j = min(bisect.bisect_left(ends, stop), i + limit - count - 1)
            piece = bytearray(window.data[8 * i : 8 * (j + 1)])
            # Clip the first extent to start at pos and the last to end at stop.
            if i == j:
                _U32.pack_into(piece, 0, min(stop, ends[j]) - pos)
            else:
                _U32.pack_into(piece, 0, ends[i] - pos)
                _U32.pack_into(piece, 8 * (j - i), min(stop, ends[j]) - ends[j - 1])
            if _U32.unpack_from(piece, 4)[0] == last_flags:
                # The same status on both sides of a window boundary: one extent.
                merged = _U32.unpack_from(out, len(out) - 8)[0] + _U32.unpack_from(piece, 0)[0]
                _U32.pack_into(out, len(out) - 8, merged)
                del piece[:8]
                count -= 1
            out += piece
            count += j - i + 1
            last_flags = _U32.unpack_from(out, len(out) - 4)[0]
            pos = min(stop, ends[j])
            known = ends[j]
        if count == limit:
            del out[-8:]
        else:
            # The whole range is answered: run the final extent on as far as it is known.
            start = end - _U32.unpack_from(out, len(out) - 8)[0]
            _U32.pack_into(out, len(out) - 8, final_end(start, end, known) - start)
        return bytes(out)

    def _window(self, context: str, index: int) -> _PackedWindow | None:
        """Window INDEX of CONTEXT, computed now if need be; None if it holds too many extents."""
        windows = self._status_cache[context]
        window = windows.get(index)
        if window is None:
            if index in self._dense[context]:
                return None
            size = self.disk.size
            start = index * STATUS_WINDOW
            stop = min(start + STATUS_WINDOW, size)
            bitmap = self.bitmaps.get(context)
            if bitmap is not None:
                # The commonest map of all, built straight from where the bits change.
                dirty, ends = bitmap.changes(start, stop, stop + STATUS_WINDOW, MAX_WINDOW_EXTENTS)
                if len(ends) > MAX_WINDOW_EXTENTS:
                    self._dense[context].add(index)
                    return None
                flags = (STATE_DIRTY, 0) if dirty else (0, STATE_DIRTY)
                window = windows[index] = _PackedWindow.alternating(start, ends, *flags)
                return window
            items = self._status(context, start, stop - start)
            if stop < size:
                # Run on through the next window's first extent: clients walking the disk with
                # requests of another size than the window's (nbdinfo asks for 4 GiB less one
                # byte) end a little past this window, and are still answered by one slice.
                following = self._status(context, stop, min(STATUS_WINDOW, size - stop))
                items = itertools.chain(items, merge_extents(following, limit=1))
            extents = merge_extents(items, limit=MAX_WINDOW_EXTENTS + 1)
            if len(extents) > MAX_WINDOW_EXTENTS:
                self._dense[context].add(index)
                return None
            window = windows[index] = _PackedWindow.of(start, extents)
        return window

    def _status(self, context: str, offset: int, length: int) -> Iterator[tuple[int, int]]:
        if context == BASE_ALLOCATION:
            for run in self.disk.map(offset, length):
                yield run.length, (STATE_HOLE | STATE_ZERO) if run.zero else 0
        elif context == ALLOCATION_DEPTH:
            for run in self.disk.map(offset, length):
                yield run.length, run.depth
        elif context in self.since:
            above = self.since[context]
            for run in self.disk.map(offset, length):
                yield run.length, STATE_DIRTY if 1 <= run.depth <= above else 0
        else:
            bitmap = self.bitmaps.get(context)
            if bitmap is None:  # pragma: no cover - the protocol only selects offered contexts
                raise RequestError(Errno.EINVAL, f"no metadata context {context}")
            for run_len, dirty in bitmap.extents(offset, length):
                yield run_len, STATE_DIRTY if dirty else 0

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
