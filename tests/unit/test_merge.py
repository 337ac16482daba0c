"""Snapshot merge engine: the choice of direction, what is refused, and the descriptor rewrite."""

from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree

from prlnbd.disk.chain import open_chain, open_disk
from prlnbd.disk.descriptor import ZERO_GUID, build_descriptor, parse_descriptor, save_descriptor
from prlnbd.disk.merge import MergeCopy, MergePlan, commit_merge, plan_merge, rewrite_descriptor
from prlnbd.disk.tools import create_disk, snapshot_disk
from prlnbd.errors import DescriptorError
from prlnbd.image.create import write_image

K64 = 64 * 1024
SIZE = 4 * 1024 * 1024

ROOT = "{11111111-1111-1111-1111-111111111111}"
MID = "{22222222-2222-2222-2222-222222222222}"
TOP = "{33333333-3333-3333-3333-333333333333}"


def write(disk_path: Path, clusters: range, value: int) -> None:
    """Write whole 64 KiB clusters of VALUE into the top of the disk."""
    disk = open_disk(disk_path, writable=True)
    try:
        for c in clusters:
            disk.write(c * K64, bytes([value]) * K64)
    finally:
        disk.close()


def chain(tmp_path: Path, clusters: list[range]) -> tuple[Path, list[str]]:
    """A bundle whose layers, root first, hold CLUSTERS; returns it and its GUIDs, root first (the last the top)."""
    disk = tmp_path / "d.hdd"
    create_disk(disk, SIZE, K64)
    guids = []
    for i, cl in enumerate(clusters):
        write(disk, cl, i + 1)
        if i + 1 < len(clusters):
            guids.append(snapshot_disk(disk)[0])
    guids.append(parse_descriptor(disk).top_guid)
    return disk, guids


def test_down_when_the_merged_snapshot_holds_less(tmp_path: Path) -> None:
    disk, (root, mid, top) = chain(tmp_path, [range(0, 2), range(0, 20), range(30, 31)])
    plan = plan_merge(parse_descriptor(disk), root)
    # The root's 2 clusters are hidden by the child: nothing to pull down; up would write 20.
    assert (plan.direction, plan.down_bytes, plan.up_bytes) == ("down", 0, 20 * K64)
    assert (plan.guid, plan.child, plan.parent) == (root, mid, ZERO_GUID)
    assert plan.target.guid == mid and plan.source.guid == root
    assert plan.delete == [plan.source.file]
    # The middle one: 20 clusters to pull down into the top, against its 1 to write up.
    plan = plan_merge(parse_descriptor(disk), mid)
    assert (plan.direction, plan.down_bytes, plan.up_bytes) == ("up", 20 * K64, K64)
    assert plan.child == top and plan.parent == root


def test_up_when_the_child_holds_less(tmp_path: Path) -> None:
    disk, (root, mid, top) = chain(tmp_path, [range(0, 2), range(0, 20), range(30, 32)])
    plan = plan_merge(parse_descriptor(disk), mid)
    assert (plan.direction, plan.down_bytes, plan.up_bytes) == ("up", 20 * K64, 2 * K64)
    # Up: the merged snapshot's image is written, the child's file goes.
    assert plan.target.guid == mid and plan.source.guid == top
    assert plan.delete == [plan.source.file] and plan.child_is_top
    assert plan.parts[0].target_chain[0].guid == mid and [e.guid for e in plan.parts[0].target_chain] == [mid, root]


def test_online_never_merges_up_into_the_top(tmp_path: Path) -> None:
    disk, (root, mid, top) = chain(tmp_path, [range(0, 2), range(0, 20), range(30, 32)])
    desc = parse_descriptor(disk)
    assert plan_merge(desc, mid).direction == "up"
    online = plan_merge(desc, mid, online=True)
    assert online.direction == "down" and online.target.guid == top and online.source.guid == mid
    with pytest.raises(DescriptorError, match="the top, is served"):
        plan_merge(desc, mid, online=True, direction="up")
    # Below the top's parent, online may merge up: the child is a frozen snapshot.
    assert plan_merge(desc, root, online=True, direction="up").direction == "up"


