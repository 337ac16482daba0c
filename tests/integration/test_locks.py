"""Image locks QEMU honours, both ways: prlnbd against qemu-io/qemu-img/qemu-nbd, and offline tools against a server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import support

pytestmark = pytest.mark.skipif(
    not all(support.have(t) for t in ("qemu-io", "qemu-img", "qemu-nbd")), reason="needs qemu-io, qemu-img, qemu-nbd"
)

M = 1024 * 1024
OLD = "11111111-2222-3333-4444-555555555555"
NEW = "66666666-7777-8888-9999-aaaaaaaaaaaa"


def prl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "prlnbd", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def bundle(tmp_path: Path) -> tuple[Path, Path]:
    """A new bundle and its top image file."""
    disk = tmp_path / "d.hdd"
    res = prl("create", disk, "--size", "8M")
    assert res.returncode == 0, res.stderr
    info = json.loads(prl("info", "--json", disk).stdout)
    return disk, Path(info["layers"][0]["file"])


def test_qemu_cannot_write_an_image_prlnbd_serves_but_can_read_it_sharing(tmp_path: Path) -> None:
    disk, top = bundle(tmp_path)
    with support.running(support.start_prlnbd(tmp_path, [f"d={disk}"])):
        res = support.run("qemu-io", "-f", "parallels", "-c", "write 0 512", top, check=False)
        assert res.returncode != 0
        assert 'Failed to get "write" lock' in res.stdout + res.stderr
        # A reader that shares everything (-U, as `qemu-img info -U`) is let in.
        support.run("qemu-io", "-r", "-U", "-f", "parallels", "-c", "read 0 512", top)
        assert "virtual size: 8 MiB" in support.run("qemu-img", "info", "-U", top).stdout
        # prlnbd's own read-only opens share everything too.
        assert prl("info", disk).returncode == 0
    # Once the server is gone, QEMU writes again.
    support.run("qemu-io", "-f", "parallels", "-c", "write 0 512", top)


def test_a_read_only_export_leaves_writing_to_qemu(tmp_path: Path) -> None:
    disk, top = bundle(tmp_path)
    with support.running(support.start_prlnbd(tmp_path, [f"d={disk}"], "--read-only")):
        support.run("qemu-io", "-f", "parallels", "-c", "write -P 7 0 512", top)


def test_prlnbd_refuses_an_image_qemu_nbd_writes(tmp_path: Path) -> None:
    disk, top = bundle(tmp_path)
    with support.running(support.start_qemu_nbd(tmp_path / "q", top)) as qemu:
        res = prl("serve", "--socket", tmp_path / "s.sock", f"d={disk}")
        assert res.returncode == 1
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1, res.stderr
        assert str(top) in lines[0]
        assert f"qemu-nbd, process {qemu.proc.pid}" in lines[0]
        assert "holds this image open for writing" in lines[0]
        # Offline tools that write are refused the same way; reading is not.
        res = prl("bitmap", disk, "add", NEW)
        assert res.returncode == 1 and f"qemu-nbd, process {qemu.proc.pid}" in res.stderr
        assert prl("bitmap", disk, "list").returncode == 0
        # Read-only, prlnbd shares everything and serves the image qemu-nbd writes.
        with support.running(support.start_prlnbd(tmp_path / "r", [f"d={disk}"], "--read-only")) as srv:
            assert support.nbd_size(srv.uri("d")) == 8 * M


def test_two_prlnbd_writers_exclude_each_other(tmp_path: Path) -> None:
    disk, top = bundle(tmp_path)
    with support.running(support.start_prlnbd(tmp_path, [f"d={disk}"])) as srv:
        res = prl("serve", "--socket", tmp_path / "second.sock", f"d={disk}")
        assert res.returncode == 1
        assert f"a prlnbd server, process {srv.proc.pid}" in res.stderr
        assert str(top) in res.stderr
        # A second read-only server is fine.
        with support.running(support.start_prlnbd(tmp_path / "ro", [f"d={disk}"], "--read-only")):
            pass


def test_offline_tools_that_write_refuse_a_served_disk(tmp_path: Path) -> None:
    disk, top = bundle(tmp_path)
    assert prl("bitmap", disk, "add", OLD).returncode == 0
    descriptor = (disk / "DiskDescriptor.xml").read_bytes()
    with support.running(support.start_prlnbd(tmp_path, [f"d={disk}"])) as srv:
        who = f"a prlnbd server, process {srv.proc.pid}"
        for args in (("snapshot", disk), ("bitmap", disk, "add", NEW), ("bitmap", disk, "remove", OLD),
                     ("bitmap", disk, "clear", OLD)):
            res = prl(*args)
            assert res.returncode == 1, (args, res.stdout, res.stderr)
            assert who in res.stderr and "prlnbd ctl" in res.stderr and str(top) in res.stderr, res.stderr
        res = prl("check", "--repair", disk)
        assert res.returncode == 2
        assert who in res.stdout and "not repaired" in res.stdout
        # Reading tools still work on the served disk.
        assert prl("bitmap", disk, "list").returncode == 0
        assert prl("check", disk).returncode in (0, 2)
    assert (disk / "DiskDescriptor.xml").read_bytes() == descriptor
    assert prl("snapshot", disk).returncode == 0
