"""The format extension and its dirty bitmaps, read through ParallelsImage.open with ext_off set."""

from __future__ import annotations

import hashlib
import itertools
import uuid
from array import array
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prlnbd.errors import CorruptImage, ExtensionError
from prlnbd.image import extension as extension_mod
from prlnbd.image.extension import (
    DirtyBitmap,
    Feature,
    bitmap_chunks,
    bitmap_l1_size,
    encode_extension,
    new_bitmap,
)
from prlnbd.image.parallels import ParallelsImage
from tests.unit.imagebuild import (
    FEATURE_DIRTY_BITMAP,
    NECESSARY,
    SECTOR,
    TRANSIT,
    Spec,
    bitmap_data,
    bits_bytes,
    extension_cluster,
    feature,
)

KIB = 1024
MIB = 1024 * KIB
FIXTURE_BITMAP = "e4f2eed0-37fe-4539-b50b-85d2e7fd235f"
ID1 = bytes.fromhex("00112233445566778899aabbccddeeff")
ID2 = bytes.fromhex("e4f2eed037fe4539b50b85d2e7fd235f")


class ExtImage:
    """A v2 image with a format extension in its first data cluster and room for bitmap clusters after it."""

    def __init__(self, *, tracks: int = 8, disk_sectors: int = 64 * 2048) -> None:
        self.cs = tracks * SECTOR
        entries = -(-disk_sectors // tracks)
        self.spec = Spec(version=2, tracks=tracks, bat=[0] * entries, nb_sectors=disk_sectors)
        self.disk_sectors = disk_sectors
        self.ext_host = self.spec.data_off_sectors * SECTOR
        self.next_host = self.ext_host + self.cs

    def add_cluster(self, data: bytes) -> int:
        """Place DATA in the next free cluster; return its offset in sectors (an L1 entry value)."""
        host = self.next_host
        self.spec.blobs[host] = data.ljust(self.cs, b"\0")
        self.next_host += self.cs
        return host // SECTOR

    def write(self, path: Path, ext: bytes) -> Path:
        """Write the image with EXT (one cluster) as its format extension."""
        assert len(ext) == self.cs
        self.spec.ext_off = self.ext_host // SECTOR
        self.spec.blobs[self.ext_host] = ext
        self.spec.file_size = max(self.next_host, self.ext_host + self.cs)
        return self.spec.write(path)

    def open(self, path: Path, sections: list[bytes], **kw: object) -> ParallelsImage:
        """Write the image with an extension of SECTIONS and open it."""
        return ParallelsImage.open(self.write(path, extension_cluster(sections, self.cs, **kw)))  # type: ignore[arg-type]


def bitmap_feature(
    ext: ExtImage, l1: list[int], *, granularity: int = 1, ident: bytes = ID1, flags: int = 0, **kw: object
) -> bytes:
    return feature(
        FEATURE_DIRTY_BITMAP,
        flags,
        bitmap_data(ext.disk_sectors, ident, granularity, l1, **kw),  # type: ignore[arg-type]
    )


# ---- good extensions


def test_bitmap_with_l1_entries_clear_set_and_offsets(tmp_path: Path) -> None:
    # 64 MiB disk, 4 KiB clusters, 1 sector per bit: 131072 bits = 16 KiB = 4 L1 clusters.
    ext = ExtImage(tracks=8, disk_sectors=64 * 2048)
    bits_per_cluster = ext.cs * 8
    a = {0, 1, 7, 8, 100, bits_per_cluster - 1}
    b = {5, 4095, 4096 * 8 - 2}
    sec_a = ext.add_cluster(bits_bytes(a, ext.cs))
    sec_b = ext.add_cluster(bits_bytes(b, ext.cs))
    l1 = [sec_a, 0, 1, sec_b]
    img = ext.open(tmp_path / "bm.hds", [bitmap_feature(ext, l1, flags=TRANSIT)])
    try:
        assert img.extension is not None
        assert img.extension.offset == ext.ext_host
        assert img.extension.features == []
        assert not img.extension.necessary_unknown
        (bm,) = img.extension.bitmaps
        assert bm.name == "00112233-4455-6677-8899-aabbccddeeff"
        assert bm.granularity == SECTOR
        assert bm.disk_size == 64 * MIB
        assert bm.nbits == 131072
        assert bm.l1 == l1
        assert bm.flags == TRANSIT
        expected = set(a) | set(range(2 * bits_per_cluster, 3 * bits_per_cluster))
        expected |= {3 * bits_per_cluster + bit for bit in b}
        # Every set bit, and the whole bitmap through extents(): set bits and only those.
        assert all(bm.is_set(bit) for bit in expected)
        dirty = set()
        pos = 0
        for n, is_dirty in bm.extents(0, bm.disk_size):
            if is_dirty:
                dirty |= set(range(pos // SECTOR, (pos + n) // SECTOR))
            pos += n
        assert dirty == expected
        assert bm.dirty_bytes() == len(expected) * SECTOR
        assert sorted(img.extension.clusters()) == [ext.ext_host, sec_a * SECTOR, sec_b * SECTOR]
    finally:
        img.close()


def test_encode_extension_reads_back(tmp_path: Path) -> None:
    ext = ExtImage(tracks=8, disk_sectors=64 * 2048)
    bm = DirtyBitmap(id=ID2, granularity=SECTOR, disk_size=64 * MIB, bits=bytearray(16 * KIB))
    bm.set_range(0, 3 * SECTOR)
    sec = ext.add_cluster(bytes(bm.bits[: ext.cs]))
    keep = Feature(0x6666, TRANSIT, b"transit data")
    cluster = encode_extension([(bm, [sec, 0, 1, 0])], [keep], ext.cs)
    img = ParallelsImage.open(ext.write(tmp_path / "enc.hds", cluster))
    try:
        assert img.extension is not None
        (got,) = img.extension.bitmaps
        assert got.name == FIXTURE_BITMAP and got.l1 == [sec, 0, 1, 0]
        assert [(f.magic, f.flags, f.data) for f in img.extension.features] == [(0x6666, TRANSIT, b"transit data")]
        assert list(got.extents(0, 4 * SECTOR)) == [(3 * SECTOR, True), (SECTOR, False)]
    finally:
        img.close()


def test_empty_extension(tmp_path: Path) -> None:
    ext = ExtImage(tracks=8, disk_sectors=2048)
    img = ext.open(tmp_path / "e.hds", [])
    try:
        assert img.extension is not None
        assert img.extension.bitmaps == [] and img.extension.features == []
        assert img.extension.clusters() == [ext.ext_host]
    finally:
        img.close()


def test_unknown_features_are_kept_with_their_flags(tmp_path: Path) -> None:
    ext = ExtImage(tracks=8, disk_sectors=2048)
    sections = [
        feature(0x1111, TRANSIT, b"abcde"),  # padded to 8 bytes
        bitmap_feature(ext, [0], granularity=8, ident=ID2),
        feature(0x2222, NECESSARY, b""),
        feature(0x3333, 0, b"x" * 16),
        feature(0x4444, NECESSARY | TRANSIT | 0x100, b"123456789"),
    ]
    img = ext.open(tmp_path / "f.hds", sections)
    try:
        e = img.extension
        assert e is not None
        assert [(f.magic, f.flags, f.data) for f in e.features] == [
            (0x1111, TRANSIT, b"abcde"),
            (0x2222, NECESSARY, b""),
            (0x3333, 0, b"x" * 16),
            (0x4444, NECESSARY | TRANSIT | 0x100, b"123456789"),
        ]
        assert [(f.necessary, f.transit) for f in e.features] == [
            (False, True),
            (True, False),
            (False, False),
            (True, True),
        ]
        assert e.necessary_unknown
        assert [bm.name for bm in e.bitmaps] == [str(uuid.UUID(bytes=ID2))]
    finally:
        img.close()


def test_transit_only_features_are_not_necessary(tmp_path: Path) -> None:
    ext = ExtImage(tracks=8, disk_sectors=2048)
    img = ext.open(tmp_path / "t.hds", [feature(0x5555, TRANSIT, b"keep")])
    try:
        assert img.extension is not None
        assert not img.extension.necessary_unknown
    finally:
        img.close()


def test_two_bitmaps(tmp_path: Path) -> None:
    ext = ExtImage(tracks=8, disk_sectors=2048)
    sec = ext.add_cluster(bits_bytes({0, 3}, 8))
    img = ext.open(
        tmp_path / "two.hds",
        [bitmap_feature(ext, [sec], granularity=128, ident=ID1), bitmap_feature(ext, [1], granularity=256, ident=ID2)],
    )
    try:
        assert img.extension is not None
        b1, b2 = img.extension.bitmaps
        assert list(b1.extents(0, MIB)) == [(64 * KIB, True), (128 * KIB, False), (64 * KIB, True), (768 * KIB, False)]
        assert list(b2.extents(0, MIB)) == [(MIB, True)]
    finally:
        img.close()


def test_all_set_l1_clips_bits_past_the_disk_end(tmp_path: Path) -> None:
    # 2056 sectors at 8 sectors per bit: 257 bits, so the last byte holds one meaningful bit.
    ext = ExtImage(tracks=8, disk_sectors=2056)
    img = ext.open(tmp_path / "tail.hds", [bitmap_feature(ext, [1], granularity=8)])
    try:
        assert img.extension is not None
        (bm,) = img.extension.bitmaps
        assert bm.nbits == 257
        assert bm.bits[-1] == 0x01
        assert list(bm.extents(0, bm.disk_size)) == [(bm.disk_size, True)]
        assert bm.dirty_bytes() == bm.disk_size
    finally:
        img.close()


def test_disk_not_a_multiple_of_the_granularity(tmp_path: Path) -> None:
    # 2049 sectors at 128 sectors per bit: the 17th bit covers one sector.
    ext = ExtImage(tracks=8, disk_sectors=2049)
    sec = ext.add_cluster(bits_bytes({16}, 3))
    img = ext.open(tmp_path / "odd.hds", [bitmap_feature(ext, [sec], granularity=128)])
    try:
        assert img.extension is not None
        (bm,) = img.extension.bitmaps
        assert list(bm.extents(0, bm.disk_size)) == [(MIB, False), (SECTOR, True)]
        assert bm.dirty_bytes() == SECTOR
    finally:
        img.close()


# ---- QEMU's sample image with a bitmap


def test_qemu_bitmap_fixture(qemu_image) -> None:
    img = ParallelsImage.open(qemu_image("parallels-with-bitmap"))
    try:
        assert img.extension is not None
        assert img.extension.features == []
        (bm,) = img.extension.bitmaps
        assert bm.name == FIXTURE_BITMAP
        assert bm.id == ID2  # the name is the id bytes in file order
        assert bm.granularity == 64 * KIB
        assert bm.disk_size == 64 * 1024 * MIB
        assert len(bm.l1) == 1
        g = 64 * KIB
        dirty = [(5, 7), (10, 13), (30, 31)]
        expected: list[tuple[int, bool]] = []
        pos = 0
        for first, last in dirty:
            expected += [(first * g - pos, False), ((last - first) * g, True)]
            pos = last * g
        expected.append((bm.disk_size - pos, False))
        assert list(bm.extents(0, bm.disk_size)) == expected
        assert [(first * g, last * g) for first, last in dirty] == [
            (327680, 458752),
            (655360, 851968),
            (1966080, 2031616),
        ]
        assert bm.dirty_bytes() == 6 * g
        # A range starting inside a dirty chunk.
        assert list(bm.extents(5 * g + 100, 3 * g)) == [(2 * g - 100, True), (g + 100, False)]
    finally:
        img.close()


# ---- errors


def _ext_error(tmp_path: Path, ext: ExtImage, data: bytes, *words: str) -> None:
    path = ext.write(tmp_path / "bad.hds", data)
    with pytest.raises(ExtensionError) as info:
        ParallelsImage.open(path)
    msg = str(info.value)
    assert str(path) in msg, msg
    for w in words:
        assert w in msg, (w, msg)


def test_bad_extension_magic(tmp_path: Path) -> None:
    ext = ExtImage(disk_sectors=2048)
    _ext_error(tmp_path, ext, extension_cluster([], ext.cs, magic=0x1234), "magic", "0x1234")


def test_checksum_mismatch(tmp_path: Path) -> None:
    ext = ExtImage(disk_sectors=2048)
    good = bytearray(extension_cluster([], ext.cs))
    good[-1] ^= 0xFF  # the checksum covers the padding up to the cluster's end
    _ext_error(tmp_path, ext, bytes(good), "m_CheckSum")


def test_checksum_does_not_cover_the_first_24_bytes(tmp_path: Path) -> None:
    ext = ExtImage(disk_sectors=2048)
    data = extension_cluster([], ext.cs)
    rest = data[24:]

    assert hashlib.md5(rest).digest() == data[8:24]
    img = ParallelsImage.open(ext.write(tmp_path / "ok.hds", data))
    img.close()


def test_feature_data_size_past_the_cluster(tmp_path: Path) -> None:
    ext = ExtImage(disk_sectors=2048)
    sections = [feature(0x77, 0, b"", data_size=ext.cs)]
    _ext_error(tmp_path, ext, extension_cluster(sections, ext.cs, end=False), "data_size 4096")


def test_feature_data_size_near_2_to_32(tmp_path: Path) -> None:
    ext = ExtImage(disk_sectors=2048)
    sections = [feature(0x77, 0, b"", data_size=0xFFFFFFFF)]
    _ext_error(tmp_path, ext, extension_cluster(sections, ext.cs, end=False), "data_size 4294967295")


def test_no_end_marker(tmp_path: Path) -> None:
    ext = ExtImage(disk_sectors=2048)
    # One feature whose data fills the cluster exactly: no room is left for the end marker.
    sections = [feature(0x77, 0, b"z" * (ext.cs - 48))]
    _ext_error(tmp_path, ext, extension_cluster(sections, ext.cs, end=False), "end-of-features")


def test_no_end_marker_with_a_partial_header_at_the_end(tmp_path: Path) -> None:
    ext = ExtImage(disk_sectors=2048)
    # 8 bytes remain after the feature: too few for another feature header.
    sections = [feature(0x77, 0, b"z" * (ext.cs - 56))]
    data = bytearray(extension_cluster(sections, ext.cs, end=False))
    data[-8:] = b"\xff" * 8

    data[8:24] = hashlib.md5(data[24:]).digest()
    _ext_error(tmp_path, ext, bytes(data), "end-of-features")


def test_bitmap_size_differs_from_the_disk(tmp_path: Path) -> None:
    ext = ExtImage(disk_sectors=2048)
    f = feature(FEATURE_DIRTY_BITMAP, 0, bitmap_data(4096, ID1, 8, [0]))
    _ext_error(tmp_path, ext, extension_cluster([f], ext.cs), "size 4096", "2048", str(uuid.UUID(bytes=ID1)))


@pytest.mark.parametrize("granularity", [0, 3, 24, 1 << 23, 0x80000001])
def test_bitmap_granularity_not_a_power_of_two(tmp_path: Path, granularity: int) -> None:
    ext = ExtImage(disk_sectors=2048)
    f = bitmap_feature(ext, [0], granularity=granularity)
    _ext_error(tmp_path, ext, extension_cluster([f], ext.cs), f"granularity {granularity}")


@pytest.mark.parametrize("l1_size", [0, 2, 1000])
def test_bitmap_wrong_l1_size(tmp_path: Path, l1_size: int) -> None:
    ext = ExtImage(disk_sectors=2048)
    f = bitmap_feature(ext, [0] * min(l1_size, 4), granularity=8, l1_size=l1_size)
    _ext_error(tmp_path, ext, extension_cluster([f], ext.cs), f"l1_size {l1_size}", "expected 1")


def test_bitmap_l1_table_longer_than_the_feature(tmp_path: Path) -> None:
    # 64 MiB at 1 sector per bit needs 4 L1 entries; the feature holds only 2.
    ext = ExtImage(tracks=8, disk_sectors=64 * 2048)
    f = bitmap_feature(ext, [0, 0], granularity=1, l1_size=4)
    _ext_error(tmp_path, ext, extension_cluster([f], ext.cs), "L1 table of 4 entries")


def test_bitmap_feature_too_short(tmp_path: Path) -> None:
    ext = ExtImage(disk_sectors=2048)
    f = feature(FEATURE_DIRTY_BITMAP, 0, b"\x00" * 20)
    _ext_error(tmp_path, ext, extension_cluster([f], ext.cs), "data_size 20")


def test_bitmap_l1_entry_past_the_end_of_the_file(tmp_path: Path) -> None:
    ext = ExtImage(tracks=8, disk_sectors=64 * 2048)
    sec = ext.add_cluster(b"\x01")
    f = bitmap_feature(ext, [sec, sec + 8 * 100, 0, 0])
    _ext_error(tmp_path, ext, extension_cluster([f], ext.cs), "L1 entry 1", "past the end")


def test_bitmap_l1_entry_cluster_crossing_the_end_of_the_file(tmp_path: Path) -> None:
    ext = ExtImage(tracks=8, disk_sectors=64 * 2048)
    last = ext.add_cluster(b"\x01")
    f = bitmap_feature(ext, [0, 0, 0, last + 1])  # the cluster starts one sector before EOF
    _ext_error(tmp_path, ext, extension_cluster([f], ext.cs), "L1 entry 3")


def test_bitmap_l1_entry_inside_the_header(tmp_path: Path) -> None:
    ext = ExtImage(tracks=8, disk_sectors=2048)
    f = bitmap_feature(ext, [2], granularity=8)  # sector 2: inside the BAT
    _ext_error(tmp_path, ext, extension_cluster([f], ext.cs), "L1 entry 0")


def test_ext_off_outside_the_file_is_corrupt(tmp_path: Path) -> None:
    ext = ExtImage(disk_sectors=2048)
    path = ext.write(tmp_path / "x.hds", extension_cluster([], ext.cs))
    data = bytearray(path.read_bytes())
    data[56:64] = (len(data) // SECTOR).to_bytes(8, "little")  # ext_off at EOF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptImage, match="ext_off"):
        ParallelsImage.open(path)


# ---- DirtyBitmap on its own


def naive_extents(bits: bytes, nbits: int, g: int, disk_size: int, offset: int, length: int) -> list[tuple[int, bool]]:
    out: list[list[int | bool]] = []
    end = min(offset + length, disk_size)
    pos = offset
    while pos < end:
        bit = pos // g
        dirty = bit < nbits and bool(bits[bit // 8] >> (bit % 8) & 1)
        stop = min(end, (bit + 1) * g)
        if out and out[-1][1] == dirty:
            out[-1][0] += stop - pos  # type: ignore[operator]
        else:
            out.append([stop - pos, dirty])
        pos = stop
    return [(int(n), bool(d)) for n, d in out]


@st.composite
def bitmaps(draw: st.DrawFn, *, tail_garbage: bool = True) -> DirtyBitmap:
    g = draw(st.sampled_from([1, 3, 512, 4096, 65536]))
    nbits = draw(st.integers(0, 300))
    disk_size = max(0, nbits * g - draw(st.integers(0, g - 1)))
    nbits = -(-disk_size // g)
    nbytes = -(-nbits // 8)
    kind = draw(st.sampled_from(["random", "sparse", "dense"]))
    if kind == "random":
        raw = bytearray(draw(st.binary(min_size=nbytes, max_size=nbytes)))
    else:
        fill = 0xFF if kind == "dense" else 0
        raw = bytearray([fill]) * nbytes
        for bit in draw(st.lists(st.integers(0, max(0, nbits - 1)), max_size=10)) if nbits else []:
            raw[bit // 8] ^= 1 << (bit % 8)
    if not tail_garbage and nbits % 8:
        raw[-1] &= (1 << (nbits % 8)) - 1
    # Small chunks: runs and changes across chunk edges, and all-set or all-clear chunks.
    chunk = draw(st.sampled_from([1, 2, 3, 5, 64 * KIB]))
    return DirtyBitmap(id=ID1, granularity=g, disk_size=disk_size, bits=raw, chunk=chunk)


@settings(max_examples=400, deadline=None)
@given(bm=bitmaps(), data=st.data())
def test_extents_match_the_per_bit_model(bm: DirtyBitmap, data: st.DataObject) -> None:
    offset = data.draw(st.integers(0, bm.disk_size + bm.granularity))
    length = data.draw(st.integers(0, bm.disk_size + 2 * bm.granularity))
    got = list(bm.extents(offset, length))
    assert got == naive_extents(bytes(bm.bits), bm.nbits, bm.granularity, bm.disk_size, offset, length)
    assert all(n > 0 for n, _ in got)


@settings(max_examples=300, deadline=None)
@given(bm=bitmaps(tail_garbage=False), data=st.data())
def test_set_range_matches_the_per_bit_model(bm: DirtyBitmap, data: st.DataObject) -> None:
    g = bm.granularity
    model = bytearray(bm.bits)
    for _ in range(data.draw(st.integers(1, 4))):
        offset = data.draw(st.integers(0, bm.disk_size + g))
        length = data.draw(st.integers(-1, bm.disk_size + g))
        bm.set_range(offset, length)
        if length > 0:
            for bit in range(bm.nbits):
                if bit * g < offset + length and (bit + 1) * g > offset:
                    model[bit // 8] |= 1 << (bit % 8)
        assert bm.bits == model
    assert bm.dirty_bytes() == sum(
        n for n, d in naive_extents(bytes(model), bm.nbits, g, bm.disk_size, 0, bm.disk_size) if d
    )
    bm.clear()
    assert not any(bm.bits)
    assert list(bm.extents(0, bm.disk_size)) == ([(bm.disk_size, False)] if bm.disk_size else [])


def test_bit_order_is_lsb_first() -> None:
    g = 512
    bm = DirtyBitmap(id=ID1, granularity=g, disk_size=16 * g, bits=bytearray([0b00000010, 0b10000000]))
    assert [bm.is_set(i) for i in range(16)] == [i in (1, 15) for i in range(16)]
    assert list(bm.extents(0, 16 * g)) == [(g, False), (g, True), (13 * g, False), (g, True)]
    bm.clear()
    bm.set_range(2 * g, 1)
    assert bm.bits == bytearray([0b00000100, 0])


def test_set_range_marks_every_touched_granule() -> None:
    g = 4096
    bm = DirtyBitmap(id=ID1, granularity=g, disk_size=40 * g, bits=bytearray(5))
    bm.set_range(g - 1, 2)  # touches granules 0 and 1
    bm.set_range(10 * g, g)  # exactly granule 10
    bm.set_range(39 * g + 5, 10 * g)  # clipped at the disk end
    assert [i for i in range(40) if bm.is_set(i)] == [0, 1, 10, 39]


@pytest.mark.parametrize(
    ("ident", "name"),
    [
        (ID2, FIXTURE_BITMAP),
        (bytes(16), "00000000-0000-0000-0000-000000000000"),
        (b"\xff" * 16, "ffffffff-ffff-ffff-ffff-ffffffffffff"),
        (bytes(range(16)), "00010203-0405-0607-0809-0a0b0c0d0e0f"),
    ],
)
def test_name_is_the_id_in_file_order_as_a_lowercase_uuid(ident: bytes, name: str) -> None:
    bm = DirtyBitmap(id=ident, granularity=512, disk_size=512, bits=bytearray(1))
    assert bm.name == name


@pytest.mark.parametrize(
    ("disk", "g", "cs", "expected"),
    [(64 << 30, 64 << 10, 1 << 20, 1), (64 << 20, 512, 4096, 4), (1 << 20, 512, 512, 1), ((1 << 20) + 512, 512, 32, 9)],
)
def test_bitmap_l1_size(disk: int, g: int, cs: int, expected: int) -> None:
    assert bitmap_l1_size(disk, g, cs) == expected


def _naive_runs(bits: bytes, first: int, last: int) -> list[tuple[int, int]]:
    """Maximal runs of set bits in [first, last), bit by bit."""
    runs: list[tuple[int, int]] = []
    for bit in range(first, last):
        if bits[bit >> 3] >> (bit & 7) & 1:
            if runs and runs[-1][1] == bit:
                runs[-1] = (runs[-1][0], bit + 1)
            else:
                runs.append((bit, bit + 1))
    return runs


@settings(max_examples=300, deadline=None)
@given(
    data=st.lists(st.sampled_from([0x00, 0xFF, 0x55, 0xAA, 0x01, 0x80, 0x7F, 0xFE, 0x0F, 0xF0]), max_size=40)
    | st.binary(max_size=40),
    cut=st.tuples(st.integers(0, 320), st.integers(0, 320)),
    chunk=st.sampled_from([1, 2, 3, 7, 64 * KIB]),
)
def test_set_runs_equal_a_bit_by_bit_scan(data: list[int] | bytes, cut: tuple[int, int], chunk: int) -> None:
    bits = bytes(data)
    first, last = sorted((min(cut[0], 8 * len(bits)), min(cut[1], 8 * len(bits))))
    bm = DirtyBitmap(id=ID1, granularity=SECTOR, disk_size=max(8 * len(bits), 8) * SECTOR, bits=bits, chunk=chunk)
    assert list(bm.set_runs(first, last)) == _naive_runs(bits, first, last)


def test_set_runs_of_alternating_bits_take_linear_time() -> None:
    """A million alternating bits: half a million runs, found in a fraction of a second.

    Not a speed figure but a guard against quadratic decoding: the previous
    version spent about 30 s here (each run shifted one 128 KiB integer).
    """
    import time

    n = 128 * 1024
    bm = DirtyBitmap(id=ID1, granularity=SECTOR, disk_size=8 * n * SECTOR, bits=b"\x55" * n)
    t0 = time.perf_counter()
    runs = list(bm.set_runs(0, 8 * n))
    elapsed = time.perf_counter() - t0
    assert len(runs) == 4 * n and runs[:2] == [(0, 1), (2, 3)] and runs[-1] == (8 * n - 2, 8 * n - 1)
    assert elapsed < 10, elapsed


@settings(max_examples=300, deadline=None)
@given(bm=bitmaps(), data=st.data())
def test_changes_say_what_extents_say(bm: DirtyBitmap, data: st.DataObject) -> None:
    """changes() gives the boundaries of extents(): up to STOP, then one more, or LIMIT reached."""
    size = bm.disk_size
    if not size:
        return
    offset = data.draw(st.integers(0, size - 1))
    # STOP anywhere, or on a change or either side of one (where off-by-one slips show).
    changes = itertools.accumulate((n for n, _ in bm.extents(offset, size)), initial=offset)
    edges = [e + d for e in changes for d in (-1, 0, 1)]
    near = sorted(e for e in edges if offset < e <= size)
    stop = data.draw(st.integers(offset + 1, size) | st.sampled_from(near or [size]))
    horizon = data.draw(st.integers(stop, size + bm.granularity))
    limit = data.draw(st.integers(1, 40))
    dirty, found = bm.changes(offset, stop, horizon, limit)
    points = list(found)
    truth = list(bm.extents(offset, min(horizon, size) - offset))
    ends = list(itertools.accumulate((n for n, _ in truth), initial=offset))[1:]
    assert dirty == truth[0][1]
    if len(points) > limit:
        assert points == ends[: len(points)]
    else:
        # Every change up to STOP, then the first past it (the end of the extent holding STOP).
        cut = next(i for i, end in enumerate(ends) if end > stop or end == ends[-1])
        assert points == ends[: cut + 1]


def naive_index(bm: DirtyBitmap) -> list[int]:
    """Every guest offset where the bitmap's state changes, from the per-bit model."""
    points: list[int] = []
    pos, state = 0, False
    for n, dirty in naive_extents(bytes(bm.bits), bm.nbits, bm.granularity, bm.disk_size, 0, bm.disk_size):
        if dirty != state:
            points.append(pos)
            state = dirty
        pos += n
    if state:
        points.append(pos)
    return points


# The index caps: the default, and small ones that send bitmaps through the path for many
# set bytes (more than MAX_FLIPS // 8 of them) and past the cap itself.
INDEX_CAPS = st.sampled_from([extension_mod.MAX_FLIPS, 24, 8])


@settings(max_examples=400, deadline=None)
@given(bm=bitmaps(), cap=INDEX_CAPS, piece=st.sampled_from([extension_mod._INDEX_SLICE, 1, 3]))
def test_index_lists_where_the_state_changes(bm: DirtyBitmap, cap: int, piece: int) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(extension_mod, "MAX_FLIPS", cap)
        # Small slices: runs across slice edges, clear slices skipped.
        mp.setattr(extension_mod, "_INDEX_SLICE", piece)
        mp.setattr(extension_mod, "_CLEAR_SLICE", bytes(piece))
        got = bm.index()
    truth = naive_index(bm)
    if len(truth) > cap:
        assert got is None
    else:
        assert got is not None and list(got) == truth


@settings(max_examples=300, deadline=None)
@given(bm=bitmaps(), cap=INDEX_CAPS, data=st.data())
def test_index_stays_true_through_changes(bm: DirtyBitmap, cap: int, data: st.DataObject) -> None:
    """set_range() and clear() keep a built index equal to one built afresh from the bits."""
    g = bm.granularity
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(extension_mod, "MAX_FLIPS", cap)
        bm.index()
        for _ in range(data.draw(st.integers(1, 6))):
            if data.draw(st.integers(0, 9)) == 0:
                bm.clear()
            else:
                offset = data.draw(st.integers(0, bm.disk_size + g))
                bm.set_range(offset, data.draw(st.integers(-1, bm.disk_size + g)))
            truth = naive_index(bm)
            got = bm.index()
            if got is not None:
                assert list(got) == truth
            elif len(truth) <= cap:
                # Given up on once it grew too long: only clear() builds it again.
                assert bm._dense
            # Either way, changes() answers from the bytes or the index alike.
            if bm.disk_size:
                dirty, found = bm.changes(0, bm.disk_size, bm.disk_size, cap + 1000)
                ends_at_the_disk_end = bool(truth) and truth[-1] == bm.disk_size
                assert list(found) == [p for p in truth if p > 0] + ([] if ends_at_the_disk_end else [bm.disk_size])
                assert dirty == bool(truth and truth[0] == 0)


def test_a_bitmap_past_the_cap_has_no_index_and_answers_from_its_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(extension_mod, "MAX_FLIPS", 6)
    g = 512
    bm = new_bitmap(64 * g, g)
    for bit in (1, 5, 9):
        bm.set_range(bit * g, g)
    assert bm.index() is not None and list(bm.index() or []) == [g, 2 * g, 5 * g, 6 * g, 9 * g, 10 * g]
    bm.set_range(20 * g, 1)  # an eighth change: too many to keep
    assert bm.index() is None
    expected = [g, 2 * g, 5 * g, 6 * g, 9 * g, 10 * g, 20 * g, 21 * g, 64 * g]
    assert bm.changes(0, 64 * g, 64 * g, 100) == (False, array("Q", expected))
    bm.clear()
    assert bm.index() is not None and len(bm.index() or []) == 0


@pytest.mark.parametrize("pattern", ["all-set", "alternating-l1", "all-clear"])
def test_bitmap_bomb_costs_what_the_file_stores(tmp_path: Path, pattern: str) -> None:
    """A 1 TiB disk whose bitmap has 512-byte granularity: 256 MiB of bits the file never stores."""
    import tracemalloc

    from prlnbd.image.parallels import ParallelsImage
    from tests.unit.imagebuild import Spec, bitmap_data, extension_cluster, feature

    cs = 64 * KIB
    disk = 1 << 40
    n_l1 = (disk // SECTOR) // 8 // cs  # 4096 entries, each for 64 KiB of bits
    l1 = {"all-set": [1] * n_l1, "alternating-l1": [i & 1 for i in range(n_l1)], "all-clear": [0] * n_l1}[pattern]
    ext = extension_cluster([feature(0x20385FAE252CB34A, 0, bitmap_data(disk // SECTOR, ID1, 1, l1))], cs)
    spec = Spec(tracks=cs // SECTOR, bat=[0] * 16, nb_sectors=disk // SECTOR, ext_off=cs // SECTOR)
    spec.blobs[cs] = ext
    path = spec.write(tmp_path / "bomb.hds")
    tracemalloc.start()
    try:
        img = ParallelsImage.open(path)
        bm = img.extension.bitmaps[0] if img.extension else None
        assert bm is not None
        expected = {"all-set": disk, "alternating-l1": disk // 2, "all-clear": 0}[pattern]
        assert bm.dirty_bytes() == expected
        flips = bm.index()
        assert flips is not None and len(flips) == {"all-set": 2, "alternating-l1": n_l1, "all-clear": 0}[pattern]
        dirty, _ = bm.changes(0, disk, disk, 10)
        assert dirty == (pattern == "all-set")
        assert bitmap_chunks(bm, cs) == [(e, None) for e in l1]
        img.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Before, the bits alone took 256 MiB.
    assert peak < 8 * MIB, peak
    assert bm.stored_bytes() == 0