def test_the_top_and_unknown_snapshots_are_refused(tmp_path: Path) -> None:
    disk, (_, mid, top) = chain(tmp_path, [range(0, 1), range(1, 2), range(2, 3)])
    desc = parse_descriptor(disk)
    with pytest.raises(DescriptorError, match=r"is the top \(TopGUID\)") as e:
        plan_merge(desc, top)
    assert str(desc.path) in str(e.value) and top in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DescriptorError, match=r"snapshot \{99999999-9999-9999-9999-999999999999\} is not in Snapshots"):
        plan_merge(desc, "99999999-9999-9999-9999-999999999999")
    # GUIDs are matched however they are spelled.
    assert plan_merge(desc, mid.upper().strip("{}")).guid == mid


def test_a_plain_layer_is_refused(tmp_path: Path) -> None:
    bundle = tmp_path / "p.hdd"
    bundle.mkdir()
    (bundle / "root.raw").write_bytes(bytes(SIZE))
    write_image(bundle / "mid.hds", SIZE, cluster_size=K64)
    write_image(bundle / "top.hds", SIZE, cluster_size=K64)
    tree = build_descriptor(
        SIZE, K64, [(TOP, "Compressed", "top.hds"), (MID, "Compressed", "mid.hds"), (ROOT, "Plain", "root.raw")]
    )
    save_descriptor(tree, bundle / "DiskDescriptor.xml")
    desc = parse_descriptor(bundle)
    with pytest.raises(DescriptorError, match=r"root\.raw, merged\) is Plain: a plain \(raw\) layer cannot be merged"):
        plan_merge(desc, ROOT)
    # The layer above a raw root merges: its child and it are expandable.
    assert plan_merge(desc, MID).parent == ROOT


def test_a_snapshot_with_two_children_is_refused(tmp_path: Path) -> None:
    bundle = tmp_path / "b.hdd"
    bundle.mkdir()
    for name in ("root", "mid", "top", "side"):
        write_image(bundle / f"{name}.hds", SIZE, cluster_size=K64)
    side = "{44444444-4444-4444-4444-444444444444}"
    tree = build_descriptor(
        SIZE, K64, [(TOP, "Compressed", "top.hds"), (MID, "Compressed", "mid.hds"), (ROOT, "Compressed", "root.hds")]
    )
    root_el = tree.getroot()
    storage = root_el.find("StorageData/Storage")
    snaps = root_el.find("Snapshots")
    assert storage is not None and snaps is not None
    image = etree.SubElement(storage, "Image")
    for tag, text in (("GUID", side), ("Type", "Compressed"), ("File", "side.hds")):
        etree.SubElement(image, tag).text = text
    shot = etree.SubElement(snaps, "Shot")
    etree.SubElement(shot, "GUID").text = side
    etree.SubElement(shot, "ParentGUID").text = ROOT
    save_descriptor(tree, bundle / "DiskDescriptor.xml")
    with pytest.raises(DescriptorError, match=r"has 2 children"):
        plan_merge(parse_descriptor(bundle), ROOT)


