"""`serve --aio=io_uring`: READs that miss the page cache, and WRITEs into clusters the top holds, go through
the ring, and give what qemu-nbd gives.

Every image is evicted from the page cache (fsync, then POSIX_FADV_DONTNEED)
before it is read, so the reads cannot be answered inline from the cache and
really go to the ring; the server's closing line counts them.
"""

from __future__ import annotations

import os
import random
import re
import uuid
from pathlib import Path

import pytest

from prlnbd import uring
from prlnbd.server import RING_READ_MAX
from tests import support
from tests.integration.test_read_chain import CHAINS, SIZE, assert_bytes, build, reference

try:
    uring.Ring(1).close()
    UNAVAILABLE = None
except OSError as _e:
    UNAVAILABLE = uring.why_unavailable(_e)

pytestmark = [
    pytest.mark.skipif(
        not all(support.have(t) for t in ("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo", "fincore")),
        reason="qemu-utils, libnbd-bin and util-linux are needed",
    ),
    pytest.mark.skipif(UNAVAILABLE is not None, reason=f"io_uring: {UNAVAILABLE}"),
]


def evict(paths: list[Path]) -> None:
    """Write the files' dirty pages out and drop all their pages from the page cache."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident(paths: list[Path]) -> int:
    """How many bytes of PATHS are in the page cache, as fincore(1) counts them."""
    res = support.run("fincore", "--bytes", "--noheadings", "--output", "RES", *map(str, paths))
    return sum(int(line) for line in res.stdout.split())


def ring_reads(server: support.Server) -> int:
    """How many reads the stopped server's ring ran (its closing line)."""
    found = re.search(r"io_uring: (\d+) reads for (\d+) READs", server.log_text())
    assert found, server.log_text()[-2000:]
    return int(found.group(1))


def random_reads(uri: str, want: bytes, seed: int, count: int = 300) -> None:
    """COUNT reads at random offsets and lengths, 8 in flight at once, each equal to WANT's bytes."""
    import nbd

    rng = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    todo = []
    for _ in range(count):
        length = rng.choice([1, 512, 4096, 65536, rng.randrange(1, 1 << 20)])
        offset = rng.randrange(0, len(want) - length)
        if rng.random() < 0.3:
            offset &= ~4095
            length = max(4096, length & ~4095)
            offset = min(offset, len(want) - length)
        todo.append((offset, length))
    for i in range(0, count, 8):
        batch = [(off, n, nbd.Buffer(n)) for off, n in todo[i : i + 8]]
        cookies = [h.aio_pread(buf, off) for off, _, buf in batch]
        for cookie in cookies:
            while not h.aio_command_completed(cookie):
                h.poll(-1)
        for off, n, buf in batch:
            assert_bytes(buf.to_bytearray(), want[off : off + n], f"{n} bytes at {off}")
    h.shutdown()


@pytest.mark.parametrize("name", ["4-mixed", "5-raw-root"])
@pytest.mark.parametrize("cache", ["writeback", "none"])
def test_cold_chain_through_the_ring_matches_qemu(tmp_path: Path, name: str, cache: str) -> None:
    bundle = tmp_path / "vm.hdd"
    chain = build(bundle, CHAINS[name])
    support.write_descriptor(bundle, chain.paths, SIZE)
    want = chain.expected_bytes()
    prl = support.start_prlnbd(tmp_path, [str(bundle)], "--read-only", "--aio=io_uring", f"--cache={cache}")
    with support.running(prl), support.running(reference(tmp_path, chain)) as ref:
        evict(chain.paths)
        # The premise: nothing of the chain is in the page cache now.
        assert resident(chain.paths) == 0
        got = support.nbd_pread(prl.uri(), chunk=RING_READ_MAX)
        assert_bytes(got, want, f"prlnbd --aio=io_uring --cache={cache}")
        assert_bytes(support.nbd_pread(ref.uri()), want, "qemu-nbd")
        evict(chain.paths)
        # Longer reads go to the pool: the same bytes.
        assert_bytes(support.nbd_pread(prl.uri(), chunk=1 << 20), want, f"1 MiB reads, --cache={cache}")
        evict(chain.paths)
        random_reads(prl.uri(), want, seed=len(name))
        evict(chain.paths)
        res = support.run("qemu-img", "compare", "-f", "raw", "-F", "raw", prl.uri(), ref.uri(), check=False)
        assert res.returncode == 0, res.stdout + res.stderr
    assert prl.stop() == 0
    assert "Traceback" not in prl.log_text()
    # The reads of up to RING_READ_MAX went through the ring, not the thread pool: with --cache=none
    # every such read of data does (the whole disk in RING_READ_MAX chunks, most of the 300 random
    # reads, qemu-img compare's); the 1 MiB ones did not.
    if cache == "none":
        assert ring_reads(prl) >= ring_read_requests(prl) > SIZE // RING_READ_MAX + 100


