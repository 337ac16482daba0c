"""A Parallels disk: its snapshot chain of layers, resolved into runs for reads and allocation."""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import mmap
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol

from prlnbd.disk.descriptor import Descriptor, ImageEntry, Piece, descriptor_path, parse_descriptor
from prlnbd.disk.pagecache import Residency
from prlnbd.errors import DescriptorError, ImageError
from prlnbd.image import format as fmt
from prlnbd.image.extension import DirtyBitmap
from prlnbd.image.parallels import FlushToken, ParallelsImage, Problem, Segment
from prlnbd.image.raw import RawImage

# Offsets, lengths and buffers of direct I/O (cache=none) are aligned to this: the largest
# logical block size of common devices. Anything less aligned goes through the page cache.
DIRECT_ALIGN = 4096
# read_nowait() stops asking the page cache after this many misses in a row, and then asks
# once in NOWAIT_PROBE reads until one finds its data cached.
NOWAIT_GIVE_UP = 8
NOWAIT_PROBE = 16
# The most layers a disk's chain may have (the top image and its snapshots down to the root).
# Checked before any image is opened: each layer holds an open file, and every read walks the
# chain down to the first layer that holds the bytes. Parallels Desktop chains are far shorter.
MAX_CHAIN_LENGTH = 256


class Layer(Protocol):
    """What the chain needs of one image, expandable or plain."""

    path: Path
    fd: int
    writable: bool
    problems: list[Problem]

    @property
    def size(self) -> int: ...

    def segments(self, offset: int, length: int) -> Iterator[Segment]: ...

    def close(self) -> None: ...


_DEVNULL: list[int] = []


def _devnull() -> int:
    """A descriptor of /dev/null open for writing, opened once per process (fill_cache())."""
    if not _DEVNULL:
        fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        if _DEVNULL:  # another worker opened it meanwhile
            os.close(fd)
        else:
            _DEVNULL.append(fd)
    return _DEVNULL[0]


def close_all(things: Iterable[Layer] | Iterable[Disk]) -> None:
    """Close each of THINGS, even when closing one fails; then raise the first failure."""
    error: BaseException | None = None
    for thing in things:
        try:
            thing.close()
        except BaseException as e:  # re-raised below, once the others are closed
            error = error or e
    if error is not None:
        raise error


@dataclass
class _Plan:
    """I/O resolved through the chain for the caller to run; it holds the disk's epochs until release()."""

    releases: list[Callable[[], None]] = field(default_factory=list, kw_only=True)

    def release(self) -> None:
        """The I/O ended (or will never run): let the disk reuse what it looked up."""
        releases, self.releases = self.releases, []
        for release in releases:
            release()


@dataclass
class ReadPlan(_Plan):
    """A read resolved through the chain: see Disk.read_begin()."""

    buf: bytes | bytearray | memoryview
    runs: list[Run]
    ios: list[tuple[int, int, memoryview, int]]


@dataclass
class WritePlan(_Plan):
    """A write into clusters the top layer holds already: see Disk.write_begin()."""

    ios: list[tuple[int, memoryview, int]]


class Run:
    """A stretch of the disk resolved through the chain.

    depth is 1 for the top layer, 2 for its parent, ..., 0 where no layer
    holds the bytes; zero means the bytes read as zeros without any I/O.
    """

    __slots__ = ("depth", "host", "layer", "length", "offset", "zero")

    def __init__(self, offset: int, length: int, depth: int, layer: Layer | None, host: int, zero: bool) -> None:
        self.offset = offset
        self.length = length
        self.depth = depth
        self.layer = layer
        self.host = host
        self.zero = zero

    def __repr__(self) -> str:
        return f"Run({self.offset}, {self.length}, depth={self.depth}, host={self.host}, zero={self.zero})"