# A descriptor as another program may write it: attributes, comments, unknown elements,
# odd spacing and spellings; only the merged snapshot's elements may change.
FOREIGN = """<?xml version='1.0' encoding='UTF-8'?>
<Parallels_disk_image Version="1.0" Vendor="x">
    <Disk_Parameters>
        <Disk_size>8192</Disk_size>
        <Cylinders>8</Cylinders>
        <Heads>16</Heads>
        <Sectors>64</Sectors>
        <Padding>0</Padding>
        <Miscellaneous><CompatLevel>level2</CompatLevel>  <Ext a="1"/></Miscellaneous>
    </Disk_Parameters>
    <StorageData>
        <Storage>
            <Start>0</Start>
            <End>8192</End>
            <Blocksize>128</Blocksize>
            <!-- the root -->
            <Image>
                <GUID>11111111-1111-1111-1111-111111111111</GUID>
                <Type>Compressed</Type>
                <File>root.hds</File>
                <Unknown keep="me">root</Unknown>
            </Image>
            <Image>
                <GUID>{22222222-2222-2222-2222-222222222222}</GUID>
                <Type>Compressed</Type>
                <File>mid.hds</File>
            </Image>
            <Image>
                <GUID>{33333333-3333-3333-3333-333333333333}</GUID>
                <Type>Compressed</Type>
                <File>top.hds</File>
                <Flags>7</Flags>
            </Image>
        </Storage>
    </StorageData>
    <Snapshots Count="3">
        <TopGUID>{33333333-3333-3333-3333-333333333333}</TopGUID>
        <Shot>
            <GUID>11111111-1111-1111-1111-111111111111</GUID>
            <ParentGUID>{00000000-0000-0000-0000-000000000000}</ParentGUID>
            <Name>base</Name>
        </Shot>
        <Shot>
            <GUID>{22222222-2222-2222-2222-222222222222}</GUID>
            <ParentGUID>11111111-1111-1111-1111-111111111111</ParentGUID>
        </Shot>
        <Shot>
            <GUID>{33333333-3333-3333-3333-333333333333}</GUID>
            <ParentGUID>{22222222-2222-2222-2222-222222222222}</ParentGUID>
            <Name>now</Name>
        </Shot>
    </Snapshots>
    <Trailer>kept</Trailer>
</Parallels_disk_image>"""

MID_IMAGE = """
            <Image>
                <GUID>{22222222-2222-2222-2222-222222222222}</GUID>
                <Type>Compressed</Type>
                <File>mid.hds</File>
            </Image>"""
MID_SHOT = """
        <Shot>
            <GUID>{22222222-2222-2222-2222-222222222222}</GUID>
            <ParentGUID>11111111-1111-1111-1111-111111111111</ParentGUID>
        </Shot>"""
TOP_PARENT = "<ParentGUID>{22222222-2222-2222-2222-222222222222}</ParentGUID>"


def foreign_plan(tmp_path: Path, guid: str, direction: str) -> tuple[MergePlan, Path]:
    path = tmp_path / "DiskDescriptor.xml"
    path.write_text(FOREIGN)
    desc = parse_descriptor(path)
    child = next(g for g, p in desc.parents.items() if p == guid)
    plan = MergePlan(desc, guid, child, desc.parents[guid], "down" if direction == "down" else "up", [], 0, 0, False)
    return plan, path


def saved(tree: etree._ElementTree, path: Path) -> str:
    save_descriptor(tree, path)
    return path.read_text()


def test_rewrite_down_removes_only_the_merged_snapshot(tmp_path: Path) -> None:
    plan, path = foreign_plan(tmp_path, MID, "down")
    out = saved(rewrite_descriptor(plan.descriptor.tree, plan), path)
    want = (
        FOREIGN.replace(MID_IMAGE, "")
        .replace(MID_SHOT, "")
        .replace(TOP_PARENT, "<ParentGUID>11111111-1111-1111-1111-111111111111</ParentGUID>")
    )
    assert out.split("\n", 1)[1] == want.split("\n", 1)[1]
    desc = parse_descriptor(path)
    assert desc.parents == {"{11111111-1111-1111-1111-111111111111}": ZERO_GUID, TOP: ROOT}
    assert [e.file.name for e in desc.chain()] == ["top.hds", "root.hds"]


def test_rewrite_up_gives_the_child_the_merged_file(tmp_path: Path) -> None:
    plan, path = foreign_plan(tmp_path, MID, "up")
    out = saved(rewrite_descriptor(plan.descriptor.tree, plan), path)
    want = (
        FOREIGN.replace(MID_IMAGE, "")
        .replace(MID_SHOT, "")
        .replace(TOP_PARENT, "<ParentGUID>11111111-1111-1111-1111-111111111111</ParentGUID>")
        .replace("<File>top.hds</File>", "<File>mid.hds</File>")
    )
    assert out.split("\n", 1)[1] == want.split("\n", 1)[1]
    assert [e.file.name for e in parse_descriptor(path).chain()] == ["mid.hds", "root.hds"]


