"""A Parallels disk: its snapshot chain of layers, resolved into runs for reads and allocation."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from prlnbd.disk.descriptor import Descriptor, descriptor_path, parse_descriptor
from prlnbd.errors import DescriptorError, ImageError
from prlnbd.image import format as fmt
from prlnbd.image.extension import DirtyBitmap
from prlnbd.image.parallels import FlushToken, ParallelsImage, Problem, Segment
from prlnbd.image.raw import RawImage


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
    def writable(self) -> bool:
        """Whether the top layer is open for writing."""
        return self.layers[0].writable

    def bitmaps(self) -> list[DirtyBitmap]:
        """The dirty bitmaps stored in the top image."""
        top = self.layers[0]
        ext = top.extension if isinstance(top, ParallelsImage) else None
        return list(ext.bitmaps) if ext is not None else []

    def close(self) -> None:
        """Close every layer."""
        for layer in self.layers:
            layer.close()

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
        if index == len(self.layers):
            yield Run(offset, length, 0, None, 0, True)
            return
        layer = self.layers[index]
        for seg in layer.segments(offset, length):
            if seg.host is None:
                yield from self._resolve(index + 1, seg.offset, seg.length)
            else:
                yield Run(seg.offset, seg.length, index + 1, layer, seg.host, seg.zero)

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

    def read(self, offset: int, length: int) -> tuple[bytes | bytearray, list[Run]]:
        """Read guest bytes into a new buffer; also return the runs (as map() gives them), for sparse replies."""
        one = self._read_one_run(offset, length)
        if one is not None:
            return one
        buf = bytearray(length)
        runs = list(self.map(offset, length))
        _fill(memoryview(buf), offset, runs)
        return buf, runs

    def _read_one_run(self, offset: int, length: int) -> tuple[bytes, list[Run]] | None:
        """The common read, done without the general machinery: the range is one data run.

        os.pread returns a new bytes object, so no buffer is zero-filled first. None
        sends the read down the general path (holes, several runs, or bytes past the
        end of the file, which read as zeros).
        """
        found = self._one_run(offset, length)
        if found is None:
            return None
        layer, depth, host = found
        data = os.pread(layer.fd, length, host)
        if len(data) != length:
            return None
        return data, [Run(offset, length, depth, layer, host, False)]

    def locate(self, offset: int, length: int) -> tuple[int, int] | None:
        """(file descriptor, host offset) when the range is one run of data in one file, else None.

        For sending the bytes without reading them first (sendfile). Past the end
        of the file they read as zeros, which the caller learns from a short send.
        """
        found = self._one_run(offset, length)
        if found is None:
            return None
        layer, _, host = found
        return layer.fd, host

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

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write DATA at OFFSET into the top layer, copying on write from the layers below."""
        top = self.layers[0]
        if type(top) is ParallelsImage:
            # The commonest write, inline: inside one cluster the top layer already holds.
            cs = top.cluster_size
            c = offset // cs
            bat = top.bat
            n = len(data)
            if n and c == (offset + n - 1) // cs and c < len(bat) and bat[c]:
                host = bat[c] + offset - c * cs
                done = os.pwrite(top.fd, data, host)
                if done < n:
                    _pwrite_all(top.fd, memoryview(data)[done:], host + done)
                return
        view = memoryview(data)
        if isinstance(top, RawImage):
            _pwrite_all(top.fd, view, offset)
            return
        if not isinstance(top, ParallelsImage):  # pragma: no cover - layers are one of the two kinds
            raise ImageError(f"{top.path}: cannot write to this kind of image")
        cs = top.cluster_size
        pos = 0
        while pos < len(view):
            at = offset + pos
            cluster = at // cs
            within = at - cluster * cs
            n = min(cs - within, len(view) - pos)
            self._write_cluster(top, cluster, within, view[pos : pos + n])
            pos += n

    def _write_cluster(self, top: ParallelsImage, cluster: int, within: int, piece: memoryview) -> None:
        host = top.host_offset(cluster)
        if host:
            _pwrite_all(top.fd, piece, host + within)
            return
        cs = top.cluster_size
        start = cluster * cs
        below = [r for r in self._below(start, cs) if not r.zero]
        new_host, fresh = top.allocate()
        try:
            if fresh and not below:
                # The new cluster reads as zeros already: write only the request's bytes.
                if len(piece) < cs:
                    # Reserve the whole cluster now: later small writes into it then find one
                    # extent instead of building the file system's map up block by block.
                    os.posix_fallocate(top.fd, new_host, cs)
                _pwrite_all(top.fd, piece, new_host + within)
            else:
                buf = bytearray(cs)
                if below and (within or len(piece) < cs):
                    _fill(memoryview(buf), start, below)
                buf[within : within + len(piece)] = piece
                _pwrite_all(top.fd, memoryview(buf), new_host)
        except BaseException:
            top.unallocate(new_host)
            raise
        # Mapped only now, after the data is in the file; the entry itself is written at flush.
        top.map_cluster(cluster, new_host)

    def zero(self, offset: int, length: int, *, trim: bool = False, no_hole: bool = False, fast: bool = False) -> None:
        """Make [offset, offset+length) read as zeros (WRITE_ZEROES), or discard it (TRIM).

        Whole clusters of the top layer are released where nothing below shows
        through; where a lower layer holds data, zeros are written instead,
        since a released cluster would expose the parent's bytes. TRIM leaves
        partial clusters alone (it is only a hint). With FAST, nothing is done
        and NotImplementedError is raised if zeroing would have to write data.
        """
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
        for action, at, n in plan:
            if action == "release":
                top.release_cluster(at // top.cluster_size)
            else:
                self._write_zeros(at, n)

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
            self.write(offset + pos, memoryview(zeros)[:n])
            pos += n

    def begin_flush(self) -> FlushToken | None:
        """Take what the next flush must make durable (in the owning thread)."""
        top = self.layers[0]
        return top.begin_flush() if isinstance(top, ParallelsImage) else None

    def flush_io(self, token: FlushToken | None) -> None:
        """The blocking part of a flush: safe to run in a worker thread."""
        top = self.layers[0]
        if isinstance(top, ParallelsImage) and token is not None:
            top.flush_io(token)
        else:
            os.fdatasync(top.fd)

    def end_flush(self, token: FlushToken | None, ok: bool) -> None:
        """Record a flush's outcome (in the owning thread)."""
        top = self.layers[0]
        if isinstance(top, ParallelsImage) and token is not None:
            top.end_flush(token, ok)


def _fill(view: memoryview, offset: int, runs: list[Run]) -> None:
    """Read the data RUNS (of a range starting at guest OFFSET) into VIEW; zero runs stay as they are."""
    for run in runs:
        if run.zero or run.layer is None:
            continue
        start = run.offset - offset
        _pread_into(run.layer.fd, view[start : start + run.length], run.host)


def _pwrite_all(fd: int, view: memoryview, host: int) -> None:
    """Write all of VIEW at HOST."""
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], host + done)


