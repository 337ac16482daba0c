"""SplitDisk: one Disk per Storage piece behind the Disk interface, and what opening one refuses."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from prlnbd.disk.chain import open_disk
from prlnbd.disk.split import SplitDisk
from prlnbd.disk.tools import compact_disk, manage_bitmaps, snapshot_disk
from prlnbd.errors import DescriptorError, PrlNbdError
from prlnbd.export import Export
from prlnbd.image.create import write_image
from tests import support

CS = 64 * 1024
SIZES = [4 * CS, 4 * CS, 2 * CS]
STARTS = [0, 4 * CS, 8 * CS]
GUIDS = ["{11111111-1111-1111-1111-111111111111}", "{22222222-2222-2222-2222-222222222222}"]


def bundle(tmp_path: Path, layers: int = 1, sizes: list[int] | None = None, cluster: list[int] | None = None) -> Path:
    """A split bundle: piece k's root holds clusters 0 and the last (bytes k+1), its top cluster 1 (0x80+k)."""
    sizes = sizes or SIZES
    b = tmp_path / "vm.hdd"
    b.mkdir()
    pieces = []
    for k, size in enumerate(sizes):
        cs = cluster[k] if cluster else CS
        last = size // cs - 1
        paths = []
        for i in range(layers):
            path = b / f"vm.hdd.{k}.{GUIDS[i]}.hds"
            data = {0: bytes([k + 1]) * cs, last: bytes([k + 1]) * cs} if i == 0 else {1: bytes([0x80 + k]) * cs}
            write_image(path, size, cluster_size=cs, clusters=data)
            paths.append(path)
        pieces.append(paths)
    support.write_split_descriptor(b, pieces, sizes, GUIDS[:layers], order=[1, 2, 0])
    return b


def expected(layers: int) -> bytes:
    out = bytearray(sum(SIZES))
    for k, start in enumerate(STARTS):
        out[start : start + CS] = bytes([k + 1]) * CS
        end = start + SIZES[k]
        out[end - CS : end] = bytes([k + 1]) * CS
        if layers > 1:
            out[start + CS : start + 2 * CS] = bytes([0x80 + k]) * CS
    return bytes(out)


@pytest.mark.parametrize("layers", [1, 2])
def test_split_disk_reads_maps_and_depths(tmp_path: Path, layers: int) -> None:
    disk = open_disk(bundle(tmp_path, layers))
    try:
        assert isinstance(disk, SplitDisk)
        assert disk.size == sum(SIZES) and len(disk.layers) == layers and disk.guids == GUIDS[:layers][::-1]
        assert [p.size for p in disk.pieces] == SIZES and disk.offsets == STARTS
        want = expected(layers)
        buf, runs = disk.read(0, disk.size)
        assert bytes(buf) == want
        assert sum(r.length for r in runs) == disk.size
        assert [r.offset for r in runs] == sorted(r.offset for r in runs)
        # Crossing a boundary, unaligned: the bytes and the runs are in disk offsets.
        buf, runs = disk.read(STARTS[1] - 100, 300)
        assert bytes(buf) == want[STARTS[1] - 100 : STARTS[1] + 200]
        assert [(r.offset, r.length) for r in runs] == [(STARTS[1] - 100, 100), (STARTS[1], 200)]
        got = disk.read_nowait(STARTS[2] - 10, 20)
        assert got is None or bytes(got[0]) == want[STARTS[2] - 10 : STARTS[2] + 10]
        assert [(r.offset, r.length) for r in disk.map(STARTS[1] - CS, 2 * CS)] == [
            (STARTS[1] - CS, CS),
            (STARTS[1], CS),
        ]
        # Depth: the root's last cluster of piece 0 and first of piece 1 merge into one stretch.
        starts, codes = disk.depth_runs(0, disk.size)
        root = layers << 1
        assert (STARTS[1] - CS, root) in zip(starts, codes, strict=True)
        assert STARTS[1] not in starts
        assert all(a != b for a, b in itertools.pairwise(codes))
        assert disk.depth_runs(STARTS[1] + 10, STARTS[1] + 20) == ([STARTS[1] + 10], [root])
        assert disk.bitmaps() == []
    finally:
        disk.close()


def test_split_disk_writes_zeroes_and_flushes(tmp_path: Path) -> None:
    b = bundle(tmp_path, 2)
    disk = open_disk(b, writable=True)
    try:
        assert disk.writable
        want = bytearray(expected(2))
        data = bytes(range(256)) * 3
        disk.write(STARTS[2] - 300, data)
        want[STARTS[2] - 300 : STARTS[2] - 300 + len(data)] = data
        disk.zero(STARTS[1] - 2 * CS, 4 * CS)
        want[STARTS[1] - 2 * CS : STARTS[1] + 2 * CS] = bytes(4 * CS)
        token = disk.begin_flush()
        disk.flush_io(token)
        disk.end_flush(token, True)
        disk.prefetch(0, disk.size)
        assert bytes(disk.read(0, disk.size)[0]) == bytes(want)
    finally:
        disk.close()
    disk = open_disk(b)
    try:
        assert bytes(disk.read(0, disk.size)[0]) == bytes(want)
    finally:
        disk.close()