@dataclass
class Disk:
    """An open disk: layers top first, its size and where it came from."""

    path: Path
    layers: list[Layer]
    guids: list[str]
    size: int
    descriptor: Descriptor | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def top(self) -> Layer:
        """The layer writes go to."""
        return self.layers[0]

    @property
    def parts(self) -> list[Disk]:
        """The disks whose chains make this one, each with its own layers: this one (a split disk: its pieces)."""
        return [self]

    @property
    def writable(self) -> bool:
        """Whether the top layer is open for writing."""
        return self.layers[0].writable

    def bitmaps(self) -> list[DirtyBitmap]:
        """The dirty bitmaps stored in the top image."""
        top = self.layers[0]
        ext = top.extension if isinstance(top, ParallelsImage) else None
        return list(ext.bitmaps) if ext is not None else []

    def close(self) -> None:
        """Close every layer (and the direct I/O twins of their descriptors), even when closing one fails.

        No I/O may be running. The first failure is raised once every layer is closed.
        """
        top = self.layers[0]
        if isinstance(top, ParallelsImage) and top.writable:
            # Nothing reads any more: quarantined clusters are free, and a clean stop cuts
            # those at the end of the file off.
            while self._quarantine:
                top.reuse(self._quarantine.popleft()[1])
        while self._retired:
            self._close_layers(self._retired.popleft()[1])
        for dfd in self._direct.values():
            os.close(dfd)
        self._direct.clear()
        for residency in self._residency.values():
            residency.close()
        self._residency.clear()
        close_all(self.layers)

    def map(self, offset: int, length: int) -> Iterator[Run]:
        """Resolve [offset, offset+length) into merged runs, walking the chain once.

        Adjacent pieces merge when they come from the same layer at contiguous
        host offsets or are zeros at the same depth, so one run is one I/O.
        """
        pending: Run | None = None
        for run in self._resolve(0, offset, length):
            if pending is None:
                pending = run
            elif (
                run.depth == pending.depth
                and run.zero == pending.zero
                and (run.zero or (run.layer is pending.layer and run.host == pending.host + pending.length))
            ):
                pending.length += run.length
            else:
                yield pending
                pending = run
        if pending is not None:
            yield pending

    def _resolve(self, index: int, offset: int, length: int) -> Iterator[Run]:
        """The runs of [offset, offset+length) as layers INDEX and below resolve it, in order.

        Iterative, with one segment iterator per layer the range falls through, so
        the depth of the chain costs no Python recursion.
        """
        layers = self.layers
        count = len(layers)
        if index >= count:
            yield Run(offset, length, 0, None, 0, True)
            return
        stack = [(index, layers[index].segments(offset, length))]
        while stack:
            i, segments = stack[-1]
            seg = next(segments, None)
            if seg is None:
                stack.pop()
            elif seg.host is not None:
                yield Run(seg.offset, seg.length, i + 1, layers[i], seg.host, seg.zero)
            elif i + 1 == count:
                yield Run(seg.offset, seg.length, 0, None, 0, True)
            else:
                stack.append((i + 1, layers[i + 1].segments(seg.offset, seg.length)))

    def depth_runs(self, offset: int, end: int) -> tuple[list[int], list[int]]:
        """Where the layer holding guest bytes [offset, end) changes: (starts, codes).

        Stretch k runs from starts[k] to starts[k+1] (the last to END) and has
        code depth << 1 | zero: depth as in Run (0 where no layer holds the
        bytes), zero set where they read as zeros without I/O (no layer, or a
        hole in a raw layer). Neighbouring stretches differ in code. What map()
        says, less the host offsets, and read-only like it: a Parallels layer's
        runs of allocated clusters are taken whole (allocated_runs), so the cost
        follows the number of stretches, not of clusters.
        """
        starts: list[int] = []
        codes: list[int] = []
        if offset < end:
            self._depths_into(0, offset, end, starts, codes)
        return starts, codes

    def _depths_into(self, index: int, offset: int, end: int, starts: list[int], codes: list[int]) -> None:
        """depth_runs() of [offset, end) from layer INDEX down, appended to STARTS and CODES."""
        if index == len(self.layers):
            if not codes or codes[-1] != 1:
                starts.append(offset)
                codes.append(1)  # depth 0, reads as zeros
            return
        layer = self.layers[index]
        code = (index + 1) << 1
        if type(layer) is ParallelsImage:
            cs = layer.cluster_size
            pos = offset
            bottom = index + 1 == len(self.layers)  # the gaps are depth 0: no call per gap
            for first, last in layer.allocated_runs(offset // cs, -(-end // cs)):
                start = max(offset, first * cs)
                if start > pos:
                    if bottom:
                        if not codes or codes[-1] != 1:
                            starts.append(pos)
                            codes.append(1)
                    else:
                        self._depths_into(index + 1, pos, start, starts, codes)
                if not codes or codes[-1] != code:
                    starts.append(start)
                    codes.append(code)
                pos = min(end, last * cs)
            if pos < end:
                self._depths_into(index + 1, pos, end, starts, codes)
            return
        for seg in layer.segments(offset, end - offset):
            if seg.host is None:
                self._depths_into(index + 1, seg.offset, seg.offset + seg.length, starts, codes)
                continue
            seg_code = code | seg.zero
            if not codes or codes[-1] != seg_code:
                starts.append(seg.offset)
                codes.append(seg_code)

    # ---- concurrency
    #
    # Reads and writes run at once: in the I/O pool's worker threads and, for reads that
    # need no waiting on storage, on the event loop. Changes to the top layer's map and
    # allocation happen under _lock. Lookups take no lock: each BAT or allocation-list
    # access is atomic under the GIL, and the image changes them in an order a reader can
    # tolerate (it sees a cluster mapped a little early or late, as a concurrent request may).
    #
    # What no reader may see is a released host cluster reused for other data while it still
    # reads or writes it. Every I/O in a worker runs inside an epoch (_enter/_leave); a flush
    # that makes releases durable puts their host clusters in quarantine under the current
    # epoch and starts a new one (end_flush, on the thread that answers requests); they become
    # reusable once no I/O of that epoch or older is running. A TRIM or zeroing punches the
    # clusters it released before it leaves its epoch, so never one already reused.

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._allocating: dict[int, threading.Event] = {}  # guest cluster -> set once it is mapped
        self._epoch = 0
        self._active: dict[int, int] = {}  # epoch -> I/O of it still running
        self._quarantine: collections.deque[tuple[int, list[int]]] = collections.deque()
        self._retired: collections.deque[tuple[int, list[Layer]]] = collections.deque()  # see replace_layers()
        self._epoch_ended = threading.Condition(self._lock)  # notified when the last I/O of an epoch ends
        self._direct: dict[int, int] = {}  # layer fd -> its O_DIRECT twin (cache=none)
        self._no_nowait: set[int] = set()  # fds whose file system refuses RWF_NOWAIT reads
        self._residency: dict[int, Residency] = {}  # layer fd -> its page cache residency (file_run())
        self._misses = 0  # read_nowait() calls in a row that found their data not cached
        self._skipped = 0

    def _enter(self) -> int:
        with self._lock:
            epoch = self._epoch
            self._active[epoch] = self._active.get(epoch, 0) + 1
        return epoch

    def _leave(self, epoch: int) -> None:
        with self._lock:
            active = self._active
            left = active[epoch] - 1
            if left:
                active[epoch] = left
            else:
                del active[epoch]
                if self._quarantine:
                    self._reclaim()
                if self._retired:
                    self._epoch_ended.notify_all()

    def _reclaim(self) -> None:
        """Hand quarantined host clusters back for reuse once no I/O that might use them runs (under _lock)."""
        oldest = min(self._active) if self._active else self._epoch + 1
        top = self.layers[0]
        while self._quarantine and self._quarantine[0][0] < oldest:
            _, hosts = self._quarantine.popleft()
            if isinstance(top, ParallelsImage):
                top.reuse(hosts)

    def close_retired(self) -> None:
        """Close the layers replace_layers() took out, once no I/O that may have looked them up runs.

        Waits for that I/O to end: for a worker thread. The close itself is done
        outside every lock and off the event loop: closing the last descriptor of a
        file a merge deleted frees its storage, which can take long.
        """
        while True:
            with self._lock:
                while self._retired and self._retired[0][0] >= (min(self._active) if self._active else self._epoch):
                    self._epoch_ended.wait()
                if not self._retired:
                    return
                _, layers = self._retired.popleft()
            self._close_layers(layers)

    def _close_layers(self, layers: list[Layer]) -> None:
        for layer in layers:
            dfd = self._direct.pop(layer.fd, None)
            if dfd is not None:
                os.close(dfd)
            residency = self._residency.pop(layer.fd, None)
            if residency is not None:
                residency.close()
        close_all(layers)

    # ---- changing the chain while it is served (online snapshot and merge), from the event loop.
    # The layer list is replaced, never changed in place: a lookup that took the old list finishes
    # with it, and what it found there reads the same as through the new one.

    def push_top(self, tops: list[Layer], guid: str) -> None:
        """Put TOPS[0] on the chain as its new top, snapshot GUID; the old top is to be frozen (ParallelsImage.seal).

        No write may be running. (A split disk takes one new top per piece.)
        """
        (top,) = tops
        with self._lock:
            self.layers = [top, *self.layers]
            self.guids = [guid, *self.guids]
            # Clusters the old top released stay holes in it: none may be handed to the new top.
            self._quarantine.clear()
        if self._direct:
            self.open_direct()

    def replace_layers(self, index: int, count: int, new: list[Layer], guids: list[str]) -> None:
        """Put NEW (with GUIDS) in place of layers[index:index+count] (a merge), reading the same.

        The layers taken out are closed by close_retired(), once no I/O that may have looked them up runs.
        """
        with self._lock:
            old = self.layers[index : index + count]
            self.layers = [*self.layers[:index], *new, *self.layers[index + count :]]
            self.guids = [*self.guids[:index], *guids, *self.guids[index + count :]]
            self._retired.append((self._epoch, old))
            self._epoch += 1
        if self._direct:
            self.open_direct()

    # ---- cache modes

    @property
    def direct(self) -> bool:
        """Whether data I/O bypasses the page cache (O_DIRECT, `--cache=none`)."""
        return bool(self._direct)

    def open_direct(self) -> None:
        """Open every layer a second time with O_DIRECT, for data I/O that is aligned to DIRECT_ALIGN.

        Headers, BAT entries and unaligned pieces keep using the buffered
        descriptor; Linux keeps the two coherent (direct I/O writes back and
        drops the cached pages it overlaps). Raises ImageError naming the file
        when its file system refuses direct I/O.
        """
        for layer in self.layers:
            if layer.fd in self._direct:
                continue
            mode = os.O_RDWR if layer.writable else os.O_RDONLY
            try:
                dfd = os.open(f"/proc/self/fd/{layer.fd}", mode | os.O_DIRECT | os.O_CLOEXEC)
                # Some file systems accept the flag at open and refuse the I/O: try one read.
                os.preadv(dfd, [mmap.mmap(-1, DIRECT_ALIGN)], 0)
            except OSError as e:
                with contextlib.suppress(NameError, OSError):
                    os.close(dfd)
                raise ImageError(
                    f"{layer.path}: its file system refuses direct I/O (O_DIRECT), which --cache=none needs:"
                    f" {e.strerror}; serve it with --cache=writeback"
                ) from e
            self._direct[layer.fd] = dfd

    # ---- reading

    def read(self, offset: int, length: int) -> tuple[bytes | bytearray | memoryview, list[Run]]:
        """Read guest bytes into a new buffer; also return the runs (as map() gives them), for sparse replies.

        May wait on storage: for a worker thread.
        """
        epoch = self._enter()
        try:
            runs = self._runs(offset, length)
            buf = self._buffer(length)
            view = memoryview(buf)
            for run in runs:
                if not run.zero and run.layer is not None:
                    start = run.offset - offset
                    self._pread_into(run.layer.fd, view[start : start + run.length], run.host)
            return buf, runs
        finally:
            self._leave(epoch)

    def fill_cache(self, offset: int, length: int) -> bool:
        """Bring the guest bytes [offset, offset+length) into the page cache without copying them out,
        when they are one data run of one file (as file_run() lends them); False otherwise.

        May wait on storage: for a worker thread. The half of a READ whose reply then
        goes by sendfile: the data goes from the file to /dev/null by splice, which
        reads it into the cache (with the layer's own readahead) and copies nothing.
        """
        epoch = self._enter()
        try:
            found = self._data_run(offset, length)
            if found is None:
                return False
            fd, host = found[0].fd, found[1].host
            done = 0
            while done < length:
                try:
                    n = os.sendfile(_devnull(), fd, host + done, length - done)
                except OSError as e:
                    if e.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                        return False  # a file system that cannot splice: read() it
                    raise
                if n <= 0:
                    return False  # past the end of the file: read() knows what that reads as
                done += n
            return True
        finally:
            self._leave(epoch)

    def read_begin(self, offset: int, length: int) -> ReadPlan:
        """What read() would do, as reads for the caller to run (io_uring): the buffer, the runs and,
        per data run, (fd, buffered fd, part of the buffer, host offset).

        The plan holds this read's epoch until its release() is called, after the
        last of its reads ended: no cluster it looked up is reused, and no layer
        it reads is closed, before then.
        """
        epoch = self._enter()
        try:
            runs = self._runs(offset, length)
            buf = self._buffer(length)
            ios = self._ios_into(memoryview(buf), offset, runs)
        except BaseException:
            self._leave(epoch)
            raise
        return ReadPlan(buf, runs, ios, releases=[partial(self._leave, epoch)])

    def _ios_into(self, view: memoryview, offset: int, runs: list[Run]) -> list[tuple[int, int, memoryview, int]]:
        ios = []
        for run in runs:
            if not run.zero and run.layer is not None:
                start = run.offset - offset
                piece = view[start : start + run.length]
                fd = run.layer.fd
                dfd = self._direct.get(fd)
                use = dfd if dfd is not None and _aligned(run.host, run.length) and _aligned_memory(piece) else fd
                ios.append((use, fd, piece, run.host))
        return ios

    def read_nowait(
        self, offset: int, length: int, cached: bool = False
    ) -> tuple[bytes | bytearray | memoryview, list[Run]] | None:
        """read(), when every byte can be had without waiting on storage (cached, or a hole); else None.

        CACHED: the caller found the range cached a moment ago: it is tried even while reads
        keep missing the cache (which otherwise skips most attempts).

        For the event loop: a READ of cached data is answered at once, and only
        a read that would wait goes to a worker thread. It needs no epoch: a
        released cluster becomes reusable only in end_flush(), which runs on
        this same thread, so not between this read's lookup and its preadv.
        """
        runs = self._runs(offset, length)
        buf: bytearray | None = None
        for run in runs:
            if run.zero or run.layer is None:
                continue
            fd = run.layer.fd
            if fd in self._no_nowait or self._direct:
                return None
            if buf is None:
                if self._misses >= NOWAIT_GIVE_UP and not cached:
                    # Reads keep missing the cache: an attempt only costs the loop time (and it
                    # starts the disk read there). Ask again now and then, to notice a warm cache.
                    self._skipped += 1
                    if self._skipped % NOWAIT_PROBE:
                        return None
                buf = bytearray(length)
            start = run.offset - offset
            if not self._pread_nowait(fd, memoryview(buf)[start : start + run.length], run.host):
                self._misses += 1
                return None
        self._misses = 0
        return (buf if buf is not None else bytearray(length)), runs

    def file_run(self, offset: int, length: int) -> tuple[int, int, bool] | None:
        """(fd, host offset, whether every page of it is in the page cache) when the range is one data
        run of one frozen layer (not a writable top): bytes that may be lent to a socket by reference
        (sendfile) once cached. Else None.

        For the event loop, like read_nowait(); asking does not read (mincore). The
        descriptor is the layer's file opened for the loop's reads (Residency.fd).
        """
        # Linux hands page-cache pages to a socket by reference and the client copies them only
        # when it reads, maybe much later. Until then the client's READ is in flight, so the bytes
        # may become anything the disk held at that offset since the read was made, but never
        # bytes of another offset. A writable top breaks that: its clusters are released and
        # reused for other offsets. A frozen layer keeps it: nothing releases or reuses its
        # clusters, and the one thing that writes it while it is served, an online merge "up" of
        # its child into it, writes only clusters the child hides, with the child's bytes for the
        # same offsets; the child got them after the read was made (else the read would have come
        # from the child), so they are what the disk held there since. The merged snapshot, whose
        # state never held them, has no export of its own during a merge (online.merge,
        # online.export_snapshot).
        if self._direct or (self.writable and len(self.layers) == 1):
            return None
        found = self._data_run(offset, length)
        if found is None:
            return None
        layer, run = found
        if self.writable and run.depth == 1:
            return None
        fd = layer.fd
        residency = self._residency.get(fd)
        if residency is None:
            residency = self._residency[fd] = Residency(fd)
        if not residency.available:
            return None  # it cannot say: the usual read path (RWF_NOWAIT) decides
        return residency.fd, run.host, residency.cached(run.host, length)

    def _data_run(self, offset: int, length: int) -> tuple[Layer, Run] | None:
        """(its layer, the run) when the range is one run of data in one layer's file (what
        file_run() lends); else None."""
        runs = self._runs(offset, length)
        if len(runs) != 1 or runs[0].zero or runs[0].layer is None:
            return None
        return runs[0].layer, runs[0]

    def _runs(self, offset: int, length: int) -> list[Run]:
        """map() as a list, with the commonest case, one data run, found without the general walk."""
        found = self._one_run(offset, length)
        if found is not None:
            layer, depth, host = found
            return [Run(offset, length, depth, layer, host, False)]
        return list(self.map(offset, length))

    def _buffer(self, length: int) -> bytearray | memoryview:
        """A buffer for LENGTH bytes read from the layers: page-aligned when direct I/O may fill it."""
        if self._direct and length:
            return memoryview(mmap.mmap(-1, length))
        return bytearray(length)

    def _pread_nowait(self, fd: int, view: memoryview, host: int) -> bool:
        """Fill VIEW from the page cache without waiting on storage; False when that cannot be done."""
        try:
            n = os.preadv(fd, [view], host, os.RWF_NOWAIT)
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self._no_nowait.add(fd)  # this file system cannot say: always use a worker
                return False
            raise
        # Short: part of it is not cached, or the file ends (read() knows how to tell).
        return n == len(view)

    def _pread_into(self, fd: int, view: memoryview, host: int) -> None:
        """Fill VIEW from FD at HOST; bytes past the end of the file stay zero."""
        dfd = self._direct.get(fd)
        use = dfd if dfd is not None and _aligned(host, len(view)) and _aligned_memory(view) else fd
        done = 0
        total = len(view)
        while done < total:
            n = os.preadv(use, [view[done:]], host + done)
            if n <= 0:
                return
            done += n
            if use != fd and not _aligned(host + done, total - done):
                use = fd  # a short direct read left an unaligned rest: read it through the cache
    def _pwrite_all(self, fd: int, view: memoryview, host: int) -> None:
        """Write all of VIEW at HOST (through the direct twin when aligned, from an aligned copy)."""
        dfd = self._direct.get(fd)
        if dfd is not None and _aligned(host, len(view)):
            if not _aligned_memory(view):
                view = _aligned_copy(view)
            fd = dfd
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], host + done)

    def _one_run(self, offset: int, length: int) -> tuple[Layer, int, int] | None:
        """(layer, depth, host offset) when the range is one data run, as map() would find it.

        That is: inside one cluster of the first Parallels layer holding it, or in
        contiguous clusters of the top layer. None otherwise (or for a raw layer).
        """
        if length <= 0:
            return None
        end = offset + length
        depth = 0
        for layer in self.layers:
            depth += 1
            if type(layer) is not ParallelsImage:
                return None
            cs = layer.cluster_size
            bat = layer.bat
            c = offset // cs
            last = (end - 1) // cs
            base = bat[c] if c < len(bat) else 0
            if not base:
                if last != c:
                    return None
                continue  # this layer does not hold the cluster: its parent shows through
            if last != c:
                if depth != 1 or last >= len(bat):
                    return None
                for k in range(c + 1, last + 1):
                    if bat[k] != base + (k - c) * cs:
                        return None
            return layer, depth, base + offset - c * cs
        return None

    # ---- writing: only the top layer changes

    def _below(self, offset: int, length: int) -> list[Run]:
        """How the layers under the top resolve a range."""
        return list(self._resolve(1, offset, length))

    def write_begin(self, offset: int, data: memoryview) -> WritePlan | None:
        """What write() would do, as writes for the caller to run (io_uring), when it is only that:
        every cluster the range touches is held by the top layer already. None when one needs
        allocating (copy-on-write, under the disk's lock): that is write()'s work.

        Each write is (fd, part of DATA, host offset); with `--cache=none`, aligned ones go
        to the O_DIRECT descriptor from an aligned copy, as write() does. The plan holds
        this write's epoch until its release(): no cluster it looked up is released and
        reused, and no layer closed, before the writes end.
        """
        top = self.layers[0]
        if not top.writable:
            return None
        epoch = self._enter()
        try:
            ios = self._write_ios(top, offset, data)
        except BaseException:
            self._leave(epoch)
            raise
        if ios is None:
            self._leave(epoch)
            return None
        return WritePlan(ios, releases=[partial(self._leave, epoch)])

    def _write_ios(self, top: Layer, offset: int, data: memoryview) -> list[tuple[int, memoryview, int]] | None:
        if isinstance(top, RawImage):
            pieces = [(data, offset)]
        elif isinstance(top, ParallelsImage):
            pieces = []
            for cluster, within, piece in _cluster_pieces(top.cluster_size, offset, data):
                host = top.host_offset(cluster)
                if not host:
                    return None
                pieces.append((piece, host + within))
        else:  # pragma: no cover - layers are one of the two kinds
            return None
        ios = []
        dfd = self._direct.get(top.fd)
        for piece, host in pieces:
            if dfd is not None and _aligned(host, len(piece)):
                ios.append((dfd, piece if _aligned_memory(piece) else _aligned_copy(piece), host))
            else:
                ios.append((top.fd, piece, host))
        return ios

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write DATA at OFFSET into the top layer, copying on write from the layers below.

        May wait on storage: for a worker thread. Writes to different clusters
        run in parallel; a cluster being allocated is waited for.
        """
        epoch = self._enter()
        try:
            self._write(offset, memoryview(data))
        finally:
            self._leave(epoch)

    def _write(self, offset: int, view: memoryview) -> None:
        top = self.layers[0]
        if isinstance(top, RawImage):
            self._pwrite_all(top.fd, view, offset)
            return
        if not isinstance(top, ParallelsImage):  # pragma: no cover - layers are one of the two kinds
            raise ImageError(f"{top.path}: cannot write to this kind of image")
        for cluster, within, piece in _cluster_pieces(top.cluster_size, offset, view):
            self._write_cluster(top, cluster, within, piece)

    def _write_cluster(self, top: ParallelsImage, cluster: int, within: int, piece: memoryview) -> None:
        while True:
            host = top.host_offset(cluster)
            if host:
                self._pwrite_all(top.fd, piece, host + within)
                return
            claimed = self._claim(top, cluster)
            if claimed is not None:
                break
            # mapped meanwhile, or another write filled it while we waited: write into it
        self._fill_claimed(top, cluster, within, piece, *claimed)

    def _claim(self, top: ParallelsImage, cluster: int) -> tuple[threading.Event, int, bool] | None:
        """Take unmapped CLUSTER of TOP for allocation: (its event, the new host cluster, whether it reads as zeros).

        None when it is mapped, or after waiting for the write that was filling it.
        """
        top.make_room()
        with self._lock:
            if top.host_offset(cluster):
                return None
            pending = self._allocating.get(cluster)
            if pending is None:
                pending = self._allocating[cluster] = threading.Event()
                try:
                    new_host, fresh = top.allocate()
                except BaseException:
                    del self._allocating[cluster]
                    pending.set()
                    raise
                return pending, new_host, fresh
        pending.wait()
        return None

    def _fill_claimed(
        self,
        top: ParallelsImage,
        cluster: int,
        within: int,
        piece: memoryview,
        pending: threading.Event,
        new_host: int,
        fresh: bool,
    ) -> None:
        """Fill a claimed cluster (PIECE at WITHIN, the rest from below), then map it and wake who waits for it."""
        try:
            zeros_under = self._fill_new_cluster(top, cluster, within, piece, new_host, fresh)
        except BaseException:
            with self._lock:
                top.unallocate(new_host)
                del self._allocating[cluster]
            pending.set()
            raise
        # Mapped only now, after the data is in the file; the entry itself is written at flush.
        with self._lock:
            top.map_cluster(cluster, new_host, zeros_under=zeros_under)
            del self._allocating[cluster]
        pending.set()

    def pull_cluster(self, cluster: int) -> bool:
        """Fill top CLUSTER with what the layers below show there, unless the top holds it or is getting it.

        A merge into the top: nothing anyone reads changes. A guest write that got
        there first wins; one that comes later waits and writes over the copy.
        Returns whether the cluster was filled. For a worker thread.
        """
        top = self.layers[0]
        if not isinstance(top, ParallelsImage) or not top.writable:
            raise ImageError(f"{top.path}: only an expandable image open for writing takes clusters from below")
        epoch = self._enter()
        try:
            with self._lock:
                if top.host_offset(cluster) or cluster in self._allocating:
                    return False  # the top holds (or is getting) its own bytes there: they hide those below
            claimed = self._claim(top, cluster)
            if claimed is None:
                return False
            self._fill_claimed(top, cluster, 0, memoryview(b""), *claimed)
            return True
        finally:
            self._leave(epoch)

    def _fill_new_cluster(
        self, top: ParallelsImage, cluster: int, within: int, piece: memoryview, new_host: int, fresh: bool
    ) -> bool:
        """Write a new cluster: PIECE at WITHIN, the rest copied from the layers below (or zeros).

        Returns whether the cluster came FRESH (never held data) with nothing below: then
        where its data did not land it reads as zeros, as before (ParallelsImage.map_cluster).
        """
        cs = top.cluster_size
        start = cluster * cs
        below = [r for r in self._below(start, cs) if not r.zero]
        zeros_under = fresh and not below
        zeros = fresh
        if not zeros and not below and len(piece) < cs:
            zeros = top.clear_cluster(new_host)  # a reused cluster: punched, it reads as zeros
        if zeros and not below:
            # The new cluster reads as zeros already: write only the request's bytes.
            if len(piece) < cs and not top.reserved(new_host):
                # Reserve the whole cluster now: later small writes into it then find one
                # extent instead of building the file system's map up block by block.
                os.posix_fallocate(top.fd, new_host, cs)
            self._pwrite_all(top.fd, piece, new_host + within)
            return zeros_under
        buf = self._buffer(cs)
        view = memoryview(buf)
        if below and (within or len(piece) < cs):
            for run in below:
                if run.layer is not None:
                    at = run.offset - start
                    self._pread_into(run.layer.fd, view[at : at + run.length], run.host)
        view[within : within + len(piece)] = piece
        self._pwrite_all(top.fd, view, new_host)
        return zeros_under

    def zero(self, offset: int, length: int, *, trim: bool = False, no_hole: bool = False, fast: bool = False) -> None:
        """Make [offset, offset+length) read as zeros (WRITE_ZEROES), or discard it (TRIM).

        Whole clusters of the top layer are released where nothing below shows
        through; where a lower layer holds data, zeros are written instead,
        since a released cluster would expose the parent's bytes. TRIM leaves
        partial clusters alone (it is only a hint). With FAST, nothing is done
        and NotImplementedError is raised if zeroing would have to write data.
        May wait on storage: for a worker thread.
        """
        epoch = self._enter()
        try:
            self._zero(offset, length, trim=trim, no_hole=no_hole, fast=fast)
        finally:
            self._leave(epoch)

    def _zero(self, offset: int, length: int, *, trim: bool, no_hole: bool, fast: bool) -> None:
        top = self.layers[0]
        if isinstance(top, RawImage):
            if fast:
                raise NotImplementedError("zeroing a plain image writes data")
            if not trim:
                self._write_zeros(offset, length)
            return
        if not isinstance(top, ParallelsImage):  # pragma: no cover
            raise ImageError(f"{top.path}: cannot write to this kind of image")
        plan = self._zero_plan(top, offset, length, trim=trim, no_hole=no_hole)
        if fast and any(action == "write" for action, _, _ in plan):
            raise NotImplementedError("zeroing this range would have to write zeros over data")
        released: list[int] = []
        for action, at, n in plan:
            if action == "release":
                with self._lock:
                    host = top.release_cluster(at // top.cluster_size)
                if host:
                    released.append(host)
            else:
                self._write_zeros(at, n)
        if released:
            # Punched inside this request's epoch: the hosts are not reusable before it ends.
            top.punch(released)

    def _zero_plan(
        self, top: ParallelsImage, offset: int, length: int, *, trim: bool, no_hole: bool
    ) -> list[tuple[str, int, int]]:
        """Decide per cluster: ("release", offset, length) or ("write", offset, length) of zeros."""
        cs = top.cluster_size
        end = offset + length
        plan: list[tuple[str, int, int]] = []
        pos = offset
        while pos < end:
            cluster = pos // cs
            cstart = cluster * cs
            cend = min(cstart + cs, self.size)
            stop = min(end, cend)
            whole = pos == cstart and stop == cend
            host = top.host_offset(cluster)
            below_data = any(not r.zero for r in self._below(pos, stop - pos))
            if whole and not no_hole and not below_data:
                if host:
                    plan.append(("release", cstart, cs))
            elif trim and not whole:
                pass  # TRIM is a hint: partial clusters are left as they are
            elif host or below_data:
                plan.append(("write", pos, stop - pos))
            pos = stop
        return plan

    def _write_zeros(self, offset: int, length: int) -> None:
        chunk = 1 << 20
        zeros = bytes(min(chunk, length))
        pos = 0
        while pos < length:
            n = min(chunk, length - pos)
            self._write(offset + pos, memoryview(zeros)[:n])
            pos += n

    def prefetch(self, offset: int, length: int) -> None:
        """Ask the kernel to read the host ranges behind the guest range into its cache (NBD CACHE)."""
        epoch = self._enter()
        try:
            for run in self._runs(offset, length):
                if not run.zero and run.layer is not None:
                    os.posix_fadvise(run.layer.fd, run.host, run.length, os.POSIX_FADV_WILLNEED)
        finally:
            self._leave(epoch)

    # ---- durability

    def begin_flush(self) -> FlushToken | None:
        """Take what the next flush must make durable (from the thread that answers requests)."""
        top = self.layers[0]
        if not isinstance(top, ParallelsImage):
            return None
        with self._lock:
            return top.begin_flush()

    def flush_io(self, token: FlushToken | None) -> None:
        """The blocking part of a flush: for a worker thread."""
        top = self.layers[0]
        if isinstance(top, ParallelsImage) and token is not None:
            top.flush_io(token)
        else:
            os.fdatasync(top.fd)

    def end_flush(self, token: FlushToken | None, ok: bool) -> None:
        """Record a flush's outcome (from the thread that answers requests)."""
        top = self.layers[0]
        if not isinstance(top, ParallelsImage) or token is None:
            return
        with self._lock:
            if ok and token.pending_free:
                # Durably unmapped now, but I/O that looked them up may still run: see _enter().
                self._quarantine.append((self._epoch, token.pending_free))
                token.pending_free = []
                self._epoch += 1
                self._reclaim()
            top.end_flush(token, ok)


