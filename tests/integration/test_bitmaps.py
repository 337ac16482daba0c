"""Dirty bitmaps: qemu:dirty-bitmap contexts, bitmaps kept true while writing, extensions, backups.

QEMU is the reference reader for stored bitmaps (`qemu-nbd -r --bitmap=NAME`);
prlnbd must serve the same extents, keep them true while it writes, store
them at a clean stop, invalidate them on a crash, and keep the format
extension's unknown features as the spec's flags say.
"""

from __future__ import annotations

import errno
import hashlib
import json
import random
import resource
import shutil
import signal
import struct
import subprocess
import uuid
from pathlib import Path

import nbd
import pytest

from tests import support
from tests.support import PYTHON, Server

pytestmark = pytest.mark.skipif(
    not all(support.have(t) for t in ("qemu-img", "qemu-nbd", "nbdinfo", "nbdcopy")),
    reason="qemu-utils and libnbd-bin are needed",
)

PREFIX = "qemu:dirty-bitmap:"
FIXTURE_BITMAP = "e4f2eed0-37fe-4539-b50b-85d2e7fd235f"
FIXTURE_DIRTY = [(327680, 131072), (655360, 196608), (1966080, 65536)]  # chunks 5-6, 10-12, 30
K = 1024
M = 1024 * K

# On-disk layout (specs/parallels-image.txt), decoded independently of prlnbd.
HEADER = struct.Struct("<16sIIIIIQIIIQ")
EXT_MAGIC = 0xAB234CEF23DCEA87
FEATURE = struct.Struct("<QQII")
BITMAP_MAGIC = 0x20385FAE252CB34A
BITMAP_HEAD = struct.Struct("<Q16sII")
NECESSARY, TRANSIT = 1, 2
IN_USE_OPEN = 0x746F6E59
Extent = tuple[int, int, int]  # (offset, length, flags)


# ---- helpers: the prlnbd command line, servers


