"""Descriptors as Parallels Desktop and Virtuozzo's ploop write them: `prlnbd snapshot` keeps
every element they carry, byte for byte; a Parallels-encrypted disk is refused clearly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from lxml import etree

from tests import support

M = 1024 * 1024
SIZE = 16 * M
SECTORS = SIZE // 512
TOP = "{5fbaabe3-6958-40ff-92a7-860e329aab41}"  # the top's GUID in both writers' descriptors
ZERO = "{00000000-0000-0000-0000-000000000000}"
BASE = "{9b1f6c1e-3d3a-4c55-8c1e-6f1f0d2a7b11}"
ENGINE = "{a4e1c1e2-8b9d-4f3a-9e55-1c0f8d7e6b21}"


def prl(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "prlnbd", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def parallels_desktop_xml(top_file: str, base_file: str, engine: str = ZERO) -> str:
    """A descriptor as Parallels Desktop writes it: 4-space indentation, no TopGUID, the top
    at the predefined GUID, and the disk's own elements (encryption, identity, statistics)."""
    return f"""<?xml version='1.0' encoding='UTF-8'?>
<Parallels_disk_image Version="1.0">
    <Disk_Parameters>
        <Disk_size>{SECTORS}</Disk_size>
        <Cylinders>{SECTORS // (16 * 32)}</Cylinders>
        <PhysicalSectorSize>4096</PhysicalSectorSize>
        <LogicSectorSize>512</LogicSectorSize>
        <Heads>16</Heads>
        <Sectors>32</Sectors>
        <Padding>0</Padding>
        <Encryption>
            <Engine>{engine}</Engine>
            <Data></Data>
            <Salt></Salt>
        </Encryption>
        <UID>{{0f3b8e57-2d7c-4a61-b0a4-6c2f5e9d8a13}}</UID>
        <Name>Windows 11 &amp; Tools</Name>
        <Miscellaneous>
            <CompatLevel>level2</CompatLevel>
            <Bootable>1</Bootable>
            <ChangeState>0</ChangeState>
            <SuspendState>0</SuspendState>
            <DupBlocksCnt>0</DupBlocksCnt>
            <CorruptBlocksCnt>0</CorruptBlocksCnt>
        </Miscellaneous>
    </Disk_Parameters>
    <StorageData>
        <Storage>
            <Start>0</Start>
            <End>{SECTORS}</End>
            <Blocksize>2048</Blocksize>
            <Image>
                <GUID>{BASE}</GUID>
                <Type>Compressed</Type>
                <File>{base_file}</File>
            </Image>
            <Image>
                <GUID>{TOP}</GUID>
                <Type>Compressed</Type>
                <File>{top_file}</File>
            </Image>
        </Storage>
    </StorageData>
    <Snapshots>
        <Shot>
            <GUID>{BASE}</GUID>
            <ParentGUID>{ZERO}</ParentGUID>
        </Shot>
        <Shot>
            <GUID>{TOP}</GUID>
            <ParentGUID>{BASE}</ParentGUID>
        </Shot>
    </Snapshots>
</Parallels_disk_image>
"""


def ploop_xml(top_file: str, base_file: str) -> str:
    """A descriptor as ploop writes it (lib/xml.c): Virtuozzo_disk_image, 2-space indentation,
    Max_delta_size, an Encryption KeyId (LUKS inside the image), a Volume, Preallocated, TopGUID
    and a Temporary snapshot."""
    return f"""<?xml version="1.0"?>
<Virtuozzo_disk_image>
  <Disk_Parameters>
    <Disk_size>{SECTORS}</Disk_size>
    <Max_delta_size>{2 * SECTORS}</Max_delta_size>
    <Cylinders>{SECTORS // (16 * 63)}</Cylinders>
    <Heads>16</Heads>
    <Sectors>63</Sectors>
    <Padding>0</Padding>
    <Encryption>
      <KeyId>2b3c4d5e-6f70-4182-93a4-b5c6d7e8f901</KeyId>
    </Encryption>
  </Disk_Parameters>
  <StorageData>
    <Volume>
      <Parent>../base-volume</Parent>
      <SnapshotGUID>{{7c0d9a52-1e4b-4f86-a2d3-95e8b1c4f670}}</SnapshotGUID>
      <ReadOnly>1</ReadOnly>
    </Volume>
    <Storage>
      <Start>0</Start>
      <End>{SECTORS}</End>
      <Blocksize>2048</Blocksize>
      <Preallocated>1</Preallocated>
      <Image>
        <GUID>{BASE}</GUID>
        <Type>Compressed</Type>
        <File>{base_file}</File>
      </Image>
      <Image>
        <GUID>{TOP}</GUID>
        <Type>Compressed</Type>
        <File>{top_file}</File>
      </Image>
    </Storage>
  </StorageData>
  <Snapshots>
    <TopGUID>{TOP}</TopGUID>
    <Shot>
      <GUID>{BASE}</GUID>
      <ParentGUID>{ZERO}</ParentGUID>
      <Temporary></Temporary>
    </Shot>
    <Shot>
      <GUID>{TOP}</GUID>
      <ParentGUID>{BASE}</ParentGUID>
    </Shot>
  </Snapshots>
</Virtuozzo_disk_image>
"""


