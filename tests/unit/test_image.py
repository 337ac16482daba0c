"""ParallelsImage.open on hand-built and sample images: geometry, validation, problems, segments()."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prlnbd.errors import CorruptImage, ImageError, InvalidHeader
from prlnbd.image.parallels import ParallelsImage, Segment
from tests.unit.imagebuild import IN_USE_CLOSED, IN_USE_OPEN, SECTOR, Spec, layout

KIB = 1024
MIB = 1024 * KIB


def pattern(tag: int, length: int) -> bytes:
    """LENGTH bytes that differ from cluster to cluster and from byte to byte."""
    return bytes((tag * 37 + i * 7 + (i >> 9)) & 0xFF for i in range(length))


def read_guest(img: ParallelsImage, offset: int, length: int) -> bytes:
    """Guest bytes as the image maps them: unallocated reads as zeros, bytes past EOF too."""
    out = bytearray()
    for seg in img.segments(offset, length):
        if seg.host is None or seg.zero:
            out += bytes(seg.length)
        else:
            data = os.pread(img.fd, seg.length, seg.host)
            out += data.ljust(seg.length, b"\0")
    assert len(out) == length
    return bytes(out)


@pytest.fixture
def opened() -> Iterator[Callable[[Path], ParallelsImage]]:
    """Open images and close them at teardown."""
    images: list[ParallelsImage] = []

    def open_(path: Path) -> ParallelsImage:
        img = ParallelsImage.open(path)
        images.append(img)
        return img

    yield open_
    for img in images:
        img.close()


# ---- good images


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("tracks", [128, 63, 504, 516, 1], ids=["64K", "63sec", "252K", "516sec", "1sec"])
def test_good_image_geometry_and_contents(tmp_path: Path, opened, version: int, tracks: int) -> None:
    cs = tracks * SECTOR
    clusters = {0: pattern(1, cs), 2: pattern(2, cs), 5: pattern(3, cs - 100)}
    spec = layout(clusters, n_entries=8, version=version, tracks=tracks, order=[5, 0, 2], cylinders=3, heads=4)
    img = opened(spec.write(tmp_path / "img.hds"))
    assert img.version == version
    assert img.format_name == ("WithoutFreeSpace" if version == 1 else "WithouFreSpacExt")
    assert img.cluster_size == cs
    assert img.size == 8 * cs
    assert img.data_off == spec.data_off_sectors * SECTOR
    assert img.header.heads == 4 and img.header.cylinders == 3
    assert img.allocated == [0, 2, 5]
    assert img.problems == []
    assert img.extension is None
    assert not img.in_use
    assert img.allocated_bytes() == 3 * cs
    expected = bytearray(8 * cs)
    for idx, data in clusters.items():
        expected[idx * cs : idx * cs + len(data)] = data
    assert read_guest(img, 0, img.size) == expected
    # An unaligned range crossing allocated and unallocated clusters.
    assert read_guest(img, cs - 77, 2 * cs + 99) == expected[cs - 77 : 3 * cs + 22]


def test_v1_data_off_zero_means_end_of_bat_rounded_to_a_sector(tmp_path: Path, opened) -> None:
    # 40 entries: the BAT ends at byte 64 + 160 = 224; the data area starts at byte 512.
    spec = Spec(version=1, tracks=1, bat=[0] * 40, data_off=0)
    spec.bat[3] = 1  # sector 1 = byte 512, the first byte of the data area
    spec.bat[7] = 2
    spec.blobs[512] = b"\x33" * 512
    spec.blobs[1024] = b"\x77" * 512
    img = opened(spec.write(tmp_path / "v1.hds"))
    assert img.header.data_off == 0
    assert img.data_off == 512
    assert img.host_offset(3) == 512 and img.host_offset(7) == 1024
    assert read_guest(img, 3 * 512, 512) == b"\x33" * 512
    assert read_guest(img, 7 * 512, 512) == b"\x77" * 512
    assert read_guest(img, 0, 3 * 512) == bytes(3 * 512)


def test_v1_data_off_zero_with_a_sector_aligned_bat(tmp_path: Path, opened) -> None:
    # 112 entries: 64 + 448 = 512, already on a sector boundary.
    spec = Spec(version=1, tracks=1, bat=[0] * 112, data_off=0)
    spec.bat[0] = 1
    spec.blobs[512] = b"\x01" * 512
    img = opened(spec.write(tmp_path / "v1.hds"))
    assert img.data_off == 512
    assert read_guest(img, 0, 512) == b"\x01" * 512


def test_v1_data_off_not_cluster_aligned(tmp_path: Path, opened) -> None:
    # v1 only asks for sector alignment of data_off; clusters start at data_off + k * cluster.
    spec = layout({0: b"\xaa" * 4096, 1: b"\xbb" * 4096}, n_entries=4, version=1, tracks=8, data_off=3)
    img = opened(spec.write(tmp_path / "v1.hds"))
    assert img.data_off == 3 * SECTOR
    assert img.problems == []
    assert read_guest(img, 0, 8192) == b"\xaa" * 4096 + b"\xbb" * 4096


def test_v2_bat_entry_is_a_cluster_number(tmp_path: Path, opened) -> None:
    spec = Spec(version=2, tracks=128, bat=[0, 3, 0, 1], data_off=128)
    spec.blobs[65536] = b"\x11" * 65536
    spec.blobs[3 * 65536] = b"\x33" * 65536
    img = opened(spec.write(tmp_path / "v2.hds"))
    assert img.host_offset(1) == 3 * 65536
    assert img.host_offset(3) == 65536
    assert img.host_offset(0) == 0
    assert img.host_offset(1000) == 0  # past the BAT
    assert read_guest(img, 65536, 65536) == b"\x33" * 65536


def test_empty_bat(tmp_path: Path, opened) -> None:
    img = opened(Spec(bat=[], nb_sectors=0).write(tmp_path / "empty.hds"))
    assert img.size == 0
    assert list(img.segments(0, 0)) == []


# ---- malformed images: the right error, naming the file, the field and the value


BAD_IMAGES: dict[str, tuple[Callable[[], bytes], type[Exception], list[str]]] = {
    "bad-magic": (
        lambda: Spec(magic=b"WithoutFreeSpacX", bat=[0] * 4).build(),
        InvalidHeader,
        ["magic", "not a Parallels expandable image"],
    ),
    "qcow-magic": (lambda: b"QFI\xfb" + bytes(60), InvalidHeader, ["magic"]),
    "version-3": (lambda: Spec(hdr_version=3, bat=[0] * 4).build(), InvalidHeader, ["version", "3"]),
    "version-0": (lambda: Spec(hdr_version=0, bat=[0] * 4).build(), InvalidHeader, ["version", "0"]),
    "tracks-0": (lambda: Spec(tracks=0, bat=[0] * 4, data_off=1).build(), InvalidHeader, ["tracks", "0"]),
    "oversized-cluster": (
        lambda: Spec(tracks=(256 * MIB) // SECTOR + 1, bat=[0] * 4, data_off=1).build(),
        InvalidHeader,
        ["tracks", str((256 * MIB) // SECTOR + 1)],
    ),
    "huge-tracks": (
        lambda: Spec(tracks=0xFFFFFFFF, bat=[0] * 4, data_off=1).build(),
        InvalidHeader,
        ["tracks", "4294967295"],
    ),
    "huge-bat": (
        lambda: Spec(bat=[0] * 4, bat_entries=0xFFFFFFFF, data_off=1).build(),
        InvalidHeader,
        ["nb_bat_entries", "4294967295"],
    ),
    "truncated-header": (lambda: Spec(bat=[0] * 4).build()[:40], InvalidHeader, ["truncated", "40"]),
    "empty-file": (lambda: b"", InvalidHeader, ["truncated", "0 bytes"]),
    "truncated-bat": (
        lambda: Spec(bat=[0] * 4, bat_entries=100, data_off=1, file_size=64 + 16).build(),
        InvalidHeader,
        ["truncated", "100 entries", "464"],
    ),
    "data-off-inside-bat": (
        lambda: Spec(bat=[0] * 200, data_off=1, file_size=4096).build(),
        InvalidHeader,
        ["data_off 1", "864"],
    ),
    "data-off-past-eof": (
        lambda: Spec(bat=[0] * 4, data_off=1000, file_size=4096).build(),
        InvalidHeader,
        ["data_off 1000", "4096"],
    ),
    # 2^64 bytes and more: NBD cannot carry the size (struct.error once served).
    "size-2^64": (
        lambda: Spec(bat=[0] * 4, nb_sectors=1 << 55).build(),
        InvalidHeader,
        ["nb_sectors", str(1 << 55), str((1 << 63) - (1 << 30))],
    ),
    "size-max-u64-sectors": (
        lambda: Spec(bat=[0] * 4, nb_sectors=(1 << 64) - 1).build(),
        InvalidHeader,
        ["nb_sectors", str((1 << 64) - 1)],
    ),
    # One sector past QEMU's largest disk (2^63 - 2^30 bytes), which qemu-img 7.2 refuses too.
    "size-past-qemu-max": (
        lambda: Spec(bat=[0] * 4, nb_sectors=((1 << 63) - (1 << 30)) // SECTOR + 1).build(),
        InvalidHeader,
        ["nb_sectors", str(((1 << 63) - (1 << 30)) // SECTOR + 1)],
    ),
    "v2-data-off-0": (
        lambda: Spec(version=2, bat=[0] * 4, data_off=0).build(),
        InvalidHeader,
        ["data_off", "0", "WithouFreSpacExt"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_malformed_header(tmp_path: Path, case: str) -> None:
    make, exc, words = BAD_IMAGES[case]
    path = tmp_path / f"{case}.hds"
    path.write_bytes(make())
    with pytest.raises(ImageError) as info:
        ParallelsImage.open(path)
    assert info.type is exc, info.value
    msg = str(info.value)
    assert str(path) in msg
    for word in words:
        assert word in msg, (word, msg)


@pytest.mark.parametrize("version", [1, 2])
def test_bat_entry_inside_header_or_bat(tmp_path: Path, version: int) -> None:
    # data_off is two clusters in, so entry 1 (v2: byte 65536) and entry 1 (v1: byte 512) are both before it.
    spec = Spec(version=version, tracks=128, bat=[0] * 8, data_off=256)
    spec.bat[5] = 1
    spec.blobs[256 * SECTOR] = bytes(65536)
    path = spec.write(tmp_path / "bad.hds")
    with pytest.raises(CorruptImage) as info:
        ParallelsImage.open(path)
    msg = str(info.value)
    assert str(path) in msg and "BAT entry 5" in msg and "is 1" in msg


def test_bat_entry_just_before_data_off(tmp_path: Path) -> None:
    spec = Spec(version=1, tracks=8, bat=[0] * 8, data_off=16, file_size=64 * KIB)
    spec.bat[2] = 15  # one sector before the data area
    path = spec.write(tmp_path / "bad.hds")
    with pytest.raises(CorruptImage, match="BAT entry 2"):
        ParallelsImage.open(path)


@pytest.mark.parametrize(
    ("ext_off", "words"),
    [(10_000, ["ext_off 10000"]), (1, ["ext_off 1"]), (129, ["ext_off 129"])],
    ids=["past-eof", "inside-header", "cluster-crosses-eof"],
)
def test_ext_off_outside_the_file(tmp_path: Path, ext_off: int, words: list[str]) -> None:
    # File: header+BAT cluster, one data cluster (bytes 65536..131072).
    spec = layout({0: b"\x01"}, n_entries=4, tracks=128, ext_off=ext_off)
    path = spec.write(tmp_path / "ext.hds")
    with pytest.raises(CorruptImage) as info:
        ParallelsImage.open(path)
    msg = str(info.value)
    assert str(path) in msg
    for w in words:
        assert w in msg


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.hds"
    with pytest.raises(ImageError) as info:
        ParallelsImage.open(path)
    assert info.type is ImageError
    assert str(path) in str(info.value) and "No such file" in str(info.value)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError) as info:
        ParallelsImage.open(tmp_path)
    assert str(tmp_path) in str(info.value)


@pytest.fixture
def hang_guard() -> Iterator[None]:
    """Fail a test that blocks (an open(2) on a FIFO would) instead of hanging the suite."""
    import signal

    def _raise(signum: int, frame: object) -> None:
        raise AssertionError("blocked: open(2) waited on a FIFO")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("writable", [False, True], ids=["ro", "rw"])
def test_fifo_is_refused_without_blocking(tmp_path: Path, hang_guard: None, writable: bool) -> None:
    from prlnbd.image.raw import RawImage

    fifo = tmp_path / "pipe.hds"
    os.mkfifo(fifo)
    for opener in (ParallelsImage.open, RawImage.open):
        with pytest.raises(ImageError) as info:
            opener(fifo, writable=writable)
        assert str(fifo) in str(info.value) and "FIFO" in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path: Path) -> None:
    path = Spec(bat=[0] * 4).write(tmp_path / "secret.hds")
    path.chmod(0)
    with pytest.raises(ImageError) as info:
        ParallelsImage.open(path)
    assert str(path) in str(info.value) and "Permission denied" in str(info.value)


def test_no_fd_leak_on_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.hds"
    path.write_bytes(Spec(magic=b"X" * 16, bat=[0] * 4).build())
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(InvalidHeader):
            ParallelsImage.open(path)
    assert len(os.listdir("/proc/self/fd")) == before


# ---- tolerated problems


def kinds(img: ParallelsImage) -> list[str]:
    return [p.kind for p in img.problems]


@pytest.mark.parametrize("version", [1, 2])
def test_bat_entry_outside_the_file_is_reported(tmp_path: Path, opened, version: int) -> None:
    spec = layout({0: b"\x42" * 65536}, n_entries=4, version=version, tracks=128)
    spec.bat[2] = spec.entry_for(40 * 65536)
    img = opened(spec.write(tmp_path / "out.hds"))
    assert kinds(img) == ["outside"]
    assert img.problems[0].cluster == 2
    assert "outside" in img.problems[0].message
    # Reads of the cluster past the end give zeros, never an error.
    assert read_guest(img, 2 * 65536, 65536) == bytes(65536)
    assert read_guest(img, 0, 65536) == b"\x42" * 65536


def test_bat_entry_partly_outside_the_file_is_reported(tmp_path: Path, opened) -> None:
    spec = layout({0: b"\x42" * 65536, 1: b"\x43" * 65536}, n_entries=4, tracks=128)
    spec.file_size = spec.data_off_sectors * SECTOR + 65536 + 100  # cluster 1 cut short
    img = opened(spec.write(tmp_path / "short.hds"))
    assert kinds(img) == ["outside"]
    assert img.problems[0].cluster == 1
    assert read_guest(img, 65536, 65536) == b"\x43" * 100 + bytes(65436)


@pytest.mark.parametrize("version", [1, 2])
def test_duplicate_bat_entries_are_reported(tmp_path: Path, opened, version: int) -> None:
    spec = layout({0: b"\x01" * 65536, 1: b"\x02" * 65536}, n_entries=4, version=version, tracks=128)
    spec.bat[3] = spec.bat[0]
    img = opened(spec.write(tmp_path / "dup.hds"))
    assert kinds(img) == ["duplicate"]
    assert img.problems[0].cluster == 3
    assert "0 and 3" in img.problems[0].message
    assert read_guest(img, 3 * 65536, 65536) == b"\x01" * 65536


def test_in_use_open_is_reported(tmp_path: Path, opened) -> None:
    img = opened(Spec(bat=[0] * 4, in_use=IN_USE_OPEN).write(tmp_path / "busy.hds"))
    assert img.in_use
    assert kinds(img) == ["in_use"]


@pytest.mark.parametrize("value", [0, IN_USE_CLOSED, 1, 0xDEADBEEF])
def test_other_in_use_values_count_as_closed(tmp_path: Path, opened, value: int) -> None:
    img = opened(Spec(bat=[0] * 4, in_use=value).write(tmp_path / "closed.hds"))
    assert not img.in_use
    assert img.problems == []


def test_v2_data_off_not_cluster_aligned_is_reported(tmp_path: Path, opened) -> None:
    img = opened(Spec(version=2, bat=[0] * 4, data_off=1).write(tmp_path / "misaligned.hds"))
    assert kinds(img) == ["data_off"]
    assert "data_off 1" in img.problems[0].message


@pytest.mark.parametrize("version", [1, 2])
def test_nb_sectors_beyond_the_bat_reach(tmp_path: Path, opened, version: int) -> None:
    cs = 65536
    spec = layout({0: b"\x10" * cs, 3: b"\x13" * cs}, n_entries=4, version=version, tracks=128, nb_sectors=64 * 128)
    img = opened(spec.write(tmp_path / "big.hds"))
    assert img.size == 64 * cs  # the size follows nb_sectors
    assert img.problems == []
    segs = list(img.segments(0, img.size))
    assert segs[-1] == Segment(4 * cs, 60 * cs, None)
    assert list(img.segments(10 * cs + 5, 100)) == [Segment(10 * cs + 5, 100, None)]
    assert list(img.segments(3 * cs, 2 * cs)) == [
        Segment(3 * cs, cs, img.host_offset(3)),
        Segment(4 * cs, cs, None),
    ]
    assert read_guest(img, 3 * cs, 3 * cs) == b"\x13" * cs + bytes(2 * cs)


def test_the_largest_disk_qemu_accepts_opens(tmp_path: Path, opened) -> None:
    spec = Spec(version=2, tracks=8, bat=[0] * 4, nb_sectors=((1 << 63) - (1 << 30)) // SECTOR)
    img = opened(spec.write(tmp_path / "max.hds"))
    assert img.size == (1 << 63) - (1 << 30)


def test_bad_magic_does_not_quote_the_file(tmp_path: Path) -> None:
    path = tmp_path / "shadow"
    path.write_bytes(b"root:*:20228:0:99999:7:::\n" * 4)
    with pytest.raises(InvalidHeader) as info:
        ParallelsImage.open(path)
    assert "20228" not in str(info.value) and "99999" not in str(info.value)


def test_v1_uses_only_the_low_32_bits_of_nb_sectors(tmp_path: Path, opened) -> None:
    spec = Spec(version=1, tracks=8, bat=[0] * 4, nb_sectors=(7 << 32) | 32)
    img = opened(spec.write(tmp_path / "v1.hds"))
    assert img.size == 32 * SECTOR


def test_v2_uses_all_64_bits_of_nb_sectors(tmp_path: Path, opened) -> None:
    spec = Spec(version=2, tracks=8, bat=[0] * 4, nb_sectors=(1 << 32) | 32)
    img = opened(spec.write(tmp_path / "v2.hds"))
    assert img.size == ((1 << 32) | 32) * SECTOR


# ---- QEMU's sample images


QEMU_CONTENTS = [(0, 0x11), (64 * KIB, 0x22), (128 * KIB, 0x33), (192 * KIB, 0x44)]


@pytest.mark.parametrize("name", ["parallels-v1", "parallels-v2"])
def test_qemu_sample_images(qemu_image, opened, name: str) -> None:
    img = opened(qemu_image(name))
    assert img.version == (1 if name.endswith("v1") else 2)
    assert img.size == 2 * MIB
    assert img.cluster_size == 64 * KIB
    assert img.header.tracks == 128
    assert len(img.bat) == 32
    assert img.header.data_off == 128
    assert img.data_off == 64 * KIB
    assert img.problems == []
    assert img.allocated == [0, 1, 2, 3]
    expected = bytearray(2 * MIB)
    for off, value in QEMU_CONTENTS:
        expected[off : off + 64 * KIB] = bytes([value]) * (64 * KIB)
    assert read_guest(img, 0, img.size) == expected
    # The four data clusters are host-contiguous: one segment, then one unallocated span.
    assert list(img.segments(0, img.size)) == [
        Segment(0, 256 * KIB, img.host_offset(0)),
        Segment(256 * KIB, 2 * MIB - 256 * KIB, None),
    ]


def test_qemu_fake_image(qemu_image, opened) -> None:
    img = opened(qemu_image("fake.parallels"))
    assert img.version == 1
    assert img.size == 2 * MIB  # nb_sectors 4096
    assert len(img.bat) == 16  # reaches only 1 MiB
    assert img.header.data_off == 0
    assert img.data_off == 512
    assert img.header.heads == 0 and img.header.cylinders == 0
    data = read_guest(img, 0, img.size)
    assert data[MIB:] == bytes(MIB)  # beyond the BAT's reach: zeros
    for seg in img.segments(0, img.size):
        if seg.host is not None:
            assert seg.host + seg.length <= img.file_size
        else:
            assert seg.offset >= 4 * 64 * KIB
    assert list(img.segments(MIB, MIB)) == [Segment(MIB, MIB, None)]


def test_qemu_bitmap_image_geometry(qemu_image, opened) -> None:
    img = opened(qemu_image("parallels-with-bitmap"))
    assert img.version == 2
    assert img.size == 64 * 1024 * MIB
    assert img.cluster_size == MIB
    assert img.header.in_use == IN_USE_CLOSED
    assert not img.in_use
    assert img.header.ext_off == 4096
    assert img.allocated == []
    assert img.problems == []
    assert img.extension is not None
    assert img.extension.offset == 4096 * SECTOR
    assert list(img.segments(0, img.size)) == [Segment(0, img.size, None)]


# ---- segments()


def test_segments_merge_host_contiguous_clusters(tmp_path: Path, opened) -> None:
    cs = 4096
    spec = layout({i: bytes([i]) * cs for i in (0, 1, 2, 4, 5, 7)}, n_entries=10, tracks=8)
    img = opened(spec.write(tmp_path / "m.hds"))
    h = img.host_offset
    assert list(img.segments(0, 10 * cs)) == [
        Segment(0, 3 * cs, h(0)),
        Segment(3 * cs, cs, None),
        Segment(4 * cs, 2 * cs, h(4)),
        Segment(6 * cs, cs, None),
        Segment(7 * cs, cs, h(7)),
        Segment(8 * cs, 2 * cs, None),
    ]
    # Unaligned start and end inside merged runs.
    assert list(img.segments(100, 2 * cs)) == [Segment(100, 2 * cs, h(0) + 100)]
    assert list(img.segments(cs + 1, 4 * cs)) == [
        Segment(cs + 1, 2 * cs - 1, h(1) + 1),
        Segment(3 * cs, cs, None),
        Segment(4 * cs, cs + 1, h(4)),
    ]


def test_segments_do_not_merge_across_host_order(tmp_path: Path, opened) -> None:
    cs = 4096
    spec = layout({0: b"a" * cs, 1: b"b" * cs, 2: b"c" * cs}, n_entries=3, tracks=8, order=[2, 1, 0])
    img = opened(spec.write(tmp_path / "rev.hds"))
    segs = list(img.segments(0, 3 * cs))
    assert [s.length for s in segs] == [cs, cs, cs]
    assert read_guest(img, 0, 3 * cs) == b"a" * cs + b"b" * cs + b"c" * cs


def test_segments_skip_long_unallocated_spans_fast(tmp_path: Path, opened) -> None:
    n = 1 << 20  # a 4 MiB BAT
    spec = Spec(version=2, tracks=1, bat=[0] * n)
    data_off = spec.data_off_sectors
    spec.bat[5] = data_off
    spec.bat[n - 2] = data_off + 1
    spec.file_size = (data_off + 2) * SECTOR
    img = opened(spec.write(tmp_path / "sparse.hds"))
    segs = list(img.segments(0, img.size))
    assert [(s.offset // SECTOR, s.length // SECTOR, s.host is not None) for s in segs] == [
        (0, 5, False),
        (5, 1, True),
        (6, n - 8, False),
        (n - 2, 1, True),
        (n - 1, 1, False),
    ]


@st.composite
def bat_and_range(draw: st.DrawFn) -> tuple[int, list[int], int, int]:
    tracks = draw(st.sampled_from([1, 3, 8]))
    n = draw(st.integers(1, 24))
    hosts = draw(st.permutations(range(n)))
    allocated = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    bat = [h + 1 if a else 0 for h, a in zip(hosts, allocated, strict=True)]
    cs = tracks * SECTOR
    size = n * cs + draw(st.integers(0, 3)) * cs  # sometimes past the BAT's reach
    offset = draw(st.integers(0, size))
    length = draw(st.integers(0, size - offset))
    return tracks, bat, offset, length


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=bat_and_range())
def test_segments_match_a_per_byte_model(tmp_path: Path, case: tuple[int, list[int], int, int]) -> None:
    tracks, bat, offset, length = case
    cs = tracks * SECTOR
    # v2 with data_off one cluster in: BAT entry k (k >= 1) means host cluster k.
    spec = Spec(version=2, tracks=tracks, bat=bat, data_off=tracks * max(1, -(-(64 + 4 * len(bat)) // cs)))
    shift = spec.data_off_sectors // tracks - 1
    spec.bat = [e + shift if e else 0 for e in bat]
    spec.nb_sectors = (offset + length) // SECTOR + len(bat) * tracks + 3 * tracks
    spec.file_size = (spec.data_off_sectors + len(bat) * tracks) * SECTOR
    path = spec.write(tmp_path / "h.hds")
    img = ParallelsImage.open(path)
    try:
        segs = list(img.segments(offset, length))
    finally:
        img.close()
    # Contiguous, covering, no empty pieces.
    pos = offset
    for s in segs:
        assert s.offset == pos and s.length > 0 and not s.zero
        pos += s.length
    assert pos == offset + length
    # Byte by byte (sampled at cluster edges and inside), the mapping is the BAT's.
    for s in segs:
        for probe in {s.offset, s.offset + s.length - 1, s.offset + s.length // 2}:
            c, within = divmod(probe, cs)
            entry = spec.bat[c] if c < len(spec.bat) else 0
            if s.host is None:
                assert entry == 0
            else:
                assert entry and s.host + (probe - s.offset) == entry * cs + within
    # Maximal: no two neighbours could have been one segment.
    for a, b in itertools.pairwise(segs):
        assert not (a.host is None and b.host is None)
        assert not (a.host is not None and b.host == a.host + a.length)


def test_v1_overlapping_clusters_are_reported(tmp_path: Path, opened) -> None:
    spec = layout({0: b"a" * 65536, 1: b"b" * 65536}, n_entries=4, version=1, tracks=128)
    spec.bat[2] = spec.bat[0] + 2  # starts 1 KiB into guest cluster 0's host cluster
    img = opened(spec.write(tmp_path / "overlap.hds"))
    assert "duplicate" in kinds(img)


def test_ext_off_sharing_a_data_cluster_is_refused_or_reported(tmp_path: Path) -> None:
    from tests.unit.imagebuild import extension_cluster

    spec = layout({0: b"a" * 4096}, n_entries=4, tracks=8)
    host = spec.data_off_sectors * SECTOR
    spec.blobs[host] = extension_cluster([], 4096)
    spec.ext_off = host // SECTOR
    path = spec.write(tmp_path / "shared.hds")
    try:
        img = ParallelsImage.open(path)
    except CorruptImage:
        return
    try:
        assert "duplicate" in kinds(img)
    finally:
        img.close()


@pytest.mark.parametrize("value", [b"pd17", b"pd22", b"v2.1", b"\0\0\0\0"], ids=["pd17", "pd22", "v2.1", "zero"])
def test_in_use_values_of_other_writers_are_kept_on_a_clean_close(tmp_path: Path, value: bytes) -> None:
    # Parallels Desktop writes its own closed values; ploop writes "v2.1". Only "Ynot" means open.
    import struct

    code = struct.unpack("<I", value)[0]
    path = Spec(bat=[0] * 4, in_use=code).write(tmp_path / "closed.hds")
    img = ParallelsImage.open(path, writable=True)
    assert struct.unpack_from("<I", path.read_bytes(), 44)[0] == IN_USE_OPEN
    img.close()
    assert path.read_bytes()[44:48] == value
    again = ParallelsImage.open(path)
    assert not again.in_use and again.problems == []
    again.close()