def prl(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `prlnbd ARGS`."""
    return support.run(PYTHON, "-m", "prlnbd", *args, check=check, timeout=60)


def serve_fails(tmp: Path, disk: str, *extra: str) -> str:
    """Start `prlnbd serve` expecting it to refuse DISK; return what it printed."""
    sock = tmp / f"fail-{uuid.uuid4().hex[:8]}.sock"
    res = subprocess.run(
        [PYTHON, "-m", "prlnbd", "serve", "--socket", str(sock), *extra, disk],
        capture_output=True, text=True, timeout=30, cwd=support.ROOT,
    )
    assert res.returncode != 0, f"serve {disk} {extra} should have failed: {res.stdout}{res.stderr}"
    assert "Traceback" not in res.stderr, res.stderr
    return res.stdout + res.stderr


def qemu_bitmap(tmp: Path, image: Path, name: str) -> Server:
    """qemu-nbd serving IMAGE read-only with its stored bitmap NAME (and allocation depth)."""
    return support.start_qemu_nbd(tmp / "q", image, "-r", "-A", f"--bitmap={name}")


def bitmap_list(path: Path) -> dict[str, dict[str, int]]:
    """`prlnbd bitmap PATH list --json` keyed by name."""
    out = json.loads(prl("bitmap", path, "list", "--json").stdout)
    return {b["name"]: b for b in out}


def qemu_img_check(image: Path, ext_clusters: int) -> None:
    """qemu-img check finds no corruption; its only "leaks" are the extension's clusters.

    QEMU 7.2 does not know the format extension: it counts the extension
    cluster and bitmap clusters past the last data cluster as leaked space.
    """
    res = support.run("qemu-img", "check", "-f", "parallels", image, check=False)
    text = res.stdout + res.stderr
    assert res.returncode in (0, 3), text
    assert "corrupt" not in text.lower() and "outside" not in text, text
    assert leaked_tail(image) <= ext_clusters, f"{text}\nmore leaked than the extension owns"


def leaked_tail(image: Path) -> int:
    """Clusters past the last BAT-mapped cluster (what qemu-img check calls leaked)."""
    h = read_header(image)
    cs = h["tracks"] * 512
    with image.open("rb") as f:
        f.seek(64)
        bat = struct.unpack(f"<{h['bat_entries']}I", f.read(4 * h["bat_entries"]))
    end = max([h["data_off"] * 512] + [e * cs + cs for e in bat if e])
    return -(-(image.stat().st_size - end) // cs) if image.stat().st_size > end else 0


# ---- helpers: the image file, decoded by hand


def read_header(path: Path) -> dict[str, int]:
    """The integer fields of an image header."""
    with path.open("rb") as f:
        vals = HEADER.unpack(f.read(HEADER.size))
    names = ["version", "heads", "cylinders", "tracks", "bat_entries", "nb_sectors", "in_use",
             "data_off", "flags", "ext_off"]
    return dict(zip(names, vals[1:], strict=True))


def set_ext_off(path: Path, sectors: int) -> None:
    """Point the header's ext_off at SECTORS."""
    with path.open("r+b") as f:
        f.seek(56)
        f.write(struct.pack("<Q", sectors))


def build_extension(cluster_size: int, features: list[tuple[int, int, bytes]]) -> bytes:
    """An extension cluster holding FEATURES (magic, flags, data), with the MD5 of bytes 24..end."""
    buf = bytearray(cluster_size)
    pos = 24
    for magic, flags, data in features:
        FEATURE.pack_into(buf, pos, magic, flags, len(data), 0)
        buf[pos + 24:pos + 24 + len(data)] = data
        pos += 24 + -(-len(data) // 8) * 8
    struct.pack_into("<Q", buf, 0, EXT_MAGIC)
    buf[8:24] = hashlib.md5(buf[24:]).digest()
    return bytes(buf)


def append_cluster(path: Path, data: bytes, cluster_size: int) -> int:
    """Append DATA at the next cluster boundary of PATH; return its sector offset."""
    at = -(-path.stat().st_size // cluster_size) * cluster_size
    with path.open("r+b") as f:
        f.seek(at)
        f.write(data)
    return at // 512


def parse_extension(path: Path) -> list[tuple[int, int, bytes, bytes]]:
    """The features of PATH's extension (magic, flags, data, raw header+data), MD5 checked."""
    h = read_header(path)
    cs = h["tracks"] * 512
    with path.open("rb") as f:
        f.seek(h["ext_off"] * 512)
        buf = f.read(cs)
    assert struct.unpack_from("<Q", buf, 0)[0] == EXT_MAGIC
    assert buf[8:24] == hashlib.md5(buf[24:]).digest(), "extension MD5 is stale"
    out = []
    pos = 24
    while True:
        magic, flags, size, _ = FEATURE.unpack_from(buf, pos)
        if magic == 0:
            return out
        out.append((magic, flags, buf[pos + 24:pos + 24 + size], buf[pos:pos + 24 + size]))
        pos += 24 + -(-size // 8) * 8


def stored_l1(path: Path) -> dict[str, tuple[int, list[int]]]:
    """Per stored bitmap name: (granularity in bytes, L1 entries)."""
    out = {}
    for magic, _, data, _ in parse_extension(path):
        if magic == BITMAP_MAGIC:
            _, ident, gran, l1_size = BITMAP_HEAD.unpack_from(data, 0)
            l1 = list(struct.unpack_from(f"<{l1_size}Q", data, BITMAP_HEAD.size))
            out[str(uuid.UUID(bytes=ident))] = (gran * 512, l1)
    return out


def bitmap_feature(disk_size: int, name: str, granularity: int, l1: list[int]) -> bytes:
    """The data of a dirty bitmap feature."""
    head = BITMAP_HEAD.pack(disk_size // 512, uuid.UUID(name).bytes, granularity // 512, len(l1))
    return head + struct.pack(f"<{len(l1)}Q", *l1)


# ---- helpers: extents


def block_status(h: nbd.NBD, ctx: str, offset: int, length: int) -> list[Extent]:
    """Every extent of CTX over [offset, offset+length), looping as a client must, merged."""
    out: list[Extent] = []
    pos, end = offset, offset + length
    while pos < end:
        got: list[int] = []

        def cb(meta: str, off: int, entries: list[int], err: int, got: list[int] = got) -> int:
            if meta == ctx:
                got.extend(entries)
            return 0

        h.block_status(min(end - pos, 1 << 30), pos, cb)
        assert got, f"no extents for {ctx} at {pos}"
        for i in range(0, len(got), 2):
            n = min(got[i], end - pos)
            out.append((pos, n, got[i + 1]))
            pos += n
            if pos >= end:
                break
    return support.merge_extents(out)


def dirty(extents: list[Extent]) -> list[tuple[int, int]]:
    """The (offset, length) runs with the dirty bit set."""
    return [(o, n) for o, n, t in extents if t & 1]


def granule_runs(granules: set[int], g: int, size: int) -> list[Extent]:
    """Merged clean/dirty extents over the disk for a set of dirty granule indices."""
    ext = [(i * g, min(g, size - i * g), 1 if i in granules else 0) for i in range(-(-size // g))]
    return support.merge_extents(ext)


def touched(g: int, offset: int, length: int) -> set[int]:
    """Granules of size G touched by [offset, offset+length)."""
    return set(range(offset // g, (offset + length - 1) // g + 1)) if length else set()


def qemu_img_dirty(sock: Path, export: str, name: str) -> list[tuple[int, int]]:
    """Dirty runs as `qemu-img map` sees them through x-dirty-bitmap (dirty shows as data: false)."""
    opts = (f"driver=nbd,server.type=unix,server.path={sock},export={export},"
            f"x-dirty-bitmap={PREFIX}{name}")
    out = support.run("qemu-img", "map", "--output=json", "--image-opts", opts, timeout=60).stdout
    runs = [(e["start"], e["length"], 0 if e["data"] else 1) for e in json.loads(out)]
    return dirty(support.merge_extents(runs))


def list_contexts(uri: str, queries: list[str]) -> list[str]:
    """NBD_OPT_LIST_META_CONTEXT with QUERIES: the names the server answers, sorted."""
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(uri)
    for q in queries:
        h.add_meta_context(q)
    names: list[str] = []
    count = h.opt_list_meta_context(lambda name: names.append(name) or 0)
    h.opt_abort()
    assert count == len(names)
    return sorted(names)


def req_one(uri: str, ctx: str, offset: int, length: int) -> list[int]:
    """BLOCK_STATUS with REQ_ONE: the raw entries of CTX."""
    h = nbd.NBD()
    h.add_meta_context(ctx)
    h.connect_uri(uri)
    got: list[int] = []

    def cb(meta: str, off: int, entries: list[int], err: int) -> int:
        if meta == ctx:
            assert off == offset
            got.extend(entries)
        return 0

    h.block_status(length, offset, cb, flags=nbd.CMD_FLAG_REQ_ONE)
    h.shutdown()
    return got


# ---- 1. the ploop fixture


@pytest.fixture
def fixture_image(tmp_path: Path) -> Path:
    return support.decompress_fixture("parallels-with-bitmap", tmp_path)


def test_fixture_bitmap_matches_qemu(tmp_path: Path, fixture_image: Path) -> None:
    ctx = PREFIX + FIXTURE_BITMAP
    digest = support.file_digest(fixture_image)
    with (
        support.running(support.start_prlnbd(tmp_path, [f"f={fixture_image}"], "--read-only")) as prl_srv,
        support.running(qemu_bitmap(tmp_path, fixture_image, FIXTURE_BITMAP)) as ref,
    ):
        p, q = prl_srv.uri("f"), ref.uri()
        size = support.nbd_size(p)
        assert size == 64 << 30
        # nbdinfo --map --json, byte for byte the same JSON as qemu-nbd's.
        raw_p = support.run("nbdinfo", f"--map={ctx}", "--json", p).stdout
        raw_q = support.run("nbdinfo", f"--map={ctx}", "--json", q).stdout
        assert json.loads(raw_p) == json.loads(raw_q)
        extents = support.nbdinfo_map(p, ctx)
        assert dirty(extents) == FIXTURE_DIRTY
        assert extents[-1] == (2031616, size - 2031616, 0)

        # libnbd agrees, and so does qemu-img through x-dirty-bitmap.
        h = nbd.NBD()
        h.add_meta_context(ctx)
        h.connect_uri(p)
        assert h.can_meta_context(ctx)
        assert block_status(h, ctx, 0, size) == extents
        # A range starting mid-run and ending mid-run: clipped at both ends.
        assert block_status(h, ctx, 400000, 500000) == [
            (400000, 58752, 1), (458752, 196608, 0), (655360, 196608, 1), (851968, 48032, 0)]
        h.shutdown()
        assert qemu_img_dirty(prl_srv.sock, "f", FIXTURE_BITMAP) == FIXTURE_DIRTY

        # NBD_OPT_LIST_META_CONTEXT: the same answers as qemu-nbd for every kind of query.
        for queries in ([], ["qemu:"], [PREFIX], [ctx], [PREFIX + "nope"], [PREFIX + "since-"],
                        ["base:", ctx], [ctx.upper()]):
            assert list_contexts(p, queries) == list_contexts(q, queries), queries
        assert list_contexts(p, ["qemu:"]) == ["qemu:allocation-depth", ctx]
        assert list_contexts(p, [PREFIX]) == [ctx]
        assert list_contexts(p, [ctx]) == [ctx]
        listed = json.loads(support.run("nbdinfo", "--list", "--json", p).stdout)
        assert sorted(listed["exports"][0]["contexts"]) == ["base:allocation", "qemu:allocation-depth", ctx]

        # REQ_ONE: exactly one extent, the same as qemu-nbd's, from aligned and unaligned starts.
        for off in (0, 327680, 330240, 458752, 655360 + 512, 1966080, 2031616, size - 65536):
            n = min(1 << 30, size - off)
            got = req_one(p, ctx, off, n)
            assert got == req_one(q, ctx, off, n), off
            assert len(got) == 2 and 0 < got[0] <= n
        # An unaligned start (qemu-nbd refuses those): the extent still ends on a granule edge.
        assert req_one(p, ctx, 330000, 1 << 20) == [458752 - 330000, 1]
    assert support.file_digest(fixture_image) == digest


# ---- 2. generated images: bitmaps kept true while writing, stored at a clean stop


SIZE = 64 * M
CASES = {
    # cluster size, the two bitmaps' granularities
    "1M-clusters": (1 * M, (64 * K, 128 * K)),
    # 4 KiB clusters: the 512-byte bitmap needs 4 L1 entries (16 MiB of disk each).
    "4K-clusters": (4 * K, (512, 64 * K)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bitmaps_follow_writes(tmp_path: Path, case: str) -> None:
    cluster, grans = CASES[case]
    img = support.make_parallels(tmp_path / "disk.hds", SIZE, cluster)
    names = [str(uuid.UUID(int=0x1111 * (i + 1))) for i in range(2)]
    for name, g in zip(names, grans, strict=True):
        out = prl("bitmap", img, "add", name, "--granularity", str(g)).stdout
        assert name in out
    listed = bitmap_list(img)
    assert {n: (b["granularity"], b["dirty-bytes"]) for n, b in listed.items()} == {
        n: (g, 0) for n, g in zip(names, grans, strict=True)}

    rng = random.Random(f"bitmaps-{case}")
    model = {n: set() for n in names}
    data = bytearray(SIZE)
    gran = dict(zip(names, grans, strict=True))

    def note(off: int, n: int) -> None:
        for name in names:
            model[name] |= touched(gran[name], off, n)

    srv = support.start_prlnbd(tmp_path, [f"d={img}"])
    try:
        assert read_header(img)["in_use"] == IN_USE_OPEN
        # While open for writing the stored bitmaps read as all dirty.
        assert all(set(l1) == {1} for _, l1 in stored_l1(img).values())
        h = nbd.NBD()
        for name in names:
            h.add_meta_context(PREFIX + name)
        h.connect_uri(srv.uri("d"))
        for name in names:
            assert block_status(h, PREFIX + name, 0, SIZE) == [(0, SIZE, 0)]
        # Random ops in [0, 16M) and [32M, 48M); [16M, 32M) is zeroed whole; [48M, 64M) untouched.
        for batch in range(4):
            for _ in range(15):
                kind = rng.choice(("write", "write", "zero", "trim"))
                n = rng.randint(1, 300 * K)
                base = rng.choice((0, 32 * M))
                off = base + rng.randrange(0, 16 * M - n)
                if kind == "write":
                    buf = rng.randbytes(n)
                    h.pwrite(buf, off)
                    data[off:off + n] = buf
                elif kind == "zero":
                    h.zero(n, off)
                    data[off:off + n] = bytes(n)
                else:
                    h.trim(n, off)
                    data[off:off + n] = h.pread(n, off)  # TRIM leaves the content undefined
                note(off, n)
            if batch == 2:
                h.zero(16 * M, 16 * M)
                data[16 * M:32 * M] = bytes(16 * M)
                note(16 * M, 16 * M)
            # The live bitmaps are exactly the granules touched so far.
            for name in names:
                assert block_status(h, PREFIX + name, 0, SIZE) == granule_runs(model[name], gran[name], SIZE)
        h.flush()
        h.shutdown()
        live = {name: support.nbdinfo_map(srv.uri("d"), PREFIX + name) for name in names}
        for name in names:
            assert live[name] == granule_runs(model[name], gran[name], SIZE)
            assert qemu_img_dirty(srv.sock, "d", name) == dirty(live[name])
    finally:
        assert srv.stop() == 0, srv.log_text()

    # Stored at the clean stop: QEMU reads exactly what prlnbd served.
    assert read_header(img)["in_use"] != IN_USE_OPEN
    for name in names:
        with support.running(qemu_bitmap(tmp_path, img, name)) as ref:
            assert support.nbdinfo_map(ref.uri(), PREFIX + name) == live[name]
    with support.running(qemu_bitmap(tmp_path, img, names[0])) as ref:
        assert support.nbd_pread(ref.uri()) == bytes(data)
    listed = bitmap_list(img)
    for name in names:
        assert listed[name]["dirty-bytes"] == len(model[name]) * gran[name]
    l1s = stored_l1(img)
    if case == "4K-clusters":
        # Uniform chunks are stored as L1 entries 1 (all set) and 0 (all clear).
        l1 = l1s[names[0]][1]
        assert len(l1) == 4 and l1[1] == 1 and l1[3] == 0 and l1[0] > 1 and l1[2] > 1, l1
    ext_clusters = 1 + sum(1 for _, l1 in l1s.values() for e in l1 if e > 1)
    qemu_img_check(img, ext_clusters)
    check = json.loads(prl("check", "--json", img).stdout)
    assert check["problems"] == [] and check["leaks"] == 0, check

    # A read-only serve gives the stored bitmaps back unchanged and leaves the file alone.
    digest = support.file_digest(img)
    with support.running(support.start_prlnbd(tmp_path, [f"d={img}"], "--read-only")) as srv:
        for name in names:
            assert support.nbdinfo_map(srv.uri("d"), PREFIX + name) == live[name]
    assert support.file_digest(img) == digest

    # clear: that bitmap is clean, the other one untouched.
    prl("bitmap", img, "clear", names[0])
    listed = bitmap_list(img)
    assert listed[names[0]]["dirty-bytes"] == 0
    assert listed[names[1]]["dirty-bytes"] == len(model[names[1]]) * gran[names[1]]
    with support.running(qemu_bitmap(tmp_path, img, names[0])) as ref:
        assert support.nbdinfo_map(ref.uri(), PREFIX + names[0]) == [(0, SIZE, 0)]
    with support.running(qemu_bitmap(tmp_path, img, names[1])) as ref:
        assert support.nbdinfo_map(ref.uri(), PREFIX + names[1]) == live[names[1]]

    # remove: gone for prlnbd and for QEMU; the other one stays.
    prl("bitmap", img, "remove", names[1])
    assert set(bitmap_list(img)) == {names[0]}
    # qemu-nbd listens before it looks the bitmap up, so ask it directly rather than by connecting.
    gone = support.run("qemu-nbd", "-r", "-f", "parallels", f"--bitmap={names[1]}",
                       "--socket", tmp_path / "gone.sock", img, check=False, timeout=60)
    assert gone.returncode == 1 and f"Bitmap '{names[1]}' is not found" in gone.stderr, gone
    with support.running(support.start_prlnbd(tmp_path, [f"d={img}"], "--read-only")) as srv:
        assert list_contexts(srv.uri("d"), [PREFIX]) == [PREFIX + names[0]]
    bad = prl("bitmap", img, "remove", names[1], check=False)
    assert bad.returncode == 1 and names[1] in bad.stderr and str(img) in bad.stderr
    bad = prl("bitmap", img, "add", names[0], check=False)
    assert bad.returncode == 1 and "already exists" in bad.stderr
    l1s = stored_l1(img)
    qemu_img_check(img, 1 + sum(1 for _, l1 in l1s.values() for e in l1 if e > 1))
    assert json.loads(prl("check", "--json", img).stdout)["leaks"] == 0
    with support.running(qemu_bitmap(tmp_path, img, names[0])) as ref:
        assert support.nbd_pread(ref.uri()) == bytes(data)
    # The last one gone: the listing says so, rather than printing nothing.
    prl("bitmap", img, "remove", names[0])
    assert prl("bitmap", img, "list").stdout == "no bitmaps\n"
    assert json.loads(prl("bitmap", img, "list", "--json").stdout) == []


# ---- 3. a crash while writing


def test_crash_leaves_bitmap_all_dirty(tmp_path: Path) -> None:
    img = support.make_parallels(tmp_path / "disk.hds", SIZE, 1 * M)
    name = str(uuid.UUID(int=0xC4A5))
    prl("bitmap", img, "add", name)
    # A first clean round so the stored bitmap has a data cluster the crash must not leave stale.
    with support.running(support.start_prlnbd(tmp_path, [f"d={img}"])) as srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri("d"))
        h.pwrite(b"\x11" * 4096, 5 * M)
        h.shutdown()
    assert stored_l1(img)[name][1][0] > 1
    assert bitmap_list(img)[name]["dirty-bytes"] == 64 * K

    srv = support.start_prlnbd(tmp_path, [f"d={img}"])
    h = nbd.NBD()
    h.add_meta_context(PREFIX + name)
    h.connect_uri(srv.uri("d"))
    h.pwrite(b"\x22" * 10000, 20 * M + 100)
    h.flush()
    assert dirty(block_status(h, PREFIX + name, 0, SIZE)) == [(5 * M, 64 * K), (20 * M, 64 * K)]
    srv.stop(signal.SIGKILL)
    del h

    assert read_header(img)["in_use"] == IN_USE_OPEN
    assert stored_l1(img)[name][1] == [1]
    with support.running(qemu_bitmap(tmp_path, img, name)) as ref:
        assert support.nbdinfo_map(ref.uri(), PREFIX + name) == [(0, SIZE, 1)]
        assert support.nbd_pread(ref.uri(), 20 * M, 64 * K)[100:10100] == b"\x22" * 10000
    res = prl("check", "--json", img, check=False)
    report = json.loads(res.stdout)
    kinds = [p["kind"] for p in report["problems"]]
    assert "bitmap" in kinds and "in_use" in kinds, report
    assert res.returncode == 2, report  # the in_use corruption, not the notice
    notice = next(p for p in report["problems"] if p["kind"] == "bitmap")
    assert name in notice["message"]
    # A writable serve refuses the unclean image, pointing at check --repair.
    assert "check --repair" in serve_fails(tmp_path, str(img))

    res = prl("check", "--repair", "--json", img, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    res = prl("check", "--json", img, check=False)
    assert res.returncode == 0 and json.loads(res.stdout)["problems"] == [], res.stdout
    assert bitmap_list(img)[name]["dirty-bytes"] == SIZE

    # Serving again works; the bitmap stays conservatively all dirty through a clean stop.
    with support.running(support.start_prlnbd(tmp_path, [f"d={img}"])) as srv:
        assert support.nbdinfo_map(srv.uri("d"), PREFIX + name) == [(0, SIZE, 1)]
        h = nbd.NBD()
        h.connect_uri(srv.uri("d"))
        h.pwrite(b"\x33" * 512, 0)
        assert h.pread(10000, 20 * M + 100) == b"\x22" * 10000
        h.shutdown()
    assert read_header(img)["in_use"] != IN_USE_OPEN
    assert stored_l1(img)[name][1] == [1]
    assert bitmap_list(img)[name]["dirty-bytes"] == SIZE
    qemu_img_check(img, 1)
    assert json.loads(prl("check", "--json", img).stdout)["problems"] == []


def start_prlnbd_fsize(tmp: Path, disk: str, limit: int) -> Server:
    """`prlnbd serve DISK` with RLIMIT_FSIZE=LIMIT: growing a file past it fails with EFBIG (ENOSPC)."""
    sock, log = tmp / "limited.sock", tmp / "limited.log"

    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    with log.open("wb") as logf:
        proc = subprocess.Popen([PYTHON, "-m", "prlnbd", "serve", "--socket", str(sock), disk],
                                stdout=logf, stderr=subprocess.STDOUT, cwd=support.ROOT, preexec_fn=set_limit)
    support.wait_for_socket(sock, proc, log)
    return Server(proc, sock, log)


def test_failed_write_still_marks_what_changed(tmp_path: Path) -> None:
    img = support.make_parallels(tmp_path / "disk.hds", SIZE, 1 * M)
    name = str(uuid.UUID(int=0xF011))
    prl("bitmap", img, "add", name)
    # Room for exactly one more cluster: a 2-cluster write fails on its second cluster.
    srv = start_prlnbd_fsize(tmp_path, f"d={img}", img.stat().st_size + 1 * M)
    try:
        h = nbd.NBD()
        h.add_meta_context(PREFIX + name)
        h.connect_uri(srv.uri("d"))
        with pytest.raises(nbd.Error) as err:
            h.pwrite(b"\x42" * (2 * M), 10 * M)
        assert errno.ENOSPC in err.value.args, err.value
        after = h.pread(2 * M, 10 * M)
        changed = {i for i in range(2 * M // (64 * K)) if any(after[i * 64 * K:(i + 1) * 64 * K])}
        assert changed, "the failed write changed nothing: the test cannot show anything"
        marked = {(o - 10 * M) // (64 * K) + j for o, n in dirty(block_status(h, PREFIX + name, 0, SIZE))
                  for j in range(n // (64 * K))}
        h.shutdown()
    finally:
        srv.stop()
    # An incremental backup from this bitmap would miss every changed granule not marked.
    assert changed <= marked, f"granules changed but clean in the bitmap: {sorted(changed - marked)}"


def test_clean_stop_that_cannot_store_bitmaps_still_closes_the_image(tmp_path: Path) -> None:
    # Cluster 10 is allocated before serving, so the write below needs no new space; storing the
    # bitmap at the stop needs one more cluster, which the file size limit refuses (EFBIG).
    img = support.make_parallels(tmp_path / "disk.hds", SIZE, 1 * M, [(0x11, 10 * M, 1 * M)])
    name = str(uuid.UUID(int=0xF012))
    prl("bitmap", img, "add", name)
    srv = start_prlnbd_fsize(tmp_path, f"d={img}", img.stat().st_size)
    try:
        h = nbd.NBD()
        h.connect_uri(srv.uri("d"))
        h.pwrite(b"\x42" * 4096, 10 * M + 8192)
        h.shutdown()
    finally:
        code = srv.stop()
    log = srv.log_text()
    assert code != 0, log
    assert "Traceback" not in log, log
    errors = [line for line in log.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "bitmap" in errors[0] and str(img) in errors[0], log
    # Closed consistently: in_use cleared, the bitmap left all dirty (safe), the data there.
    assert read_header(img)["in_use"] != IN_USE_OPEN
    assert stored_l1(img)[name][1] == [1]
    assert bitmap_list(img)[name]["dirty-bytes"] == SIZE
    qemu_img_check(img, 1)
    assert json.loads(prl("check", "--json", img).stdout)["problems"] == []
    with support.running(support.start_prlnbd(tmp_path, [f"d={img}"], "--read-only")) as again:
        assert support.nbd_pread(again.uri("d"), 10 * M + 8192, 4096) == b"\x42" * 4096


# ---- 4. format extension edge cases, built by hand


UNKNOWN_A = 0x5452414E53495421  # TRANSIT
UNKNOWN_B = 0x44524F504D452121  # neither flag
UNKNOWN_C = 0x4E45434553534152  # NECESSARY
HAND_BITMAP = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"


def hand_image(tmp: Path, features: list[tuple[int, int, bytes]], *, with_bitmap: bool = True) -> Path:
    """A 64 MiB, 1 MiB-cluster image with some data and a hand-built extension.

    With WITH_BITMAP the extension starts with a 64 KiB bitmap whose bits 3 and
    100..103 are set, stored in its own cluster.
    """
    cs = 1 * M
    tmp.mkdir(parents=True, exist_ok=True)
    img = support.make_parallels(tmp / "hand.hds", SIZE, cs, [(0x5A, 3 * M, 8192)])
    feats = list(features)
    if with_bitmap:
        bits = bytearray(cs)
        bits[0] = 1 << 3
        bits[12] = 0xF0  # bits 100..103
        l1 = append_cluster(img, bytes(bits), cs)
        feats.insert(0, (BITMAP_MAGIC, 0, bitmap_feature(SIZE, HAND_BITMAP, 64 * K, [l1])))
    set_ext_off(img, append_cluster(img, build_extension(cs, feats), cs))
    return img


HAND_DIRTY = [(3 * 64 * K, 64 * K), (100 * 64 * K, 4 * 64 * K)]


def test_hand_built_bitmap_read_like_qemu(tmp_path: Path) -> None:
    img = hand_image(tmp_path, [])
    with support.running(qemu_bitmap(tmp_path, img, HAND_BITMAP)) as ref:
        assert dirty(support.nbdinfo_map(ref.uri(), PREFIX + HAND_BITMAP)) == HAND_DIRTY
    with support.running(support.start_prlnbd(tmp_path, [f"h={img}"], "--read-only")) as srv:
        assert dirty(support.nbdinfo_map(srv.uri("h"), PREFIX + HAND_BITMAP)) == HAND_DIRTY


def test_extension_md5_mismatch_refused(tmp_path: Path) -> None:
    img = hand_image(tmp_path, [(UNKNOWN_A, TRANSIT, b"payload!")])
    at = read_header(img)["ext_off"] * 512
    with img.open("r+b") as f:  # flip one byte inside the checksummed area
        f.seek(at + 24 + 16)
        b = f.read(1)
        f.seek(at + 24 + 16)
        f.write(bytes([b[0] ^ 0xFF]))
    digest = support.file_digest(img)
    for extra in ((), ("--read-only",)):
        msg = serve_fails(tmp_path, f"h={img}", *extra)
        assert str(img) in msg and "MD5" in msg and "extension" in msg, msg
    assert support.file_digest(img) == digest
    report = json.loads(prl("check", "--json", img, check=False).stdout)
    assert [p["kind"] for p in report["problems"]] == ["extension"], report


def test_extension_unknown_features_kept_or_dropped(tmp_path: Path) -> None:
    transit_data = bytes(range(13))  # not a multiple of 8: padding must follow
    img = hand_image(tmp_path, [(UNKNOWN_A, TRANSIT, transit_data), (UNKNOWN_B, 0, b"drop me!")])
    before = {m: raw for m, _, _, raw in parse_extension(img)}
    with support.running(support.start_prlnbd(tmp_path, [f"h={img}"])) as srv:
        h = nbd.NBD()
        h.add_meta_context(PREFIX + HAND_BITMAP)
        h.connect_uri(srv.uri("h"))
        h.pwrite(b"\x77" * 100, 40 * M)
        assert dirty(block_status(h, PREFIX + HAND_BITMAP, 0, SIZE)) == [*HAND_DIRTY, (40 * M, 64 * K)]
        h.shutdown()
    feats = parse_extension(img)
    assert [m for m, _, _, _ in feats] == [BITMAP_MAGIC, UNKNOWN_A]
    assert feats[1][3] == before[UNKNOWN_A]  # header (magic, flags, size, unused) and data, byte for byte
    assert feats[1][2] == transit_data and feats[1][1] == TRANSIT
    # (QEMU 7.2 refuses any feature with flags set, so prlnbd itself reads the result back.)
    with support.running(support.start_prlnbd(tmp_path, [f"h={img}"], "--read-only")) as srv:
        assert dirty(support.nbdinfo_map(srv.uri("h"), PREFIX + HAND_BITMAP)) == [*HAND_DIRTY, (40 * M, 64 * K)]
        assert support.nbd_pread(srv.uri("h"), 40 * M, 100) == b"\x77" * 100
    assert json.loads(prl("check", "--json", img).stdout)["problems"] == []

    # Only an unknown feature with neither flag: the whole extension goes away.
    img2 = hand_image(tmp_path / "b", [(UNKNOWN_B, 0, b"drop me too")], with_bitmap=False)
    with support.running(support.start_prlnbd(tmp_path, [f"h={img2}"])) as srv:
        support.nbd_pread(srv.uri("h"), 0, 4096)
    assert read_header(img2)["ext_off"] == 0
    assert leaked_tail(img2) == 0
    assert json.loads(prl("info", "--json", img2).stdout)["bitmaps"] == []
    assert json.loads(prl("check", "--json", img2).stdout)["problems"] == []


def test_extension_unknown_necessary_feature(tmp_path: Path) -> None:
    img = hand_image(tmp_path, [(UNKNOWN_C, NECESSARY, b"must understand me")])
    digest = support.file_digest(img)
    msg = serve_fails(tmp_path, f"h={img}")
    assert str(img) in msg and "NECESSARY" in msg and "read-only" in msg, msg
    assert support.file_digest(img) == digest
    bad = prl("bitmap", img, "add", check=False)
    assert bad.returncode == 1 and "NECESSARY" in bad.stderr
    assert support.file_digest(img) == digest
    with support.running(support.start_prlnbd(tmp_path, [f"h={img}"], "--read-only")) as srv:
        assert dirty(support.nbdinfo_map(srv.uri("h"), PREFIX + HAND_BITMAP)) == HAND_DIRTY
        assert support.nbd_pread(srv.uri("h"), 3 * M, 8192) == b"\x5a" * 8192
    assert support.file_digest(img) == digest


# ---- 5. incremental backup end to end


def pwrite_all(uri: str, writes: list[tuple[int, bytes]], zeros: list[tuple[int, int]] | None = None) -> None:
    """Write through libnbd, WRITE_ZEROES the ZEROS ranges, flush."""
    h = nbd.NBD()
    h.connect_uri(uri)
    for off, buf in writes:
        h.pwrite(buf, off)
    for off, n in zeros or []:
        h.zero(n, off)
    h.flush()
    h.shutdown()


def incremental(uri: str, ctx: str, base: Path, out: Path) -> tuple[list[tuple[int, int]], int]:
    """Copy BASE to OUT and apply the dirty extents of CTX read from URI; return (extents, bytes read)."""
    shutil.copyfile(base, out)
    h = nbd.NBD()
    h.add_meta_context(ctx)
    h.connect_uri(uri)
    assert h.can_meta_context(ctx)
    size = h.get_size()
    runs = dirty(block_status(h, ctx, 0, size))
    moved = 0
    with out.open("r+b") as f:
        for off, n in runs:
            pos = off
            while pos < off + n:
                chunk = min(off + n - pos, 16 * M)
                f.seek(pos)
                f.write(h.pread(chunk, pos))
                moved += chunk
                pos += chunk
    h.shutdown()
    return runs, moved


def qemu_compare(raw: Path, uri: str) -> None:
    res = support.run("qemu-img", "compare", "-f", "raw", "-F", "raw", raw, uri, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def top_guid(bundle: Path) -> str:
    return str(json.loads(prl("info", "--json", bundle).stdout)["top-guid"])


def new_snapshot(bundle: Path) -> str:
    """Take a snapshot; return the new top's GUID (the frozen one is the top before)."""
    before = top_guid(bundle)
    frozen_line, top_line = prl("snapshot", bundle).stdout.strip().splitlines()
    assert frozen_line == f"snapshot {before}", frozen_line
    assert top_line.startswith("new top {"), top_line
    guid = top_line.removeprefix("new top ")
    assert top_guid(bundle) == guid
    return guid


def since(guid: str) -> str:
    return PREFIX + "since-" + guid.strip("{}").lower()


def test_incremental_backup(tmp_path: Path) -> None:
    cs = 64 * K
    bundle = tmp_path / "vm.hdd"
    prl("create", bundle, "--size", "64M", "--cluster-size", "64K")
    rng = random.Random("incremental")
    writes1 = [(rng.randrange(0, SIZE - 200 * K), rng.randbytes(rng.randint(1, 200 * K))) for _ in range(40)]
    with support.running(support.start_prlnbd(tmp_path, [f"vm={bundle}"])) as srv:
        pwrite_all(srv.uri("vm"), writes1)

    # Snapshot: the old top (P1) is frozen; GUID1 is the new, empty, writable top.
    p1 = top_guid(bundle)
    guid1 = new_snapshot(bundle)
    full = tmp_path / "full.raw"
    with support.running(support.start_prlnbd(tmp_path, [f"vm={bundle}"], "--snapshot", guid1)) as srv:
        support.run("nbdcopy", srv.uri("vm"), full)
        qemu_compare(full, srv.uri("vm"))
    assert full.stat().st_size == SIZE

    # More writes on the current top (GUID1's image), including zeros over old data.
    writes2 = [(5 * M + 1000, b"\xaa" * 3000), (17 * M - 10, b"\xbb" * 20), (40 * M, rng.randbytes(150 * K)),
               (63 * M + 5, b"\xcc" * 7)]
    zeros2 = [(writes1[0][0], 4096)]
    with support.running(support.start_prlnbd(tmp_path, [f"vm={bundle}"])) as srv:
        pwrite_all(srv.uri("vm"), writes2, zeros2)
    guid2 = new_snapshot(bundle)
    layers = json.loads(prl("info", "--json", bundle).stdout)["layers"]
    assert [entry["guid"] for entry in layers] == [guid2, guid1, p1]

    must = set().union(*(touched(cs, off, len(b)) for off, b in writes2))
    may = must | set().union(*(touched(cs, off, n) for off, n in zeros2))
    result = tmp_path / "incr.raw"
    with support.running(support.start_prlnbd(tmp_path, [f"vm={bundle}"], "--snapshot", guid2)) as srv:
        uri = srv.uri("vm")
        # Every snapshot below the served top has a since- context; the top has none.
        assert list_contexts(uri, [PREFIX]) == sorted([since(guid1), since(p1)])
        # since-P1: everything the layers above the frozen P1 hold, i.e. what changed after the full backup.
        runs, moved = incremental(uri, since(p1), full, result)
        qemu_compare(result, uri)
        clusters = {c for off, n in runs for c in range(off // cs, (off + n) // cs)}
        assert must <= clusters <= may, (sorted(must), sorted(clusters))
        assert all(off % cs == 0 and n % cs == 0 for off, n in runs)
        assert moved == sum(n for _, n in runs) == len(clusters) * cs
        assert moved < SIZE // 50
        assert dirty(support.nbdinfo_map(uri, since(p1))) == runs
        # since-GUID1 is strictly above GUID1: only GUID2's layer, which is empty.
        assert support.nbdinfo_map(uri, since(guid1)) == [(0, SIZE, 0)]
    # GUID1 is frozen now: serving it gives the same disk and the same since-P1 extents.
    with support.running(support.start_prlnbd(tmp_path, [f"vm={bundle}"], "--snapshot", guid1)) as srv:
        qemu_compare(result, srv.uri("vm"))
        assert dirty(support.nbdinfo_map(srv.uri("vm"), since(p1))) == runs

    # Second cycle: a stored bitmap on the top instead of a snapshot delta.
    name = str(uuid.UUID(int=0xBAC0B))
    assert name in prl("bitmap", bundle, "add", name, "--granularity", "64K").stdout
    assert [b["name"] for b in json.loads(prl("info", "--json", bundle).stdout)["bitmaps"]] == [name]
    writes3 = [(9 * M + 7, b"\xdd" * 70000), (33 * M, rng.randbytes(4096)), (SIZE - 512, b"\xee" * 512)]
    zeros3 = [(writes1[1][0] + 1, 100)]
    with support.running(support.start_prlnbd(tmp_path, [f"vm={bundle}"])) as srv:
        pwrite_all(srv.uri("vm"), writes3, zeros3)
    want = set().union(*(touched(64 * K, off, len(b)) for off, b in writes3),
                       *(touched(64 * K, off, n) for off, n in zeros3))
    assert bitmap_list(bundle)[name]["dirty-bytes"] == len(want) * 64 * K
    result2 = tmp_path / "incr2.raw"
    with support.running(support.start_prlnbd(tmp_path, [f"vm={bundle}"], "--read-only")) as srv:
        uri = srv.uri("vm")
        runs2, moved2 = incremental(uri, PREFIX + name, result, result2)
        assert runs2 == dirty(granule_runs(want, 64 * K, SIZE))
        assert moved2 == len(want) * 64 * K
        qemu_compare(result2, uri)
        assert dirty(support.nbdinfo_map(uri, PREFIX + name)) == runs2
        # The snapshot deltas are there too, next to the bitmap.
        assert list_contexts(uri, [PREFIX]) == sorted([PREFIX + name, since(guid1), since(p1)])
    # QEMU reads the same stored bitmap from the top image.
    top_file = Path(layers[0]["file"])
    with support.running(qemu_bitmap(tmp_path, top_file, name)) as ref:
        assert dirty(support.nbdinfo_map(ref.uri(), PREFIX + name)) == runs2


def test_snapshot_carries_bitmaps_to_the_new_top(tmp_path: Path) -> None:
    """A stored bitmap goes on tracking changes after `prlnbd snapshot`: the new top gets a copy."""
    bundle = tmp_path / "vm.hdd"
    prl("create", bundle, "--size", "64M", "--cluster-size", "64K")
    name = str(uuid.UUID(int=0xCA22))
    prl("bitmap", bundle, "add", name, "--granularity", "64K")
    with support.running(support.start_prlnbd(tmp_path, [f"vm={bundle}"])) as srv:
        pwrite_all(srv.uri("vm"), [(1 * M, b"\x01" * 4096)])
    new_snapshot(bundle)
    assert bitmap_list(bundle)[name]["dirty-bytes"] == 64 * K
    with support.running(support.start_prlnbd(tmp_path, [f"vm={bundle}"])) as srv:
        pwrite_all(srv.uri("vm"), [(5 * M, b"\x02" * 4096)])
        assert dirty(support.nbdinfo_map(srv.uri("vm"), PREFIX + name)) == [(1 * M, 64 * K), (5 * M, 64 * K)]
    assert bitmap_list(bundle)[name]["dirty-bytes"] == 2 * 64 * K


def qemu_img_check_json(image: Path) -> tuple[int, dict[str, int]]:
    res = support.run("qemu-img", "check", "-f", "parallels", "--output=json", image, check=False)
    return res.returncode, json.loads(res.stdout)


def extension_clusters(image: Path) -> set[int]:
    """Host offsets of the extension cluster and the bitmap clusters, as prlnbd reads them."""
    from prlnbd.image.parallels import ParallelsImage

    img = ParallelsImage.open(image)
    try:
        return set(img.extension.clusters()) if img.extension is not None else set()
    finally:
        img.close()


def write_through_server(tmp: Path, bundle: Path, writes: list[tuple[int, int, int]]) -> None:
    """Serve BUNDLE, apply WRITES (pattern, offset, length) with libnbd, stop the server cleanly."""
    with support.running(support.start_prlnbd(tmp, [f"d={bundle}"])) as srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri("d"))
        for pattern, offset, length in writes:
            h.pwrite(bytes([pattern]) * length, offset)
        h.flush()
        h.shutdown()
    assert srv.proc.returncode == 0, srv.log_text()


def test_qemu_img_check_on_images_prlnbd_wrote(tmp_path: Path) -> None:
    """QEMU 7.2's check finds no error in what prlnbd writes, and no leak without an extension.

    With dirty bitmaps its only "leaks" are exactly the extension's clusters that lie past the
    last cluster the BAT maps: QEMU 7.2 reads neither ext_off nor bitmap L1 tables.
    """
    bundle = tmp_path / "d.hdd"
    prl("create", bundle, "--size", "64M", "--cluster-size", "64K")
    image = next(bundle.glob("*.hds"))
    write_through_server(tmp_path, bundle, [(0x55, M, 200_000), (0x66, 30 * M, 70_000)])
    rc, report = qemu_img_check_json(image)
    assert rc == 0 and report["check-errors"] == 0, report
    assert "leaks" not in report and "corruptions" not in report, report

    prl("bitmap", bundle, "add")
    write_through_server(tmp_path, bundle, [(0x77, 50 * M, 5000), (0x88, 0, 4096)])
    rc, report = qemu_img_check_json(image)
    assert report["check-errors"] == 0 and "corruptions" not in report, report
    owned = extension_clusters(image)
    cs = 64 * K
    tail = leaked_tail(image)
    end = image.stat().st_size
    assert tail >= 1 and rc == 3 and report["leaks"] == tail, report
    assert {end - (i + 1) * cs for i in range(tail)} <= owned, "a leaked cluster that is not the extension's"
    assert json.loads(prl("check", "--json", bundle).stdout)["problems"] == []

    # A new top that carries the bitmaps and maps no cluster: its extension and bitmap clusters
    # are all there is past the BAT, so QEMU 7.2 calls them leaked (there is no data cluster to
    # put after them, and mapping one would hide the layer below).
    prl("snapshot", bundle)
    top = Path(json.loads(prl("info", "--json", bundle).stdout)["layers"][0]["file"])
    rc, report = qemu_img_check_json(top)
    owned = extension_clusters(top)
    assert rc == 3 and report["check-errors"] == 0 and "corruptions" not in report, report
    assert report["leaks"] == leaked_tail(top) == len(owned) >= 1, report
    assert owned == {top.stat().st_size - (i + 1) * cs for i in range(len(owned))}
