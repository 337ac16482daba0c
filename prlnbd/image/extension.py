"""The format extension cluster of an image and the dirty bitmaps stored in it."""

from __future__ import annotations

import bisect
import hashlib
import itertools
import operator
import os
import re
import uuid
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prlnbd.errors import ExtensionError
from prlnbd.image import format as fmt

_NONZERO = re.compile(rb"[^\x00]")
# What set_runs() steps through, skipping clear bytes: a byte with a bit set, and any all-set
# bytes after it. A pattern that opens with a character class lets the regular expression
# engine skip clear bytes in its fast search loop (an alternation would not): 4x faster.
_SET_BYTES = re.compile(rb"[^\x00]\xff*")


def _byte_runs(value: int) -> tuple[tuple[int, int], ...]:
    """The runs [lo, hi) of set bits in one byte, least significant bit first."""
    runs = []
    bit = 0
    while bit < 8:
        if value >> bit & 1:
            lo = bit
            while bit < 8 and value >> bit & 1:
                bit += 1
            runs.append((lo, bit))
        else:
            bit += 1
    return tuple(runs)


_BYTE_RUNS = tuple(_byte_runs(v) for v in range(256))
_NOT_ALL_SET = re.compile(rb"[^\xff]")
# Per byte value: the bit positions 0..8 where the bits of that byte change, taking the bits
# before and after the byte as clear (0x10 -> (4, 5), 0xff -> (0, 8)).
_BYTE_FLIPS = tuple(tuple(b for run in _byte_runs(v) for b in run) for v in range(256))
# Every non-zero byte to 1, a zero byte to 0: split() on 1 then finds the non-zero bytes.
_NONZERO_TO_ONE = bytes([0] + [1] * 255)
# The most change points an index keeps (8 bytes each). A bitmap with more is dense
# enough that scanning its bytes is as cheap, and an index would cost memory and, on
# every write, a long move of the points after the one written.
MAX_FLIPS = 1 << 18
# The bytes of a bitmap the index is built from at a time (see _sparse_changes).
_INDEX_SLICE = 1 << 20
_CLEAR_SLICE = bytes(_INDEX_SLICE)


@dataclass
class Feature:
    """A feature the extension holds that prlnbd does not interpret, kept as it is."""

    magic: int
    flags: int
    data: bytes

    @property
    def necessary(self) -> bool:
        """Whether the file must not be changed because this feature is unknown."""
        return bool(self.flags & fmt.FEATURE_NECESSARY)

    @property
    def transit(self) -> bool:
        """Whether the feature must be kept byte for byte when the extension is rewritten."""
        return bool(self.flags & fmt.FEATURE_TRANSIT)


# Bytes of bitmap per chunk of a bitmap made here (one loaded from an image uses its cluster
# size, what one L1 entry covers).
DEFAULT_CHUNK = 64 * 1024


