"""Block status: one index per context, built on open and kept true by writes, against models built from nothing.

Two independent models: one per cluster, straight from the layers' BATs and
the bitmaps' bits; and a brute force one from Disk.map(), which resolves the
chain its own way (and knows raw layers' holes).
"""

from __future__ import annotations

import itertools
import math
import random
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prlnbd.export as export_mod
import prlnbd.image.extension as extension_mod
from prlnbd.disk.chain import Disk, open_disk
from prlnbd.disk.descriptor import build_descriptor, new_guid, save_descriptor
from prlnbd.export import Export, _BitmapStatus, final_end
from prlnbd.image.create import write_image
from prlnbd.image.extension import Extension, new_bitmap
from prlnbd.image.parallels import ParallelsImage
from prlnbd.nbd.constants import ALLOCATION_DEPTH, BASE_ALLOCATION, STATE_DIRTY

U32 = 0xFFFFFFFF
Extents = list[tuple[int, int]]


def write(exp: Export, offset: int, data: memoryview) -> None:
    """A WRITE as the server does it: the I/O, then the bookkeeping before the reply."""
    exp.write(offset, data)
    exp.changed(offset, len(data))


def zero(exp: Export, offset: int, length: int, **kwargs: bool) -> None:
    """A WRITE_ZEROES or TRIM as the server does it."""
    exp.zero(offset, length, **kwargs)
    exp.changed(offset, length)


def unpack(payload: bytes) -> Extents:
    return [struct.unpack_from(">II", payload, i) for i in range(0, len(payload), 8)]


def merged(items: Iterator[tuple[int, int]] | Extents) -> Extents:
    out: Extents = []
    for length, flags in items:
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + length, flags)
        elif length:
            out.append((length, flags))
    return out


# ---- the models


