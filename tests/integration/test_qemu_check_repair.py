"""`qemu-img check -r leaks` on an image prlnbd wrote with dirty bitmaps, and `prlnbd check --repair` after it.

QEMU 7.2 does not know the format extension: it counts the extension cluster and
bitmap clusters past the last data cluster as leaked, and `-r leaks` cuts them
off. prlnbd must then refuse the image with an error that says what to do, and
`prlnbd check --repair` must drop what was cut off, one line per bitmap,
keeping every guest byte (read by qemu before and after).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests import support

nbd = pytest.importorskip("nbd")

pytestmark = pytest.mark.skipif(
    not all(support.have(t) for t in ("qemu-img", "qemu-io", "qemu-nbd")), reason="qemu-utils is needed"
)

M1 = 1 << 20
SIZE = 64 * M1
NAMES = ["11111111-2222-3333-4444-555555555555", "66666666-7777-8888-9999-aaaaaaaaaaaa"]


def prl(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [support.PYTHON, "-m", "prlnbd", *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


def qemu_read(tmp: Path, img: Path) -> bytes:
    with support.running(support.start_qemu_nbd(tmp, img, "-r")) as q:
        return support.nbd_pread(q.uri())


def prl_write(tmp: Path, img: Path, writes: list[tuple[int, bytes]]) -> None:
    with support.running(support.start_prlnbd(tmp, [f"d={img}"])) as srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri("d"))
        for at, data in writes:
            h.pwrite(data, at)
        h.flush()
        h.shutdown()
    assert srv.proc.returncode == 0, srv.log_text()


def one_line_error(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


@pytest.mark.parametrize("case", ["bitmap-clusters", "extension-cluster"])
def test_qemu_img_check_r_leaks_then_prlnbd_check_repair(tmp_path: Path, case: str) -> None:
    img = tmp_path / "d.hds"
    support.run("qemu-img", "create", "-f", "parallels", img, str(SIZE))
    if case == "extension-cluster":
        # Data first, then the bitmaps: their extension cluster goes past the last data cluster.
        support.run("qemu-io", "-f", "parallels", "-c", "write -P 0x11 0 3M", img)
    for name in NAMES:
        assert prl("bitmap", img, "add", name).returncode == 0
    if case == "bitmap-clusters":
        # Writes through prlnbd mark the bitmaps; partly dirty, they are stored in clusters at the end.
        prl_write(tmp_path, img, [(5 * M1 + 7, b"x" * 100000), (M1, b"y" * 10)])
        marked = json.loads(prl("bitmap", img, "list", "--json").stdout)
        assert [b["dirty-bytes"] for b in marked] == [3 * 64 * 1024] * 2
    before = qemu_read(tmp_path / "q0", img)
    size0 = os.stat(img).st_size

    res = support.run("qemu-img", "check", "-f", "parallels", "-r", "leaks", img, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert os.stat(img).st_size < size0, "qemu-img check -r leaks cut nothing off: the case is not reproduced"

    # prlnbd refuses the image, in one line naming it (and, for cut bitmaps, what to do).
    for args in (["info", img], ["serve", "--socket", tmp_path / "s.sock", img]):
        line = one_line_error(prl(*args))
        assert str(img) in line
        if case == "bitmap-clusters":
            assert f"`prlnbd check --repair {img}` drops it" in line, line
    res = prl("check", img)
    assert res.returncode == 2 and "check --repair" in res.stdout, res.stdout
    res = prl("check", "--repair", img)
    assert res.returncode == 0, res.stdout + res.stderr
    fixed = [line for line in res.stdout.splitlines() if "[fixed]" in line]
    if case == "bitmap-clusters":
        # One line per bitmap dropped, naming it.
        assert len(fixed) == 2 and all(any(n in line for line in fixed) for n in NAMES), res.stdout
        assert all("fixed: the bitmap dropped" in line for line in fixed)
    else:
        assert len(fixed) == 1 and "ext_off cleared" in fixed[0], res.stdout

    # Clean for both checkers, every guest byte kept, and usable again: new bitmaps, new writes.
    assert prl("check", img).returncode == 0
    support.run("qemu-img", "check", "-f", "parallels", img)
    assert qemu_read(tmp_path / "q1", img) == before
    assert json.loads(prl("bitmap", img, "list", "--json").stdout) == []
    assert prl("bitmap", img, "add", NAMES[0]).returncode == 0
    prl_write(tmp_path / "again", img, [(9 * M1, b"z" * 3)])
    after = bytearray(before)
    after[9 * M1 : 9 * M1 + 3] = b"zzz"
    assert qemu_read(tmp_path / "q2", img) == bytes(after)
    assert json.loads(prl("bitmap", img, "list", "--json").stdout)[0]["dirty-bytes"] == 64 * 1024


def test_split_disk_repair_drops_a_cut_bitmap_from_every_piece(tmp_path: Path) -> None:
    """`qemu-img check -r leaks` on one piece of a split disk cuts that piece's part of a bitmap; `prlnbd check
    --repair` of the disk drops the bitmap from every piece (a bitmap is whole only in all of them), and the disk
    is served again."""
    disk = tmp_path / "s.hdd"
    size = 3 * 1024 * M1
    assert prl("create", disk, "--size", size, "--split").returncode == 0
    assert prl("bitmap", disk, "add", NAMES[0]).returncode == 0
    boundary = 3989504 * 512
    prl_write(tmp_path, disk, [(boundary - 100, b"z" * 200), (M1, b"y" * 10)])
    assert [b["name"] for b in json.loads(prl("bitmap", disk, "list", "--json").stdout)] == [NAMES[0]]
    first = sorted(disk.glob("*.0.*.hds"))[0]
    size0 = os.stat(first).st_size
    res = support.run("qemu-img", "check", "-f", "parallels", "-r", "leaks", first, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert os.stat(first).st_size < size0, "qemu-img check -r leaks cut nothing off: the case is not reproduced"
    rep = prl("check", disk, "--repair", "--json")
    assert rep.returncode == 0, rep.stdout + rep.stderr
    messages = [p["message"] for p in json.loads(rep.stdout)["problems"]]
    assert any("1 of the 2 pieces" in m and "removed from the others" in m for m in messages), messages
    assert prl("check", disk).returncode == 0
    assert json.loads(prl("bitmap", disk, "list", "--json").stdout) == []
    with support.running(support.start_prlnbd(tmp_path / "again", [f"d={disk}"])) as srv:
        assert support.nbd_pread(srv.uri("d"), boundary - 100, 200) == b"z" * 200