def _aligned(host: int, length: int) -> bool:
    return not (host | length) % DIRECT_ALIGN


def _aligned_memory(view: memoryview) -> bool:
    """Whether VIEW starts at a DIRECT_ALIGN boundary in memory (a requirement of O_DIRECT)."""
    if view.readonly or not len(view):
        return False
    return ctypes.addressof(ctypes.c_char.from_buffer(view)) % DIRECT_ALIGN == 0


def _cluster_pieces(cs: int, offset: int, view: memoryview) -> Iterator[tuple[int, int, memoryview]]:
    """VIEW, to be written at guest OFFSET, cut at boundaries of CS-byte clusters: (cluster, offset in it, piece)."""
    pos = 0
    while pos < len(view):
        at = offset + pos
        cluster = at // cs
        within = at - cluster * cs
        n = min(cs - within, len(view) - pos)
        yield cluster, within, view[pos : pos + n]
        pos += n


def _aligned_copy(view: memoryview) -> memoryview:
    """VIEW's bytes in page-aligned memory, for an O_DIRECT write of a buffer that is not."""
    copy = mmap.mmap(-1, len(view))
    copy[:] = view
    return memoryview(copy)


def _open_layer(path: Path, kind: str, writable: bool) -> Layer:
    if kind == "Plain":
        return RawImage.open(path, writable=writable)
    return ParallelsImage.open(path, writable=writable)


