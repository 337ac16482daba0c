"""Read path, one expandable image: prlnbd against qemu-nbd and against the bytes written."""

from __future__ import annotations

from pathlib import Path

import nbd
import pytest

from tests import support
from tests.support import Server, Write

pytestmark = pytest.mark.skipif(
    not all(support.have(t) for t in ("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")),
    reason="qemu-utils and libnbd-bin are needed",
)

SIZE = 11719 * 512  # 6000128: a multiple of no cluster size used here
CLUSTERS = [64 << 10, 1 << 20, 258048]  # 252 KiB: 63 sectors per track, old images


def writes_for(cs: int) -> list[Write]:
    """Unaligned writes: across a cluster edge, zeros into a cluster, the partial tail."""
    return [
        (0xA1, 1000, 300000),
        (0xB2, 2 * cs - 7, 20),
        (0x00, 3 * cs + 5, 4096),
        (0xC3, SIZE - 5000, 5000),
        (0xD4, 1500, 10),
    ]


def qemu(tmp: Path, image: Path) -> Server:
    """The reference server on IMAGE, read-only."""
    return support.start_qemu_nbd(tmp / "q", image, "-r")


def assert_same_export(prl: str, ref: str, expected: bytes | None = None) -> None:
    """Bytes, base:allocation and qemu-img's view of PRL equal those of REF (and EXPECTED)."""
    assert support.nbd_size(prl) == support.nbd_size(ref)
    got, want = support.nbd_pread(prl), support.nbd_pread(ref)
    if expected is not None:
        assert_bytes(want, expected, "qemu-nbd")
    assert_bytes(got, want, "prlnbd vs qemu-nbd")
    assert support.nbdinfo_map(prl) == support.nbdinfo_map(ref)
    assert support.qemu_img_map(prl) == support.qemu_img_map(ref)
    res = support.run("qemu-img", "compare", "-f", "raw", "-F", "raw", prl, ref, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def assert_bytes(got: bytes, want: bytes, what: str) -> None:
    """Equal bytes, or a message naming the first differing offset (not a 6 MB diff)."""
    assert len(got) == len(want), f"{what}: length {len(got)} != {len(want)}"
    if got != want:
        first = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
        raise AssertionError(
            f"{what}: first difference at {first}: {got[first:first + 8].hex()} "
            f"!= {want[first:first + 8].hex()}"
        )


@pytest.mark.parametrize("cluster", CLUSTERS, ids=["64K", "1M", "252K"])
@pytest.mark.parametrize("read_only", [False, True], ids=["rw", "ro"])
def test_image_matches_qemu_nbd(tmp_path: Path, cluster: int, read_only: bool) -> None:
    writes = writes_for(cluster)
    image = support.make_parallels(tmp_path / "disk.hds", SIZE, cluster, writes)
    digest = support.file_digest(image)
    expected = bytes(support.apply_writes(bytearray(SIZE), writes))
    mapped = support.allocated_extents(image)
    extra = ("--read-only",) if read_only else ()
    with support.running(support.start_prlnbd(tmp_path, [str(image)], *extra)) as prl, \
            support.running(qemu(tmp_path, image)) as ref:
        assert_same_export(prl.uri(), ref.uri(), expected)
        assert_bytes(support.nbd_pread(prl.uri()), expected, "prlnbd vs written")
        want_map = support.merge_extents(
            [(o, n, 0) for o, n in mapped]
            + [(a, b - a, 3) for a, b in gaps(mapped, SIZE)]
        )
        assert support.nbdinfo_map(prl.uri()) == sorted(want_map)
    assert support.file_digest(image) == digest


def gaps(extents: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """The (start, end) ranges of [0, SIZE) that EXTENTS leave out."""
    out, pos = [], 0
    for off, length in sorted(extents):
        if off > pos:
            out.append((pos, off))
        pos = off + length
    if pos < size:
        out.append((pos, size))
    return out


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_unaligned_reads(tmp_path: Path, structured: bool) -> None:
    """Many small reads across data/hole/cluster edges, on one connection each side."""
    import random

    import nbd

    cluster = 258048
    writes = writes_for(cluster)
    image = support.make_parallels(tmp_path / "disk.hds", SIZE, cluster, writes)
    expected = bytes(support.apply_writes(bytearray(SIZE), writes))
    rng = random.Random(7)
    edges = [0, SIZE] + [o for _, o, n in writes] + [o + n for _, o, n in writes]
    edges += [k * cluster for k in range(SIZE // cluster + 1)]
    reqs = []
    for _ in range(300):
        edge = rng.choice(edges)
        off = max(0, min(SIZE - 1, edge + rng.randint(-700, 700)))
        reqs.append((off, rng.randint(1, min(3 * cluster, SIZE - off))))
    with support.running(support.start_prlnbd(tmp_path, [str(image)])) as prl:
        h = nbd.NBD()
        h.set_request_structured_replies(structured)
        h.connect_uri(prl.uri())
        assert h.get_structured_replies_negotiated() == structured
        # Unaligned down to the block size the server asks for (1 if it accepts any).
        align = max(1, h.get_block_size(nbd.SIZE_MINIMUM))
        for off, n in reqs:
            off -= off % align
            n = min(-(-n // align) * align, SIZE - off)
            assert h.pread(n, off) == expected[off:off + n], (off, n)
        h.shutdown()



def test_harness_detects_difference(tmp_path: Path) -> None:
    """The comparison above fails on two exports that differ by one cluster."""
    a = support.make_parallels(tmp_path / "a.hds", SIZE, 1 << 16, writes_for(1 << 16))
    b = support.make_parallels(tmp_path / "b.hds", SIZE, 1 << 16,
                               [*writes_for(1 << 16), (0, 5 << 20, 1)])
    with support.running(qemu(tmp_path / "a", a)) as qa, \
            support.running(qemu(tmp_path / "b", b)) as qb:
        # Same bytes (b only allocated a zero cluster), different allocation.
        assert support.nbd_pread(qa.uri()) == support.nbd_pread(qb.uri())
        assert support.nbdinfo_map(qa.uri()) != support.nbdinfo_map(qb.uri())
        with pytest.raises(AssertionError):
            assert_same_export(qa.uri(), qb.uri())
    c = support.make_parallels(tmp_path / "c.hds", SIZE, 1 << 16,
                               [*writes_for(1 << 16), (0x5A, 4 << 20, 1)])
    with support.running(qemu(tmp_path / "a2", a)) as qa, \
            support.running(qemu(tmp_path / "c", c)) as qc:
        res = support.run("qemu-img", "compare", "-f", "raw", "-F", "raw", qa.uri(), qc.uri(),
                          check=False)
        assert res.returncode == 1
        with pytest.raises(AssertionError, match="first difference at 4194304"):
            assert_same_export(qa.uri(), qc.uri())


# --- QEMU's sample images ---

V1_V2_BYTES = b"".join(bytes([p]) * 65536 for p in (0x11, 0x22, 0x33, 0x44)).ljust(2 << 20, b"\0")


@pytest.mark.parametrize("name", ["parallels-v1", "parallels-v2"])
def test_fixture_contents(tmp_path: Path, name: str) -> None:
    image = support.decompress_fixture(name, tmp_path)
    digest = support.file_digest(image)
    with support.running(support.start_prlnbd(tmp_path, [str(image)])) as prl, \
            support.running(qemu(tmp_path, image)) as ref:
        assert_bytes(support.nbd_pread(prl.uri()), V1_V2_BYTES, name)
        assert support.nbdinfo_map(prl.uri()) == [(0, 256 << 10, 0), (256 << 10, 1792 << 10, 3)]
        assert_same_export(prl.uri(), ref.uri(), V1_V2_BYTES)
        assert support.nbd_pread(prl.uri(name), 65530, 12) == b"\x11" * 6 + b"\x22" * 6
    assert support.file_digest(image) == digest


def test_fixture_with_bitmap_reads_zeros(tmp_path: Path) -> None:
    image = support.decompress_fixture("parallels-with-bitmap", tmp_path)
    size = 64 << 30
    # Read-only: a writable server refuses images whose bitmaps writes would make stale.
    with support.running(support.start_prlnbd(tmp_path, [str(image)], "--read-only")) as prl, \
            support.running(qemu(tmp_path, image)) as ref:
        assert support.nbd_size(prl.uri()) == size
        for off, n in [(0, 1 << 20), (327680, 131072), (4 << 20, 1 << 20),
                       ((32 << 30) - 4096, 1 << 20), (size - (1 << 20), 1 << 20), (size - 512, 512)]:
            assert support.nbd_pread(prl.uri(), off, n) == bytes(n), off
        assert support.nbdinfo_map(prl.uri()) == [(0, size, 3)]
        assert support.nbdinfo_map(prl.uri()) == support.nbdinfo_map(ref.uri())
        assert support.qemu_img_map(prl.uri()) == support.qemu_img_map(ref.uri())


def test_fixture_fake_is_safe(tmp_path: Path) -> None:
    """nb_sectors claims 2 MiB, the BAT maps 1 MiB: zeros past it, or a clear refusal."""
    image = support.decompress_fixture("fake.parallels", tmp_path)
    try:
        prl = support.start_prlnbd(tmp_path, [str(image)])
    except RuntimeError as e:  # refused at startup: allowed, but it must say why
        assert "Traceback" not in str(e)
        assert "fake.parallels" in str(e)
        return
    with support.running(prl), support.running(qemu(tmp_path, image)) as ref:
        data = support.nbd_pread(prl.uri())
        assert len(data) in (1 << 20, 2 << 20)
        assert data[:1 << 20] == V1_V2_BYTES[:1 << 20]
        assert data[1 << 20:] == bytes(len(data) - (1 << 20))
        if len(data) == 2 << 20:
            assert_same_export(prl.uri(), ref.uri(), V1_V2_BYTES)
        # Reads past what the BAT maps, and past the end, leave the server alive.
        assert support.nbd_pread(prl.uri(), len(data) - 4096, 4096) == bytes(4096)
        h = nbd.NBD()
        h.set_strict_mode(0)  # let the server, not libnbd, refuse the read past the end
        h.connect_uri(prl.uri())
        with pytest.raises(nbd.Error):
            h.pread(512, len(data))
        assert h.pread(512, 0) == b"\x11" * 512
        h.shutdown()
        assert prl.proc.poll() is None
    assert "Traceback" not in prl.log_text()


def test_offsets_past_4_gib(tmp_path: Path) -> None:
    """A 10 GiB sparse image: data past 4 GiB and past 2^32 sectors' worth of bytes / 512."""
    size = 10 << 30
    writes = [(0x31, (5 << 30) - 3, 10), (0x32, (9 << 30) + 12345, 70000), (0x33, size - 9, 9)]
    image = support.make_parallels(tmp_path / "big.hds", size, 1 << 20, writes)
    with support.running(support.start_prlnbd(tmp_path, [str(image)])) as prl, \
            support.running(qemu(tmp_path, image)) as ref:
        assert support.nbd_size(prl.uri()) == size
        for pattern, off, n in writes:
            a, b = (off - 5000) // 512 * 512, min(size, (off + n + 5000) // 512 * 512 + 512)
            assert support.nbd_pread(prl.uri(), a, b - a) == support.nbd_pread(ref.uri(), a, b - a)
            assert support.nbd_pread(prl.uri(), off, n) == bytes([pattern]) * n
        assert support.nbdinfo_map(prl.uri()) == support.nbdinfo_map(ref.uri())


def patched_fixture(tmp: Path, name: str, offset: int, data: bytes) -> Path:
    """A copy of a QEMU sample with DATA written at OFFSET of the file."""
    image = support.decompress_fixture(name, tmp)
    with image.open("r+b") as f:
        f.seek(offset)
        f.write(data)
    return image


def test_v1_ignores_high_nb_sectors(tmp_path: Path) -> None:
    """v1: only the low 32 bits of nb_sectors count."""
    image = patched_fixture(tmp_path, "parallels-v1", 40, (0xDEADBEEF).to_bytes(4, "little"))
    with support.running(support.start_prlnbd(tmp_path, [str(image)], "--read-only")) as prl, \
            support.running(qemu(tmp_path, image)) as ref:
        assert_same_export(prl.uri(), ref.uri(), V1_V2_BYTES)


def test_unclean_image_read_only(tmp_path: Path) -> None:
    """in_use "Ynot": read-only serving works; writable serving is a clear refusal."""
    image = patched_fixture(tmp_path, "parallels-v2", 44, (0x746F6E59).to_bytes(4, "little"))
    digest = support.file_digest(image)
    with support.running(support.start_prlnbd(tmp_path, [str(image)], "--read-only")) as prl, \
            support.running(qemu(tmp_path, image)) as ref:
        assert_same_export(prl.uri(), ref.uri(), V1_V2_BYTES)
    try:
        prl = support.start_prlnbd(tmp_path, [str(image)])
    except RuntimeError as e:
        assert "Traceback" not in str(e)
        assert image.name in str(e)
    else:
        with support.running(prl):
            assert support.nbd_pread(prl.uri()) == V1_V2_BYTES
    assert support.file_digest(image) == digest


def test_bat_entry_past_eof(tmp_path: Path) -> None:
    """A BAT entry beyond the file: zeros there as QEMU reads, or a clear refusal."""
    # v2 sample: BAT at byte 64, entries are cluster numbers; point guest cluster 2 far away.
    image = patched_fixture(tmp_path, "parallels-v2", 64 + 2 * 4, (1000).to_bytes(4, "little"))
    expected = V1_V2_BYTES[:2 * 65536] + bytes(65536) + V1_V2_BYTES[3 * 65536:]
    try:
        prl = support.start_prlnbd(tmp_path, [str(image)], "--read-only")
    except RuntimeError as e:
        assert "Traceback" not in str(e)
        assert image.name in str(e)
        return
    with support.running(prl), support.running(qemu(tmp_path, image)) as ref:
        assert support.nbd_pread(ref.uri()) == expected
        assert_bytes(support.nbd_pread(prl.uri()), expected, "prlnbd")
    assert "Traceback" not in prl.log_text()
