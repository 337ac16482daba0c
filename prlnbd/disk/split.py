"""A split disk: several Storage pieces, each a Disk of its own chain, served as one disk.

Parallels Desktop splits a disk into pieces of 3989504 sectors (the last one
shorter), each a complete expanding image with its own header, its size the
piece's, and one delta image per piece for each snapshot: every piece's chain
follows the same Snapshots tree. SplitDisk has the interface the export uses
of a Disk, made of one Disk per piece: offsets are translated, ranges split at
piece boundaries (a request crossing one is still one request and one reply),
and runs and depth maps shifted back to disk offsets.

A dirty bitmap of a split disk is the same bitmap (one id, one granularity)
in every piece's top image, each holding the bits of its piece: a SplitBitmap
joins them into one bitmap of the whole disk, and each piece's image stores
its part at the clean stop as a single image stores its bitmaps.
"""

from __future__ import annotations

import bisect
import mmap
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from prlnbd.disk.chain import MAX_CHAIN_LENGTH, Disk, Layer, ReadPlan, Run, WritePlan, close_all, open_chain
from prlnbd.disk.descriptor import Descriptor, Piece
from prlnbd.errors import DescriptorError, ExtensionError, PrlNbdError
from prlnbd.image.extension import DirtyBitmap, Extension, SplitBitmap, feature_space, kept_features, new_bitmap
from prlnbd.image.parallels import FlushToken, ParallelsImage


@dataclass
class SplitFlushToken(FlushToken):
    """One flush of a split disk: the token of each piece."""

    parts: list[FlushToken | None] = field(default_factory=list)