def make_bundle(tmp: Path, kind: str, engine: str = ZERO) -> Path:
    """A two-layer bundle with data in both layers and a descriptor written as KIND writes it."""
    bundle = tmp / ("harddisk.hdd" if kind == "parallels-desktop" else "disk.hdd")
    bundle.mkdir()
    base, top = (f"{bundle.name}.0.{BASE}.hds", f"{bundle.name}.1.{TOP}.hds") if kind == "parallels-desktop" \
        else ("root.hds", f"root.hds.{TOP}")
    support.make_parallels(bundle / base, SIZE, M, [(0x11, 0, 3 * M)])
    support.make_parallels(bundle / top, SIZE, M, [(0x22, M, M)])
    text = parallels_desktop_xml(top, base, engine) if kind == "parallels-desktop" else ploop_xml(top, base)
    (bundle / "DiskDescriptor.xml").write_text(text)
    return bundle


def serialized(el: etree._Element) -> bytes:
    return etree.tostring(el, with_tail=False)


@pytest.mark.parametrize("kind", ["parallels-desktop", "ploop"])
def test_snapshot_keeps_every_element_byte_for_byte(tmp_path: Path, kind: str) -> None:
    bundle = make_bundle(tmp_path, kind)
    desc = bundle / "DiskDescriptor.xml"
    before = etree.parse(str(desc)).getroot()
    res = prl("snapshot", bundle)
    assert res.returncode == 0, res.stderr
    frozen, new_top = (line.split()[-1] for line in res.stdout.splitlines())
    assert frozen == TOP
    after = etree.parse(str(desc)).getroot()
    assert after.tag == before.tag and dict(after.attrib) == dict(before.attrib)
    # Every element the writer put there, outside the two lists a snapshot extends, is unchanged.
    for old in before:
        if old.tag in ("StorageData", "Snapshots"):
            continue
        same = after.find(old.tag)
        assert same is not None and serialized(same) == serialized(old), old.tag
    old_storage, new_storage = before.find("StorageData"), after.find("StorageData")
    assert old_storage is not None and new_storage is not None
    for old in old_storage:
        if old.tag != "Storage":
            assert serialized(new_storage.find(old.tag)) == serialized(old), old.tag
    old_st, new_st = old_storage.find("Storage"), new_storage.find("Storage")
    assert old_st is not None and new_st is not None
    assert len(new_st) == len(old_st) + 1
    for old, new in zip(old_st, new_st, strict=False):
        assert serialized(new) == serialized(old)
    image = new_st[-1]
    assert [(c.tag, c.text) for c in image] == [
        ("GUID", new_top), ("Type", "Compressed"), ("File", f"{bundle.name}.2.{new_top}.hds")]
    old_snaps, new_snaps = before.find("Snapshots"), after.find("Snapshots")
    assert old_snaps is not None and new_snaps is not None
    old_shots, new_shots = old_snaps.findall("Shot"), new_snaps.findall("Shot")
    assert [serialized(s) for s in new_shots[:-1]] == [serialized(s) for s in old_shots]
    assert [(c.tag, c.text) for c in new_shots[-1]] == [("GUID", new_top), ("ParentGUID", TOP)]
    assert new_snaps.findtext("TopGUID") == new_top
    # The new elements are indented as their siblings are.
    text = desc.read_text()
    step = "    " if kind == "parallels-desktop" else "  "
    assert f"\n{step * 3}<Image>\n{step * 4}<GUID>{new_top}</GUID>\n" in text, text
    assert f"\n{step * 2}<Shot>\n{step * 3}<GUID>{new_top}</GUID>\n" in text, text
    assert f"\n{step}</Snapshots>\n</{after.tag}>" in text, text
    # The chain reads as before, through the new top.
    info = json.loads(prl("info", "--json", bundle).stdout)
    assert [layer["guid"] for layer in info["layers"]] == [new_top, TOP, BASE]
    with support.running(support.start_prlnbd(tmp_path, [f"d={bundle}"], "--read-only")) as srv:
        data = support.nbd_pread(srv.uri("d"), 0, 3 * M)
    assert data == b"\x11" * M + b"\x22" * M + b"\x11" * M


def encrypted(tmp: Path) -> Path:
    return make_bundle(tmp, "parallels-desktop", engine=ENGINE)


@pytest.mark.parametrize("command", ["serve", "info", "check", "snapshot"])
def test_parallels_encryption_is_refused(tmp_path: Path, command: str) -> None:
    bundle = encrypted(tmp_path)
    desc = bundle / "DiskDescriptor.xml"
    before = {p: support.file_digest(p) for p in bundle.iterdir()}
    args: list[str | Path] = [command]
    if command == "serve":
        args += ["--socket", tmp_path / "s.sock"]
    res = prl(*args, bundle, timeout=60)
    assert res.returncode == (2 if command == "check" else 1), res.stdout + res.stderr
    out = res.stdout + res.stderr
    assert "Traceback" not in out
    lines = [line for line in out.splitlines() if "Encryption/Engine" in line]
    assert len(lines) == 1, out
    assert str(desc) in lines[0] and ENGINE in lines[0] and "encrypt" in lines[0], lines[0]
    assert {p: support.file_digest(p) for p in bundle.iterdir()} == before


def test_ploop_key_id_is_served_as_stored(tmp_path: Path) -> None:
    # ploop's encryption is LUKS inside the image: prlnbd serves the bytes; clients decrypt.
    bundle = make_bundle(tmp_path, "ploop")
    info = json.loads(prl("info", "--json", bundle).stdout)
    assert info["encryption"] == {"key-id": "2b3c4d5e-6f70-4182-93a4-b5c6d7e8f901"}
    human = prl("info", bundle).stdout
    assert "2b3c4d5e-6f70-4182-93a4-b5c6d7e8f901" in human and "clients decrypt" in human
    (tmp_path / "pd").mkdir()
    plain = make_bundle(tmp_path / "pd", "parallels-desktop")  # an all-zero Engine: not encrypted
    assert json.loads(prl("info", "--json", plain).stdout)["encryption"] is None
