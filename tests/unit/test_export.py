"""Export.status_payload (packed, cached per window) must equal the plain extent computation."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

import prlnbd.export as export_mod
from prlnbd.disk.chain import open_disk
from prlnbd.disk.descriptor import build_descriptor, new_guid, save_descriptor
from prlnbd.export import Export
from prlnbd.image.create import write_image
from prlnbd.image.extension import Extension, new_bitmap
from prlnbd.image.parallels import ParallelsImage

SIZE = 64 * 1024 * 1024
CS = 64 * 1024


def write(exp: Export, offset: int, data: memoryview) -> None:
    """A WRITE as the server does it: the I/O, then the bookkeeping before the reply."""
    exp.write(offset, data)
    exp.changed(offset, len(data))


def unpack(payload: bytes) -> list[tuple[int, int]]:
    return [struct.unpack_from(">II", payload, i) for i in range(0, len(payload), 8)]


def answered(exp: Export, ctx: str, off: int, length: int, payload: bytes) -> list[tuple[int, int]]:
    """Check a reply without REQ_ONE against the plain computation; return its extents.

    Every extent but the last lies inside the request; the last reaches the
    request's end (unless the reply holds MAX_EXTENTS extents) and may run past
    it, but only as far as its status truly goes on.
    """
    got = unpack(payload)
    total = sum(n for n, _ in got)
    assert sum(n for n, _ in got[:-1]) < length, (ctx, off, length)
    assert total >= length or len(got) == export_mod.MAX_EXTENTS, (ctx, off, length)
    assert off + total <= SIZE
    assert got == exp.extents(ctx, off, total), (ctx, off, length)
    return got


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    """A 3-layer chain with scattered clusters and a bitmap on the top."""
    rng = random.Random(7)
    chain = []
    for i in range(3):
        guid = new_guid()
        name = f"l{i}.hds"
        clusters = {c: b"x" for c in rng.sample(range(SIZE // CS), 60)}
        write_image(tmp_path / name, SIZE, cluster_size=CS, clusters=clusters)
        chain.insert(0, (guid, "Compressed", name))
    save_descriptor(build_descriptor(SIZE, CS, chain), tmp_path / "DiskDescriptor.xml")
    top = ParallelsImage.open(tmp_path / chain[0][2], writable=True)
    bm = new_bitmap(SIZE, 4096)
    for _ in range(200):
        bm.set_range(rng.randrange(SIZE), rng.randrange(1, 300_000))
    top.extension = Extension(offset=0, bitmaps=[bm])
    top.close()
    return tmp_path


def test_status_payload_equals_extents(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Small windows so requests cross many window edges.
    monkeypatch.setattr(export_mod, "STATUS_WINDOW", 3 * 1024 * 1024 + 4096)
    disk = open_disk(bundle, writable=True)
    exp = Export("x", disk, read_only=False)
    rng = random.Random(11)
    extended = 0
    try:
        for round_ in range(3):
            for _ in range(200):
                ctx = rng.choice(list(exp.info.contexts))
                off = rng.randrange(SIZE)
                length = rng.randrange(1, SIZE - off + 1)
                got = answered(exp, ctx, off, length, exp.status_payload(ctx, off, length))
                extended += sum(n for n, _ in got) > length
                # REQ_ONE: one extent, never past the request.
                one = unpack(exp.status_payload(ctx, off, length, req_one=True))
                assert len(one) == 1 and one == exp.extents(ctx, off, length, req_one=True)
                assert one[0][0] <= length
            # A write must drop the cached windows it touches.
            write(exp, rng.randrange(SIZE - 8192) + round_, memoryview(b"w" * 5000))
    finally:
        exp.close()
    # Most requests end inside an extent that goes on: their final extent runs on.
    assert extended > 300


@pytest.mark.parametrize("max_extents", [7, export_mod.MAX_EXTENTS])
def test_status_walks_are_answered_by_one_window_slice(
    bundle: Path, monkeypatch: pytest.MonkeyPatch, max_extents: int
) -> None:
    """Walks with requests a little longer than a window (as nbdinfo's are) are answered from kept windows.

    Each window holds the next one's first extent too, so a step that runs a
    little past it is one slice; a step builds the windows it needs. Final extents
    run on past the request, so the steps drift into the next window: those
    are two slices joined. Writes in between must show in the next answer.
    With a tiny MAX_EXTENTS the replies are cut short instead.
    """
    window = 3 * 1024 * 1024 + 4096
    monkeypatch.setattr(export_mod, "STATUS_WINDOW", window)
    monkeypatch.setattr(export_mod, "MAX_EXTENTS", max_extents)
    disk = open_disk(bundle, writable=True)
    exp = Export("x", disk, read_only=False)
    across: list[int] = []
    pack_across = exp._pack_across

    def counting(context: str, offset: int, end: int) -> bytes:
        across.append(offset)
        return pack_across(context, offset, end)

    monkeypatch.setattr(exp, "_pack_across", counting)
    rng = random.Random(5)

    def walk(ctx: str, request: int, write_every: int) -> tuple[int, int]:
        off, steps, writes = 0, 0, 0
        while off < SIZE:
            length = min(SIZE - off, request)
            got = answered(exp, ctx, off, length, exp.packed_status(ctx, off, length))
            off += sum(n for n, _ in got)
            steps += 1
            if write_every and steps % write_every == 0 and off + 700 <= SIZE:
                # Where the next step starts: the windows there must be computed afresh.
                write(exp, off + rng.randrange(4096), memoryview(b"w" * 700))
                writes += 1
        return steps, writes

    try:
        for ctx in exp.info.contexts:
            for request in (window + 511, window // 2 + 3 * 4096):
                # From nothing kept: each step builds the windows it needs and is one slice.
                exp._status_cache[ctx].clear()
                walk(ctx, request, 0)
                if max_extents > 100:
                    assert across == [], ctx
                across.clear()
                steps, writes = walk(ctx, request, 5)
                if max_extents > 100 and request > window:
                    # Only the steps just after a write went the long way round.
                    assert steps > 15 and len(across) <= 2 * writes, (ctx, across, steps, writes)
    finally:
        exp.close()


@pytest.mark.parametrize("max_extents", [7, export_mod.MAX_EXTENTS])
def test_dense_windows_are_answered_directly(bundle: Path, monkeypatch: pytest.MonkeyPatch, max_extents: int) -> None:
    """A window with more extents than a window may hold is never kept, and every request still gets its answer.

    Requests starting past what such a window could hold, and walks through
    it, must get the same extents as the plain computation.
    """
    window = 3 * 1024 * 1024 + 4096
    monkeypatch.setattr(export_mod, "STATUS_WINDOW", window)
    monkeypatch.setattr(export_mod, "MAX_EXTENTS", max_extents)
    monkeypatch.setattr(export_mod, "MAX_WINDOW_EXTENTS", 5)
    disk = open_disk(bundle, writable=True)
    exp = Export("x", disk, read_only=False)
    rng = random.Random(3)
    kept = dense = 0
    try:
        for ctx in exp.info.contexts:
            for _ in range(60):
                off = rng.randrange(SIZE)
                length = rng.randrange(1, min(SIZE - off, 2 * window) + 1)
                answered(exp, ctx, off, length, exp.packed_status(ctx, off, length))
            off = 0
            while off < SIZE:
                length = min(SIZE - off, window + 511)
                got = answered(exp, ctx, off, length, exp.packed_status(ctx, off, length))
                off += sum(n for n, _ in got)
            # Dense windows are not kept, and the others hold at most the allowed number of extents.
            assert all(len(w.ends) <= 5 for w in exp._status_cache[ctx].values())
            kept += len(exp._status_cache[ctx])
            dense += len(exp._dense[ctx])
        assert kept and dense  # both kinds of window were met
    finally:
        exp.close()


def test_write_in_a_cluster_across_a_window_edge_shows_in_the_next_window(
    bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write changes status in its whole cluster, also the part of it in the next window.

    Windows are not cluster-aligned (the real one is 4 GiB less 512 bytes), so
    a cluster can straddle two; both must be computed afresh.
    """
    window = 3 * 1024 * 1024 + 4096
    monkeypatch.setattr(export_mod, "STATUS_WINDOW", window)
    edge = 2 * window
    assert edge % CS  # the cluster holding the edge's last byte straddles it
    disk = open_disk(bundle, writable=True)
    exp = Export("x", disk, read_only=False)
    try:
        depth = "qemu:allocation-depth"
        for off in range(0, SIZE, window // 2):  # every window kept
            exp.packed_status(depth, off, min(window, SIZE - off))
        before = unpack(exp.packed_status(depth, edge, 4096))
        write(exp, edge - 1, memoryview(b"w"))
        for ctx in exp.info.contexts:
            answered(exp, ctx, edge, 4096, exp.packed_status(ctx, edge, 4096))
        assert unpack(exp.packed_status(depth, edge, 4096))[0][1] == 1 != before[0][1]
    finally:
        exp.close()


def test_final_end_stays_within_a_u32_length() -> None:
    u32 = 0xFFFFFFFF
    assert export_mod.final_end(0, 512, 10 << 30) == u32 - 511  # cut short at a 512-byte boundary
    assert export_mod.final_end(100, 612, 10 << 30) % 512 == 0
    assert export_mod.final_end(100, 612, 10 << 30) - 100 <= u32
    assert export_mod.final_end(0, u32, 10 << 30) == u32  # never short of the request
    assert export_mod.final_end(4096, 8192, 1 << 20) == 1 << 20  # to where the status is known to end


def test_final_extent_of_a_huge_hole(tmp_path: Path) -> None:
    """A hole longer than a u32 length: the final extent runs on as far as one descriptor can."""
    size = 12 << 30
    write_image(tmp_path / "big.hds", size, cluster_size=1 << 20, clusters={(9 << 30) >> 20: b"x"})
    img = ParallelsImage.open(tmp_path / "big.hds", writable=True)
    bm = new_bitmap(size, 64 * 1024)
    bm.set_range(9 << 30, 1)  # and the bitmap says the same
    img.extension = Extension(offset=0, bitmaps=[bm])
    img.close()
    exp = Export("x", open_disk(tmp_path / "big.hds"), read_only=True)
    try:
        for ctx in ("base:allocation", "qemu:allocation-depth", f"qemu:dirty-bitmap:{bm.name}"):
            got = unpack(exp.packed_status(ctx, 4096, 512))
            assert len(got) == 1 and got[0][0] == 0xFFFFFFFF - 511
            got = unpack(exp.packed_status(ctx, 8 << 30, 4096))
            assert got[0][0] == 1 << 30  # up to the data at 9 GiB, not further
    finally:
        exp.close()


def test_write_after_a_window_joined_with_the_next(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A joined window holds the next window's extents, up to the first one of the window after.

    A write there must drop it too: else a final extent running on from the
    joined window would reach past the newly written cluster.
    """
    window = 1024 * 1024 + 4096
    monkeypatch.setattr(export_mod, "STATUS_WINDOW", window)
    size = 65 * CS
    # Clusters in window 0, inside window 1, and in window 2; a hole from cluster 21 to 40.
    write_image(tmp_path / "j.hds", size, cluster_size=CS, clusters={2: b"a", 20: b"b", 40: b"c"})
    exp = Export("x", open_disk(tmp_path / "j.hds", writable=True), read_only=False)
    try:
        ctx = "base:allocation"
        for off in range(0, size, window):
            exp.packed_status(ctx, off, min(window, size - off))
        # From the end of window 0 to the hole in window 1: the two windows are joined.
        off, length = window - 4096, window
        assert unpack(exp.packed_status(ctx, off, length))[-1] == (40 * CS - 21 * CS, 3)
        assert exp._status_cache[ctx][0].ends[-1] == 40 * CS
        write(exp, 2 * window + 100 * 1024, memoryview(b"w"))  # cluster 33, in window 2
        got = answered(exp, ctx, off, length, exp.packed_status(ctx, off, length))
        assert got[-1] == (33 * CS - 21 * CS, 3)
    finally:
        exp.close()


def test_warm_up_builds_every_bitmap_window_ahead(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After warm_up() a walk of a bitmap context builds nothing; a write half-way shows all the same."""
    window = 3 * 1024 * 1024 + 4096
    monkeypatch.setattr(export_mod, "STATUS_WINDOW", window)
    exp = Export("x", open_disk(bundle, writable=True), read_only=False)
    (ctx,) = exp.bitmaps
    count = -(-SIZE // window)
    try:
        steps = exp.warm_up()
        for _ in range(count // 2):
            next(steps)
        write(exp, SIZE // 4, memoryview(b"w" * 3000))  # in a window already built
        write(exp, 3 * SIZE // 4, memoryview(b"w" * 3000))  # in one not built yet
        assert sum(1 for _ in steps) == count - count // 2
        assert set(exp._status_cache[ctx]) >= set(range(count)) - set(range(count // 4 - 3, count // 4 + 2))
        # The other contexts are left for the clients to ask about.
        assert all(not windows for name, windows in exp._status_cache.items() if name != ctx)
        built: list[int] = []
        window_of = exp._window

        def counting(context: str, index: int) -> export_mod._PackedWindow | None:
            if index not in exp._status_cache[context]:
                built.append(index)
            return window_of(context, index)

        monkeypatch.setattr(exp, "_window", counting)
        off = 0
        while off < SIZE:
            length = min(SIZE - off, window + 511)
            got = answered(exp, ctx, off, length, exp.packed_status(ctx, off, length))
            off += sum(n for n, _ in got)
        # Only the windows the first write dropped again were built on demand.
        assert built and all(count // 4 - 3 <= i < count // 4 + 2 for i in built), built
    finally:
        exp.close()