def test_split_disk_export_recomputes_status_in_every_piece(tmp_path: Path) -> None:
    """Export.changed() over a write in a later piece: the top layer's shortcut is the first piece's."""
    disk = open_disk(bundle(tmp_path, 2), writable=True)
    export = Export("vm", disk, read_only=False)
    try:
        # What changed since the root snapshot: the clusters each piece's top holds.
        since = "qemu:dirty-bitmap:since-" + GUIDS[0].strip("{}")
        assert since in export.info.contexts
        assert export.extents(since, STARTS[1], 3 * CS) == [(CS, 0), (CS, 1), (CS, 0)]
        assert export.extents(since, STARTS[2] + CS, CS) == [(CS, 1)]
        at = STARTS[1] + 2 * CS  # a cluster no image of piece 1 holds
        assert export.extents("qemu:allocation-depth", at, CS) == [(CS, 0)]
        export.write(at + 5, memoryview(b"x"))
        export.changed(at + 5, 1)
        assert export.extents("qemu:allocation-depth", at, CS) == [(CS, 1)]
        export.zero(at, CS, trim=False)
        export.changed(at, CS)
        assert export.extents("base:allocation", at, CS) == [(CS, 3)]
        assert "2 layers" in export.info.description
    finally:
        export.close()


def test_split_piece_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    b = bundle(tmp_path)
    write_image(b / f"vm.hdd.1.{GUIDS[0]}.hds", 5 * CS, cluster_size=CS, exclusive=False)
    with pytest.raises(DescriptorError) as info:
        open_disk(b)
    msg = str(info.value)
    assert "of Storage 0 is 327680 bytes" in msg and f"sectors {STARTS[1] // 512}..{STARTS[2] // 512}" in msg, msg
    assert "262144 bytes" in msg and "\n" not in msg


def test_split_pieces_with_other_cluster_sizes_are_refused(tmp_path: Path) -> None:
    b = bundle(tmp_path, cluster=[CS, CS, 2 * CS])
    with pytest.raises(DescriptorError, match="must share one cluster size"):
        open_disk(b)


def piece_top(b: Path, k: int, guid: str = GUIDS[0]) -> Path:
    return b / f"vm.hdd.{k}.{guid}.hds"


def test_split_bitmap_in_some_pieces_only_is_refused_naming_the_file(tmp_path: Path) -> None:
    b = bundle(tmp_path)
    name = manage_bitmaps(piece_top(b, 2), "add", None, CS)[0]["name"]
    manage_bitmaps(piece_top(b, 1), "add", str(name), CS)
    for action in ("open", "list", "clear"):
        with pytest.raises(DescriptorError) as info:
            if action == "open":
                open_disk(b)
            else:
                manage_bitmaps(b, action, str(name), 0)
        msg = str(info.value)
        assert f"top image {piece_top(b, 0)}: has no dirty bitmap {name}" in msg and "\n" not in msg, msg
    # remove is the way out: it takes the bitmap from every piece that holds it.
    assert manage_bitmaps(b, "remove", str(name), 0) == [{"name": name}]
    assert manage_bitmaps(b, "list", None, 0) == []


def test_split_bitmap_with_another_granularity_in_one_piece_is_refused(tmp_path: Path) -> None:
    b = bundle(tmp_path)
    name = str(manage_bitmaps(b, "add", None, CS)[0]["name"])
    manage_bitmaps(piece_top(b, 1), "remove", name, 0)
    manage_bitmaps(piece_top(b, 1), "add", name, 2 * CS)
    with pytest.raises(DescriptorError, match=rf"top image {piece_top(b, 1)}: dirty bitmap {name} has granularity"):
        open_disk(b)


def test_split_bitmap_granularity_must_divide_the_pieces(tmp_path: Path) -> None:
    b = bundle(tmp_path)
    msg = rf"granularity {8 * CS} does not divide the start of the piece .*vm\.hdd\.1\."
    with pytest.raises(PrlNbdError, match=msg):
        manage_bitmaps(b, "add", None, 8 * CS)
    assert manage_bitmaps(b, "list", None, 0) == []