class ClusterModel:
    """Every context's flags per unit of the disk (the gcd of every cluster size and granularity).

    Read from the layers' BATs and the bitmaps' bits one unit at a time, with
    none of the code under test.
    """

    def __init__(self, exp: Export) -> None:
        disk = exp.disk
        self.size = disk.size
        layers = [layer for layer in disk.layers if isinstance(layer, ParallelsImage)]
        assert len(layers) == len(disk.layers)
        bitmaps = exp.bitmaps
        self.unit = unit = math.gcd(
            *[layer.cluster_size for layer in layers], *[b.granularity for b in bitmaps.values()]
        )
        depths = []
        for u in range(-(-self.size // unit)):
            at = u * unit
            depth = 0
            for i, layer in enumerate(layers):
                c = at // layer.cluster_size
                if c < len(layer.bat) and layer.bat[c]:
                    depth = i + 1
                    break
            depths.append(depth)
        self.flags: dict[str, list[int]] = {
            BASE_ALLOCATION: [0 if d else 3 for d in depths],
            ALLOCATION_DEPTH: depths,
        }
        for ctx, above in exp.since.items():
            self.flags[ctx] = [STATE_DIRTY if 1 <= d <= above else 0 for d in depths]
        for ctx, bm in bitmaps.items():
            self.flags[ctx] = [STATE_DIRTY if bm.is_set(u * unit // bm.granularity) else 0 for u in range(len(depths))]

    def extents(self, ctx: str, offset: int, end: int) -> Extents:
        """The merged extents of [offset, end)."""
        unit = self.unit
        flags = self.flags[ctx]
        pieces = []
        pos = offset
        while pos < end:
            stop = min(end, (pos // unit + 1) * unit)
            pieces.append((stop - pos, flags[pos // unit]))
            pos = stop
        return merged(pieces)

    def known_end(self, ctx: str, pos: int) -> int:
        """Where the status at POS stops."""
        return pos + self.extents(ctx, pos, self.size)[0][0]


class BruteModel:
    """Each context from Disk.map() (the read path's own resolution of the chain) and DirtyBitmap.extents()."""

    def __init__(self, exp: Export) -> None:
        self.exp = exp
        self.size = exp.disk.size

    def extents(self, ctx: str, offset: int, end: int) -> Extents:
        exp = self.exp
        if ctx in exp.bitmaps:
            return merged((n, STATE_DIRTY if d else 0) for n, d in exp.bitmaps[ctx].extents(offset, end - offset))
        out = []
        for run in exp.disk.map(offset, end - offset):
            if ctx == BASE_ALLOCATION:
                flags = 3 if run.zero else 0
            elif ctx == ALLOCATION_DEPTH:
                flags = run.depth
            else:
                flags = STATE_DIRTY if 1 <= run.depth <= exp.since[ctx] else 0
            out.append((run.length, flags))
        return merged(out)

    def known_end(self, ctx: str, pos: int) -> int:
        return pos + self.extents(ctx, pos, self.size)[0][0]


Model = ClusterModel | BruteModel


def check_request(exp: Export, model: Model, ctx: str, offset: int, length: int) -> None:
    """All three answers to one request, against the model: extents(), status_payload() with and without REQ_ONE."""
    end = offset + length
    limit = export_mod.MAX_EXTENTS
    status = exp._status.get(ctx)
    if isinstance(status, _BitmapStatus) and status.stretches is None:
        limit = min(limit, export_mod.SCAN_EXTENTS)  # a bitmap too dense to index: scanned
    want = model.extents(ctx, offset, end)
    assert exp.extents(ctx, offset, length) == want[:limit], (ctx, offset, length)
    # REQ_ONE: exactly one extent, never past the request.
    assert unpack(exp.status_payload(ctx, offset, length, req_one=True)) == want[:1], (ctx, offset, length)
    assert exp.extents(ctx, offset, length, req_one=True) == want[:1]
    got = unpack(exp.status_payload(ctx, offset, length))
    assert all(0 < n <= U32 for n, _ in got)
    if len(want) > limit:
        # Cut short: whole extents, all inside the request; the client asks again for the rest.
        assert got == want[:limit], (ctx, offset, length)
        return
    assert got[:-1] == want[:-1], (ctx, offset, length)
    # The final extent runs on as far as its status goes, within a u32 length and the disk.
    start = offset + sum(n for n, _ in got[:-1])
    assert got[-1][1] == want[-1][1]
    assert start + got[-1][0] == final_end(start, end, model.known_end(ctx, start)), (ctx, offset, length)
    assert start + got[-1][0] <= exp.disk.size


def check_indexes(exp: Export, model: Model) -> None:
    """Every context over the whole disk as the model says; each index in its one, canonical shape."""
    size = exp.disk.size
    for ctx in exp.info.contexts:
        want = model.extents(ctx, 0, size)
        assert exp.extents(ctx, 0, size) == want[: export_mod.MAX_EXTENTS], ctx
        index = exp._status[ctx]
        if isinstance(index, _BitmapStatus):
            assert (index.stretches is None) == (index.bitmap.index() is None), ctx
            index = index.stretches
        if index is not None:
            bounds = index.bounds.tolist()
            values = index.values()
            assert bounds[0] == 0 and bounds[-1] == size and len(bounds) == len(values) + 1
            assert all(a < b for a, b in itertools.pairwise(bounds)), ctx
            assert all(a != b for a, b in itertools.pairwise(values)), ctx  # neighbours differ
            assert len(values) == len(want), ctx
            # The packed descriptors say each stretch's length too (a u32 at most).
            assert unpack(bytes(index.descs)) == [
                (min(b - a, U32), v) for (a, b), v in zip(itertools.pairwise(bounds), values, strict=True)
            ], ctx
    depth = exp._depth
    assert all(a < b for a, b in itertools.pairwise(depth.bounds))
    assert all(a != b for a, b in itertools.pairwise(depth.values()))


# ---- building disks


def make_disk(
    where: Path,
    size: int,
    layers: list[tuple[int, list[int]]],
    bitmap: tuple[int, list[tuple[int, int]]] | None = None,
) -> Path:
    """LAYERS top first, each (cluster size, allocated clusters); a bitmap (granularity, ranges) on the top.

    One layer is a single .hds image, more a bundle.
    """
    names = []
    for i, (cs, clusters) in enumerate(layers):
        name = f"l{i}.hds"
        write_image(where / name, size, cluster_size=cs, clusters={c: bytes([i + 1]) * 512 for c in clusters})
        names.append(name)
    if bitmap is not None:
        granularity, ranges = bitmap
        top = ParallelsImage.open(where / names[0], writable=True)
        bm = new_bitmap(size, granularity)
        for offset, length in ranges:
            bm.set_range(offset, length)
        top.extension = Extension(offset=0, bitmaps=[bm])
        top.close()
    if len(layers) == 1:
        return where / names[0]
    chain = [(new_guid(), "Compressed", name) for name in names]
    save_descriptor(build_descriptor(size, layers[0][0], chain), where / "DiskDescriptor.xml")
    return where


@st.composite
def disks(draw: st.DrawFn) -> tuple[int, list[tuple[int, list[int]]], tuple[int, list[tuple[int, int]]] | None]:
    """A small disk: 1-3 layers of odd and even cluster sizes (a size that ends mid-cluster), maybe a bitmap."""
    size = draw(st.integers(1, 96)) * 512
    layers = []
    for _ in range(draw(st.integers(1, 3))):
        cs = draw(st.sampled_from([1024, 1536, 4096]))
        count = -(-size // cs)
        held = draw(st.lists(st.booleans(), min_size=count, max_size=count))
        layers.append((cs, [c for c, h in enumerate(held) if h]))
    bitmap = None
    if draw(st.booleans()):
        granularity = draw(st.sampled_from([512, 2048]))
        ranges = draw(st.lists(st.tuples(st.integers(0, size - 1), st.integers(1, 8192)), max_size=12))
        bitmap = (granularity, ranges)
    return size, layers, bitmap


def requests(data: st.DataObject, size: int, count: int) -> list[tuple[int, int]]:
    out = []
    for _ in range(count):
        offset = data.draw(st.integers(0, size - 1))
        out.append((offset, data.draw(st.integers(1, size - offset))))
    return out


# ---- the index, built on open


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(disk=disks(), max_extents=st.sampled_from([1, 2, 3, 64 * 1024]), data=st.data())
def test_indexes_match_a_per_cluster_model(
    disk: tuple[int, list[tuple[int, list[int]]], tuple[int, list[tuple[int, int]]] | None],
    max_extents: int,
    data: st.DataObject,
) -> None:
    size, layers, bitmap = disk
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        mp.setattr(export_mod, "MAX_EXTENTS", max_extents)
        exp = Export("x", open_disk(make_disk(Path(tmp), size, layers, bitmap)), read_only=True)
        try:
            model = ClusterModel(exp)
            check_indexes(exp, model)
            for offset, length in requests(data, size, 10):
                for ctx in exp.info.contexts:
                    check_request(exp, model, ctx, offset, length)
        finally:
            exp.close()


_OPS = st.lists(
    st.tuples(st.sampled_from(["write", "zero", "zero-no-hole", "trim"]), st.integers(0, 10**9), st.integers(1, 9000)),
    min_size=1,
    max_size=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(disk=disks(), ops=_OPS, data=st.data())
def test_indexes_stay_true_through_writes_zeros_and_trims(
    disk: tuple[int, list[tuple[int, list[int]]], tuple[int, list[tuple[int, int]]] | None],
    ops: list[tuple[str, int, int]],
    data: st.DataObject,
) -> None:
    """After every WRITE, WRITE_ZEROES or TRIM, each index is what a fresh look at the BATs and bits says."""
    size, layers, bitmap = disk
    with tempfile.TemporaryDirectory() as tmp:
        exp = Export("x", open_disk(make_disk(Path(tmp), size, layers, bitmap), writable=True), read_only=False)
        try:
            for kind, where, length in ops:
                offset = where % size
                length = min(length, size - offset)
                if kind == "write":
                    write(exp, offset, memoryview(b"w" * length))
                else:
                    zero(exp, offset, length, trim=kind == "trim", no_hole=kind == "zero-no-hole")
                model = ClusterModel(exp)
                check_indexes(exp, model)
                for offset, length in requests(data, size, 3):
                    for ctx in exp.info.contexts:
                        check_request(exp, model, ctx, offset, length)
        finally:
            exp.close()


def test_final_end_stays_within_a_u32_length() -> None:
    assert final_end(0, 512, 10 << 30) == U32 - 511  # cut short at a 512-byte boundary
    assert final_end(100, 612, 10 << 30) % 512 == 0
    assert final_end(100, 612, 10 << 30) - 100 <= U32
    assert final_end(0, U32, 10 << 30) == U32  # never short of the request
    assert final_end(4096, 8192, 1 << 20) == 1 << 20  # to where the status is known to end


def test_final_extent_of_a_huge_hole(tmp_path: Path) -> None:
    """A stretch longer than a u32 length, in every context: the final extent runs on as far as one descriptor can."""
    size = 12 << 30
    mib = 1 << 20
    # Top: a cluster at 9 GiB; parent: one at 10 GiB. A bitmap says the same as the top.
    where = make_disk(tmp_path, size, [(mib, [9 << 10]), (mib, [10 << 10])], (64 * 1024, [(9 << 30, 1)]))
    exp = Export("x", open_disk(where), read_only=True)
    try:
        assert len(exp.info.contexts) == 4  # base, depth, the bitmap, since the parent
        check_indexes(exp, BruteModel(exp))
        for ctx in exp.info.contexts:
            got = unpack(exp.status_payload(ctx, 4096, 512))
            assert len(got) == 1 and got[0][0] == U32 - 511, ctx
            got = unpack(exp.status_payload(ctx, 8 << 30, 4096))
            assert got == [(1 << 30, got[0][1])], ctx  # up to the change at 9 GiB, not further
            # Half-way into a long stretch: cut at a 512-byte boundary a u32 from the start.
            start = (1 << 30) + 100
            got = unpack(exp.status_payload(ctx, start, 512))
            assert got[0][0] == (start + U32) // 512 * 512 - start, ctx
        # A request that ends at the change: the final extent stops there too.
        assert unpack(exp.status_payload(BASE_ALLOCATION, (9 << 30) - U32, U32)) == [(U32, 3)]
        assert unpack(exp.status_payload(BASE_ALLOCATION, (9 << 30) - U32 + 1, U32)) == [(U32 - 1, 3), (mib, 0)]
    finally:
        exp.close()


def test_requests_at_the_end_of_the_disk(tmp_path: Path) -> None:
    """The last cluster is short; nothing runs past the disk's end, and a write there shows at once."""
    cs = 64 * 1024
    size = 10 * cs + 1536
    exp = Export("x", open_disk(make_disk(tmp_path, size, [(cs, [3])]), writable=True), read_only=False)
    try:
        model: Model = ClusterModel(exp)
        for offset, length in [
            (size - 1, 1),
            (size - 512, 512),
            (size - 1536, 1536),
            (4 * cs, size - 4 * cs),
            (0, size),
        ]:
            for ctx in exp.info.contexts:
                check_request(exp, model, ctx, offset, length)
        assert unpack(exp.status_payload(BASE_ALLOCATION, size - 1, 1)) == [(1, 3)]
        assert unpack(exp.status_payload(BASE_ALLOCATION, 5 * cs, 1)) == [(size - 5 * cs, 3)]
        write(exp, size - 700, memoryview(b"e" * 700))
        model = ClusterModel(exp)
        check_indexes(exp, model)
        assert unpack(exp.status_payload(BASE_ALLOCATION, 5 * cs, 1)) == [(5 * cs, 3)]
        assert unpack(exp.status_payload(ALLOCATION_DEPTH, size - 1, 1)) == [(1, 1)]
        assert unpack(exp.status_payload(ALLOCATION_DEPTH, 10 * cs - 1, 1)) == [(1, 0)]
        assert unpack(exp.status_payload(ALLOCATION_DEPTH, 10 * cs - 1, 2)) == [(1, 0), (1536, 1)]
        zero(exp, 10 * cs, 1536, trim=True)  # the whole short cluster: released again
        check_indexes(exp, ClusterModel(exp))
        assert unpack(exp.status_payload(BASE_ALLOCATION, 5 * cs, 1)) == [(size - 5 * cs, 3)]
    finally:
        exp.close()


# ---- a 3-layer chain with a raw root, against the brute force model


def make_raw_chain(tmp_path: Path, size: int, cs: int, rng: random.Random) -> Path:
    """Top and middle: Parallels images with scattered clusters, a bitmap on the top; root: a sparse raw file."""
    with (tmp_path / "root.raw").open("wb") as f:
        f.truncate(size)
        for _ in range(20):
            f.seek(rng.randrange(size // 4096) * 4096)
            f.write(b"r" * rng.choice([4096, 8192, 3 * cs]))
        f.truncate(size)
    names = []
    for i in range(2):
        name = f"l{i}.hds"
        clusters = {c: b"x" for c in rng.sample(range(size // cs), 40)}
        write_image(tmp_path / name, size, cluster_size=cs, clusters=clusters)
        names.append(name)
    top = ParallelsImage.open(tmp_path / names[0], writable=True)
    bm = new_bitmap(size, 4096)
    for _ in range(100):
        bm.set_range(rng.randrange(size), rng.randrange(1, 300_000))
    top.extension = Extension(offset=0, bitmaps=[bm])
    top.close()
    chain = [
        (new_guid(), "Compressed", names[0]),
        (new_guid(), "Compressed", names[1]),
        (new_guid(), "Plain", "root.raw"),
    ]
    save_descriptor(build_descriptor(size, cs, chain), tmp_path / "DiskDescriptor.xml")
    return tmp_path


@pytest.mark.parametrize("max_extents", [5, 64 * 1024])
def test_three_layer_chain_against_brute_force(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, max_extents: int
) -> None:
    """Every context of a 3-layer chain (raw root with holes), also after random writes, zeros and trims."""
    monkeypatch.setattr(export_mod, "MAX_EXTENTS", max_extents)
    size, cs = 64 * 1024 * 1024, 64 * 1024
    rng = random.Random(7 + max_extents)
    exp = Export("x", open_disk(make_raw_chain(tmp_path, size, cs, rng), writable=True), read_only=False)
    model = BruteModel(exp)
    try:
        assert len(exp.info.contexts) == 5  # base, depth, the bitmap, since the middle, since the root
        assert {code >> 1 for code in exp._depth.values()} == {1, 2, 3}
        assert any(code == 3 << 1 | 1 for code in exp._depth.values())  # the raw root's holes
        for round_ in range(40):
            check_indexes(exp, model)
            for _ in range(10):
                ctx = rng.choice(exp.info.contexts)
                offset = rng.randrange(size)
                check_request(exp, model, ctx, offset, rng.randrange(1, size - offset + 1))
            offset = rng.randrange(size - 1)
            length = rng.randrange(1, min(size - offset, 3 * cs) + 1)
            kind = round_ % 4
            if kind == 0:
                write(exp, offset, memoryview(b"w" * length))
            else:
                zero(exp, offset, length, trim=kind == 3, no_hole=kind == 2)
        check_indexes(exp, model)
    finally:
        exp.close()


# ---- stored bitmaps


def test_a_bitmap_too_dense_to_index_is_scanned_only_as_far_as_the_reply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without an index, a reply costs as many runs of the bitmap as it has extents, at most SCAN_EXTENTS
    of them however many MAX_EXTENTS allows, and is still right."""
    monkeypatch.setattr(extension_mod, "MAX_FLIPS", 64)
    cs = 4096
    size = 256 * cs
    rng = random.Random(3)
    ranges = [(rng.randrange(size), rng.randrange(1, 3 * cs)) for _ in range(120)]
    exp = Export(
        "x", open_disk(make_disk(tmp_path, size, [(cs, [1, 2, 9])], (512, ranges)), writable=True), read_only=False
    )
    (ctx,) = exp.bitmaps
    bm = exp.bitmaps[ctx]
    try:
        assert bm.index() is None
        scanned: list[int] = []
        set_runs = bm.set_runs

        def counting(first: int, last: int) -> Iterator[tuple[int, int]]:
            for run in set_runs(first, last):
                scanned.append(1)
                yield run

        monkeypatch.setattr(bm, "set_runs", counting)
        for max_extents, scan_extents in ((3, 4096), (64 * 1024, 5), (64 * 1024, 4096)):
            monkeypatch.setattr(export_mod, "MAX_EXTENTS", max_extents)
            monkeypatch.setattr(export_mod, "SCAN_EXTENTS", scan_extents)
            model = ClusterModel(exp)
            for _ in range(100):
                offset = rng.randrange(size)
                check_request(exp, model, ctx, offset, rng.randrange(1, size - offset + 1))
                # Aligned to the granularity too: requests that end right where the bits change.
                offset = rng.randrange(size // 512) * 512
                check_request(exp, model, ctx, offset, rng.randrange(1, (size - offset) // 512 + 1) * 512)
            scanned.clear()
            got = unpack(exp.status_payload(ctx, 0, size))
            assert len(got) == min(max_extents, scan_extents, len(model.extents(ctx, 0, size)))
            assert len(scanned) <= len(got) // 2 + 2  # a run of set bits is two extents
            write(exp, rng.randrange(size - cs), memoryview(b"w" * 1000))
        check_indexes(exp, ClusterModel(exp))
    finally:
        exp.close()


def test_writes_mark_the_bitmap_and_its_context_at_once(tmp_path: Path) -> None:
    """A bitmap context's replies are slices of the bitmap's own index, which every write keeps true."""
    cs = 64 * 1024
    exp = Export("x", open_disk(make_disk(tmp_path, 64 * cs, [(cs, [])], (cs, [])), writable=True), read_only=False)
    (ctx,) = exp.bitmaps
    try:
        assert unpack(exp.status_payload(ctx, 0, 4096)) == [(64 * cs, 0)]
        write(exp, 5 * cs + 10, memoryview(b"w"))
        zero(exp, 9 * cs, cs, trim=True)
        assert unpack(exp.status_payload(ctx, 0, 4096)) == [(5 * cs, 0)]
        assert unpack(exp.status_payload(ctx, 0, 6 * cs)) == [(5 * cs, 0), (cs, STATE_DIRTY)]
        assert exp.extents(ctx, 0, 64 * cs) == [(5 * cs, 0), (cs, 1), (3 * cs, 0), (cs, 1), (54 * cs, 0)]
        assert exp.bitmaps[ctx].index() is not None
    finally:
        exp.close()


# ---- cost: what is done follows the stretches, not the clusters


class CountingList(list[int]):
    """A list that counts how often an item is looked up."""

    gets = 0

    def __getitem__(self, i):  # type: ignore[no-untyped-def]
        CountingList.gets += 1
        return super().__getitem__(i)


def test_runs_of_clusters_are_found_without_visiting_each(tmp_path: Path) -> None:
    """allocated_runs() takes a run of 100 000 clusters in a few dozen lookups; depth_runs() makes it one stretch."""
    cs = 4096
    count = 100_000
    write_image(tmp_path / "full.hds", count * cs + 8 * cs, cluster_size=cs)
    img = ParallelsImage.open(tmp_path / "full.hds")
    try:
        img.allocated = CountingList([*range(5, count), *range(count + 2, count + 4)])
        for c in img.allocated:
            img.bat[c] = 1 << 20  # the host offsets do not matter here
        CountingList.gets = 0
        assert list(img.allocated_runs(0, count + 8)) == [(5, count), (count + 2, count + 4)]
        assert CountingList.gets < 100
        assert list(img.allocated_runs(7, 9)) == [(7, 9)]
        assert list(img.allocated_runs(count - 1, count + 3)) == [(count - 1, count), (count + 2, count + 3)]
        assert list(img.allocated_runs(count, count + 2)) == []
        disk = Disk(path=tmp_path, layers=[img], guids=[""], size=img.size)
        CountingList.gets = 0
        starts, codes = disk.depth_runs(0, img.size)
        assert (starts, codes) == ([0, 5 * cs, count * cs, (count + 2) * cs, (count + 4) * cs], [1, 2, 1, 2, 1])
        assert CountingList.gets < 100
    finally:
        img.close()


@settings(max_examples=300, deadline=None)
@given(held=st.lists(st.booleans(), max_size=80), first=st.integers(0, 90), span=st.integers(0, 90))
def test_allocated_runs_match_the_clusters(held: list[bool], first: int, span: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "a.hds"
        write_image(path, 96 * 512, cluster_size=512, clusters={c: b"a" for c, h in enumerate(held) if h})
        img = ParallelsImage.open(path)
        try:
            last = first + span
            want = []
            for c in range(first, last):
                if c < len(held) and held[c]:
                    if want and want[-1][1] == c:
                        want[-1] = (want[-1][0], c + 1)
                    else:
                        want.append((c, c + 1))
            assert list(img.allocated_runs(first, last)) == want
        finally:
            img.close()


def test_a_write_into_clusters_the_top_holds_recomputes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commonest write changes no status: changed() then costs two binary searches, not a recomputation."""
    cs = 64 * 1024
    exp = Export(
        "x", open_disk(make_disk(tmp_path, 64 * cs, [(cs, [3, 4, 5, 6]), (cs, [10])]), writable=True), read_only=False
    )
    recomputed: list[tuple[int, int]] = []
    depth_runs = exp.disk.depth_runs

    def counting(offset: int, end: int) -> tuple[list[int], list[int]]:
        recomputed.append((offset, end))
        return depth_runs(offset, end)

    monkeypatch.setattr(exp.disk, "depth_runs", counting)
    try:
        write(exp, 3 * cs + 100, memoryview(b"w" * (3 * cs)))  # clusters 3-6, all held
        write(exp, 6 * cs, memoryview(b"w" * cs))
        assert recomputed == []
        write(exp, 7 * cs - 1, memoryview(b"w" * 2))  # clusters 6 and 7: 7 is new
        assert recomputed == [(6 * cs, 8 * cs)]
        write(exp, 10 * cs + 5, memoryview(b"w"))  # over the parent's cluster: new in the top
        assert recomputed[-1] == (10 * cs, 11 * cs)
        zero(exp, 4 * cs, cs, trim=True)  # a hole in the middle of held clusters
        assert recomputed[-1] == (4 * cs, 5 * cs)
        check_indexes(exp, ClusterModel(exp))
        assert exp.extents(ALLOCATION_DEPTH, 0, 12 * cs) == [
            (3 * cs, 0),
            (cs, 1),
            (cs, 0),
            (3 * cs, 1),
            (2 * cs, 0),
            (cs, 1),
            (cs, 0),
        ]
    finally:
        exp.close()


def test_status_of_a_raw_top(tmp_path: Path) -> None:
    """A plain image on its own has no clusters: a write recomputes the file's data and holes around it."""
    size = 8 << 20
    with (tmp_path / "root.raw").open("wb") as f:
        f.truncate(size)
    save_descriptor(
        build_descriptor(size, 1 << 20, [(new_guid(), "Plain", "root.raw")]), tmp_path / "DiskDescriptor.xml"
    )
    exp = Export("x", open_disk(tmp_path, writable=True), read_only=False)
    model = BruteModel(exp)
    try:
        rng = random.Random(1)
        for _ in range(10):
            offset = rng.randrange(size - 1)
            length = rng.randrange(1, min(size - offset, 300_000) + 1)
            if rng.random() < 0.7:
                write(exp, offset, memoryview(b"r" * length))
            else:
                zero(exp, offset, length, trim=False)
            check_indexes(exp, model)
    finally:
        exp.close()


def test_a_flush_syncs_only_for_writes_no_flush_begun_after_them_covered(tmp_path: Path) -> None:
    """FLUSH covers every write that ended before it arrived: one with nothing new to cover syncs nothing,
    one after a write (an overwrite too, which maps no cluster) or after a failed flush syncs."""
    import asyncio

    cs = 1 << 20
    exp = Export("x", open_disk(make_disk(tmp_path, 4 * cs, [(cs, [1])]), writable=True), read_only=False)
    syncs: list[str] = []
    fail = False
    gate: asyncio.Event | None = None
    entered = asyncio.Event()

    async def run(fn: object, *args: object) -> None:
        assert callable(fn)
        syncs.append("sync")
        entered.set()
        if gate is not None:
            await gate.wait()
        if fail:
            raise OSError(5, "Input/output error")
        fn(*args)

    def write(offset: int) -> None:
        exp.write(offset, memoryview(b"x" * 4096))
        exp.changed(offset, 4096)

    async def main() -> None:
        nonlocal fail, gate
        await exp.flush(run)
        assert syncs == []  # nothing written since the disk was opened
        write(cs)  # an overwrite: no BAT entry changes
        await exp.flush(run)
        await exp.flush(run)
        assert len(syncs) == 1
        write(3 * cs)  # allocates
        await exp.flush(run)
        assert len(syncs) == 2
        write(cs + 4096)
        fail = True
        with pytest.raises(export_mod.RequestError):
            await exp.flush(run)
        fail = False
        await exp.flush(run)  # the failed flush covered nothing
        assert len(syncs) == 4
        # Two flushes arrive while a running one syncs, which began after the last write they
        # must cover ended: both are covered by it. A write that ends after they arrived is
        # not theirs to cover: they sync nothing for it; the next flush does.
        gate = asyncio.Event()
        write(cs)
        entered.clear()
        first = asyncio.ensure_future(exp.flush(run))
        await entered.wait()  # the first flush is now in its sync, holding the flush lock
        assert len(syncs) == 5
        second = asyncio.ensure_future(exp.flush(run))
        third = asyncio.ensure_future(exp.flush(run))
        # Callbacks run in order: the tasks' first steps (they arrive, then wait for the lock),
        # then this write.
        ended = asyncio.Event()
        asyncio.get_running_loop().call_soon(lambda: (write(cs + 8192), ended.set()))
        await ended.wait()
        gate.set()
        await asyncio.gather(first, second, third)
        assert len(syncs) == 5
        gate = None
        await exp.flush(run)
        assert len(syncs) == 6

    try:
        asyncio.run(main())
    finally:
        exp.close()
