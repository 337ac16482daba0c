"""Disk._resolve on deep chains, the chain-length limit and the cost of walking many Shots."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from prlnbd.disk import chain as chain_mod
from prlnbd.disk import descriptor as descriptor_mod
from prlnbd.disk.chain import MAX_CHAIN_LENGTH, Disk, open_disk
from prlnbd.disk.descriptor import ZERO_GUID, parse_descriptor
from prlnbd.errors import DescriptorError
from prlnbd.image.create import write_image
from prlnbd.image.parallels import Problem, Segment

UNIT = 4096


class FakeLayer:
    """A layer holding guest bytes [k*UNIT, (k+1)*UNIT) for each k in HELD, at host offset k*UNIT."""

    def __init__(self, held: set[int], size: int) -> None:
        self.path = Path("fake")
        self.fd = -1
        self.writable = False
        self.problems: list[Problem] = []
        self.held = held
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    def segments(self, offset: int, length: int) -> Iterator[Segment]:
        pos, end = offset, offset + length
        while pos < end:
            k = pos // UNIT
            stop = min(end, (k + 1) * UNIT)
            yield Segment(pos, stop - pos, k * UNIT + 7 if k in self.held else None)
            pos = stop

    def close(self) -> None:
        pass


def test_resolve_walks_a_deep_chain_without_recursion() -> None:
    # 3000 layers (Python's recursion limit is 1000): layer i holds unit i; units past the
    # last layer fall through every layer to nothing.
    depth = 3000
    size = (depth + 2) * UNIT
    layers = [FakeLayer({i}, size) for i in range(depth)]
    disk = Disk(path=Path("deep"), layers=layers, guids=[""] * depth, size=size)  # type: ignore[arg-type]
    runs = list(disk.map(0, 3 * UNIT))
    want = [(i * UNIT, UNIT, i + 1, i * UNIT + 7) for i in range(3)]
    assert [(r.offset, r.length, r.depth, r.host) for r in runs] == want
    # The last units: held by the bottom layer, then by none.
    runs = list(disk.map((depth - 1) * UNIT + 5, 2 * UNIT))
    assert [(r.offset, r.length, r.depth, r.layer is layers[-1]) for r in runs] == [
        ((depth - 1) * UNIT + 5, UNIT - 5, depth, True),
        (depth * UNIT, UNIT + 5, 0, False),
    ]
    # What the layers below the top see (copy-on-write reads through it).
    below = disk._below(depth * UNIT - 10, 20)
    assert [(r.offset, r.length, r.depth) for r in below] == [(depth * UNIT - 10, 10, depth), (depth * UNIT, 10, 0)]


def chain_descriptor(tmp_path: Path, n: int, *, files: bool) -> Path:
    """A bundle whose chain has N layers (root first in Storage), with image files if FILES."""
    guids = [f"{{00000000-0000-0000-0000-{i + 1:012x}}}" for i in range(n)]
    images, shots = [], []
    for i, guid in enumerate(guids):
        name = f"d.hdd.{i}.hds"
        if files:
            write_image(tmp_path / name, 1 << 20, cluster_size=64 << 10)
        images.append(f"<Image><GUID>{guid}</GUID><Type>Compressed</Type><File>{name}</File></Image>")
        parent = guids[i - 1] if i else ZERO_GUID
        shots.append(f"<Shot><GUID>{guid}</GUID><ParentGUID>{parent}</ParentGUID></Shot>")
    text = (
        '<Parallels_disk_image Version="1.0"><Disk_Parameters><Disk_size>2048</Disk_size>'
        "<Cylinders>4</Cylinders><Heads>16</Heads><Sectors>32</Sectors><Padding>0</Padding></Disk_Parameters>"
        f"<StorageData><Storage><Start>0</Start><End>2048</End><Blocksize>128</Blocksize>{''.join(images)}"
        f"</Storage></StorageData><Snapshots><TopGUID>{guids[-1]}</TopGUID>{''.join(shots)}</Snapshots>"
        "</Parallels_disk_image>"
    )
    path = tmp_path / "DiskDescriptor.xml"
    path.write_text(text)
    return path


def test_chain_longer_than_the_limit_is_refused_before_opening_files(tmp_path: Path) -> None:
    path = chain_descriptor(tmp_path, MAX_CHAIN_LENGTH + 1, files=False)
    with pytest.raises(DescriptorError) as info:
        open_disk(tmp_path)
    msg = str(info.value)
    assert str(path) in msg and str(MAX_CHAIN_LENGTH + 1) in msg and str(MAX_CHAIN_LENGTH) in msg


def test_chain_at_the_limit_opens(tmp_path: Path) -> None:
    chain_descriptor(tmp_path, MAX_CHAIN_LENGTH, files=True)
    disk = open_disk(tmp_path)
    try:
        assert len(disk.layers) == MAX_CHAIN_LENGTH
        assert [r.depth for r in disk.map(0, 1 << 20)] == [0]
    finally:
        disk.close()


class CountingGuid(str):
    """A GUID string that counts how often it is compared by value."""

    compared = 0

    def __eq__(self, other: object) -> bool:
        CountingGuid.compared += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


@pytest.mark.parametrize("shape", ["chain", "siblings"])
def test_walking_shots_is_linear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shape: str) -> None:
    # Count value comparisons of GUIDs while parsing: a list lookup per step of the walk (as
    # before) compares each GUID with every one seen, n^2 / 2 in all.
    n = MAX_CHAIN_LENGTH if shape == "chain" else 4000
    if shape == "chain":
        chain_descriptor(tmp_path, n, files=False)
    else:
        path = chain_descriptor(tmp_path, 2, files=False)
        text = path.read_text()
        first = "{00000000-0000-0000-0000-000000000001}"
        extra = "".join(
            f"<Shot><GUID>{{10000000-0000-0000-0000-{i:012x}}}</GUID><ParentGUID>{first}</ParentGUID></Shot>"
            for i in range(n)
        )
        path.write_text(text.replace("</Snapshots>", extra + "</Snapshots>"))
    real = descriptor_mod.normalize_guid
    monkeypatch.setattr(descriptor_mod, "normalize_guid", lambda text: CountingGuid(real(text)))
    CountingGuid.compared = 0
    desc = parse_descriptor(tmp_path)
    assert len(desc.chain()) == (n if shape == "chain" else 2)
    assert CountingGuid.compared < 20 * n, CountingGuid.compared


def test_chain_limit_is_the_documented_one() -> None:
    assert chain_mod.MAX_CHAIN_LENGTH == 256