def ring_read_requests(server: support.Server) -> int:
    """How many READ requests the stopped server's ring served (its closing line)."""
    found = re.search(r"io_uring: \d+ reads for (\d+) READs", server.log_text())
    assert found, server.log_text()[-2000:]
    return int(found.group(1))


def ring_writes(server: support.Server) -> tuple[int, int]:
    """How many writes the stopped server's ring ran, for how many WRITE requests (its closing line)."""
    found = re.search(r"(\d+) writes for (\d+) WRITEs", server.log_text())
    assert found, server.log_text()[-2000:]
    return int(found.group(1)), int(found.group(2))


def concurrent_writes(h: object, want: bytearray, rng: random.Random, count: int, depth: int = 16) -> int:
    """COUNT writes (every fifth a WRITE_ZEROES), DEPTH in flight, none overlapping another in flight;
    WANT follows them. Returns how many were WRITEs."""
    import nbd

    assert isinstance(h, nbd.NBD)
    size = len(want)
    writes = 0
    done = 0
    while done < count:
        batch: list[tuple[int, int, bytes | None]] = []
        while len(batch) < min(depth, count - done):
            length = rng.choice([512, 4096, 4096, 65536, rng.randrange(1, 200_000)])
            offset = rng.randrange(0, size - length)
            if rng.random() < 0.5:
                offset &= ~4095
            if any(offset < o + n and o < offset + length for o, n, _ in batch):
                continue
            data = None if len(batch) % 5 == 4 else rng.randbytes(length)
            batch.append((offset, length, data))
        cookies = []
        for offset, length, data in batch:
            if data is None:
                cookies.append(h.aio_zero(length, offset))
                want[offset : offset + length] = bytes(length)
            else:
                cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), offset))
                want[offset : offset + length] = data
                writes += 1
        for cookie in cookies:
            while not h.aio_command_completed(cookie):
                h.poll(-1)
        done += len(batch)
    return writes


