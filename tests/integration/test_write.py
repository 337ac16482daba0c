"""Write path: prlnbd against qemu-nbd on single images, copy-on-write into a snapshot
chain against a Python model, zero/trim semantics, concurrency, durability and errors."""

from __future__ import annotations

import errno
import os
import random
import re
import resource
import signal
import struct
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from prlnbd.disk.descriptor import build_descriptor, new_guid, save_descriptor
from prlnbd.image.create import write_image
from prlnbd.image.parallels import ParallelsImage
from tests import support
from tests.support import Server

nbd = pytest.importorskip("nbd")

pytestmark = pytest.mark.skipif(
    not all(support.have(t) for t in ("qemu-img", "qemu-nbd", "nbdinfo")),
    reason="qemu-utils and libnbd-bin are needed",
)

K64, K256, M1 = 64 << 10, 256 << 10, 1 << 20
IN_USE_OFFSET = 44
IN_USE_OPEN = 0x746F6E59
DEPTH = "qemu:allocation-depth"
BASE = "base:allocation"
HOLE_ZERO = 3


# ---------------------------------------------------------------- helpers


def connect(uri: str, *, strict: bool = True, align: bool = True) -> nbd.NBD:
    """A libnbd handle on URI; without STRICT, libnbd sends even requests it would refuse itself.

    Without ALIGN it sends requests below the server's minimum block size: qemu-nbd
    advertises 512 for Parallels images but does read-modify-write for smaller ones.
    """
    h = nbd.NBD()
    if not strict:
        h.set_strict_mode(0)
    elif not align:
        h.set_strict_mode(nbd.STRICT_MASK & ~nbd.STRICT_ALIGN)
    h.connect_uri(uri)
    return h


def nbd_errno(fn: object, *args: object) -> int:
    """Call a libnbd method that must fail; return the errno the server answered."""
    with pytest.raises(nbd.Error) as ei:
        fn(*args)  # type: ignore[operator]
    return int(ei.value.errnum)


def pread_all(h: nbd.NBD, size: int, chunk: int = 4 << 20) -> bytes:
    return b"".join(h.pread(min(chunk, size - pos), pos) for pos in range(0, size, chunk))


def qemu_check(path: Path) -> None:
    """`qemu-img check` finds neither errors nor leaks."""
    res = support.run("qemu-img", "check", "-f", "parallels", path, check=False)
    assert res.returncode == 0 and "No errors were found" in res.stdout, (
        f"qemu-img check {path} ({res.returncode}):\n{res.stdout}{res.stderr}"
    )


def stop_clean(server: Server) -> None:
    rc = server.stop()
    assert rc == 0, f"server exited with {rc}:\n{server.log_text()}"


def in_use_word(path: Path) -> int:
    with path.open("rb") as f:
        f.seek(IN_USE_OFFSET)
        return int(struct.unpack("<I", f.read(4))[0])


