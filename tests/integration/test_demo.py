"""The main job: `prlnbd demo` builds a 3-layer disk and serves it to qemu-img and nbdcopy."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests import support


def test_demo_is_readable_by_qemu_img_and_nbdcopy(tmp_path: Path) -> None:
    sock = tmp_path / "demo.sock"
    log = tmp_path / "demo.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prlnbd", "demo", "--dir", str(tmp_path / "prlnbd-demo"), "--socket", str(sock)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = support.Server(proc, sock, log)
    with support.running(server):
        support.wait_for_socket(sock, proc, log)
        uri = f"nbd+unix:///demo?socket={sock}"
        support.run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, tmp_path / "a.raw")
        support.run("nbdcopy", uri, tmp_path / "b.raw")
        depth = support.run("nbdinfo", "--map=qemu:allocation-depth", uri).stdout
    assert server.proc.returncode == 0
    text = log.read_text()
    assert f"serving {uri}" in text and "nbdinfo --map" in text
    data = (tmp_path / "a.raw").read_bytes()
    assert data == (tmp_path / "b.raw").read_bytes() and len(data) == 64 * 1024 * 1024
    # Each cluster says where it comes from: upper layers hide lower ones.
    origin = {
        int(c): layer
        for c, layer in re.findall(rb"cluster +(\d+) comes from the ([\w-]+) layer", data)
    }
    assert origin[0] == b"root" and origin[5] == b"snapshot-1" and origin[6] == b"top" and origin[20] == b"top"
    assert "local" in depth and "backing depth 2" in depth and "backing depth 3" in depth