@pytest.mark.parametrize("cache", ["writeback", "none"])
def test_writes_through_the_ring_and_cold_reads(tmp_path: Path, cache: str) -> None:
    """A writable export with a dirty bitmap, 16 requests in flight: writes into clusters the top holds go
    to the ring, those that allocate (and zeroing, flushes) to the pool. After a flush and eviction the
    export reads what was written, the bitmap covers every write, qemu-nbd reads the same after the
    stop and qemu-img check finds the top clean."""
    import nbd

    bundle = tmp_path / "vm.hdd"
    chain = build(bundle, CHAINS["2-parallels"])
    support.write_descriptor(bundle, chain.paths, SIZE)
    name = str(uuid.uuid4())
    support.run(support.PYTHON, "-m", "prlnbd", "bitmap", str(bundle), "add", name)
    want = bytearray(chain.expected_bytes())
    prl = support.start_prlnbd(tmp_path, [str(bundle)], "--aio=io_uring", f"--cache={cache}")
    rng = random.Random(11)
    with support.running(prl):
        h = nbd.NBD()
        h.add_meta_context(f"qemu:dirty-bitmap:{name}")
        h.connect_uri(prl.uri())
        before = bytearray(want)
        writes = concurrent_writes(h, want, rng, 400)
        h.flush()
        evict(chain.paths)
        assert_bytes(bytes(h.pread(SIZE, 0)), bytes(want), "after eviction")
        h.shutdown()
        dirty = [(o, n) for o, n, flags in support.nbdinfo_map(prl.uri(), f"qemu:dirty-bitmap:{name}") if flags]
        changed = [i for i in range(0, SIZE, 512) if before[i : i + 512] != want[i : i + 512]]
        assert changed
        for i in changed:
            assert any(o <= i < o + n for o, n in dirty), f"changed sector at {i} not marked dirty"
        evict(chain.paths)
        random_reads(prl.uri(), bytes(want), seed=3, count=100)
    assert prl.stop() == 0
    assert "Traceback" not in prl.log_text()
    ring, requests = ring_writes(prl)
    # Most writes met clusters the top held by then: the ring ran them; the first write into each
    # new cluster went to the pool.
    assert 0 < requests < writes, (requests, writes)
    assert ring >= requests
    assert ring_reads(prl) > 0
    with support.running(reference(tmp_path, chain)) as ref:
        assert_bytes(support.nbd_pread(ref.uri()), bytes(want), "qemu-nbd after the stop")
    res = support.run("qemu-img", "check", "-f", "parallels", str(chain.paths[-1]), check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_no_silent_fallback(tmp_path: Path) -> None:
    """An unknown mode is refused by the parser; --aio=threads runs no ring."""
    bundle = tmp_path / "vm.hdd"
    chain = build(bundle, CHAINS["2-parallels"])
    support.write_descriptor(bundle, chain.paths, SIZE)
    res = support.run(support.PYTHON, "-m", "prlnbd", "serve", "--socket", str(tmp_path / "s"), "--aio=native",
                      str(bundle), check=False)
    assert res.returncode != 0 and "--aio" in res.stderr
    prl = support.start_prlnbd(tmp_path, [str(bundle)], "--read-only", "--aio=threads")
    with support.running(prl):
        evict(chain.paths)
        assert_bytes(support.nbd_pread(prl.uri()), chain.expected_bytes(), "threads")
    assert prl.stop() == 0
    assert "io_uring" not in prl.log_text()


def test_the_default_runs_the_ring_where_it_can(tmp_path: Path) -> None:
    """Without --aio the server runs io_uring here (the default is auto): its first line says so and
    cold reads go through the ring."""
    bundle = tmp_path / "vm.hdd"
    chain = build(bundle, CHAINS["2-parallels"])
    support.write_descriptor(bundle, chain.paths, SIZE)
    prl = support.start_prlnbd(tmp_path, [str(bundle)], "--read-only")
    with support.running(prl):
        evict(chain.paths)
        assert_bytes(support.nbd_pread(prl.uri(), chunk=RING_READ_MAX), chain.expected_bytes(), "default --aio")
    assert prl.stop() == 0
    assert "aio io_uring" in prl.log_text()
    assert ring_reads(prl) > 0


def test_reads_longer_than_the_ring_limit_go_to_the_pool(tmp_path: Path) -> None:
    """With --cache=none no read is answered from the cache: 16 reads of RING_READ_MAX take the ring,
    8 of 1 MiB the pool, and all read the image's bytes."""
    size = 16 << 20
    data = random.Random(3).randbytes(size)
    raw = tmp_path / "data.raw"
    raw.write_bytes(data)
    img = tmp_path / "d.hds"
    support.run("qemu-img", "convert", "-f", "raw", "-O", "parallels", raw, img)
    prl = support.start_prlnbd(tmp_path, [str(img)], "--read-only", "--aio=io_uring", "--cache=none")
    with support.running(prl):
        for offset in range(0, size, 1 << 20):
            assert_bytes(support.nbd_pread(prl.uri(), offset, 1 << 20, chunk=1 << 20),
                         data[offset : offset + (1 << 20)], f"1 MiB at {offset}")
        for i in range(16):
            offset = i * 997 * 1024
            assert_bytes(support.nbd_pread(prl.uri(), offset, RING_READ_MAX, chunk=RING_READ_MAX),
                         data[offset : offset + RING_READ_MAX], f"{RING_READ_MAX} at {offset}")
    assert prl.stop() == 0
    assert ring_read_requests(prl) == 16