def pattern(seed: int, length: int) -> bytes:
    """LENGTH reproducible bytes that differ per SEED and contain no long zero runs."""
    rng = random.Random(seed)
    block = bytes(b | 1 for b in rng.randbytes(min(length, 8191)))
    return (block * (length // len(block) + 1))[:length]


def runs_of(mask: bytearray) -> Iterator[tuple[int, int]]:
    """(offset, length) of the runs of 1 bytes in MASK, in pieces of at most 4 MiB."""
    for m in re.finditer(b"\x01+", mask):
        for off in range(m.start(), m.end(), 4 << 20):
            yield off, min(4 << 20, m.end() - off)


def start_prlnbd_limited(tmp: Path, disk: str, fsize: int) -> Server:
    """prlnbd serving DISK with RLIMIT_FSIZE = FSIZE (growing the file fails with EFBIG)."""
    tmp.mkdir(parents=True, exist_ok=True)
    sock = tmp / f"prlnbd-limited-{time.monotonic_ns()}.sock"
    log = sock.with_suffix(".log")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.RLIM_INFINITY))

    cmd = [support.PYTHON, "-m", "prlnbd", "serve", "--socket", str(sock), disk]
    with log.open("wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=support.ROOT, preexec_fn=limit)
    support.wait_for_socket(sock, proc, log)
    return Server(proc, sock, log)


def start_fails(tmp: Path, disks: Sequence[str], *extra: str) -> str:
    """Start prlnbd, which must exit non-zero before listening; return its output."""
    with pytest.raises(RuntimeError, match=r"server exited with [1-9]") as ei:
        support.start_prlnbd(tmp, disks, *extra).stop()
    return str(ei.value)


# ---------------------------------------------------------------- 1. differential vs qemu-nbd


def workload(seed: int, size: int, cs: int, count: int = 300) -> list[tuple[str, int, int, int]]:
    """COUNT ops (kind, offset, length, flags): unaligned, overlapping writes, zeroes, trims, flushes."""
    rng = random.Random(seed)
    hot = [rng.randrange(0, size) for _ in range(5)]  # hot spots make writes overlap
    ops: list[tuple[str, int, int, int]] = []
    for _ in range(count):
        r = rng.random()
        if r < 0.08:
            ops.append(("flush", 0, 0, 0))
            continue
        length = min(size, rng.choice((rng.randint(1, 5000), rng.randint(1, cs + cs // 2), rng.randint(cs, 2 * cs))))
        offset = rng.choice(hot) + rng.randint(-cs, cs) if rng.random() < 0.5 else rng.randrange(0, size)
        if rng.random() < 0.25:  # whole clusters: what zero/trim can release
            offset = offset // cs * cs
            length = max(1, length // cs) * cs
        offset = max(0, min(offset, size - length))
        length = min(length, size - offset)
        fua = nbd.CMD_FLAG_FUA if rng.random() < 0.15 else 0
        if r < 0.62:
            ops.append(("write", offset, length, fua))
        elif r < 0.85:
            no_hole = nbd.CMD_FLAG_NO_HOLE if rng.random() < 0.5 else 0
            ops.append(("zero", offset, length, no_hole | fua))
        else:
            ops.append(("trim", offset, length, fua))
    return ops


def _differential_image(tmp: Path, kind: str) -> tuple[Path, int]:
    """A fresh image (64K or 1M clusters) or the v1 fixture, as (path, cluster size)."""
    if kind == "v1":
        return support.decompress_fixture("parallels-v1", tmp), K64
    tmp.mkdir(parents=True, exist_ok=True)
    cs = {"64K": K64, "1M": M1}[kind]
    size = {"64K": 12 << 20, "1M": 40 << 20}[kind]
    return support.make_parallels(tmp / "fresh.hds", size, cs), cs


SEEDS = {"64K": 1, "1M": 2, "v1": 3}


@pytest.mark.parametrize("kind", ["64K", "1M", "v1"])
def test_differential_against_qemu_nbd(tmp_path: Path, kind: str) -> None:
    src, cs = _differential_image(tmp_path / "src", kind)
    mine, ref = tmp_path / "prlnbd.hds", tmp_path / "qemu.hds"
    mine.write_bytes(src.read_bytes())
    ref.write_bytes(src.read_bytes())
    p = support.start_prlnbd(tmp_path, [f"d={mine}"])
    q = support.start_qemu_nbd(tmp_path, ref)
    with support.running(p), support.running(q):
        hp, hq = connect(p.uri("d")), connect(q.uri(), align=False)
        size = hp.get_size()
        assert size == hq.get_size()
        assert not hp.is_read_only()
        assert hp.can_flush() and hp.can_fua() and hp.can_trim() and hp.can_zero() and hp.can_multi_conn()
        # qemu 7.2's parallels driver ignores discard: qemu keeps the old bytes where prlnbd
        # may release clusters. MASK marks bytes whose last change was a TRIM; at the end
        # prlnbd must read there either qemu's (old) bytes or zeros, then both get the
        # same fresh data over those ranges so the full comparisons below are exact.
        mask = bytearray(size)
        for i, (op, off, n, flags) in enumerate(workload(SEEDS[kind], size, cs)):
            for h in (hp, hq):
                if op == "write":
                    h.pwrite(pattern(i, n), off, flags)
                elif op == "zero":
                    h.zero(n, off, flags)
                elif op == "trim":
                    h.trim(n, off, flags)
                else:
                    h.flush()
            if op != "flush":
                mask[off : off + n] = (b"\x01" if op == "trim" else b"\x00") * n
        for off, n in runs_of(mask):
            got, old = hp.pread(n, off), hq.pread(n, off)
            for s in range(0, n, 512):
                a, b = got[s : s + 512], old[s : s + 512]
                if a != b and a.count(0) != len(a):
                    bad = [j for j in range(len(a)) if a[j] not in (0, b[j])]
                    assert not bad, f"trimmed byte {off + s + bad[0]}: {a[bad[0]]} is neither old nor zero"
            data = pattern(10_000 + off, n)
            hp.pwrite(data, off)
            hq.pwrite(data, off)
        a, b = pread_all(hp, size), pread_all(hq, size)
        assert a == b, f"first difference at byte {next(i for i in range(size) if a[i] != b[i])}"
        hp.flush()
        hq.flush()
        hp.shutdown()
        hq.shutdown()
        support.run("qemu-img", "compare", "-f", "raw", "-F", "raw", p.uri("d"), q.uri(), timeout=60)
    assert p.proc.returncode == 0, p.log_text()
    assert in_use_word(mine) != IN_USE_OPEN
    qemu_check(mine)
    support.run("qemu-img", "compare", "-f", "parallels", "-F", "parallels", mine, ref, timeout=60)


# ---------------------------------------------------------------- 2. chain writes


SIZE = (8 << 20) + (96 << 10)  # the last cluster of the 1M and 256K layers is partial
LAYERS = [("root", M1), ("mid", K64), ("top", K256)]  # root first


class Bundle:
    """A 3-layer bundle (root 1M, mid 64K, top 256K clusters) and its guest bytes."""

    def __init__(self, directory: Path, seed: int, top_clusters: Sequence[int] = (1, 9, 31, 32)) -> None:
        rng = random.Random(seed)
        self.dir = directory
        directory.mkdir(parents=True)
        self.model = bytearray(SIZE)
        self.paths: dict[str, Path] = {}
        self.clusters: dict[str, dict[int, bytes]] = {}
        chain = []
        picks = {"root": [0, 2, 3, 5, 8], "mid": sorted(rng.sample(range(SIZE // K64), 30)), "top": top_clusters}
        for name, cs in LAYERS:
            guid = new_guid()
            path = directory / f"disk.hdd.{name}.{guid}.hds"
            data = {c: rng.randbytes(cs - rng.choice((0, 0, 777))) for c in picks[name]}
            write_image(path, SIZE, cluster_size=cs, clusters=data)
            for c, d in data.items():
                start = c * cs
                n = min(cs, SIZE - start)
                self.model[start : start + n] = d.ljust(cs, b"\0")[:n]
            self.paths[name] = path
            self.clusters[name] = data
            chain.append((guid, "Compressed", path.name))
        save_descriptor(build_descriptor(SIZE, K256, chain[::-1]), directory / "DiskDescriptor.xml")

    @property
    def top(self) -> Path:
        return self.paths["top"]

    def lower_digests(self) -> dict[str, str]:
        return {n: support.file_digest(self.paths[n]) for n in ("root", "mid")}

    def image_opts(self) -> str:
        return (
            f"driver=parallels,file.filename={self.paths['top']},"
            f"backing.driver=parallels,backing.file.filename={self.paths['mid']},"
            f"backing.backing.driver=parallels,backing.backing.file.filename={self.paths['root']}"
        )

    def below_has_data(self, start: int, end: int) -> bool:
        """Whether root or mid map any cluster overlapping [start, end)."""
        return any(c * cs < end and start < (c + 1) * cs for name, cs in LAYERS[:2] for c in self.clusters[name])


def qemu_chain_read(tmp: Path, bundle: Bundle) -> tuple[bytes, list[tuple[int, int, int]]]:
    """The chain's bytes and allocation depth as qemu-nbd sees it through backing links."""
    q = support.start_qemu_nbd(tmp, bundle.image_opts(), "-r", "-A", "--image-opts", fmt=None)
    with support.running(q):
        return support.nbd_pread(q.uri()), support.nbdinfo_map(q.uri(), DEPTH)


def test_chain_random_writes(tmp_path: Path) -> None:
    b = Bundle(tmp_path / "disk.hdd", seed=7)
    lower = b.lower_digests()
    rng = random.Random(8)
    p = support.start_prlnbd(tmp_path, [f"disk={b.dir}"])
    with support.running(p):
        h = connect(p.uri("disk"))
        assert h.get_size() == SIZE and not h.is_read_only()
        assert support.nbd_pread(p.uri("disk")) == bytes(b.model)
        for i in range(200):
            r = rng.random()
            n = rng.choice((rng.randint(1, 4096), rng.randint(1, 300_000)))
            off = rng.randrange(0, SIZE - n + 1)
            if r < 0.65:
                data = pattern(i, n)
                h.pwrite(data, off, nbd.CMD_FLAG_FUA if rng.random() < 0.1 else 0)
                b.model[off : off + n] = data
            elif r < 0.85:
                h.zero(n, off, nbd.CMD_FLAG_NO_HOLE if rng.random() < 0.5 else 0)
                b.model[off : off + n] = bytes(n)
            elif r < 0.95:
                # TRIM: whole top (256K) clusters read as zeros afterwards (released where
                # nothing below has data, zeroed where something does); partial ones are untouched.
                h.trim(n, off)
                first = -(-off // K256) * K256
                for cstart in range(first, off + n, K256):
                    cend = min(cstart + K256, SIZE)
                    if cend <= off + n:
                        b.model[cstart:cend] = bytes(cend - cstart)
            else:
                h.flush()
        got = pread_all(h, SIZE)
        assert got == bytes(b.model), f"first difference at {next(i for i in range(SIZE) if got[i] != b.model[i])}"
        mine_depth = support.nbdinfo_map(p.uri("disk"), DEPTH)
        h.shutdown()
    assert p.proc.returncode == 0, p.log_text()
    assert b.lower_digests() == lower, "a lower layer changed"
    qemu_check(b.top)
    data, depth = qemu_chain_read(tmp_path, b)
    assert data == bytes(b.model)
    assert mine_depth == depth
    # And prlnbd reopened read-only agrees with the model and with itself.
    p = support.start_prlnbd(tmp_path, [f"disk={b.dir}"], "--read-only")
    with support.running(p):
        assert support.nbd_pread(p.uri("disk")) == bytes(b.model)
        assert support.nbdinfo_map(p.uri("disk"), DEPTH) == depth


def test_chain_copy_on_write(tmp_path: Path) -> None:
    b = Bundle(tmp_path / "disk.hdd", seed=11, top_clusters=())
    lower = b.lower_digests()
    # A top cluster held below only by the root (and maybe the mid layer): guest cluster 2 of 256K.
    cstart = 2 * K256
    assert b.below_has_data(cstart, cstart + K256)
    before = bytes(b.model[cstart : cstart + K256])
    assert before.count(0) < K256 // 2
    at = cstart + 70_001
    data = pattern(1, 4096)
    p = support.start_prlnbd(tmp_path, [f"disk={b.dir}"])
    with support.running(p):
        assert all(d >= 2 for _, _, d in _spans(p.uri("disk"), DEPTH, cstart, K256))
        h = connect(p.uri("disk"))
        h.pwrite(data, at)
        got = h.pread(K256, cstart)
        h.shutdown()
        want = before[: at - cstart] + data + before[at - cstart + 4096 :]
        assert got == want, "the rest of the cluster must show the parent's bytes"
        spans = _spans(p.uri("disk"), DEPTH, cstart, K256)
        assert spans == [(cstart, K256, 1)], spans
    assert p.proc.returncode == 0
    assert b.lower_digests() == lower
    qemu_check(b.top)
    img = ParallelsImage.open(b.top)
    try:
        assert img.allocated == [2]
    finally:
        img.close()
    b.model[at : at + 4096] = data
    qemu_data, _ = qemu_chain_read(tmp_path, b)
    assert qemu_data == bytes(b.model)


# ---------------------------------------------------------------- 3. zero / trim semantics


def _two_layers(tmp: Path) -> tuple[Path, Path, Path, bytes]:
    """Bundle: root (1M clusters) holds data in [0, 1M) only; top (64K clusters) is empty. 4 MiB."""

    d = tmp / "z.hdd"
    d.mkdir()
    root_data = pattern(99, M1)
    root, top = d / "root.hds", d / "top.hds"
    write_image(root, 4 * M1, cluster_size=M1, clusters={0: root_data})
    write_image(top, 4 * M1, cluster_size=K64)
    chain = [(new_guid(), "Compressed", top.name), (new_guid(), "Compressed", root.name)]
    save_descriptor(build_descriptor(4 * M1, K64, chain), d / "DiskDescriptor.xml")
    return d, root, top, root_data


def _spans(uri: str, context: str, start: int, length: int) -> list[tuple[int, int, int]]:
    """The merged extents of CONTEXT clipped to [start, start+length)."""
    end = start + length
    return [
        (max(o, start), min(o + n, end) - max(o, start), t)
        for o, n, t in support.nbdinfo_map(uri, context)
        if o < end and start < o + n
    ]


def test_zero_and_trim_on_chain(tmp_path: Path) -> None:
    d, root, top, root_data = _two_layers(tmp_path)
    root_digest = support.file_digest(root)
    p = support.start_prlnbd(tmp_path, [f"z={d}"])
    with support.running(p):
        uri = p.uri("z")
        h = connect(uri)
        assert h.can_fast_zero()
        # WRITE_ZEROES over a whole cluster with parent data: zeros, not the parent's bytes.
        h.zero(K64, 2 * K64)
        assert h.pread(K64, 2 * K64) == bytes(K64)
        assert _spans(uri, DEPTH, 2 * K64, K64) == [(2 * K64, K64, 1)]
        # ... and over a partial range: only those bytes change, the rest is the parent's.
        h.zero(1000, 300_000)
        got = h.pread(K64, 4 * K64)
        assert got == root_data[4 * K64 : 300_000] + bytes(1000) + root_data[301_000 : 5 * K64]
        # TRIM of a whole cluster with parent data: zeros are written instead of releasing.
        h.trim(K64, 6 * K64)
        assert h.pread(K64, 6 * K64) == bytes(K64)
        # TRIM of a partial cluster is a no-op hint.
        h.trim(100, 8 * K64 + 5)
        assert h.pread(K64, 8 * K64) == root_data[8 * K64 : 9 * K64]

        # FAST_ZERO where the parent has data would need a write: ENOTSUP, nothing changes.
        assert nbd_errno(h.zero, K64, 10 * K64, nbd.CMD_FLAG_FAST_ZERO) == errno.ENOTSUP
        assert h.pread(K64, 10 * K64) == root_data[10 * K64 : 11 * K64]
        # ... where nothing is below and the top holds nothing: succeeds.
        h.zero(4 * K64, 3 * M1, nbd.CMD_FLAG_FAST_ZERO)
        assert h.pread(4 * K64, 3 * M1) == bytes(4 * K64)

        # TRIM of whole top clusters with nothing below: holes, and the space is reused.
        data = pattern(5, 4 * K64)
        h.pwrite(data, 2 * M1)
        h.flush()
        assert _spans(uri, BASE, 2 * M1, 4 * K64) == [(2 * M1, 4 * K64, 0)]
        full = os.stat(top).st_size
        # FAST_ZERO over a whole top cluster with nothing below: released, succeeds.
        h.zero(K64, 2 * M1, nbd.CMD_FLAG_FAST_ZERO)
        h.trim(3 * K64, 2 * M1 + K64)
        assert h.pread(4 * K64, 2 * M1) == bytes(4 * K64)
        assert _spans(uri, BASE, 2 * M1, 4 * K64) == [(2 * M1, 4 * K64, HOLE_ZERO)]
        assert _spans(uri, DEPTH, 2 * M1, 4 * K64) == [(2 * M1, 4 * K64, 0)]
        h.flush()  # the release is durable now: its clusters may be reused
        h.pwrite(pattern(6, 4 * K64), 3 * M1 + 12345)  # 5 new clusters, 4 of them reused
        h.flush()
        assert os.stat(top).st_size <= full + K64, "released clusters were not reused"
        final = pread_all(h, 4 * M1)
        h.shutdown()
    assert p.proc.returncode == 0, p.log_text()
    assert support.file_digest(root) == root_digest
    qemu_check(top)
    opts = f"driver=parallels,file.filename={top},backing.driver=parallels,backing.file.filename={root}"
    q = support.start_qemu_nbd(tmp_path, opts, "-r", "--image-opts", fmt=None)
    with support.running(q):
        assert support.nbd_pread(q.uri()) == final


# ---------------------------------------------------------------- 4. concurrency and multi-conn


def _drain(handles: Sequence[nbd.NBD], cookies: Sequence[Sequence[int]]) -> None:
    """Drive every handle until all its commands completed; raise on any error."""
    while any(h.aio_in_flight() for h in handles):
        for h in handles:
            if h.aio_in_flight():
                h.poll(0)
    for h, cs in zip(handles, cookies, strict=True):
        for c in cs:
            assert h.aio_command_completed(c)


def test_concurrent_writes_to_one_cluster(tmp_path: Path) -> None:
    d = tmp_path / "c.hdd"
    d.mkdir()
    root, top = d / "root.hds", d / "top.hds"
    parent = {1: pattern(41, M1), 2: pattern(42, M1)}
    write_image(root, 6 * M1, cluster_size=M1, clusters=parent)
    write_image(top, 6 * M1, cluster_size=M1)
    chain = [(new_guid(), "Compressed", top.name), (new_guid(), "Compressed", root.name)]
    save_descriptor(build_descriptor(6 * M1, M1, chain), d / "DiskDescriptor.xml")
    step, piece = 20_000, 16_384  # 52 non-overlapping pieces per cluster, with gaps between

    def expected(cluster: int) -> bytes:
        buf = bytearray(parent.get(cluster, bytes(M1)))
        for k in range(M1 // step):
            at = k * step
            buf[at : at + piece] = pattern(cluster * 1000 + k, piece)
        return bytes(buf)

    p = support.start_prlnbd(tmp_path, [f"c={d}"])
    with support.running(p):
        # One connection, many writes in flight to cluster 1 (the parent holds it: COW).
        h = connect(p.uri("c"))
        cookies = [
            h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(pattern(1000 + k, piece))), M1 + k * step)
            for k in range(M1 // step)
        ]
        _drain([h], [cookies])
        # Four connections at once: cluster 2 (parent data) and cluster 3 (nothing below).
        hs = [connect(p.uri("c")) for _ in range(4)]
        per: list[list[int]] = [[] for _ in hs]
        for cluster in (2, 3):
            for k in range(M1 // step):
                buf = nbd.Buffer.from_bytearray(bytearray(pattern(cluster * 1000 + k, piece)))
                per[k % 4].append(hs[k % 4].aio_pwrite(buf, cluster * M1 + k * step))
        _drain(hs, per)
        for cluster in (1, 2, 3):
            assert h.pread(M1, cluster * M1) == expected(cluster), f"cluster {cluster}"
        for x in (h, *hs):
            x.shutdown()
    assert p.proc.returncode == 0, p.log_text()
    img = ParallelsImage.open(top)
    try:
        assert img.allocated == [1, 2, 3], "each cluster must be allocated exactly once"
        hosts = sorted(int(img.bat[c]) for c in img.allocated)
        assert len(set(hosts)) == 3
    finally:
        img.close()
    qemu_check(top)
    assert os.stat(top).st_size == hosts[-1] + M1


def test_multi_conn_flush_survives_sigkill(tmp_path: Path) -> None:
    img = support.make_parallels(tmp_path / "m.hds", 16 << 20, K64)
    p = support.start_prlnbd(tmp_path, [f"m={img}"])
    try:
        a, b = connect(p.uri("m")), connect(p.uri("m"))
        assert a.can_multi_conn()
        data = pattern(3, 3 * K64 + 1234)
        a.pwrite(data, 5 * K64 + 17)
        b.flush()
        assert in_use_word(img) == IN_USE_OPEN
    finally:
        p.stop(signal.SIGKILL)
    assert p.proc.returncode == -signal.SIGKILL
    assert in_use_word(img) == IN_USE_OPEN, "a killed writer leaves in_use set"
    # Writable open is refused now; read-only works and shows the flushed write.
    out = start_fails(tmp_path, [f"m={img}"])
    assert "prlnbd check --repair" in out
    p = support.start_prlnbd(tmp_path, [f"m={img}"], "--read-only")
    with support.running(p):
        assert support.nbd_pread(p.uri("m"), 5 * K64 + 17, len(data)) == data
    assert in_use_word(img) == IN_USE_OPEN


# ---------------------------------------------------------------- 5. errors


def test_write_past_end_is_enospc(tmp_path: Path) -> None:
    img = support.make_parallels(tmp_path / "e.hds", 4 << 20, K64)
    p = support.start_prlnbd(tmp_path, [f"e={img}"])
    with support.running(p):
        h = connect(p.uri("e"), strict=False)
        size = h.get_size()
        assert nbd_errno(h.pwrite, b"x" * 512, size - 100) == errno.ENOSPC
        assert nbd_errno(h.pwrite, b"x", size) == errno.ENOSPC
        assert nbd_errno(h.zero, 4096, size - 100) == errno.ENOSPC
        assert h.pread(4096, size - 4096) == bytes(4096)
        h.pwrite(b"y" * 100, size - 100)  # exactly up to the end is fine
        assert h.pread(100, size - 100) == b"y" * 100
        h.shutdown()
    assert p.proc.returncode == 0
    qemu_check(img)


def test_read_only_refuses_writes(tmp_path: Path) -> None:
    img = support.make_parallels(tmp_path / "r.hds", 4 << 20, K64, [(0x5A, 1000, 70_000)])
    digest = support.file_digest(img)
    p = support.start_prlnbd(tmp_path, [f"r={img}"], "--read-only")
    with support.running(p):
        h = connect(p.uri("r"), strict=False)
        assert h.is_read_only()
        assert nbd_errno(h.pwrite, b"x" * 512, 0) == errno.EPERM
        assert nbd_errno(h.zero, K64, 0) == errno.EPERM
        assert nbd_errno(h.trim, K64, 0) == errno.EPERM
        assert h.pread(10, 1000) == b"\x5a" * 10
        h.shutdown()
    assert support.file_digest(img) == digest


def _full_disk_image(tmp: Path) -> tuple[Path, int]:
    img = support.make_parallels(tmp / "full.hds", 8 << 20, K64)
    return img, os.stat(img).st_size


def test_disk_full_is_enospc_and_server_keeps_serving(tmp_path: Path) -> None:
    img, base = _full_disk_image(tmp_path)
    p = start_prlnbd_limited(tmp_path, f"f={img}", base + 2 * K64 + K64 // 2)
    with support.running(p):
        h = connect(p.uri("f"))
        a, b = pattern(1, K64), pattern(2, K64 - 10)
        h.pwrite(a, 0)  # two clusters fit under the limit
        h.pwrite(b, K64 + 5)
        h.flush()
        assert nbd_errno(h.pwrite, pattern(3, 5000), 6 * K64 + 7) == errno.ENOSPC
        assert nbd_errno(h.pwrite, pattern(3, 5000), 7 * K64, nbd.CMD_FLAG_FUA) == errno.ENOSPC
        assert p.proc.poll() is None, f"server died ({p.proc.returncode}, SIGXFSZ is {signal.SIGXFSZ})"
        # Still serving: reads, writes into allocated clusters, zeroing that needs no space, flush.
        assert h.pread(K64, 0) == a
        assert h.pread(2000, 6 * K64) == bytes(2000)
        h.pwrite(b"z" * 300, 1000)
        h.zero(K64, 4 * K64)
        h.flush()
        assert h.pread(300, 1000) == b"z" * 300
        h.shutdown()
        h = connect(p.uri("f"))  # new connections still work
        assert h.pread(len(b), K64 + 5) == b
        h.shutdown()
    assert p.proc.returncode == 0, p.log_text()
    qemu_check(img)
    assert os.stat(img).st_size == base + 2 * K64


def test_disk_full_then_space_returns_leaves_no_gap(tmp_path: Path) -> None:
    """After failed allocations, a later one (space freed again) must not skip host clusters."""
    img, base = _full_disk_image(tmp_path)
    p = start_prlnbd_limited(tmp_path, f"f={img}", base + K64 + K64 // 2)
    with support.running(p):
        h = connect(p.uri("f"))
        h.pwrite(pattern(1, 100), 0)
        for i in range(3):
            assert nbd_errno(h.pwrite, pattern(2, 100), (3 + i) * K64) == errno.ENOSPC
        resource.prlimit(p.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        h.pwrite(pattern(3, 100), 7 * K64)
        h.shutdown()
    assert p.proc.returncode == 0, p.log_text()
    qemu_check(img)
    image = ParallelsImage.open(img)
    try:
        hosts = sorted(int(image.bat[c]) for c in image.allocated)
    finally:
        image.close()
    assert hosts == [base, base + K64], f"host clusters {hosts}: failed allocations left a gap"
    assert os.stat(img).st_size == base + 2 * K64


def test_in_use_image_refused_for_writing(tmp_path: Path) -> None:
    img = support.make_parallels(tmp_path / "u.hds", 4 << 20, K64, [(0x33, 0, 5000)])
    with img.open("r+b") as f:
        f.seek(IN_USE_OFFSET)
        f.write(struct.pack("<I", IN_USE_OPEN))
    digest = support.file_digest(img)
    out = start_fails(tmp_path, [f"u={img}"])
    assert "prlnbd check --repair" in out and str(img) in out
    p = support.start_prlnbd(tmp_path, [f"u={img}"], "--read-only")
    with support.running(p):
        assert support.nbd_pread(p.uri("u"), 0, 5000) == b"\x33" * 5000
    assert support.file_digest(img) == digest
    # After a repair the image opens for writing again.
    support.run(support.PYTHON, "-m", "prlnbd", "check", "--repair", img)
    assert in_use_word(img) != IN_USE_OPEN
    p = support.start_prlnbd(tmp_path, [f"u={img}"])
    with support.running(p):
        h = connect(p.uri("u"))
        h.pwrite(b"w" * 10, 10)
        h.shutdown()
    assert p.proc.returncode == 0
    qemu_check(img)


BITMAP = "e4f2eed0-37fe-4539-b50b-85d2e7fd235f"


def _dirty(uri: str) -> list[tuple[int, int]]:
    return [(o, n) for o, n, t in support.nbdinfo_map(uri, f"qemu:dirty-bitmap:{BITMAP}") if t & 1]


FIXTURE_DIRTY = [(327680, 131072), (655360, 196608), (1966080, 65536)]


def test_bitmap_image_writes(tmp_path: Path) -> None:
    """The brief for the write path: an image with dirty bitmaps is refused for writing
    unless --read-only. The working tree has since started keeping bitmaps up to date
    while writing; either behaviour passes, each checked for what it promises."""
    img = support.decompress_fixture("parallels-with-bitmap", tmp_path)
    digest = support.file_digest(img)
    p = support.start_prlnbd(tmp_path, [f"b={img}"], "--read-only")
    with support.running(p):
        assert _dirty(p.uri("b")) == FIXTURE_DIRTY
    assert support.file_digest(img) == digest
    try:
        p = support.start_prlnbd(tmp_path, [f"b={img}"])
    except RuntimeError as e:
        assert "read-only" in str(e) and "server exited with 1" in str(e)
        assert support.file_digest(img) == digest
        return
    data = pattern(9, 4096)
    with support.running(p):
        h = connect(p.uri("b"))
        h.pwrite(data, (10 << 20) + 100)
        h.zero(100_000, 50 << 20)
        h.shutdown()
        want = [*FIXTURE_DIRTY, (10 << 20, K64), (50 << 20, 2 * K64)]
        assert _dirty(p.uri("b")) == want
    assert p.proc.returncode == 0, p.log_text()
    assert in_use_word(img) != IN_USE_OPEN
    support.run(support.PYTHON, "-m", "prlnbd", "check", img)
    # qemu 7.2 does not know the format extension: it counts its clusters as leaks (as it
    # does on the untouched fixture), but must find no errors.
    res = support.run("qemu-img", "check", "-f", "parallels", img, check=False)
    assert res.returncode in (0, 3) and "ERROR" not in res.stdout.replace("ERROR space leaked", ""), res.stdout
    p = support.start_prlnbd(tmp_path, [f"b={img}"], "--read-only")
    with support.running(p):
        assert _dirty(p.uri("b")) == want
        assert support.nbd_pread(p.uri("b"), 10 << 20, 2 * K64) == bytes(100) + data + bytes(2 * K64 - 4196)
    q = support.start_qemu_nbd(tmp_path, img, "-r", f"--bitmap={BITMAP}")
    with support.running(q):
        assert _dirty(q.uri()) == want


# ---------------------------------------------------------------- 6. space


def _allocated(path: Path) -> int:
    """Bytes the file system holds for PATH (st_blocks)."""
    return os.stat(path).st_blocks * 512


def test_trim_and_zero_give_space_back_and_it_is_reused(tmp_path: Path) -> None:
    size = 64 * M1
    img = support.make_parallels(tmp_path / "s.hds", size, K64)
    p = support.start_prlnbd(tmp_path, [f"s={img}"])
    with support.running(p):
        h = connect(p.uri("s"))
        data = pattern(11, 16 * M1)
        h.pwrite(data, 0)
        h.flush()
        full, full_size = _allocated(img), os.stat(img).st_size
        assert full >= 16 * M1
        # TRIM of whole clusters (and a partial one at each end, which stays).
        h.trim(8 * M1 - 2 * K64 + 100, 100)
        h.flush()
        trimmed = _allocated(img)
        assert trimmed <= full - (8 * M1 - 3 * K64), (full, trimmed)
        # WRITE_ZEROES over whole clusters punches too.
        h.zero(4 * M1, 10 * M1)
        h.flush()
        zeroed = _allocated(img)
        assert zeroed <= trimmed - (4 * M1 - K64), (trimmed, zeroed)
        assert h.pread(4 * M1, 10 * M1) == bytes(4 * M1)
        assert h.pread(100, 0) == data[:100]
        assert h.pread(2 * M1, 14 * M1) == data[14 * M1 :]
        # New data elsewhere goes into the released clusters: the file does not grow.
        more = pattern(12, 10 * M1)
        h.pwrite(more, 40 * M1)
        h.flush()
        assert os.stat(img).st_size == full_size
        assert _allocated(img) <= full + K64
        assert h.pread(10 * M1, 40 * M1) == more
        # A partial write into a reused (punched) cluster reads zeros around it.
        h.trim(10 * M1, 40 * M1)
        h.flush()
        h.pwrite(b"x" * 100, 60 * M1 + 5000)
        h.flush()
        assert h.pread(K64, 60 * M1) == bytes(5000) + b"x" * 100 + bytes(K64 - 5100)
        h.shutdown()
    stop_clean(p)
    rc, report = prlnbd_check(img)
    assert rc == 0, report
    qemu_check(img)


def prlnbd_check(path: Path) -> tuple[int, dict[str, object]]:
    import json

    res = subprocess.run([support.PYTHON, "-m", "prlnbd", "check", "--json", str(path)],
                         capture_output=True, text=True, cwd=support.ROOT, timeout=60, check=False)
    return res.returncode, json.loads(res.stdout)


def test_check_counts_punched_clusters_as_free_not_leaked(tmp_path: Path) -> None:
    img = support.make_parallels(tmp_path / "f.hds", 32 * M1, K64)
    p = support.start_prlnbd(tmp_path, [f"f={img}"])
    with support.running(p):
        h = connect(p.uri("f"))
        h.pwrite(pattern(5, 8 * M1), 0)
        h.flush()
        h.trim(2 * M1, M1)  # whole clusters in the middle: punched, free
        h.flush()
        h.shutdown()
    stop_clean(p)
    rc, report = prlnbd_check(img)
    assert rc == 0 and report["leaks"] == 0 and not report["problems"], report
    assert report["free-bytes"] == 2 * M1, report
    out = support.run(support.PYTHON, "-m", "prlnbd", "check", img).stdout
    assert "Free" in out and "2097152 bytes (32 clusters) free" in out and "No errors were found" in out, out
    qemu_check(img)


def test_check_and_qemu_img_check_agree_after_a_crash_with_punched_clusters(tmp_path: Path) -> None:
    """Punched clusters in the middle are free for both (qemu counts nothing there); punched ones at
    the end of the file, and the space it was grown by ahead, are the same leaked bytes for both."""
    img = support.make_parallels(tmp_path / "k.hds", 32 * M1, K64)
    p = support.start_prlnbd(tmp_path, [f"k={img}"])
    try:
        h = connect(p.uri("k"))
        h.pwrite(pattern(8, 8 * M1), 0)
        h.flush()
        h.trim(M1, 2 * M1)
        h.trim(M1, 7 * M1)
        h.flush()
    finally:
        p.stop(signal.SIGKILL)
    # The data area starts at K64; 8 MiB of data; the file grew ahead past it.
    ahead = os.path.getsize(img) - (K64 + 8 * M1)
    assert ahead > 0
    rc, report = prlnbd_check(img)
    assert rc == 2 and report["leaked-bytes"] == M1 + ahead and report["free-bytes"] == M1, report
    assert {pr["kind"] for pr in report["problems"]} == {"in_use", "leak"}, report  # type: ignore[union-attr]
    res = support.run("qemu-img", "check", "-f", "parallels", img, check=False)
    text = res.stdout + res.stderr
    assert res.returncode == 2, text
    assert f"ERROR space leaked at the end of the image {M1 + ahead}" in text, text
    assert f"{(M1 + ahead) // K64} leaked clusters were found" in text, text
