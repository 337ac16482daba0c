"""SplitDisk: one Disk per Storage piece behind the Disk interface, and what opening one refuses."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from prlnbd.disk.chain import open_disk
from prlnbd.disk.split import SplitDisk
from prlnbd.disk.tools import compact_disk, manage_bitmaps, snapshot_disk
from prlnbd.errors import DescriptorError
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


def test_split_disk_with_dirty_bitmaps_is_refused(tmp_path: Path) -> None:
    b = bundle(tmp_path)
    name = manage_bitmaps(b / f"vm.hdd.2.{GUIDS[0]}.hds", "add", None, CS)[0]["name"]
    with pytest.raises(DescriptorError, match=rf"Storage 1 .*holds dirty bitmaps \({name}\).*not supported"):
        open_disk(b)


def test_split_disk_tools_refuse_what_they_cannot_do(tmp_path: Path) -> None:
    b = bundle(tmp_path)
    with pytest.raises(DescriptorError, match="split into 3 Storage pieces"):
        manage_bitmaps(b, "list", None, CS)
    with pytest.raises(DescriptorError, match="split into 3 Storage pieces"):
        compact_disk(b)


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