def test_split_bitmaps_managed_marked_and_stored_per_piece(tmp_path: Path) -> None:
    b = bundle(tmp_path, 2)
    name = str(manage_bitmaps(b, "add", None, 4096)[0]["name"])
    other = str(manage_bitmaps(b, "add", "e4f2eed0-37fe-4539-b50b-85d2e7fd235f", CS)[0]["name"])
    with pytest.raises(PrlNbdError, match=f"bitmap {name} already exists"):
        manage_bitmaps(b, "add", name, 4096)
    listed = manage_bitmaps(b, "list", None, 0)
    assert listed == [
        {"name": name, "granularity": 4096, "dirty-bytes": 0},
        {"name": other, "granularity": CS, "dirty-bytes": 0},
    ]
    disk = open_disk(b, writable=True)
    export = Export("vm", disk, read_only=False)
    try:
        context = "qemu:dirty-bitmap:" + name
        assert context in export.info.contexts
        at = STARTS[1] - 5000  # 5000 bytes in piece 0, 3000 in piece 1
        export.write(at, memoryview(b"w" * 8000))
        export.changed(at, 8000)
        # Granules 2 and 1 before the boundary, and the first after it: one dirty run over it.
        assert export.extents(context, STARTS[1] - 3 * 4096, 5 * 4096) == [(4096, 0), (3 * 4096, 1), (4096, 0)]
        assert export.extents(context, 0, disk.size) == [
            (STARTS[1] - 2 * 4096, 0),
            (3 * 4096, 1),
            (disk.size - STARTS[1] - 4096, 0),
        ]
        # Online: add, clear and remove go to every piece's top.
        added = export.add_bitmap(None, 4096)
        export.write(STARTS[2] - 1, memoryview(b"xy"))
        export.changed(STARTS[2] - 1, 2)
        assert export.extents("qemu:dirty-bitmap:" + added.name, STARTS[2] - 4096, 2 * 4096) == [(2 * 4096, 1)]
        export.clear_bitmap(other)
        export.remove_bitmap(added.name)
        assert "qemu:dirty-bitmap:" + added.name not in export.info.contexts
        gone = export.add_bitmap(None, 4096)
        assert all(any(p is bm for bm in t.top.extension.bitmaps) for p, t in zip(gone.parts, disk.pieces, strict=True))  # type: ignore[attr-defined,union-attr]
        export.remove_bitmap(gone.name)
    finally:
        export.close()
    listed = manage_bitmaps(b, "list", None, 0)
    assert listed == [
        {"name": name, "granularity": 4096, "dirty-bytes": 3 * 4096 + 2 * 4096},
        {"name": other, "granularity": CS, "dirty-bytes": 0},
    ]
    # Each piece's top stores its own part.
    assert [manage_bitmaps(piece_top(b, k, GUIDS[1]), "list", None, 0)[0]["dirty-bytes"] for k in range(3)] == [
        2 * 4096,
        2 * 4096,
        4096,
    ]
    manage_bitmaps(b, "clear", name, 0)
    assert manage_bitmaps(b, "list", None, 0)[0]["dirty-bytes"] == 0
    manage_bitmaps(b, "remove", name, 0)
    assert [x["name"] for x in manage_bitmaps(b, "list", None, 0)] == [other]
    assert all(len(manage_bitmaps(piece_top(b, k, GUIDS[1]), "list", None, 0)) == 1 for k in range(3))


def test_split_snapshot_copies_every_piece_bitmaps(tmp_path: Path) -> None:
    b = bundle(tmp_path)
    name = str(manage_bitmaps(b, "add", None, 4096)[0]["name"])
    disk = open_disk(b, writable=True)
    try:
        disk.bitmaps()[0].set_range(STARTS[2] - 1, 2)
    finally:
        disk.close()
    _, top = snapshot_disk(b)
    for k, want in enumerate([0, 4096, 4096]):
        assert manage_bitmaps(piece_top(b, k, top), "list", None, 0) == [
            {"name": name, "granularity": 4096, "dirty-bytes": want}
        ]
    assert manage_bitmaps(b, "list", None, 0)[0]["dirty-bytes"] == 2 * 4096


def test_split_compact_compacts_every_piece(tmp_path: Path) -> None:
    b = bundle(tmp_path, 2)
    disk = open_disk(b, writable=True)
    try:
        # In pieces 0 and 1 the top's one cluster (1) is freed (no image below holds it), then cluster 0
        # is written past it; in piece 2 the root holds cluster 1, so zeroing keeps it: nothing to move.
        for start in STARTS:
            disk.zero(start + CS, CS, trim=True)
            disk.write(start + 10, b"z" * 10)
        want = bytes(disk.read(0, disk.size)[0])
    finally:
        disk.close()
    seen: list[tuple[int, int]] = []
    result = compact_disk(b, lambda done, total: seen.append((done, total)))
    assert result.moved == 2 and len(result.pieces) == 3 and [p.moved for p in result.pieces] == [1, 1, 0]
    assert seen[0] == (0, 2) and seen[-1] == (2, 2) and all(t == 2 for _, t in seen)
    assert result.size_after == result.size_before - 2 * CS
    assert result.as_dict()["pieces"] == [p.as_dict() for p in result.pieces]
    disk = open_disk(b)
    try:
        assert bytes(disk.read(0, disk.size)[0]) == want
    finally:
        disk.close()


def test_split_snapshot_adds_one_image_per_piece(tmp_path: Path) -> None:
    b = bundle(tmp_path, 2)
    frozen, top = snapshot_disk(b)
    assert frozen == GUIDS[1]
    for k in range(3):
        assert (b / f"vm.hdd.{k}.{top}.hds").exists()
    disk = open_disk(b, writable=True)
    try:
        assert disk.guids == [top, GUIDS[1], GUIDS[0]]
        assert bytes(disk.read(0, disk.size)[0]) == expected(2)
        disk.write(STARTS[1] - 1, b"ab")
    finally:
        disk.close()
    disk = open_disk(b, snapshot=GUIDS[1])
    try:
        assert bytes(disk.read(0, disk.size)[0]) == expected(2)
    finally:
        disk.close()