class SplitDisk(Disk):
    """A disk made of PIECES, one Disk each, the k-th starting at byte OFFSETS[k].

    layers, guids and top are the first piece's: every piece has a chain of the
    same snapshots, so depth k means the same snapshot in every piece, and
    the export's shortcut over the top layer's clusters (Export._top_holds)
    finds the first piece's clusters where they are and, past it, nothing, so
    it recomputes status there through depth_runs(). Every piece's top is of
    the same kind, with the same cluster size, and starts at a multiple of it,
    so the export's grain (the top's cluster size) is that of every piece.
    """

    def __init__(
        self,
        path: Path,
        pieces: list[Disk],
        offsets: list[int],
        size: int,
        descriptor: Descriptor,
        bitmaps: list[SplitBitmap] | None = None,
    ) -> None:
        first = pieces[0]
        super().__init__(
            path=path,
            layers=first.layers,
            guids=first.guids,
            size=size,
            descriptor=descriptor,
            warnings=list(descriptor.warnings),
        )
        self.pieces = pieces
        self.offsets = offsets
        self._ends = [*offsets[1:], size]
        # Built once at open: the export marks these objects, and each part is the one its
        # piece's top image stores at the clean stop.
        self._bitmaps: list[SplitBitmap] = bitmaps if bitmaps is not None else []

    # ---- translating ranges

    def _parts(self, offset: int, length: int) -> Iterator[tuple[Disk, int, int, int]]:
        """(piece, its disk offset, piece-relative offset, length) for each piece [offset, offset+length) meets."""
        end = offset + length
        k = max(0, bisect.bisect_right(self.offsets, offset) - 1)
        pos = offset
        while pos < end and k < len(self.pieces):
            base = self.offsets[k]
            stop = min(end, self._ends[k])
            yield self.pieces[k], base, pos - base, stop - pos
            pos = stop
            k += 1

    @staticmethod
    def _shift(runs: list[Run], base: int) -> list[Run]:
        """RUNS (fresh objects of one piece) moved to disk offsets."""
        if base:
            for run in runs:
                run.offset += base
        return runs

    # ---- what the export uses

    @property
    def parts(self) -> list[Disk]:
        """The pieces, each a Disk with its own chain."""
        return list(self.pieces)

    @property
    def writable(self) -> bool:
        """Whether every piece's top layer is open for writing."""
        return all(piece.writable for piece in self.pieces)

    def bitmaps(self) -> list[DirtyBitmap]:
        """The dirty bitmaps of the disk, each made of the same bitmap in every piece's top image."""
        return list(self._bitmaps)

    def _tops(self) -> list[ParallelsImage]:
        tops = []
        for piece in self.pieces:
            top = piece.top
            if not isinstance(top, ParallelsImage):
                where = getattr(top, "path", "?")
                raise PrlNbdError(f"{self.path}: the top image {where} is a plain image, which holds no bitmaps")
            tops.append(top)
        return tops

    def add_bitmap(self, name: str | None, granularity: int) -> SplitBitmap:
        """Add a clean bitmap, one part in every piece's top image (stored at the clean stop)."""
        tops = self._tops()
        parts = new_split_bitmap(self.path, tops, self.offsets, name, granularity)
        bm = SplitBitmap(parts, list(self.offsets))
        for top, part in zip(tops, parts, strict=True):
            if top.extension is None:
                top.extension = Extension(offset=0)
            top.extension.bitmaps.append(part)
        self._bitmaps.append(bm)
        return bm

    def remove_bitmap(self, bm: DirtyBitmap) -> None:
        """Remove the bitmap BM (one of bitmaps()) from every piece's top image."""
        if not isinstance(bm, SplitBitmap) or bm not in self._bitmaps:
            raise PrlNbdError(f"{self.path}: no dirty bitmap {bm.name} in this split disk")
        for top, part in zip(self._tops(), bm.parts, strict=True):
            if top.extension is not None and part in top.extension.bitmaps:
                top.extension.bitmaps.remove(part)
        self._bitmaps.remove(bm)

    @property
    def direct(self) -> bool:
        """Whether data I/O bypasses the page cache (O_DIRECT, `--cache=none`)."""
        return any(piece.direct for piece in self.pieces)

    def open_direct(self) -> None:
        """Open every layer of every piece a second time with O_DIRECT (see Disk.open_direct)."""
        for piece in self.pieces:
            piece.open_direct()

    def map(self, offset: int, length: int) -> Iterator[Run]:
        """The runs of [offset, offset+length), piece by piece (never merged across a boundary)."""
        for piece, base, at, n in self._parts(offset, length):
            yield from self._shift(list(piece.map(at, n)), base)

    def depth_runs(self, offset: int, end: int) -> tuple[list[int], list[int]]:
        """Disk.depth_runs() of each piece the range meets, concatenated (equal codes merged at boundaries)."""
        starts: list[int] = []
        codes: list[int] = []
        for piece, base, at, n in self._parts(offset, end - offset):
            piece_starts, piece_codes = piece.depth_runs(at, at + n)
            if codes and piece_codes and piece_codes[0] == codes[-1]:
                piece_starts, piece_codes = piece_starts[1:], piece_codes[1:]
            starts += [s + base for s in piece_starts] if base else piece_starts
            codes += piece_codes
        return starts, codes

    def read(self, offset: int, length: int) -> tuple[bytes | bytearray | memoryview, list[Run]]:
        """Read guest bytes, piece by piece; also return the runs (disk offsets). For a worker thread."""
        parts = list(self._parts(offset, length))
        if len(parts) == 1:
            piece, base, at, n = parts[0]
            buf, runs = piece.read(at, n)
            return buf, self._shift(runs, base)
        out = bytearray(length)
        all_runs: list[Run] = []
        for piece, base, at, n in parts:
            buf, runs = piece.read(at, n)
            start = base + at - offset
            out[start : start + n] = buf
            all_runs += self._shift(runs, base)
        return out, all_runs

    def read_begin(self, offset: int, length: int) -> ReadPlan:
        """Disk.read_begin() piece by piece, into one buffer; the plan holds each piece's epoch."""
        parts = list(self._parts(offset, length))
        if len(parts) == 1:
            piece, base, at, n = parts[0]
            plan = piece.read_begin(at, n)
            plan.runs = self._shift(plan.runs, base)
            return plan
        direct = any(piece.direct for piece, _, _, _ in parts)
        buf: bytearray | memoryview = memoryview(mmap.mmap(-1, length)) if direct and length else bytearray(length)
        view = memoryview(buf)
        out = ReadPlan(buf, [], [])
        try:
            for piece, base, at, n in parts:
                epoch = piece._enter()
                out.releases.append(partial(piece._leave, epoch))
                runs = piece._runs(at, n)
                start = base + at - offset
                out.ios += piece._ios_into(view[start : start + n], at, runs)
                out.runs += self._shift(runs, base)
        except BaseException:
            out.release()
            raise
        return out

    def read_nowait(
        self, offset: int, length: int, cached: bool = False
    ) -> tuple[bytes | bytearray | memoryview, list[Run]] | None:
        """read(), when every piece can be read without waiting on storage; else None (CACHED: as
        Disk.read_nowait())."""
        parts = list(self._parts(offset, length))
        if len(parts) == 1:
            piece, base, at, n = parts[0]
            got = piece.read_nowait(at, n, cached)
            if got is None:
                return None
            return got[0], self._shift(got[1], base)
        out = bytearray(length)
        all_runs: list[Run] = []
        for piece, base, at, n in parts:
            got = piece.read_nowait(at, n, cached)
            if got is None:
                return None
            start = base + at - offset
            out[start : start + n] = got[0]
            all_runs += self._shift(got[1], base)
        return out, all_runs

    def _one_piece(self, offset: int, length: int) -> tuple[Disk, int, int] | None:
        """(piece, offset in it, length) when one piece holds the whole range; None when it spans pieces."""
        parts = list(self._parts(offset, length))
        if len(parts) != 1:
            return None
        piece, _base, at, n = parts[0]
        return piece, at, n

    def file_run(self, offset: int, length: int) -> tuple[int, int, bool] | None:
        """Disk.file_run() of the one piece holding the whole range; None when it spans pieces."""
        one = self._one_piece(offset, length)
        return one[0].file_run(one[1], one[2]) if one is not None else None

    def fill_cache(self, offset: int, length: int) -> bool:
        """Disk.fill_cache() of the one piece holding the whole range; False when it spans pieces."""
        one = self._one_piece(offset, length)
        return one[0].fill_cache(one[1], one[2]) if one is not None else False

    def write_begin(self, offset: int, data: memoryview) -> WritePlan | None:
        """Disk.write_begin() piece by piece: one plan, or None when any piece must allocate."""
        out = WritePlan([])
        try:
            for piece, base, at, n in self._parts(offset, len(data)):
                start = base + at - offset
                plan = piece.write_begin(at, data[start : start + n])
                if plan is None:
                    out.release()
                    return None
                out.ios += plan.ios
                out.releases += plan.releases
        except BaseException:
            out.release()
            raise
        return out

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write DATA at OFFSET, each part into its piece's top layer. For a worker thread."""
        view = memoryview(data)
        for piece, base, at, n in self._parts(offset, len(view)):
            start = base + at - offset
            piece.write(at, view[start : start + n])

    def zero(self, offset: int, length: int, *, trim: bool = False, no_hole: bool = False, fast: bool = False) -> None:
        """Disk.zero() in each piece the range meets.

        With FAST, a later piece may refuse after an earlier one was zeroed: the
        client then writes zeros over the whole range, which is what it asked for.
        """
        for piece, _, at, n in self._parts(offset, length):
            piece.zero(at, n, trim=trim, no_hole=no_hole, fast=fast)

    def prefetch(self, offset: int, length: int) -> None:
        """Disk.prefetch() in each piece the range meets."""
        for piece, _, at, n in self._parts(offset, length):
            piece.prefetch(at, n)

    def begin_flush(self) -> FlushToken | None:
        """Take what the next flush of every piece must make durable."""
        return SplitFlushToken(entries=[], pending_free=[], parts=[piece.begin_flush() for piece in self.pieces])

    def flush_io(self, token: FlushToken | None) -> None:
        """Flush every piece (for a worker thread)."""
        parts = token.parts if isinstance(token, SplitFlushToken) else [None] * len(self.pieces)
        for piece, part in zip(self.pieces, parts, strict=True):
            piece.flush_io(part)

    def end_flush(self, token: FlushToken | None, ok: bool) -> None:
        """Record a flush's outcome in every piece."""
        if isinstance(token, SplitFlushToken):
            for piece, part in zip(self.pieces, token.parts, strict=True):
                piece.end_flush(part, ok)

    def push_top(self, tops: list[Layer], guid: str) -> None:
        """Disk.push_top() of every piece: TOPS holds one new top per piece."""
        for piece, top in zip(self.pieces, tops, strict=True):
            piece.push_top([top], guid)
        self.layers, self.guids = self.pieces[0].layers, self.pieces[0].guids

    def replace_layers(self, index: int, count: int, new: list[Layer], guids: list[str]) -> None:
        """Disk.replace_layers() of every piece: NEW holds len(GUIDS) layers per piece, piece after piece."""
        n = len(guids)
        for k, piece in enumerate(self.pieces):
            piece.replace_layers(index, count, new[k * n : (k + 1) * n], guids)
        self.layers, self.guids = self.pieces[0].layers, self.pieces[0].guids

    def close_retired(self) -> None:
        """Disk.close_retired() of every piece."""
        for piece in self.pieces:
            piece.close_retired()

    def close(self) -> None:
        """Close every piece, even when closing one fails; the first failure is raised after."""
        close_all(self.pieces)


