"""READ replies sent by sendfile: only from frozen layers (never a writable top), only cached data, byte-exact.

sendfile hands page-cache pages to the socket by reference, so the loop
copies nothing; the client copies the pages when it reads them. Which
replies went that way is in each connection's closing log line
("N bytes read (M by sendfile)").
"""

from __future__ import annotations

import os
import re
import socket
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from prlnbd import online
from prlnbd.disk.chain import open_disk
from prlnbd.export import Export
from tests import support
from tests.integration.test_datapath import M1, SIZE, in_process, pattern
from tests.integration.test_online import prl
from tests.integration.test_read_uring import evict
from tests.nbdraw import Client, Closed, Cmd, assemble_read

pytestmark = pytest.mark.skipif(
    not all(support.have(t) for t in ("qemu-img", "qemu-io")), reason="qemu-utils is needed"
)

# The in-process tests run the loop PRLNBD_LOOP names (tests/run.sh runs this file on both).
LOOP = os.environ.get("PRLNBD_LOOP", "uvloop")
# (offset, length): one cluster, several, unaligned, the whole disk.
READS = [(0, 64 << 10), (M1 - 4096, 128 << 10), (3 * M1 + 512, M1), (0, SIZE)]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    writes = [(0x40 + i, i * M1, M1) for i in range(SIZE // M1)]
    path = support.make_parallels(tmp_path / "disk.hds", SIZE, writes=writes)
    path.read_bytes()  # in the page cache
    return path


def closing_counts(srv: support.Server) -> tuple[int, int]:
    """(bytes read, of them sent by sendfile) of the first connection, once its closing line is logged."""
    text = srv.wait_for_log("client disconnected", timeout=60)
    m = re.search(r"(\d+) bytes read(?: \((\d+) by sendfile\))?, .*client disconnected", text)
    assert m is not None, text
    return int(m.group(1)), int(m.group(2) or 0)


def read_all(client: Client, reads: list[tuple[int, int]]) -> None:
    """Send READS at once, then check every reply."""
    cookies = []
    for offset, length in reads:
        cookies.append(client.request(Cmd.READ, offset, length))
    results = client.collect(cookies)
    for cookie, (offset, length) in zip(cookies, reads, strict=True):
        assert assemble_read(results[cookie], offset, length) == pattern(offset, length), (offset, length)


@pytest.mark.parametrize("structured", [True, False])
@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_cached_reads_of_a_read_only_disk_go_by_sendfile(
    tmp_path: Path, image: Path, structured: bool, transport: str
) -> None:
    extra = ["--read-only"] + (["--port", "0"] if transport == "tcp" else [])
    srv = support.start_prlnbd(tmp_path, [f"d={image}"], *extra)
    with support.running(srv):
        if transport == "tcp":
            m = re.search(r"serving .* on .*\('127\.0\.0\.1', (\d+)\)", srv.wait_for_log("serving"))
            assert m is not None, srv.log_text()
            client = Client(socket.create_connection(("127.0.0.1", int(m.group(1)))))
        else:
            client = Client.unix(srv.sock)
        with client:
            client.connect("d", structured=structured)
            for offset, length in READS:  # one at a time: each finds the socket empty
                assert client.read(offset, length) == pattern(offset, length)
            read_all(client, READS * 3)  # pipelined: some find replies queued before them
            client.disc()
        total, lent = closing_counts(srv)
    assert total == 4 * sum(length for _, length in READS)
    assert lent >= sum(length for _, length in READS[:3])


def test_reads_of_a_writable_top_are_copied(tmp_path: Path, image: Path) -> None:
    """The top layer may change while a reply waits in the socket: its pages are never lent."""
    srv = support.start_prlnbd(tmp_path, [f"d={image}"])
    with support.running(srv):
        with Client.unix(srv.sock) as client:
            client.connect("d")
            for offset, length in READS:
                assert client.read(offset, length) == pattern(offset, length)
            client.disc()
        assert closing_counts(srv) == (sum(n for _, n in READS), 0)


def writable_bundle(tmp_path: Path) -> tuple[Path, Export]:
    """A bundle whose first top was filled with pattern(), opened writable (not yet served)."""
    bundle = tmp_path / "vm.hdd"
    res = prl("create", bundle, "--size", str(SIZE))
    assert res.returncode == 0, res.stderr
    disk = open_disk(bundle, writable=True)
    disk.write(0, pattern(0, SIZE))
    return bundle, Export("d", disk, read_only=False)


def cache_bundle(bundle: Path) -> None:
    for path in bundle.iterdir():
        if path.suffix == ".hds":
            path.read_bytes()


def test_reads_of_frozen_layers_under_a_writable_top_are_lent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A VM's disk after a snapshot: reads that come from the frozen layer go by sendfile, reads of
    what the writable top holds, or of a range across both, are copied."""
    bundle, export = writable_bundle(tmp_path)
    sent = SendfileCalls(monkeypatch)
    with in_process(tmp_path, {"d": export}, LOOP) as srv, Client.unix(srv.sock) as client:
        client.connect("d")
        srv.call(online.snapshot(srv.server, export))
        new = bytes([0xEE]) * (2 * M1)
        assert client.call(Cmd.WRITE, 4 * M1, len(new), payload=new).error == 0  # into the new top
        cache_bundle(bundle)
        before = sent.after_reply(client)
        assert client.read(M1, M1) == pattern(M1, M1)  # the frozen layer's
        lent = sent.after_reply(client)
        assert lent - before == M1
        assert client.read(4 * M1, M1) == new[:M1]  # the top's
        assert client.read(3 * M1 + 4096, M1) == pattern(3 * M1 + 4096, M1 - 4096) + new[:4096]  # both
        assert sent.after_reply(client) == lent


def test_a_lent_reply_waiting_across_a_write_a_snapshot_and_a_merge_up_holds_only_that_offsets_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one change to a frozen layer while it is served: an online merge "up" of its child into
    it rewrites, in place, clusters a reply lent earlier may still have in a socket nobody reads.

    A client asks for 8 MiB of the frozen layer and does not read; another writes
    4 MiB of that range into the top; a snapshot freezes it; the merge writes those
    4 MiB into the first layer in place. Each block of the reply is then either the
    first layer's old bytes or the newer bytes written at that offset (both were
    the disk's while the READ was in flight), never anything else.
    """
    bundle, export = writable_bundle(tmp_path)
    sent = SendfileCalls(monkeypatch)
    big = (M1, 8 * M1)
    with in_process(tmp_path, {"d": export}, LOOP) as srv:
        first = srv.call(online.snapshot(srv.server, export))["frozen"]
        cache_bundle(bundle)
        with Client.unix(srv.sock, rcvbuf=4096) as reader, Client.unix(srv.sock) as writer:
            reader.connect("d")
            writer.connect("d")
            cookie = reader.request(Cmd.READ, *big)
            assert sent.partial.wait(60)  # part of the reply is in the socket, by reference
            new = bytes([0xEE]) * (4 * M1)
            assert writer.call(Cmd.WRITE, M1, len(new), payload=new).error == 0
            srv.call(online.snapshot(srv.server, export))
            merged = srv.call(online.merge(srv.server, export, first))
            assert merged["direction"] == "up", merged
            got = assemble_read(reader.collect([cookie])[cookie], *big)
            assert writer.read(*big) == new + pattern(5 * M1, 4 * M1)
    old = pattern(*big)
    want_new = new + old[len(new) :]
    for at in range(0, big[1], 4096):
        block = got[at : at + 4096]
        assert block in (old[at : at + 4096], want_new[at : at + 4096]), big[0] + at
    assert sum(sent.sizes) > 0


def test_data_not_in_the_page_cache_is_brought_in_by_the_pool_and_lent(
    tmp_path: Path, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sendfile of pages not in the cache would read them on the event loop: the pool brings them
    into the cache (copying nothing out), then the reply goes by sendfile. Once they are cached,
    the same READ goes by sendfile at once and reads nothing."""
    disk = open_disk(image, writable=False)
    reads = Reads(disk.read)
    disk.read = reads  # type: ignore[method-assign]
    fills = Reads(disk.fill_cache)
    disk.fill_cache = fills  # type: ignore[method-assign]
    sent = SendfileCalls(monkeypatch)
    evict([image])
    run = disk.file_run(5 * M1, M1)
    assert run is not None
    if run[2]:
        pytest.skip(f"{image.parent} keeps files in memory: nothing to evict")
    with in_process(tmp_path, {"d": Export("d", disk, read_only=True)}, LOOP) as srv, Client.unix(srv.sock) as client:
        client.connect("d")
        assert client.read(5 * M1, M1) == pattern(5 * M1, M1)
        assert fills.calls == [(5 * M1, M1)]
        # By sendfile, unless the kernel did not yet count every page as cached (a folio it is still
        # reading ahead): then it was read in the pool, once.
        mine = [c for c in reads.calls if c[0] == 5 * M1]
        assert (sent.after_reply(client), mine) in ((M1, []), (0, [(5 * M1, M1)]))
        fd, host, _ = run
        os.pread(fd, M1, host)  # now surely cached
        before = sent.after_reply(client)
        assert client.read(5 * M1, M1) == pattern(5 * M1, M1)
        assert fills.calls == [(5 * M1, M1)]  # nothing brought in or read again
        assert [c for c in reads.calls if c[0] == 5 * M1] == mine
        assert sent.after_reply(client) - before == M1


def test_a_failed_fill_is_an_error_reply(tmp_path: Path, image: Path) -> None:
    """Bringing the data into the cache fails (EIO from storage): the READ gets EIO, before any of its
    reply is sent, and the connection goes on."""
    disk = open_disk(image, writable=False)
    evict([image])
    run = disk.file_run(5 * M1, M1)
    assert run is not None
    if run[2]:
        pytest.skip(f"{image.parent} keeps files in memory: nothing to evict")

    def fill_cache(offset: int, length: int) -> bool:
        raise OSError(5, "Input/output error")

    disk.fill_cache = fill_cache  # type: ignore[method-assign]
    with in_process(tmp_path, {"d": Export("d", disk, read_only=True)}, LOOP) as srv, Client.unix(srv.sock) as client:
        client.connect("d")
        with pytest.raises(OSError) as err:
            client.read(5 * M1, M1)
        assert err.value.errno == 5
        assert client.read(0, 4096) == pattern(0, 4096)


class Reads:
    """Wraps Disk.read (or fill_cache): records each call; with FAIL, the first fails."""

    def __init__(self, real: Any, fail: bool = False) -> None:
        self.real = real
        self.fail = fail
        self.calls: list[tuple[int, int]] = []

    def __call__(self, offset: int, length: int) -> Any:
        self.calls.append((offset, length))
        if self.fail and len(self.calls) == 1:
            raise OSError(5, "Input/output error")
        return self.real(offset, length)


class SendfileCalls:
    """os.sendfile to a socket, counted: the bytes each call sent; `partial` is set once one sends less
    than asked."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sizes: list[int] = []
        self.partial = threading.Event()
        real = os.sendfile

        def sendfile(out_fd: int, in_fd: int, offset: int, count: int) -> int:
            n = real(out_fd, in_fd, offset, count)
            if not stat.S_ISSOCK(os.fstat(out_fd).st_mode):
                return n  # Disk.fill_cache() to /dev/null
            self.sizes.append(n)
            if n < count:
                self.partial.set()
            return n

        monkeypatch.setattr(os, "sendfile", sendfile)

    def after_reply(self, client: Client) -> int:
        """The bytes sent so far, once the server answered one more request of CLIENT: the count is
        kept after each sendfile returns, and the client can have its data before that."""
        assert client.read(0, 4096) == pattern(0, 4096)
        return sum(self.sizes)


@pytest.mark.parametrize("fail", [False, True])
def test_what_the_socket_did_not_take_follows_even_when_it_left_the_cache(
    tmp_path: Path, image: Path, fail: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client not reading: sendfile sends what fits, the rest of the data follows, nothing between.

    The rest is made to miss the cache (as if evicted while the reply waited):
    it is read in the pool while the connection sends nothing else. If that read
    fails, the reply cannot become an error any more: the connection is dropped.
    """
    big = (M1, 8 * M1)  # far more than a socket holds for a peer that does not read
    disk = open_disk(image, writable=False)
    real_file_run = disk.file_run

    def file_run(offset: int, length: int) -> tuple[int, int, bool] | None:
        run = real_file_run(offset, length)
        if run is not None and big[0] < offset < big[0] + big[1]:
            return run[0], run[1], False  # the rest of the big READ: out of the cache
        return run

    disk.file_run = file_run  # type: ignore[method-assign]
    reads = Reads(disk.read, fail)
    disk.read = reads  # type: ignore[method-assign]
    sent = SendfileCalls(monkeypatch)
    with in_process(tmp_path, {"d": Export("d", disk, read_only=True)}, LOOP) as srv:
        with Client.unix(srv.sock) as client:
            client.connect("d")
            cookies = [client.request(Cmd.READ, *big), client.request(Cmd.READ, 0, 4096)]
            assert sent.partial.wait(60)  # before the client reads a byte
            if fail:
                with pytest.raises(Closed):
                    client.collect(cookies)
            else:
                results = client.collect(cookies)
                assert assemble_read(results[cookies[0]], *big) == pattern(*big)
                assert assemble_read(results[cookies[1]], 0, 4096) == pattern(0, 4096)
                assert client.read(2 * M1, M1) == pattern(2 * M1, M1)
        offset, length = reads.calls[0]
        assert big[0] + sent.sizes[0] <= offset and offset + length == big[0] + big[1], reads.calls
        # Another client is served either way.
        with Client.unix(srv.sock) as other:
            other.connect("d")
            assert other.read(M1, M1) == pattern(M1, M1)


def test_a_reply_whose_rest_is_read_in_the_pool_gets_nothing_else_sent_meanwhile(
    tmp_path: Path, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lent reply stopped by a full socket whose rest left the cache: the rest is read in the
    pool. Another reply's data coming in meanwhile sends nothing of it (that would send bytes the
    pool's read then sends again): the rest follows once, then the other reply."""
    big, other = (M1, 8 * M1), (10 * M1, M1)
    disk = open_disk(image, writable=False)
    evict([image])
    probe = disk.file_run(*other)
    assert probe is not None
    if probe[2]:
        pytest.skip(f"{image.parent} keeps files in memory: nothing to evict")
    run = disk.file_run(*big)
    assert run is not None
    os.pread(run[0], big[1], run[1])  # BIG cached, OTHER not

    missing = threading.Event()  # while set, the rest of BIG reads as not cached
    missing.set()
    real_file_run, real_nowait, real_read, real_fill = disk.file_run, disk.read_nowait, disk.read, disk.fill_cache
    rest_asked, rest_go, fill_asked, fill_go, other_filled = (threading.Event() for _ in range(5))

    def file_run(offset: int, length: int) -> tuple[int, int, bool] | None:
        run = real_file_run(offset, length)
        if offset == other[0]:
            if fill_go.is_set():
                other_filled.set()  # _filled(): the other reply is lent next, on this same turn
        elif run is not None and missing.is_set() and big[0] < offset < big[0] + big[1]:
            return run[0], run[1], False
        return run

    def read_nowait(offset: int, length: int, cached: bool = False) -> Any:
        if missing.is_set() and big[0] < offset < big[0] + big[1]:
            return None
        return real_nowait(offset, length, cached)

    def read(offset: int, length: int) -> Any:
        if big[0] < offset < big[0] + big[1]:
            rest_asked.set()
            assert rest_go.wait(60)
        return real_read(offset, length)

    def fill_cache(offset: int, length: int) -> bool:
        if offset == other[0]:
            fill_asked.set()
            assert fill_go.wait(60)
        return real_fill(offset, length)

    monkeypatch.setattr(disk, "file_run", file_run)
    monkeypatch.setattr(disk, "read_nowait", read_nowait)
    monkeypatch.setattr(disk, "read", read)
    monkeypatch.setattr(disk, "fill_cache", fill_cache)
    sent = SendfileCalls(monkeypatch)
    export = Export("d", disk, read_only=True)
    with in_process(tmp_path, {"d": export}, LOOP) as srv, Client.unix(srv.sock, rcvbuf=4096) as client:
        client.connect("d")
        (conn,) = srv.server.connections
        with socket.socket(fileno=os.dup(conn._sock)) as server_side:
            server_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # full at once
        cookies = [client.request(Cmd.READ, *other), client.request(Cmd.READ, *big)]
        assert fill_asked.wait(60) and rest_asked.wait(60) and sent.partial.is_set()
        missing.clear()
        fill_go.set()
        assert other_filled.wait(60)
        rest_go.set()
        results = client.collect(cookies)
        assert assemble_read(results[cookies[0]], *other) == pattern(*other)
        assert assemble_read(results[cookies[1]], *big) == pattern(*big)
        assert client.read(0, 4096) == pattern(0, 4096)


@pytest.mark.parametrize("cached", [True, False])
def test_a_split_disk_lends_reads_inside_one_piece(tmp_path: Path, cached: bool) -> None:
    """A split bundle served read-only: reads inside one piece may go by sendfile (once the pool
    brought their data into the cache, if it was not), reads across pieces are copied, and every
    byte is the pieces' own."""
    from tests.integration.test_split import STARTS, build

    bundle = tmp_path / "vm.hdd"
    chains, _ = build(bundle, 2)
    for chain in chains:
        if cached:
            for path in chain.paths:
                path.read_bytes()
        else:
            evict(chain.paths)
    want = b"".join(chain.expected_bytes() for chain in chains)
    reads = [(0, M1), (M1, M1), (2 * M1 + 4096, M1), (STARTS[1] + M1, M1), (STARTS[1] - M1 // 2, M1)]
    srv = support.start_prlnbd(tmp_path, [str(bundle)], "--read-only")
    with support.running(srv):
        with Client.unix(srv.sock) as client:
            client.connect("")
            for offset, length in reads:
                assert client.read(offset, length) == want[offset : offset + length], offset
            client.disc()
        total, lent = closing_counts(srv)
    assert total == len(reads) * M1 and lent >= M1
