"""Read path through real clients: qemu-img, qemu-io, nbdcopy, nbdinfo, socket activation,
TCP, several disks in one server."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests import support
from tests.support import Chain

pytestmark = pytest.mark.skipif(
    not all(support.have(t) for t in ("qemu-img", "qemu-io", "nbdinfo", "nbdcopy")),
    reason="qemu-utils and libnbd-bin are needed",
)

SIZE = 8 * 16 * 63 * 512  # 4128768
K64, M1, K252 = 64 << 10, 1 << 20, 258048


def chain_bundle(directory: Path, seed: int = 3) -> Chain:
    """A three-layer bundle (raw root, 1 MiB, 64 KiB clusters) with its descriptor."""
    layers = [(None, support.random_writes(seed, SIZE, M1, 3, 0x20)),
              (M1, support.random_writes(seed + 1, SIZE, M1, 3, 0x40)),
              (K64, [*support.random_writes(seed + 2, SIZE, K64, 5, 0x60), (0x99, 4097, 3)])]
    chain = support.build_chain(directory, SIZE, layers)
    support.write_descriptor(directory, chain.paths, SIZE)
    return chain


def single_image(path: Path, cluster: int = K252) -> tuple[Path, bytes]:
    """An expandable image and the bytes it holds."""
    writes = [(0x5A, 12345, 400000), (0xA5, SIZE - 777, 777)]
    support.make_parallels(path, SIZE, cluster, writes)
    return path, bytes(support.apply_writes(bytearray(SIZE), writes))


@pytest.fixture
def bundle(tmp_path: Path) -> Chain:
    return chain_bundle(tmp_path / "vm.hdd")


def test_qemu_img_convert(tmp_path: Path, bundle: Chain) -> None:
    out = tmp_path / "out.raw"
    with support.running(support.start_prlnbd(tmp_path, [str(bundle.paths[0].parent)])) as prl:
        support.run("qemu-img", "convert", "-f", "raw", "-O", "raw", prl.uri(), out)
    assert out.read_bytes() == bundle.expected_bytes()


def test_nbdcopy(tmp_path: Path, bundle: Chain) -> None:
    out = tmp_path / "out.raw"
    with support.running(support.start_prlnbd(tmp_path, [str(bundle.paths[0].parent)])) as prl:
        support.run("nbdcopy", prl.uri("vm.hdd"), out)
        support.run("nbdcopy", "--requests=16", "--connections=4", prl.uri(), tmp_path / "o4.raw")
    assert out.read_bytes() == bundle.expected_bytes()
    assert (tmp_path / "o4.raw").read_bytes() == bundle.expected_bytes()


def test_qemu_io_reads_patterns(tmp_path: Path) -> None:
    image, _ = single_image(tmp_path / "d.hds")
    with support.running(support.start_prlnbd(tmp_path, [str(image)])) as prl:
        res = support.run("qemu-io", "-r", "-f", "raw",
                          "-c", "read -P 0x5a 12345 400000",
                          "-c", "read -P 0 0 12345",
                          "-c", "read -P 0 412345 1000",
                          "-c", f"read -P 0xa5 {SIZE - 777} 777",
                          prl.uri())
        assert "Pattern verification failed" not in res.stdout + res.stderr
        bad = support.run("qemu-io", "-r", "-f", "raw", "-c", "read -P 0x5a 0 4096", prl.uri(),
                          check=False)
        assert "Pattern verification failed" in bad.stdout + bad.stderr


def test_nbdinfo_json(tmp_path: Path, bundle: Chain) -> None:
    disk = str(bundle.paths[0].parent)
    with support.running(support.start_prlnbd(tmp_path, [disk], "--read-only")) as prl:
        info = json.loads(support.run("nbdinfo", "--json", prl.uri()).stdout)
    (export,) = info["exports"]
    assert export["export-size"] == SIZE
    assert export["is_read_only"] is True
    assert {"base:allocation", "qemu:allocation-depth"} <= set(export["contexts"])
    assert info["structured"] is True


def test_several_disks_by_name(tmp_path: Path) -> None:
    chain = chain_bundle(tmp_path / "vm.hdd")
    other = chain_bundle(tmp_path / "other.hdd", seed=9)
    third = chain_bundle(tmp_path / "third.hdd", seed=11)
    image, image_bytes = single_image(tmp_path / "plain.hds")
    disks = {
        "a": str(tmp_path / "vm.hdd"),
        "b": str(image),
        "c": str(tmp_path / "third.hdd" / "DiskDescriptor.xml"),
    }
    args = [f"{k}={v}" for k, v in disks.items()] + [str(tmp_path / "other.hdd")]
    with support.running(support.start_prlnbd(tmp_path, args)) as prl:
        listed = json.loads(support.run("nbdinfo", "--list", "--json", prl.uri("a")).stdout)
        names = {e["export-name"] for e in listed["exports"]}
        assert names == {"a", "b", "c", "other.hdd"}
        sizes = {e["export-name"]: e["export-size"] for e in listed["exports"]}
        assert set(sizes.values()) == {SIZE}
        # What a remote client learns of each export: its name, layers and format, no server path.
        descriptions = {e["export-name"]: e.get("description", "") for e in listed["exports"]}
        assert descriptions["b"] == "b: Parallels disk, 1 layer, expandable image v2"
        assert all(str(tmp_path) not in d and d.startswith(f"{n}: Parallels disk, ") for n, d in descriptions.items())
        assert support.nbd_pread(prl.uri("a")) == chain.expected_bytes()
        assert support.nbd_pread(prl.uri("b")) == image_bytes
        assert support.nbd_pread(prl.uri("c")) == third.expected_bytes()
        assert support.nbd_pread(prl.uri("other.hdd")) == other.expected_bytes()
        assert support.nbdinfo_map(prl.uri("c"), "qemu:allocation-depth") == third.expected_depth()
        assert support.run("nbdinfo", prl.uri("nope"), check=False).returncode != 0
        text = support.run("nbdinfo", "--list", prl.uri("a")).stdout
        for name in names:
            assert f"export=\"{name}\"" in text or name in text


def test_default_names(tmp_path: Path) -> None:
    """One disk: reachable as "" and by the base name of its directory or file."""
    image, image_bytes = single_image(tmp_path / "solo.hds")
    with support.running(support.start_prlnbd(tmp_path, [str(image)])) as prl:
        assert support.nbd_pread(prl.uri()) == image_bytes
        assert support.nbd_pread(prl.uri("solo.hds")) == image_bytes
    chain = chain_bundle(tmp_path / "vm.hdd")
    with support.running(support.start_prlnbd(tmp_path, [str(tmp_path / "vm.hdd") + "/"])) as prl:
        assert support.nbd_pread(prl.uri("vm.hdd")) == chain.expected_bytes()


def test_socket_activation(tmp_path: Path, bundle: Chain) -> None:
    serve = [support.PYTHON, "-m", "prlnbd", "serve", str(bundle.paths[0].parent)]
    info = json.loads(support.run("nbdinfo", "--json", "--", "[", *serve, "]").stdout)
    assert info["exports"][0]["export-size"] == SIZE
    out = tmp_path / "out.raw"
    support.run("nbdcopy", "--", "[", *serve, "]", out)
    assert out.read_bytes() == bundle.expected_bytes()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_tcp(tmp_path: Path) -> None:
    image, image_bytes = single_image(tmp_path / "tcp.hds", K64)
    port = free_port()
    log = tmp_path / "tcp.log"
    with log.open("wb") as logf:
        proc = subprocess.Popen([support.PYTHON, "-m", "prlnbd", "serve", "--bind", "127.0.0.1",
                                 "--port", str(port), f"t={image}"],
                                stdout=logf, stderr=subprocess.STDOUT)
    server = support.Server(proc, tmp_path / "unused", log)
    with support.running(server):
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
        uri = f"nbd://127.0.0.1:{port}/t"
        assert support.nbd_pread(uri) == image_bytes
        res = support.run("qemu-img", "compare", "-f", "raw", "-F", "raw", uri, image, check=False)
        assert res.returncode == 1  # the image file is parallels, read as raw: differs
        # -U: prlnbd holds the image for writing, and a QEMU reader of a format image shares no writer.
        res = support.run("qemu-img", "compare", "-U", "-f", "raw", "-F", "parallels", uri, image)
        assert res.returncode == 0


def test_same_disk_twice(tmp_path: Path, bundle: Chain) -> None:
    """Two names for one disk: fine read-only; writable, a clean refusal that changes nothing."""
    disk = str(bundle.paths[0].parent)
    digests = [support.file_digest(p) for p in bundle.paths]
    with support.running(support.start_prlnbd(tmp_path, [f"x={disk}", f"y={disk}"],
                                              "--read-only")) as prl:
        assert support.nbd_pread(prl.uri("x")) == bundle.expected_bytes()
        assert support.nbd_pread(prl.uri("y")) == bundle.expected_bytes()
    try:
        prl = support.start_prlnbd(tmp_path, [f"x={disk}", f"y={disk}"])
    except RuntimeError as e:
        assert "Traceback" not in str(e)
        assert bundle.paths[-1].name in str(e) or "vm.hdd" in str(e)
    else:
        with support.running(prl):
            assert support.nbd_pread(prl.uri("y")) == bundle.expected_bytes()
    assert [support.file_digest(p) for p in bundle.paths] == digests