def open_split(desc: Descriptor, *, writable: bool, snapshot: str | None) -> SplitDisk:
    """Open every piece of the split disk DESC: one chain per piece, from SNAPSHOT (default: the top)."""
    chains = desc.piece_chains(snapshot)
    if len(chains[0]) > MAX_CHAIN_LENGTH:
        raise DescriptorError(
            f"{desc.path}: the snapshot chain from {chains[0][0].guid} has {len(chains[0])} layers,"
            f" more than the {MAX_CHAIN_LENGTH} prlnbd opens"
        )
    pieces: list[Disk] = []
    try:
        for piece, entries in zip(desc.pieces, chains, strict=True):
            pieces.append(open_chain(desc, entries, writable=writable, piece=piece))
        _check_pieces(desc, pieces)
        bitmaps = join_bitmaps(desc.path, desc.pieces, [disk.top for disk in pieces])
    except BaseException:
        for disk in pieces:
            disk.close()
        raise
    return SplitDisk(desc.path, pieces, [piece.offset for piece in desc.pieces], desc.size, desc, bitmaps)


def _check_pieces(desc: Descriptor, disks: list[Disk]) -> None:
    """Refuse what a SplitDisk cannot serve: tops of different kinds or cluster sizes, pieces off a cluster
    boundary."""
    first: Layer = disks[0].top
    for piece, disk in zip(desc.pieces, disks, strict=True):
        top = disk.top
        where = f"{desc.path}: Storage {piece.index} (sectors {piece.start}..{piece.end}), top image {top.path}"
        if type(top) is not type(first):
            raise DescriptorError(f"{where}: its top image is of another kind than that of the first piece")
        if isinstance(top, ParallelsImage) and isinstance(first, ParallelsImage):
            if top.cluster_size != first.cluster_size:
                raise DescriptorError(
                    f"{where}: {top.cluster_size}-byte clusters, but the first piece's top has {first.cluster_size};"
                    " the pieces of a split disk must share one cluster size"
                )
            if piece.offset % top.cluster_size:
                raise DescriptorError(
                    f"{where}: the piece starts at byte {piece.offset}, not on a {top.cluster_size}-byte cluster"
                    " boundary"
                )