def open_disk(
    path: str | os.PathLike[str],
    *,
    writable: bool = False,
    snapshot: str | None = None,
    allow_outside_bundle: bool = False,
) -> Disk:
    """Open a disk: a bundle directory, a DiskDescriptor.xml, or a single expandable image.

    Only the top image is ever opened for writing; every parent is read-only. Images
    outside the bundle directory are refused unless ALLOW_OUTSIDE_BUNDLE.
    """
    p = Path(path)
    if not p.exists():
        raise ImageError(f"{p}: no such file or directory")
    if p.is_dir() or p.name.lower().endswith(".xml"):
        dpath = descriptor_path(p)
        if not dpath.exists():
            from prlnbd.disk.vm import is_vm_directory

            if is_vm_directory(p):
                raise DescriptorError(f"{p}: is a VM directory holding several disks; open one of its .hdd bundles")
            raise DescriptorError(f"{p}: directory has no {dpath.name}")
        desc = parse_descriptor(dpath, allow_outside=allow_outside_bundle)
        return _open_bundle(desc, writable=writable, snapshot=snapshot)
    if snapshot is not None:
        raise DescriptorError(f"{p}: a single image has no snapshots to choose from")
    image = ParallelsImage.open(p, writable=writable)
    return Disk(path=p, layers=[image], guids=[""], size=image.size)


