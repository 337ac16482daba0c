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


def unpack(payload: bytes) -> list[tuple[int, int]]:
    return [struct.unpack_from(">II", payload, i) for i in range(0, len(payload), 8)]


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
    try:
        for round_ in range(3):
            for _ in range(200):
                ctx = rng.choice(list(exp.info.contexts))
                off = rng.randrange(SIZE)
                length = rng.randrange(1, SIZE - off + 1)
                assert unpack(exp.status_payload(ctx, off, length)) == exp.extents(ctx, off, length)
                one = unpack(exp.status_payload(ctx, off, length, req_one=True))
                assert len(one) == 1 and one == exp.extents(ctx, off, length, req_one=True)
            # A write must drop the cached windows it touches.
            exp.write(rng.randrange(SIZE - 8192) + round_, memoryview(b"w" * 5000))
    finally:
        exp.close()


def test_status_walk_with_replies_prepared_ahead(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client walking the disk gets replies computed ahead; writes in between discard them."""
    monkeypatch.setattr(export_mod, "STATUS_WINDOW", 3 * 1024 * 1024 + 4096)
    monkeypatch.setattr(export_mod, "MAX_EXTENTS", 7)  # short replies: many steps per walk
    disk = open_disk(bundle, writable=True)
    exp = Export("x", disk, read_only=False)
    computed: list[tuple[int, int]] = []
    pack = exp._pack_status

    def counting(context: str, offset: int, length: int) -> tuple[bytes, int]:
        computed.append((offset, length))
        return pack(context, offset, length)

    monkeypatch.setattr(exp, "_pack_status", counting)
    rng = random.Random(5)
    try:
        for ctx in exp.info.contexts:
            off, steps, ahead = 0, 0, 0
            while off < SIZE:
                length = min(SIZE - off, 5 * 1024 * 1024 + 512)
                computed.clear()
                got = unpack(exp.status_payload(ctx, off, length))
                ahead += not computed  # answered from what prepare_status() computed
                assert got == exp.extents(ctx, off, length)
                exp.prepare_status()
                at = off + sum(n for n, _ in got) + rng.randrange(4096)
                if steps % 5 == 4 and at + 700 <= SIZE:
                    # A write after the reply was prepared: the next answer must see it.
                    exp.write(at, memoryview(b"w" * 700))
                off += sum(n for n, _ in got)
                steps += 1
            assert ahead >= steps * 3 // 5, (ctx, ahead, steps)
    finally:
        exp.close()