def _where(path: Path, piece: Piece, top: Layer) -> str:
    """How an error names a piece: the descriptor, the Storage element and the top image file."""
    return f"{path}: Storage {piece.index} (sectors {piece.start}..{piece.end}), top image {getattr(top, 'path', '?')}"


def join_bitmaps(path: Path, pieces: Sequence[Piece], tops: Sequence[Layer]) -> list[SplitBitmap]:
    """The dirty bitmaps of the split disk at PATH: one SplitBitmap per bitmap id its pieces' TOPS hold.

    Each bitmap must be in every piece's top with one granularity that divides
    every piece boundary; else a DescriptorError names the piece's file.
    """
    held: list[dict[bytes, DirtyBitmap]] = []
    for top in tops:
        ext = top.extension if isinstance(top, ParallelsImage) else None
        held.append({bm.id: bm for bm in ext.bitmaps} if ext is not None else {})
    order: dict[bytes, int] = {}  # every id, in the order first met, with the piece it was first met in
    for k, bms in enumerate(held):
        for ident in bms:
            order.setdefault(ident, k)
    out: list[SplitBitmap] = []
    for ident, first in order.items():
        ref = held[first][ident]
        parts: list[DirtyBitmap] = []
        for piece, top, bms in zip(pieces, tops, held, strict=True):
            where = _where(path, piece, top)
            bm = bms.get(ident)
            if bm is None:
                raise DescriptorError(
                    f"{where}: has no dirty bitmap {ref.name}, which the top image of Storage {pieces[first].index}"
                    " holds; a split disk's bitmap must be in every piece (`prlnbd bitmap DISK remove"
                    f" {ref.name}` removes it from those that hold it)"
                )
            if bm.granularity != ref.granularity:
                raise DescriptorError(
                    f"{where}: dirty bitmap {ref.name} has granularity {bm.granularity}, but"
                    f" {ref.granularity} in Storage {pieces[first].index}; a split disk's bitmap has one granularity"
                )
            if piece.offset % bm.granularity:
                raise DescriptorError(
                    f"{where}: dirty bitmap {ref.name}'s granularity {bm.granularity} does not divide the piece's"
                    f" start (byte {piece.offset})"
                )
            parts.append(bm)
        out.append(SplitBitmap(parts, [piece.offset for piece in pieces]))
    return out