def _open_bundle(desc: Descriptor, *, writable: bool, snapshot: str | None) -> Disk:
    if desc.split:
        from prlnbd.disk.split import open_split

        return open_split(desc, writable=writable, snapshot=snapshot)
    entries = desc.chain(snapshot)
    if len(entries) > MAX_CHAIN_LENGTH:
        raise DescriptorError(
            f"{desc.path}: the snapshot chain from {entries[0].guid} has {len(entries)} layers,"
            f" more than the {MAX_CHAIN_LENGTH} prlnbd opens"
        )
    return open_chain(desc, entries, writable=writable)


def open_chain(desc: Descriptor, entries: list[ImageEntry], *, writable: bool, piece: Piece | None = None) -> Disk:
    """Open the images ENTRIES (top first) of DESC as one Disk: the whole disk, or PIECE of a split one.

    Every image must be the size of the disk (of the piece): a split disk's
    pieces each have their own header, whose size is the piece's.
    """
    size = piece.size if piece is not None else desc.size
    blocksize = piece.blocksize if piece is not None else desc.blocksize
    layers: list[Layer] = []
    try:
        for i, entry in enumerate(entries):
            layer = _open_layer(entry.file, entry.type, writable and i == 0)
            layers.append(layer)
            if layer.size != size:
                if piece is not None:
                    raise DescriptorError(
                        f"{desc.path}: image {entry.file} ({entry.guid}) of Storage {piece.index} is"
                        f" {layer.size} bytes, but the piece is sectors {piece.start}..{piece.end}"
                        f" (End - Start = {piece.end - piece.start} sectors, {size} bytes)"
                    )
                raise DescriptorError(
                    f"{desc.path}: image {entry.file} ({entry.guid}) is {layer.size} bytes,"
                    f" Disk_size says {desc.size} ({desc.disk_size} sectors)"
                )
            if isinstance(layer, ParallelsImage) and layer.cluster_size != blocksize * fmt.SECTOR:
                desc.warnings.append(
                    f"image {entry.file} has {layer.cluster_size}-byte clusters, Blocksize says"
                    f" {blocksize * fmt.SECTOR}"
                )
    except BaseException:
        for layer in layers:
            layer.close()
        raise
    return Disk(
        path=desc.path,
        layers=layers,
        guids=[e.guid for e in entries],
        size=size,
        descriptor=desc,
        warnings=list(desc.warnings),
    )
