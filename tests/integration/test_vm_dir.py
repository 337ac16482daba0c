"""A Parallels VM directory (NAME.pvm: config.pvs and one .hdd bundle per disk) given to
`serve` exports each disk under its bundle's name; `info` lists them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import support

M = 1024 * 1024
CONFIG = """<?xml version="1.0" encoding="UTF-8"?>
<ParallelsVirtualMachine dyn_lists="VirtualAppliance 0" schemaVersion="1.0">
   <Identification dyn_lists="">
      <VmUuid>{6a3f2b1c-9d8e-4f70-a1b2-c3d4e5f60718}</VmUuid>
      <VmName>Test VM</VmName>
   </Identification>
   <Hardware dyn_lists="Hdd 2">
      <Hdd id="0" dyn_lists="Partition 0">
         <SystemName>harddisk.hdd</SystemName>
         <UserFriendlyName>harddisk.hdd</UserFriendlyName>
      </Hdd>
      <Hdd id="1" dyn_lists="Partition 0">
         <SystemName>harddisk1.hdd</SystemName>
         <UserFriendlyName>harddisk1.hdd</UserFriendlyName>
      </Hdd>
   </Hardware>
</ParallelsVirtualMachine>
"""


def prl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "prlnbd", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def make_vm(tmp: Path, name: str = "Test VM.pvm") -> Path:
    """A VM directory with two disks of different sizes and contents, and files that are not disks."""
    vm = tmp / name
    vm.mkdir(parents=True)
    (vm / "config.pvs").write_text(CONFIG)
    (vm / "config.pvs.backup").write_text(CONFIG)
    (vm / "Test VM-0.mem.sav").write_bytes(b"")
    (vm / "NVRAM.dat").write_bytes(bytes(1024))
    (vm / "Snapshots").mkdir()
    for i, (disk, size, pattern) in enumerate((("harddisk.hdd", 8 * M, 0x41), ("harddisk1.hdd", 4 * M, 0x42))):
        res = prl("create", vm / disk, "--size", str(size), "--cluster-size", "64K")
        assert res.returncode == 0, res.stderr
        image = next((vm / disk).glob("*.hds"))
        support.qemu_io_write(image, [(pattern, i * M, M)])
    return vm


def test_serve_a_vm_directory_exports_every_disk(tmp_path: Path) -> None:
    vm = make_vm(tmp_path)
    with support.running(support.start_prlnbd(tmp_path, [str(vm)], "--read-only")) as srv:
        listing = support.run("nbdinfo", "--list", "--json", srv.uri()).stdout
        exports = {e["export-name"]: e["export-size"] for e in json.loads(listing)["exports"]}
        assert exports == {"harddisk.hdd": 8 * M, "harddisk1.hdd": 4 * M}
        assert support.nbd_pread(srv.uri("harddisk.hdd"), 0, M) == b"\x41" * M
        assert support.nbd_pread(srv.uri("harddisk1.hdd"), M, M) == b"\x42" * M
        assert support.nbd_pread(srv.uri("harddisk1.hdd"), 0, M) == bytes(M)


def test_vm_directory_with_a_name_prefixes_its_exports(tmp_path: Path) -> None:
    # Two VMs both hold harddisk.hdd: NAME=VM.pvm keeps their exports apart.
    a, b = make_vm(tmp_path / "a"), make_vm(tmp_path / "b")
    res = prl("serve", "--socket", tmp_path / "x.sock", a, b)
    assert res.returncode == 1 and "harddisk.hdd" in res.stderr and "Traceback" not in res.stderr
    with support.running(support.start_prlnbd(tmp_path, [f"a={a}", f"b={b}"], "--read-only")) as srv:
        listing = json.loads(support.run("nbdinfo", "--list", "--json", srv.uri()).stdout)
        names = sorted(e["export-name"] for e in listing["exports"])
        assert names == ["a/harddisk.hdd", "a/harddisk1.hdd", "b/harddisk.hdd", "b/harddisk1.hdd"]
        assert support.nbd_pread(srv.uri("b/harddisk1.hdd"), M, M) == b"\x42" * M


def test_info_on_a_vm_directory_lists_its_disks(tmp_path: Path) -> None:
    vm = make_vm(tmp_path)
    doc = json.loads(prl("info", "--json", vm).stdout)
    assert doc["format"] == "parallels-vm" and doc["path"] == str(vm)
    assert [(d["name"], d["virtual-size"]) for d in doc["disks"]] == [("harddisk.hdd", 8 * M), ("harddisk1.hdd", 4 * M)]
    assert all(len(d["layers"]) == 1 for d in doc["disks"])
    human = prl("info", vm).stdout
    assert "disk harddisk.hdd" in human and "disk harddisk1.hdd" in human and "8 MiB" in human, human


def test_check_on_a_vm_directory_checks_every_disk(tmp_path: Path) -> None:
    vm = make_vm(tmp_path)
    res = prl("check", vm)
    assert res.returncode == 0 and "No errors" in res.stdout, res.stdout + res.stderr
    image = next((vm / "harddisk1.hdd").glob("*.hds"))
    with image.open("ab") as f:
        f.write(bytes(64 * 1024))
    res = prl("check", "--json", vm)
    assert res.returncode == 3, res.stdout + res.stderr
    assert [p["file"] for p in json.loads(res.stdout)["problems"]] == [str(image)]


@pytest.mark.parametrize("command", ["serve", "info"])
def test_vm_directory_without_disks_is_an_error(tmp_path: Path, command: str) -> None:
    vm = tmp_path / "Empty.pvm"
    vm.mkdir()
    (vm / "config.pvs").write_text(CONFIG)
    (vm / "stray.hdd").mkdir()  # a bundle directory without a descriptor is not a disk
    args: list[str | Path] = [command, *(["--socket", tmp_path / "s.sock"] if command == "serve" else []), vm]
    res = prl(*args)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and str(vm) in lines[0] and "no disk" in lines[0], lines


def test_vm_directory_symlink_to_a_bundle_elsewhere_needs_the_option(tmp_path: Path) -> None:
    vm = make_vm(tmp_path)
    other = tmp_path / "secret.hdd"
    assert prl("create", other, "--size", "1M").returncode == 0
    (vm / "linked.hdd").symlink_to(other)
    res = prl("info", vm)
    assert res.returncode == 1 and "linked.hdd" in res.stderr and "outside" in res.stderr, res.stderr
    doc = json.loads(prl("info", "--json", "--allow-outside-bundle", vm).stdout)
    assert [d["name"] for d in doc["disks"]] == ["harddisk.hdd", "harddisk1.hdd", "linked.hdd"]