def new_split_bitmap(
    path: Path, tops: Sequence[ParallelsImage], offsets: Sequence[int], name: str | None, granularity: int
) -> list[DirtyBitmap]:
    """The parts of a new clean bitmap NAME (a new UUID if None) for the split disk at PATH, one per top in TOPS.

    Checks, before anything changes, that every top has room for it and none
    holds it yet, and that GRANULARITY divides every piece boundary.
    """
    try:
        name = str(uuid.UUID(name)) if name else str(uuid.uuid4())
    except ValueError:
        raise ExtensionError(f"bitmap name {name!r} is not a UUID; Parallels names bitmaps by UUID") from None
    parts: list[DirtyBitmap] = []
    for top, offset in zip(tops, offsets, strict=True):
        bm = new_bitmap(top.size, granularity, name, chunk=top.cluster_size)
        if offset % granularity:
            raise PrlNbdError(
                f"{path}: bitmap granularity {granularity} does not divide the start of the piece {top.path}"
                f" (byte {offset})"
            )
        ext = top.extension
        bitmaps = ext.bitmaps if ext is not None else []
        if any(b.id == bm.id for b in bitmaps):
            raise PrlNbdError(f"{top.path}: bitmap {bm.name} already exists")
        if feature_space([*bitmaps, bm], kept_features(ext), top.cluster_size) > top.cluster_size:
            raise PrlNbdError(
                f"{top.path}: no room for another bitmap in the {top.cluster_size}-byte extension cluster"
            )
        parts.append(bm)
    return parts