class DirtyBitmap:
    """One dirty bitmap: bit i set means guest bytes [i*g, (i+1)*g) changed (g = granularity).

    The bits are kept in chunks of CHUNK bytes, each all clear, all set, or stored
    bytes, as the image stores them per L1 entry: memory and time follow what the
    file holds (and what writes touch), not the size the header claims. Bit i is
    bit (i % 8) of byte (i // 8); change them through set_range() and clear().
    """

    def __init__(
        self,
        id: bytes,
        granularity: int,
        disk_size: int,
        bits: bytes | bytearray | None = None,
        flags: int = 0,
        l1: list[int] | None = None,
        chunk: int = DEFAULT_CHUNK,
    ) -> None:
        self.id = id
        self.granularity = granularity  # bytes per bit
        self.disk_size = disk_size  # bytes
        self.flags = flags
        self.l1: list[int] = l1 if l1 is not None else []
        self.chunk = chunk
        nbytes = -(-self.nbits // 8)
        # Per chunk: False all clear, True all (meaningful) bits set, or the stored bytes.
        self._chunks: list[bytearray | bool] = [False] * -(-nbytes // chunk)
        if bits is not None:
            for k in range(len(self._chunks)):
                piece = bits[k * chunk : (k + 1) * chunk]
                if _NONZERO.search(piece):
                    self._chunks[k] = bytearray(piece.ljust(self._chunk_len(k), b"\0"))
        # The index: every guest offset where the state changes, in order (even positions start a
        # dirty run, odd ones end it; the last granule is clipped to the disk). Built on first
        # use, kept true by set_range() and clear(); None until then, and while the bitmap has
        # more than MAX_FLIPS changes (_dense).
        self._flips: array[int] | None = None
        self._dense = False

    def copy(self) -> DirtyBitmap:
        """An independent copy (same id, granularity and bits)."""
        other = DirtyBitmap(self.id, self.granularity, self.disk_size, None, self.flags, list(self.l1), self.chunk)
        other._chunks = [c if isinstance(c, bool) else bytearray(c) for c in self._chunks]
        return other

    @property
    def name(self) -> str:
        """The name QEMU and backup tools use: the id as a lowercase UUID."""
        return str(uuid.UUID(bytes=bytes(self.id)))

    @property
    def nbits(self) -> int:
        """How many bits cover the disk."""
        return -(-self.disk_size // self.granularity)

    @property
    def bits(self) -> bytearray:
        """All the bitmap's bytes, as a new buffer (for tests and small bitmaps: it costs the full size)."""
        return bytearray().join(self._chunk_bytes(k) for k in range(len(self._chunks)))

    def stored_bytes(self) -> int:
        """Bytes of memory the bits take (chunks that are neither all clear nor all set)."""
        return sum(len(c) for c in self._chunks if not isinstance(c, bool))

    def _chunk_len(self, k: int) -> int:
        nbytes = -(-self.nbits // 8)
        return min(self.chunk, nbytes - k * self.chunk)

    def _chunk_bits(self, k: int) -> tuple[int, int]:
        """The meaningful bits [first, end) of chunk K."""
        first = k * self.chunk * 8
        return first, min(first + self.chunk * 8, self.nbits)

    def _chunk_bytes(self, k: int) -> bytes | bytearray:
        c = self._chunks[k]
        n = self._chunk_len(k)
        if c is False:
            return bytes(n)
        if c is True:
            first, end = self._chunk_bits(k)
            buf = bytearray(n)
            _set_bits(buf, 0, end - first)
            return buf
        return c

    def is_set(self, bit: int) -> bool:
        """Whether BIT is set."""
        k, at = divmod(bit >> 3, self.chunk)
        c = self._chunks[k]
        if isinstance(c, bool):
            return c and bit < self.nbits
        return bool(c[at] & (1 << (bit & 7)))

    def set_range(self, offset: int, length: int) -> None:
        """Mark every granule touched by guest bytes [offset, offset+length) dirty."""
        if length <= 0:
            return
        first = offset // self.granularity
        last = min(self.nbits, -(-(offset + length) // self.granularity))
        if first >= last:
            return
        self._set_chunked(first, last)
        flips = self._flips
        if flips is not None:
            # The changes inside [start, end] go; start starts a run unless a run is already
            # going on there (an odd number of changes before it), end ends one unless one
            # goes on past it.
            start = first * self.granularity
            end = min(last * self.granularity, self.disk_size)
            i = bisect.bisect_left(flips, start)
            j = bisect.bisect_right(flips, end, i)
            flips[i:j] = array("Q", ([] if i & 1 else [start]) + ([] if j & 1 else [end]))
            if len(flips) > MAX_FLIPS:
                self._flips = None
                self._dense = True

    def _set_chunked(self, first: int, last: int) -> None:
        """Set bits [first, last); a chunk covered whole becomes all set without bytes."""
        per = self.chunk * 8
        for k in range(first // per, (last - 1) // per + 1):
            lo, hi = self._chunk_bits(k)
            a, b = max(first, lo), min(last, hi)
            c = self._chunks[k]
            if a == lo and b == hi:
                self._chunks[k] = True
            elif c is not True:
                buf = bytearray(self._chunk_len(k)) if c is False else c
                _set_bits(buf, a - lo, b - lo)
                self._chunks[k] = buf

    def clear(self) -> None:
        """Mark the whole disk clean."""
        self._chunks = [False] * len(self._chunks)
        self._flips = array("Q")
        self._dense = False

    def index(self) -> array[int] | None:
        """The guest offsets where the bitmap changes, in order; None for a bitmap with too many.

        Built once from the bytes (ahead of need by a server, as QEMU builds its
        own summary when it loads a bitmap), then kept true by every change, so
        finding the dirty runs of any range costs two binary searches.
        """
        if self._flips is None and not self._dense:
            flips = self._build_index()
            if flips is None:
                self._dense = True
            self._flips = flips
        return self._flips

    def _build_index(self) -> array[int] | None:
        nbits = self.nbits
        points = self._sparse_changes()
        if points is None:
            # Many set bytes: long runs of them, which set_runs() takes whole, or too many changes.
            points = list(itertools.islice(itertools.chain.from_iterable(self.set_runs(0, nbits)), MAX_FLIPS + 1))
        else:
            # Bits past the disk end carry no meaning.
            cut = bisect.bisect_left(points, nbits)
            if cut < len(points):
                points[cut:] = [nbits] if cut & 1 else []
        if len(points) > MAX_FLIPS:
            return None
        flips = array("Q", map(self.granularity.__mul__, points))
        if points and points[-1] == nbits:
            flips[-1] = self.disk_size
        return flips

    def _sparse_changes(self) -> list[int] | None:
        """The bits where the state changes, byte by set byte; None past MAX_FLIPS // 8 set bytes.

        An all-set chunk gives its two ends; in a stored one, split() locates the set
        bytes at memchr speed and a table gives each byte's changes. A stored chunk
        is taken a slice at a time, and a clear slice costs one comparison.
        """
        points: list[int] = []
        budget = MAX_FLIPS // 8
        neighbours = False  # set bytes side by side: a run over their edge ends and starts there
        for k, c in enumerate(self._chunks):
            if c is False:
                continue
            if c is True:
                lo, hi = self._chunk_bits(k)
                neighbours = neighbours or bool(points and points[-1] == lo)
                points += (lo, hi)
                continue
            base = k * self.chunk
            for start in range(0, len(c), _INDEX_SLICE):
                piece = c[start : start + _INDEX_SLICE]
                if piece == (_CLEAR_SLICE if len(piece) == _INDEX_SLICE else bytes(len(piece))):
                    continue
                set_bytes = piece.translate(None, b"\x00")
                budget -= len(set_bytes)
                if budget < 0:
                    return None
                gaps = piece.translate(_NONZERO_TO_ONE).split(b"\x01")
                # The k-th set byte is at the length of the gaps before it, plus k. (One gap more
                # than set bytes: the one after the last.)
                where = map(operator.add, itertools.accumulate(map(len, gaps)), itertools.count(base + start))
                found = [
                    (at << 3) + b for at, value in zip(where, set_bytes, strict=False) for b in _BYTE_FLIPS[value]
                ]
                neighbours = neighbours or b"" in gaps[1:-1] or bool(points and found and found[0] == points[-1])
                points += found
        if neighbours:
            joined: list[int] = []
            for point in points:
                if joined and joined[-1] == point:
                    joined.pop()
                else:
                    joined.append(point)
            points = joined
        return points

    def _raw_runs(self, first: int, last: int) -> Iterator[tuple[int, int]]:
        """Runs of set bits covering the set bits of [first, last), in order, maybe adjacent or past it."""
        if first >= last:
            return
        per = self.chunk * 8
        for k in range(first // per, min(len(self._chunks), (last - 1) // per + 1)):
            c = self._chunks[k]
            if c is False:
                continue
            if c is True:
                yield self._chunk_bits(k)
                continue
            base = k * per
            lo_byte = max(first - base, 0) >> 3
            hi_byte = min((last - base + 7) >> 3, len(c))
            for m in _SET_BYTES.finditer(c, lo_byte, hi_byte):
                lead, stop = m.span()
                at = base + (lead << 3)
                for lo, hi in _BYTE_RUNS[c[lead]]:
                    yield at + lo, at + hi
                if stop - lead > 1:
                    # The all-set bytes after the lead byte: one run.
                    yield at + 8, at + ((stop - lead) << 3)

    def set_runs(self, first: int, last: int) -> Iterator[tuple[int, int]]:
        """The maximal runs [start, end) of set bits within bits [first, last), in order.

        All-clear and all-set chunks cost one step each; in a stored chunk a regular
        expression skips clear bytes and takes a stretch of all-set bytes whole, at C
        speed, and the byte that leads it is looked up in a table. So the cost
        follows the number of runs and the stored bytes, not the size of the disk,
        and stays linear however the bits alternate.
        """
        start = end = -1  # the run being grown
        for lo, hi in self._raw_runs(first, last):
            if lo == end:
                end = hi
                continue
            if start < end:
                a, b = max(start, first), min(end, last)
                if a < b:
                    yield a, b
            start, end = lo, hi
        if start < end:
            a, b = max(start, first), min(end, last)
            if a < b:
                yield a, b

    def extents(self, offset: int, length: int) -> Iterator[tuple[int, bool]]:
        """Split [offset, offset+length) into (length, dirty) runs, aligned to the granularity."""
        g = self.granularity
        end = min(offset + length, self.disk_size)
        pos = offset
        for first, last in self.set_runs(offset // g, -(-end // g)):
            start = max(first * g, offset)
            stop = min(last * g, end)
            if stop <= start:
                continue
            if start > pos:
                yield start - pos, False
            yield stop - start, True
            pos = stop
        if pos < end:
            yield end - pos, False

    def changes(self, offset: int, stop: int, horizon: int, limit: int) -> tuple[bool, array[int]]:
        """Whether guest byte OFFSET is dirty, and where the state changes after it.

        The changes are every offset in (OFFSET, STOP] where it flips, then the
        first one past STOP, or HORIZON (the last offset given) if it comes
        first; or more than LIMIT of them, cut short. What extents() says, as
        boundaries, for callers that want many at once: a slice of the index
        when the bitmap has one.
        """
        horizon = min(horizon, self.disk_size)
        flips = self.index()
        if flips is not None:
            i = bisect.bisect_right(flips, offset)
            j = bisect.bisect_right(flips, stop, i)
            if j - i > limit:
                return bool(i & 1), flips[i : i + limit + 1]
            # The changes up to STOP, and the next one.
            found = flips[i : j + 1]
            cut = bisect.bisect_left(found, horizon)
            if cut < len(found):
                del found[cut:]
                found.append(horizon)
            elif j == len(flips):
                # No change after STOP: the state holds to the horizon.
                found.append(horizon)
            return bool(i & 1), found
        dirty, points = self._scanned_changes(offset, stop, horizon, limit)
        return dirty, array("Q", points)

    def _scanned_changes(self, offset: int, stop: int, horizon: int, limit: int) -> tuple[bool, list[int]]:
        """changes() for a bitmap without an index: from the bytes, run by run."""
        g = self.granularity
        points: list[int] = []
        add = points.append
        dirty = False
        for first, last in self.set_runs(offset // g, -(-horizon // g)):
            lo = first * g
            if lo > offset:
                if lo > stop:
                    add(min(lo, horizon))
                    return dirty, points
                add(lo)
            else:
                dirty = True
            hi = min(last * g, horizon)
            add(hi)
            if hi > stop or len(points) > limit:
                return dirty, points
        if not points or points[-1] < horizon:
            add(horizon)
        return dirty, points

    def dirty_bytes(self) -> int:
        """How many guest bytes the set bits cover (the last granule clipped to the disk).

        Counted per chunk (a population count of stored bytes), not run by run.
        """
        nbits = self.nbits
        count = 0
        for k, c in enumerate(self._chunks):
            lo, hi = self._chunk_bits(k)
            if c is True:
                count += hi - lo
            elif c is not False:
                value = int.from_bytes(c, "little")
                count += (value & ((1 << (hi - lo)) - 1)).bit_count()
        total = count * self.granularity
        if nbits and self.is_set(nbits - 1):
            total -= nbits * self.granularity - self.disk_size
        return total


def _set_bits(bits: bytearray, first: int, last: int) -> None:
    """Set bits [first, last) in BITS."""
    while first < last and first & 7:
        bits[first >> 3] |= 1 << (first & 7)
        first += 1
    whole_end = last & ~7
    if first < whole_end:
        bits[first >> 3 : whole_end >> 3] = b"\xff" * ((whole_end - first) >> 3)
        first = whole_end
    while first < last:
        bits[first >> 3] |= 1 << (first & 7)
        first += 1


def bitmap_l1_size(disk_size: int, granularity: int, cluster_size: int) -> int:
    """How many L1 entries a bitmap of GRANULARITY over DISK_SIZE bytes needs."""
    nbits = -(-disk_size // granularity)
    nbytes = -(-nbits // 8)
    return -(-nbytes // cluster_size)


@dataclass
class Extension:
    """The decoded format extension cluster."""

    offset: int  # byte offset of the extension cluster in the file
    bitmaps: list[DirtyBitmap] = field(default_factory=list)
    features: list[Feature] = field(default_factory=list)  # unknown ones, in order

    @property
    def necessary_unknown(self) -> bool:
        """Whether an unknown NECESSARY feature forbids changing the file."""
        return any(f.necessary for f in self.features)

    def clusters(self) -> list[int]:
        """Host byte offsets of every cluster the extension owns (itself and bitmap data)."""
        out = [self.offset]
        for bm in self.bitmaps:
            out.extend(e * fmt.SECTOR for e in bm.l1 if e > fmt.L1_ALL_SET)
        return out


class BitmapCutOff(ExtensionError):
    """A dirty bitmap whose clusters lie past the end of the file (cut off, as `qemu-img check -r` cuts them)."""


def repair_hint(path: Path) -> str:
    """What a message about a bitmap cut off from PATH tells the user to do."""
    return f"`prlnbd check --repair {path}` drops it"


def read_extension(
    path: Path,
    fd: int,
    offset: int,
    cluster_size: int,
    disk_size: int,
    data_off: int,
    *,
    cut_off: list[DirtyBitmap] | None = None,
) -> Extension:
    """Read and validate the format extension cluster at byte OFFSET of the image.

    A bitmap whose clusters lie past the end of the file is an error
    (BitmapCutOff), unless CUT_OFF is a list: then it is left out of the
    extension and put there, header only (for `check --repair`).
    """
    data = os.pread(fd, cluster_size, offset)
    if len(data) < cluster_size:
        raise ExtensionError(f"{path}: format extension at byte {offset} is truncated")
    magic, checksum = fmt.EXT_HEADER.unpack_from(data, 0)
    if magic != fmt.EXT_MAGIC:
        raise ExtensionError(
            f"{path}: format extension at byte {offset}: bad magic {magic:#x}, expected {fmt.EXT_MAGIC:#x}"
        )
    actual = hashlib.md5(memoryview(data)[fmt.EXT_CHECKSUM_START :]).digest()
    if actual != checksum:
        raise ExtensionError(
            f"{path}: format extension at byte {offset}: m_CheckSum is {checksum.hex()},"
            f" the MD5 of the cluster is {actual.hex()}"
        )
    ext = Extension(offset=offset)
    pos = fmt.EXT_HEADER.size
    while True:
        if pos + fmt.FEATURE_HEADER.size > cluster_size:
            raise ExtensionError(f"{path}: format extension has no end-of-features marker")
        fmagic, flags, size, _unused = fmt.FEATURE_HEADER.unpack_from(data, pos)
        pos += fmt.FEATURE_HEADER.size
        if fmagic == fmt.FEATURE_END:
            return ext
        padded = fmt.round_up(size, 8)
        if pos + padded > cluster_size:
            raise ExtensionError(
                f"{path}: feature {fmagic:#x} data_size {size} runs past the extension cluster"
            )
        body = data[pos : pos + size]
        pos += padded
        if fmagic == fmt.FEATURE_DIRTY_BITMAP:
            try:
                ext.bitmaps.append(_read_bitmap(path, fd, body, flags, cluster_size, disk_size, data_off))
            except BitmapCutOff:
                if cut_off is None:
                    raise
                size, ident, granularity, _ = fmt.BITMAP_HEADER.unpack_from(body, 0)
                cut_off.append(DirtyBitmap(bytes(ident), granularity * fmt.SECTOR, size * fmt.SECTOR, flags=flags))
        else:
            ext.features.append(Feature(fmagic, flags, bytes(body)))


def _read_bitmap(
    path: Path, fd: int, body: bytes, flags: int, cluster_size: int, disk_size: int, data_off: int
) -> DirtyBitmap:
    """Decode one dirty bitmap feature and load its bits."""
    if len(body) < fmt.BITMAP_HEADER.size:
        raise ExtensionError(
            f"{path}: dirty bitmap feature data_size {len(body)} is smaller than {fmt.BITMAP_HEADER.size}"
        )
    size, ident, granularity, l1_size = fmt.BITMAP_HEADER.unpack_from(body, 0)
    name = str(uuid.UUID(bytes=ident))
    where = f"{path}: dirty bitmap {name}"
    sectors = disk_size // fmt.SECTOR
    if size != sectors:
        raise ExtensionError(f"{where}: size {size} sectors differs from the disk's {sectors}")
    if granularity == 0 or granularity & (granularity - 1) or granularity * fmt.SECTOR > 0xFFFFFFFF:
        raise ExtensionError(f"{where}: granularity {granularity} sectors is not a power of two below 4 GiB")
    gbytes = granularity * fmt.SECTOR
    expect = bitmap_l1_size(disk_size, gbytes, cluster_size)
    if l1_size != expect:
        raise ExtensionError(
            f"{where}: l1_size {l1_size} does not match size and granularity (expected {expect})"
        )
    if fmt.BITMAP_HEADER.size + l1_size * fmt.L1_ENTRY.size > len(body):
        raise ExtensionError(f"{where}: L1 table of {l1_size} entries exceeds the feature's data_size")
    file_size = os.fstat(fd).st_size
    bm = DirtyBitmap(id=bytes(ident), granularity=gbytes, disk_size=disk_size, flags=flags, chunk=cluster_size)
    nbits = bm.nbits
    l1: list[int] = []
    # Only the clusters the file stores take memory and reading time: an all-clear or all-set
    # L1 entry costs nothing, whatever size the header claims.
    for i in range(l1_size):
        (entry,) = fmt.L1_ENTRY.unpack_from(body, fmt.BITMAP_HEADER.size + i * fmt.L1_ENTRY.size)
        l1.append(entry)
        if entry == fmt.L1_ALL_CLEAR:
            continue
        if entry == fmt.L1_ALL_SET:
            bm._chunks[i] = True
            continue
        host = entry * fmt.SECTOR
        if host < data_off:
            raise ExtensionError(
                f"{where}: L1 entry {i} points at byte {host}, inside the header and BAT (data_off {data_off})"
            )
        if host + cluster_size > file_size:
            # What `qemu-img check -r leaks` leaves: QEMU 7.2 counts bitmap clusters as leaked space.
            raise BitmapCutOff(
                f"{where}: L1 entry {i} points at byte {host}, past the end of the {file_size}-byte file"
                f" (cut off, as `qemu-img check -r` cuts bitmap clusters); {repair_hint(path)}"
            )
        count = bm._chunk_len(i)
        chunk = bytearray(os.pread(fd, count, host))
        if len(chunk) < count:
            raise BitmapCutOff(f"{where}: bitmap cluster at byte {host} is truncated; {repair_hint(path)}")
        if i == l1_size - 1 and nbits & 7:
            # Bits past the disk end carry no meaning; keep them clear so scans stop at the end.
            chunk[-1] &= (1 << (nbits & 7)) - 1
        if _NONZERO.search(chunk):
            bm._chunks[i] = chunk
    bm.l1 = l1
    return bm


def new_bitmap(
    disk_size: int, granularity: int, name: str | None = None, chunk: int = DEFAULT_CHUNK
) -> DirtyBitmap:
    """A new, all-clean bitmap; NAME must be a UUID (the format stores 16 id bytes).

    CHUNK is best the image's cluster size: the bits are then kept as they are stored.
    """
    if granularity < fmt.SECTOR or granularity & (granularity - 1) or granularity > 0xFFFFFFFF:
        raise ExtensionError(f"bitmap granularity {granularity} must be a power of two from 512 bytes to 2 GiB")
    try:
        ident = uuid.UUID(name).bytes if name else uuid.uuid4().bytes
    except ValueError:
        raise ExtensionError(f"bitmap name {name!r} is not a UUID; Parallels names bitmaps by UUID") from None
    return DirtyBitmap(id=ident, granularity=granularity, disk_size=disk_size, chunk=chunk)


def feature_space(bitmaps: list[DirtyBitmap], features: list[Feature], cluster_size: int) -> int:
    """Bytes the extension cluster needs for these features, its header and the end marker."""
    total = fmt.EXT_HEADER.size + fmt.FEATURE_HEADER.size
    for bm in bitmaps:
        l1 = bitmap_l1_size(bm.disk_size, bm.granularity, cluster_size)
        total += fmt.FEATURE_HEADER.size + fmt.round_up(fmt.BITMAP_HEADER.size + 8 * l1, 8)
    for f in features:
        total += fmt.FEATURE_HEADER.size + fmt.round_up(len(f.data), 8)
    return total


def kept_features(ext: Extension | None) -> list[Feature]:
    """Unknown features that survive a rewrite: TRANSIT ones, byte for byte (others are dropped, as the spec says)."""
    return [f for f in ext.features if f.transit] if ext is not None else []


def encode_extension(bitmaps: list[tuple[DirtyBitmap, list[int]]], features: list[Feature], cluster_size: int) -> bytes:
    """The extension cluster holding BITMAPS (each with its L1 table) and FEATURES, with a fresh MD5."""
    buf = bytearray(cluster_size)
    pos = fmt.EXT_HEADER.size
    for bm, l1 in bitmaps:
        body = fmt.BITMAP_HEADER.pack(bm.disk_size // fmt.SECTOR, bm.id, bm.granularity // fmt.SECTOR, len(l1))
        body += b"".join(fmt.L1_ENTRY.pack(e) for e in l1)
        pos = _put_feature(buf, pos, fmt.FEATURE_DIRTY_BITMAP, 0, body)
    for f in features:
        pos = _put_feature(buf, pos, f.magic, f.flags, f.data)
    if pos + fmt.FEATURE_HEADER.size > cluster_size:
        raise ExtensionError(f"format extension needs more than one {cluster_size}-byte cluster")
    # The end-of-features marker is all zeros: the buffer already holds it.
    digest = hashlib.md5(memoryview(buf)[fmt.EXT_CHECKSUM_START :]).digest()
    fmt.EXT_HEADER.pack_into(buf, 0, fmt.EXT_MAGIC, digest)
    return bytes(buf)


def _put_feature(buf: bytearray, pos: int, magic: int, flags: int, data: bytes) -> int:
    end = pos + fmt.FEATURE_HEADER.size + fmt.round_up(len(data), 8)
    if end + fmt.FEATURE_HEADER.size > len(buf):
        raise ExtensionError(f"format extension needs more than one {len(buf)}-byte cluster")
    fmt.FEATURE_HEADER.pack_into(buf, pos, magic, flags, len(data), 0)
    start = pos + fmt.FEATURE_HEADER.size
    buf[start : start + len(data)] = data
    return end


def bitmap_chunks(bm: DirtyBitmap, cluster_size: int) -> list[tuple[int, bytes | None]]:
    """Per L1 entry: (0 or 1, None) for a uniform chunk, or (-1, cluster bytes) for one to store.

    A bitmap kept in chunks of the cluster size is taken chunk by chunk, so an
    all-clear or all-set one costs nothing; otherwise one cluster of bytes at a time.
    """
    out: list[tuple[int, bytes | None]] = []
    nbits = bm.nbits
    nbytes = -(-nbits // 8)
    for start in range(0, nbytes, cluster_size):
        state: bytearray | bool | None = None
        if bm.chunk == cluster_size:
            state = bm._chunks[start // cluster_size]
        if state is False:
            out.append((fmt.L1_ALL_CLEAR, None))
            continue
        if state is True:
            out.append((fmt.L1_ALL_SET, None))
            continue
        chunk = bytes(state) if state is not None else _bitmap_bytes(bm, start, start + cluster_size)
        first_bit = start * 8
        if not _NONZERO.search(chunk):
            out.append((fmt.L1_ALL_CLEAR, None))
        elif _all_set(chunk, min(nbits, first_bit + len(chunk) * 8) - first_bit):
            out.append((fmt.L1_ALL_SET, None))
        else:
            out.append((-1, chunk.ljust(cluster_size, b"\0")))
    return out


def _bitmap_bytes(bm: DirtyBitmap, start: int, stop: int) -> bytes:
    """Bytes [start, stop) of the bitmap (clipped to its end), gathered from its chunks."""
    stop = min(stop, -(-bm.nbits // 8))
    parts = []
    pos = start
    while pos < stop:
        k, at = divmod(pos, bm.chunk)
        n = min(stop - pos, bm._chunk_len(k) - at)
        parts.append(bytes(bm._chunk_bytes(k)[at : at + n]))
        pos += n
    return b"".join(parts)


def _all_set(chunk: bytes, nbits: int) -> bool:
    """Whether the first NBITS bits of CHUNK are all set (the bits after them do not count)."""
    whole = nbits >> 3
    if _NOT_ALL_SET.search(chunk, 0, whole):
        return False
    tail = nbits & 7
    return not tail or chunk[whole] & ((1 << tail) - 1) == (1 << tail) - 1


class SplitBitmap(DirtyBitmap):
    """One dirty bitmap of a split disk: PARTS, the same bitmap of each piece, the k-th at disk byte OFFSETS[k].

    It answers as a DirtyBitmap of the whole disk (what the export marks and
    indexes): a change is passed to the parts it touches, so each piece's top
    image stores its own part, and the change index is the parts' indexes
    shifted and joined. The granularity divides every piece boundary, so a
    granule never straddles two pieces and bit i of the disk is one bit of one
    part.
    """

    def __init__(self, parts: list[DirtyBitmap], offsets: list[int]) -> None:
        first = parts[0]
        g = first.granularity
        for part, offset in zip(parts, offsets, strict=True):
            if part.id != first.id or part.granularity != g:
                raise ExtensionError(
                    f"dirty bitmap {part.name}: granularity {part.granularity} differs from {g} of {first.name}"
                )
            if offset % g:
                raise ExtensionError(
                    f"dirty bitmap {first.name}: granularity {g} does not divide the piece boundary at byte {offset}"
                )
        # Not DirtyBitmap.__init__: the bits live in the parts, none here.
        self.id = first.id
        self.granularity = g
        self.disk_size = offsets[-1] + parts[-1].disk_size
        self.flags = first.flags
        self.l1 = []
        self.chunk = first.chunk
        self._chunks = []
        self.parts = parts
        self.offsets = offsets
        self._bit_offsets = [offset // g for offset in offsets]
        self._flips = None
        self._dense = False

    def copy(self) -> SplitBitmap:
        """An independent copy (a copy of every part)."""
        return SplitBitmap([part.copy() for part in self.parts], list(self.offsets))

    @property
    def bits(self) -> bytearray:
        """All the bitmap's bytes (for tests: the parts' bits joined, bit by bit)."""
        out = bytearray(-(-self.nbits // 8))
        for first, last in self.set_runs(0, self.nbits):
            _set_bits(out, first, last)
        return out

    def stored_bytes(self) -> int:
        """Bytes of memory the parts' bits take."""
        return sum(part.stored_bytes() for part in self.parts)

    def _locate(self, bit: int) -> int:
        """The index of the part holding disk bit BIT."""
        return max(0, bisect.bisect_right(self._bit_offsets, bit) - 1)

    def is_set(self, bit: int) -> bool:
        """Whether BIT is set."""
        k = self._locate(bit)
        return self.parts[k].is_set(bit - self._bit_offsets[k])

    def _set_chunked(self, first: int, last: int) -> None:
        """Set bits [first, last) in the parts they fall in (their indexes kept true as set_range keeps them)."""
        g = self.granularity
        for k in range(self._locate(first), len(self.parts)):
            base = self._bit_offsets[k]
            if base >= last:
                break
            part = self.parts[k]
            a, b = max(first - base, 0), min(last - base, part.nbits)
            if a < b:
                part.set_range(a * g, (b - a) * g)

    def clear(self) -> None:
        """Mark the whole disk clean, in every part."""
        for part in self.parts:
            part.clear()
        super().clear()

    def _build_index(self) -> array[int] | None:
        """The parts' indexes shifted to disk offsets and joined (a run over a boundary is one run)."""
        points: list[int] = []
        for part, offset in zip(self.parts, self.offsets, strict=True):
            flips = part.index()
            if flips is None:
                return None
            shifted = [flip + offset for flip in flips]
            if points and shifted and points[-1] == shifted[0]:
                points.pop()
                del shifted[0]
            points += shifted
            if len(points) > MAX_FLIPS:
                return None
        return array("Q", points)

    def _raw_runs(self, first: int, last: int) -> Iterator[tuple[int, int]]:
        """The parts' runs of set bits within [first, last), in disk bits (set_runs joins them over boundaries)."""
        for k in range(self._locate(first), len(self.parts)):
            base = self._bit_offsets[k]
            if base >= last:
                break
            part = self.parts[k]
            for lo, hi in part.set_runs(max(first - base, 0), min(last - base, part.nbits)):
                yield lo + base, hi + base

    def dirty_bytes(self) -> int:
        """How many disk bytes the set bits cover: the parts' counts added."""
        return sum(part.dirty_bytes() for part in self.parts)
