"""Offline tools through the real command line: create, snapshot, check [--repair]."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

from lxml import etree

from tests import support

M = 1024 * 1024
K = 1024
SIZE = 16 * M
CS = 64 * K
BAT = 64  # the BAT starts right after the 64-byte header


def prl(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, "-m", "prlnbd", *map(str, args)], capture_output=True, text=True)
    if check and res.returncode != 0:
        raise AssertionError(f"prlnbd {args} failed ({res.returncode}): {res.stdout}{res.stderr}")
    return res


def check_json(path: Path, *extra: str) -> tuple[int, dict[str, object]]:
    res = prl("check", path, "--json", *extra, check=False)
    return res.returncode, json.loads(res.stdout)


def kinds(report: dict[str, object]) -> list[str]:
    problems = report["problems"]
    assert isinstance(problems, list)
    return sorted(p["kind"] for p in problems)


def qemu_check(path: Path) -> int:
    return support.run("qemu-img", "check", "-f", "parallels", path, check=False).returncode


def image_with_data(path: Path) -> Path:
    """A qemu-img-made image with clusters 0..3 written (64 KiB clusters)."""
    support.run("qemu-img", "create", "-q", "-f", "parallels", "-o", f"cluster_size={CS}", path, str(SIZE))
    for c in range(4):
        support.run("qemu-io", "-f", "parallels", "-c", f"write -P {0x10 + c} {c * CS} {CS}", path)
    return path


def bat_entry(path: Path, index: int) -> int:
    with path.open("rb") as f:
        f.seek(BAT + 4 * index)
        return int(struct.unpack("<I", f.read(4))[0])


def set_bat_entry(path: Path, index: int, value: int) -> None:
    with path.open("r+b") as f:
        f.seek(BAT + 4 * index)
        f.write(struct.pack("<I", value))


def read_guest(path: Path) -> bytes:
    out = path.with_suffix(".raw")
    support.run("qemu-img", "convert", "-f", "parallels", "-O", "raw", path, out)
    return out.read_bytes()


def test_create_bundle_and_single_image(tmp_path: Path) -> None:
    prl("create", tmp_path / "d.hdd", "--size", "64M", "--cluster-size", "256K")
    info = json.loads(prl("info", "--json", tmp_path / "d.hdd").stdout)
    assert info["virtual-size"] == 64 * M and len(info["layers"]) == 1
    assert info["layers"][0]["cluster-size"] == 256 * K
    assert qemu_check(Path(info["layers"][0]["file"])) == 0
    prl("create", tmp_path / "x.hds", "--size", "10M")
    assert qemu_check(tmp_path / "x.hds") == 0
    assert "10 MiB" in support.run("qemu-img", "info", "-f", "parallels", tmp_path / "x.hds").stdout
    # Refuses to overwrite, and refuses sizes the format cannot hold.
    assert prl("create", tmp_path / "x.hds", "--size", "10M", check=False).returncode == 1
    res = prl("create", tmp_path / "y.hds", "--size", "1000", check=False)
    assert res.returncode == 1 and "multiple of 512" in res.stderr and "Traceback" not in res.stderr


def test_snapshot_keeps_unknown_elements_and_chain(tmp_path: Path) -> None:
    bundle = tmp_path / "vm.hdd"
    prl("create", bundle, "--size", "16M", "--cluster-size", "64K")
    desc = bundle / "DiskDescriptor.xml"
    tree = etree.parse(str(desc))
    etree.SubElement(tree.getroot(), "Vendor_Extra", Attr="kept").text = "opaque"
    tree.write(str(desc))
    before = json.loads(prl("info", "--json", bundle).stdout)["top-guid"]
    out = prl("snapshot", bundle).stdout.splitlines()
    assert out[0] == f"snapshot {before}"
    after = json.loads(prl("info", "--json", bundle).stdout)
    assert after["top-guid"] != before and [x["guid"] for x in after["layers"]] == [after["top-guid"], before]
    root = etree.parse(str(desc)).getroot()
    extra = root.find("Vendor_Extra")
    assert extra is not None and extra.get("Attr") == "kept" and extra.text == "opaque"
    assert not [p for p in bundle.iterdir() if p.name.endswith(".tmp")]
    # A single image has no snapshots; an image in use cannot be frozen.
    prl("create", tmp_path / "one.hds", "--size", "1M")
    assert prl("snapshot", tmp_path / "one.hds", check=False).returncode == 1
    with support.running(support.start_prlnbd(tmp_path, [f"vm={bundle}"])) as srv:
        res = prl("snapshot", bundle, check=False)
        assert res.returncode == 1 and f"a prlnbd server, process {srv.proc.pid}" in res.stderr


def test_check_clean_then_unclean_flag(tmp_path: Path) -> None:
    img = image_with_data(tmp_path / "a.hds")
    rc, report = check_json(img)
    assert rc == 0 and report["problems"] == []
    with img.open("r+b") as f:
        f.seek(44)
        f.write(struct.pack("<I", 0x746F6E59))
    rc, report = check_json(img)
    assert rc == 2 and kinds(report) == ["in_use"]
    rc, report = check_json(img, "--repair")
    assert rc == 0 and report["repaired"] is True
    assert check_json(img)[0] == 0 and qemu_check(img) == 0


def test_check_leak_is_exit_3_and_repaired(tmp_path: Path) -> None:
    img = image_with_data(tmp_path / "a.hds")
    data = read_guest(img)
    with img.open("ab") as f:
        f.write(b"\xee" * 3 * CS)
    rc, report = check_json(img)
    assert rc == 3 and kinds(report) == ["leak"] and report["leaked-bytes"] == 3 * CS
    assert qemu_check(img) == 3  # qemu agrees it is a leak
    rc, _ = check_json(img, "--repair")
    assert rc == 0 and qemu_check(img) == 0 and read_guest(img) == data


def test_check_duplicate_entries_repaired_without_losing_data(tmp_path: Path) -> None:
    img = image_with_data(tmp_path / "a.hds")
    # Guest cluster 5 now shares guest cluster 1's host cluster: writing one would change the other.
    set_bat_entry(img, 5, bat_entry(img, 1))
    data = read_guest(img)
    assert data[5 * CS : 6 * CS] == bytes([0x11]) * CS
    rc, report = check_json(img)
    assert rc == 2 and "duplicate" in kinds(report)
    res = prl("serve", "--socket", tmp_path / "s.sock", img, check=False)
    assert res.returncode == 1 and "check --repair" in res.stderr
    rc, _ = check_json(img, "--repair")
    assert rc == 0 and bat_entry(img, 5) != bat_entry(img, 1)
    assert read_guest(img) == data and qemu_check(img) == 0


def test_check_cluster_outside_image(tmp_path: Path) -> None:
    img = image_with_data(tmp_path / "a.hds")
    end = os.path.getsize(img)
    set_bat_entry(img, 9, (end + 10 * CS) // CS)  # v2: entries count clusters
    rc, report = check_json(img)
    assert rc == 2 and "outside" in kinds(report)
    data = read_guest(img)
    rc, report = check_json(img, "--repair")
    assert rc == 0 and qemu_check(img) == 0
    # Still mapped (a layer below would show through an unmapped cluster), still zeros.
    assert bat_entry(img, 9) != 0 and read_guest(img) == data
    assert "zeros" in json.dumps(report)


def test_check_repair_keeps_the_data_of_a_cluster_cut_short(tmp_path: Path) -> None:
    img = image_with_data(tmp_path / "a.hds")
    end = os.path.getsize(img)
    # The last cluster (guest cluster 3) loses its second half: served as 32 KiB of data, then zeros.
    os.truncate(img, end - CS // 2)
    expected = bytearray(SIZE)
    for c in range(4):
        expected[c * CS : (c + 1) * CS] = bytes([0x10 + c]) * CS
    expected[3 * CS + CS // 2 : 4 * CS] = bytes(CS // 2)
    with support.running(support.start_prlnbd(tmp_path, [f"a={img}"], "--read-only")) as srv:
        assert support.nbd_pread(srv.uri("a")) == expected
    rc, report = check_json(img)
    assert rc == 2 and kinds(report) == ["outside"]
    rc, report = check_json(img, "--repair")
    assert rc == 0, report
    assert "data kept" in json.dumps(report)
    assert bat_entry(img, 3) != 0 and read_guest(img) == expected and qemu_check(img) == 0


def test_check_bad_header_and_chain(tmp_path: Path) -> None:
    img = image_with_data(tmp_path / "a.hds")
    with img.open("r+b") as f:
        f.write(b"NotAParallelsImg")
    rc, report = check_json(img)
    assert rc == 2 and kinds(report) == ["header"]
    bundle = tmp_path / "b.hdd"
    prl("create", bundle, "--size", "16M")
    layer = next(bundle.glob("*.hds"))
    layer.unlink()
    rc, report = check_json(bundle)
    assert rc == 2 and kinds(report) == ["chain"]
    assert "missing" in json.dumps(report) or "No such" in json.dumps(report)


def test_check_refuses_a_size_nbd_cannot_carry(tmp_path: Path) -> None:
    img = image_with_data(tmp_path / "a.hds")
    with img.open("r+b") as f:
        f.seek(36)
        f.write(struct.pack("<Q", 1 << 55))  # 2^64 bytes
    rc, report = check_json(img)
    assert rc == 2 and kinds(report) == ["header"], report
    assert "nb_sectors" in json.dumps(report)


def test_check_refuses_a_chain_longer_than_the_limit(tmp_path: Path) -> None:
    bundle = tmp_path / "long.hdd"
    layers = [support.DescImage(f"long.hdd.{i}.hds", "Compressed") for i in range(257)]
    support.write_descriptor(bundle, layers, SIZE, blocksize=128)
    rc, report = check_json(bundle)
    assert rc == 2 and kinds(report) == ["chain"] and "257 layers" in json.dumps(report), report


def header_data_off(path: Path) -> int:
    with path.open("rb") as f:
        f.seek(48)
        return int(struct.unpack("<I", f.read(4))[0])


def set_data_off(path: Path, sectors: int) -> None:
    with path.open("r+b") as f:
        f.seek(48)
        f.write(struct.pack("<I", sectors))


def test_check_repairs_a_data_off_inside_the_bat(tmp_path: Path) -> None:
    img = image_with_data(tmp_path / "a.hds")
    good = header_data_off(img)
    assert good == CS // 512  # header and BAT fit in the first cluster
    set_data_off(img, 1)  # byte 512: inside the BAT
    expected = read_guest(img)
    res = prl("serve", "--socket", tmp_path / "s.sock", img, check=False)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "data_off 1" in res.stderr and str(img) in res.stderr and "check --repair" in res.stderr, res.stderr
    rc, report = check_json(img)
    assert rc == 2 and kinds(report) == ["data_off"], report
    assert header_data_off(img) == 1  # a check without --repair writes nothing
    rc, report = check_json(img, "--repair")
    assert rc == 0, report
    # As QEMU's check: data_off becomes the end of the BAT, rounded up to a cluster.
    assert header_data_off(img) == good
    assert read_guest(img) == expected and qemu_check(img) == 0
    assert check_json(img)[0] == 0


def test_check_repair_of_data_off_keeps_clusters_that_lie_below_it(tmp_path: Path) -> None:
    # A 2 GiB disk: 32768 BAT entries end at byte 131136, so data starts at cluster 3 (byte 196608).
    img = tmp_path / "big.hds"
    support.run("qemu-img", "create", "-q", "-f", "parallels", "-o", f"cluster_size={CS}", img, str(2 << 30))
    support.run("qemu-io", "-f", "parallels", "-c", f"write -P 0x31 0 {CS}", "-c", f"write -P 0x32 {CS} {CS}", img)
    assert header_data_off(img) == 3 * CS // 512
    # A writer that took data_off for byte 32768 put guest cluster 7 at host cluster 2, over the
    # BAT's tail and the padding after it.
    with img.open("r+b") as f:
        f.seek(131136)
        f.write(b"\x77" * (3 * CS - 131136))
    set_data_off(img, 32768 // 512)
    set_bat_entry(img, 7, 2)
    expected = read_guest(img)
    assert expected[7 * CS : 7 * CS + 64] == bytes(64) and expected[7 * CS + 64 : 8 * CS] == b"\x77" * (CS - 64)
    rc, report = check_json(img)
    assert rc == 2 and kinds(report) == ["below_data", "data_off"], report
    rc, report = check_json(img, "--repair")
    assert rc == 0, report
    assert "copied" in json.dumps(report)
    assert header_data_off(img) == 3 * CS // 512
    assert bat_entry(img, 7) >= 3 and bat_entry(img, 7) not in (bat_entry(img, 0), bat_entry(img, 1))
    assert read_guest(img) == expected and qemu_check(img) == 0 and check_json(img)[0] == 0