def _pread_into(fd: int, view: memoryview, host: int) -> None:
    """Fill VIEW from FD at HOST; bytes past the end of the file stay zero."""
    done = 0
    total = len(view)
    while done < total:
        n = os.preadv(fd, [view[done:]], host + done)
        if n <= 0:
            return
        done += n


def _open_layer(path: Path, kind: str, writable: bool) -> Layer:
    if kind == "Plain":
        return RawImage.open(path, writable=writable)
    return ParallelsImage.open(path, writable=writable)


def open_disk(path: str | os.PathLike[str], *, writable: bool = False, snapshot: str | None = None) -> Disk:
    """Open a disk: a bundle directory, a DiskDescriptor.xml, or a single expandable image.

    Only the top image is ever opened for writing; every parent is read-only.
    """
    p = Path(path)
    if not p.exists():
        raise ImageError(f"{p}: no such file or directory")
    if p.is_dir() or p.name.lower().endswith(".xml"):
        dpath = descriptor_path(p)
        if not dpath.exists():
            raise DescriptorError(f"{p}: directory has no {dpath.name}")
        return _open_bundle(parse_descriptor(dpath), writable=writable, snapshot=snapshot)
    if snapshot is not None:
        raise DescriptorError(f"{p}: a single image has no snapshots to choose from")
    image = ParallelsImage.open(p, writable=writable)
    return Disk(path=p, layers=[image], guids=[""], size=image.size)


def _open_bundle(desc: Descriptor, *, writable: bool, snapshot: str | None) -> Disk:
    entries = desc.chain(snapshot)
    layers: list[Layer] = []
    try:
        for i, entry in enumerate(entries):
            layer = _open_layer(entry.file, entry.type, writable and i == 0)
            layers.append(layer)
            if layer.size != desc.size:
                raise DescriptorError(
                    f"{desc.path}: image {entry.file} ({entry.guid}) is {layer.size} bytes,"
                    f" Disk_size says {desc.size} ({desc.disk_size} sectors)"
                )
            if isinstance(layer, ParallelsImage) and layer.cluster_size != desc.blocksize * fmt.SECTOR:
                desc.warnings.append(
                    f"image {entry.file} has {layer.cluster_size}-byte clusters, Blocksize says"
                    f" {desc.blocksize * fmt.SECTOR}"
                )
    except BaseException:
        for layer in layers:
            layer.close()
        raise
    return Disk(
        path=desc.path,
        layers=layers,
        guids=[e.guid for e in entries],
        size=desc.size,
        descriptor=desc,
        warnings=list(desc.warnings),
    )