def test_rewrite_of_the_root_makes_the_child_the_root(tmp_path: Path) -> None:
    plan, path = foreign_plan(tmp_path, ROOT, "down")
    out = saved(rewrite_descriptor(plan.descriptor.tree, plan), path)
    assert "<Name>base</Name>" not in out and "<Unknown" not in out and "<!-- the root -->" in out
    assert "<Flags>7</Flags>" in out and '<Miscellaneous><CompatLevel>level2</CompatLevel>  <Ext a="1"/>' in out
    desc = parse_descriptor(path)
    assert desc.parents == {MID: ZERO_GUID, TOP: MID}
    # The original tree is left as it was: the rewrite works on a copy.
    assert b"root.hds" in etree.tostring(plan.descriptor.tree)


def test_copy_down_is_idempotent_and_keeps_the_child(tmp_path: Path) -> None:
    disk, (root, mid, _) = chain(tmp_path, [range(0, 6), range(2, 4), range(5, 6)])
    desc = parse_descriptor(disk)
    plan = plan_merge(desc, root, direction="down")
    before = open_disk(disk, snapshot=mid)
    want = bytes(before.read(0, SIZE)[0])
    before.close()
    for _ in range(2):  # a second copy finds nothing left to pull
        target = open_chain(desc, plan.parts[0].target_chain, writable=True)
        try:
            mc = MergeCopy(plan, target, target.layers[1])
            total = mc.total
            copied = 0
            while n := mc.step(K64):
                assert n == K64
                copied += n
            mc.finish()
            assert copied == total and mc.finished
            assert bytes(target.read(0, SIZE)[0]) == want
        finally:
            target.close()
    assert total == 0  # the second round


def test_check_reports_a_leftover_journal_as_a_notice(tmp_path: Path) -> None:
    from prlnbd.disk.merge import JOURNAL_NAME, begin_merge
    from prlnbd.disk.tools import check_disk

    disk, (root, _, _) = chain(tmp_path, [range(0, 2), range(0, 3), range(5, 6)])
    begin_merge(plan_merge(parse_descriptor(disk), root))
    assert (disk / JOURNAL_NAME).exists()
    report = check_disk(disk)
    notes = [f for f in report.findings if f.kind == "merge"]
    assert len(notes) == 1 and root in notes[0].message and f"prlnbd merge {disk} {root}" in notes[0].message
    assert report.exit_code == 0
    # Opening the disk is not confused by it either.
    open_disk(disk).close()


def test_copy_down_never_overwrites_what_the_child_got_meanwhile(tmp_path: Path) -> None:
    """Online, guest writes reach the child during the copy: a cluster written first is not pulled over."""
    disk, (root, mid, _) = chain(tmp_path, [range(0, 1), range(0, 8), range(20, 21)])
    desc = parse_descriptor(disk)
    plan = plan_merge(desc, mid, online=True)
    assert plan.direction == "down" and plan.child_is_top
    target = open_disk(disk, writable=True)  # the served disk: the top over mid over root
    try:
        mc = MergeCopy(plan, target, target.layers[1])
        assert mc.total == 8 * K64
        target.write(3 * K64 + 10, b"\xee" * 100)  # a guest write after the plan, before the copy
        while mc.step(3 * K64):
            pass
        mc.finish()
        data = bytes(target.read(0, SIZE)[0])
    finally:
        target.close()
    want = bytearray([2]) * (8 * K64) + bytes(SIZE - 8 * K64)
    want[3 * K64 + 10 : 3 * K64 + 110] = b"\xee" * 100
    want[20 * K64 : 21 * K64] = bytes([3]) * K64
    assert data == bytes(want)
    assert commit_merge(plan) == [plan.source.file] and not plan.source.file.exists()
    after = open_disk(disk)
    try:
        assert bytes(after.read(0, SIZE)[0]) == bytes(want)
        assert after.guids == [plan.child, root]
    finally:
        after.close()
