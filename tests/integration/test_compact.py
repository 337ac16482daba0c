"""`prlnbd compact`: clusters moved into the holes TRIM left, the file cut short, the guest's bytes kept."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from prlnbd.disk.chain import open_disk
from prlnbd.image.parallels import ParallelsImage
from tests import support

nbd = pytest.importorskip("nbd")

pytestmark = pytest.mark.skipif(
    not all(support.have(t) for t in ("qemu-img", "qemu-nbd")), reason="qemu-utils is needed"
)

K64, M1 = 64 << 10, 1 << 20


def prlnbd(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [support.PYTHON, "-m", "prlnbd", *map(str, args)],
        capture_output=True, text=True, cwd=support.ROOT, timeout=120, check=False,
        env={**os.environ, **env} if env else None,
    )


def holey_image(tmp: Path, size: int = 32 * M1, data: int = 12 * M1) -> Path:
    """An image with a dirty bitmap whose extension cluster lies at the end, and TRIMmed holes before it."""
    img = support.make_parallels(tmp / "c.hds", size, K64)
    p = support.start_prlnbd(tmp, [f"c={img}"])
    with support.running(p):
        h = nbd.NBD()
        h.connect_uri(p.uri("c"))
        h.pwrite(bytes(b | 1 for b in os.urandom(data)), 0)
        h.shutdown()
    assert p.proc.returncode == 0
    assert prlnbd("bitmap", img, "add").returncode == 0  # its extension cluster goes at the end
    p = support.start_prlnbd(tmp, [f"c={img}"])
    with support.running(p):
        h = nbd.NBD()
        h.connect_uri(p.uri("c"))
        h.trim(4 * M1, M1)
        h.trim(M1, 7 * M1)
        h.pwrite(b"\x55" * 5000, size * 5 // 8 + 7)
        h.shutdown()
    assert p.proc.returncode == 0
    return img


def qemu_read(tmp: Path, img: Path) -> bytes:
    q = support.start_qemu_nbd(tmp, img, "--read-only")
    with support.running(q):
        return support.nbd_pread(q.uri(), 0, None)


def guest_bytes(img: Path) -> bytes:
    d = open_disk(img)
    try:
        buf, _ = d.read(0, d.size)
        return bytes(buf)
    finally:
        d.close()


def bitmaps(img: Path) -> list[object]:
    res = prlnbd("bitmap", img, "list", "--json")
    assert res.returncode == 0, res.stderr
    return list(json.loads(res.stdout))


def test_compact_round_trip_with_qemu_nbd(tmp_path: Path) -> None:
    img = holey_image(tmp_path)
    before_img = ParallelsImage.open(img)
    ext_before = before_img.header.ext_off
    before_img.close()
    before = qemu_read(tmp_path, img)
    marks = bitmaps(img)
    size0, blocks0 = os.stat(img).st_size, os.stat(img).st_blocks
    res = prlnbd("compact", img, "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    out = json.loads(res.stdout)
    st = os.stat(img)
    assert out["size-before"] == size0 and out["size-after"] == st.st_size < size0 - 4 * M1, out
    assert out["given-back"] == max(0, blocks0 * 512 - st.st_blocks * 512), out
    assert out["moved-clusters"] > 0
    assert qemu_read(tmp_path, img) == before
    assert bitmaps(img) == marks and marks and marks[0]["dirty-bytes"]  # type: ignore[index]
    after_img = ParallelsImage.open(img)
    assert after_img.header.ext_off < ext_before, "the extension cluster was moved down"
    after_img.close()
    chk = prlnbd("check", img, "--json")
    assert chk.returncode == 0 and json.loads(chk.stdout)["free-bytes"] == 0, chk.stdout
    support.run("qemu-img", "check", "-f", "parallels", img)
    # Nothing left to do: a second run moves nothing and prints what it gave back.
    res = prlnbd("compact", img)
    assert res.returncode == 0 and "moved 0 clusters" in res.stdout and "gave back 0 bytes" in res.stdout, res.stdout
    assert "compact: [" not in res.stderr  # no progress bar when stderr is not a terminal


def test_compact_refuses_an_image_in_use(tmp_path: Path) -> None:
    img = holey_image(tmp_path, data=2 * M1)
    p = support.start_prlnbd(tmp_path, [f"c={img}"])
    with support.running(p):
        res = prlnbd("compact", img)
        assert res.returncode == 1 and f"(a prlnbd server, process {p.proc.pid}) holds this image open" in res.stderr, (
            res.stderr
        )
    p = support.start_prlnbd(tmp_path, [f"c={img}"])
    p.stop(signal.SIGKILL)
    res = prlnbd("compact", img)
    assert res.returncode == 1 and "marked in use" in res.stderr, res.stderr


def test_compact_killed_at_every_step_reads_the_same(tmp_path: Path) -> None:
    """SIGKILL before each write and sync of a compaction in turn: the image always reads the same."""
    img = holey_image(tmp_path, size=8 * M1, data=4 * M1)
    original = tmp_path / "orig.hds"
    shutil.copyfile(img, original)
    expected = guest_bytes(original)
    step = 0
    while True:
        step += 1
        shutil.copyfile(original, img)
        res = prlnbd("compact", img, env={"PRLNBD_COMPACT_KILL_AT": str(step)})
        assert res.returncode in (0, -signal.SIGKILL), res.stderr
        assert guest_bytes(img) == expected, f"killed before step {step}"
        chk = prlnbd("check", img, "--json")
        report = json.loads(chk.stdout)
        assert chk.returncode in (0, 3) and all(p["kind"] == "leak" for p in report["problems"]), report
        qemu = support.run("qemu-img", "check", "-f", "parallels", img, check=False)
        assert qemu.returncode in (0, 3), qemu.stdout + qemu.stderr
        if res.returncode == 0:
            break
        assert prlnbd("compact", img).returncode == 0
        assert guest_bytes(img) == expected, f"compacted again after a kill before step {step}"
        assert prlnbd("check", img).returncode == 0
    assert step > 10


def test_compact_draws_a_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    img = holey_image(tmp_path, size=8 * M1, data=4 * M1)
    res, out = support.prlnbd_on_tty("compact", img)
    assert res.returncode == 0, out
    assert b"compact: [" in out and b"100.0%" in out, out
    assert "gave back" in res.stdout


def test_compact_a_bundle_compacts_its_top_image(tmp_path: Path) -> None:
    bundle = tmp_path / "b.hdd"
    assert prlnbd("create", bundle, "--size", "8M", "--cluster-size", "64K").returncode == 0
    p = support.start_prlnbd(tmp_path, [f"b={bundle}"])
    with support.running(p):
        h = nbd.NBD()
        h.connect_uri(p.uri("b"))
        h.pwrite(b"\x11" * (4 * M1), 0)
        h.flush()
        h.trim(2 * M1, 0)
        h.shutdown()
    assert p.proc.returncode == 0
    before = guest_bytes(bundle)
    res = prlnbd("compact", bundle, "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["moved-clusters"] == 32 and out["size-after"] == out["size-before"] - 2 * M1, out
    assert guest_bytes(bundle) == before
    assert prlnbd("check", bundle).returncode == 0
