"""The data path: disk I/O off the event loop, cache modes, the connection lifecycle and stopping.

Storage that waits is simulated by a disk whose read or write blocks on an
event the test controls, in a server run in this process (so the test can
reach the disk); what must or must not have happened is then a matter of
order, never of time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from prlnbd.disk.chain import open_disk
from prlnbd.export import Export
from prlnbd.image.parallels import ParallelsImage
from prlnbd.server import NbdServer
from tests import support
from tests.nbdraw import Client, Cmd

nbd = pytest.importorskip("nbd")

pytestmark = pytest.mark.skipif(
    not all(support.have(t) for t in ("qemu-img", "qemu-io", "qemu-nbd")), reason="qemu-utils is needed"
)

M1 = 1 << 20
SIZE = 16 * M1
SLOW = 5 * M1  # the offset whose I/O waits on the test's gate
LOOPS = ["uvloop", "asyncio"]


def pattern(offset: int, length: int) -> bytes:
    """What the test image holds at OFFSET: each MiB filled with its own byte."""
    out = bytearray()
    pos = offset
    while pos < offset + length:
        n = min(offset + length, (pos // M1 + 1) * M1) - pos
        out += bytes([0x40 + pos // M1]) * n
        pos += n
    return bytes(out)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    writes = [(0x40 + i, i * M1, M1) for i in range(SIZE // M1)]
    return support.make_parallels(tmp_path / "disk.hds", SIZE, writes=writes)


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        return loop
    return asyncio.new_event_loop()


class InProcess:
    """An NbdServer on a Unix socket, its event loop running in a thread of this process."""

    def __init__(self, sock: Path, exports: dict[str, Export], loop: asyncio.AbstractEventLoop) -> None:
        self.sock = sock
        self.loop = loop
        self.thread = threading.Thread(target=loop.run_forever, daemon=True)
        self.thread.start()
        self.server: NbdServer = self.call(self._start(exports))

    async def _start(self, exports: dict[str, Export]) -> NbdServer:
        # These tests hold the pool's calls (disk.read, disk.write, ...) at a gate: every request
        # takes the pool. The ring's paths have their tests in test_read_uring and test_uring;
        # one here puts a stand-in ring (StandInRing) in server.ring.
        server = NbdServer(exports, aio="threads")
        await server.listen_unix(str(self.sock))
        return server

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def uri(self, export: str = "") -> str:
        return f"nbd+unix:///{export}?socket={self.sock}"

    def close(self) -> None:
        if not self.server.stopping:
            self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


@contextlib.contextmanager
def in_process(tmp: Path, exports: dict[str, Export], loop: str = "uvloop") -> Iterator[InProcess]:
    srv = InProcess(tmp / "s.sock", exports, new_loop(loop))
    try:
        yield srv
    finally:
        srv.close()


class Gate:
    """Makes a disk method block at one offset until opened; says when a call has arrived there."""

    def __init__(self, real: Callable[..., Any], offset: int = SLOW) -> None:
        self.real = real
        self.offset = offset
        self.arrived = threading.Event()
        self.opened = threading.Event()

    def __call__(self, offset: int, *args: Any, **kwargs: Any) -> Any:
        if offset == self.offset:
            self.arrived.set()
            if not self.opened.wait(60):
                raise TimeoutError("the test never opened the gate")
        return self.real(offset, *args, **kwargs)


def handle(uri: str, *contexts: str) -> Any:
    h = nbd.NBD()
    for c in contexts:
        h.add_meta_context(c)
    h.connect_uri(uri)
    return h


def wait_done(h: Any, cookie: int) -> None:
    while not h.aio_command_completed(cookie):
        h.poll(-1)


# ---------------------------------------------------------------- storage that waits


@pytest.mark.parametrize("loop", LOOPS)
def test_a_read_waiting_on_storage_holds_up_no_other_request(tmp_path: Path, image: Path, loop: str) -> None:
    """While one READ waits on storage, reads, block status, writes and flushes of every client go on."""
    disk = open_disk(image, writable=True)
    gate = Gate(disk.read)
    disk.read = gate  # type: ignore[method-assign]
    disk.read_nowait = lambda offset, length, cached=False: None  # type: ignore[method-assign]  # nothing is cached
    exp = Export("d", disk, read_only=False)
    with in_process(tmp_path, {"d": exp}, loop) as srv:
        h1 = handle(srv.uri())
        slow = nbd.Buffer(4096)
        cookie = h1.aio_pread(slow, SLOW)
        assert gate.arrived.wait(30)
        h2 = handle(srv.uri(), "base:allocation")
        assert h2.pread(4096, 0) == pattern(0, 4096)
        seen: list[tuple[int, int]] = []
        h2.block_status(SIZE, 0, lambda meta, off, ents, err: seen.extend(zip(ents[::2], ents[1::2], strict=True)))
        assert seen == [(SIZE, 0)]
        h2.pwrite(b"w" * 4096, 8 * M1)
        h2.flush()
        # The same connection too: its next request is answered before the one that waits.
        assert h1.pread(4096, M1) == pattern(M1, 4096)
        assert not h1.aio_command_completed(cookie)
        gate.opened.set()
        wait_done(h1, cookie)
        assert slow.to_bytearray() == pattern(SLOW, 4096)
        assert h1.pread(4096, 8 * M1) == b"w" * 4096
        h1.shutdown()
        h2.shutdown()


def test_a_write_waiting_on_storage_lets_reads_of_cached_data_through(tmp_path: Path, image: Path) -> None:
    disk = open_disk(image, writable=True)
    gate = Gate(disk.write)
    disk.write = gate  # type: ignore[method-assign]
    exp = Export("d", disk, read_only=False)
    with in_process(tmp_path, {"d": exp}) as srv:
        h = handle(srv.uri())
        cookie = h.aio_pwrite(b"s" * 4096, SLOW)
        assert gate.arrived.wait(30)
        for i in range(8):
            assert h.pread(4096, i * M1 + 512) == pattern(i * M1 + 512, 4096)
        assert not h.aio_command_completed(cookie)
        gate.opened.set()
        wait_done(h, cookie)
        assert h.pread(4096, SLOW) == b"s" * 4096
        h.shutdown()


class LogEvent(logging.Handler):
    """Sets an event when a log record matching a pattern is emitted."""

    def __init__(self, regex: str) -> None:
        super().__init__()
        self.regex = re.compile(regex)
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.regex.search(record.getMessage()):
            self.event.set()


class StandInRing:
    """An io_uring stand-in whose reads end when the test says: CAPACITY run at once, the rest wait
    first come, first served, as in UringIO. Called on the server's loop."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.running: list[tuple[list[Any], Callable[[BaseException | None], None]]] = []
        self.waiting: collections.deque[tuple[list[Any], Callable[[BaseException | None], None]]] = (
            collections.deque())
        self.reads = self.read_requests = self.writes = self.write_requests = self.overflows = 0
        self.auto = False  # end every read at once from now on
        self.arrived = threading.Condition()  # notified on each read_all(), for the test's thread

    @property
    def busy(self) -> int:
        return len(self.running) + len(self.waiting)

    def read_all(self, ios: list[Any], callback: Callable[[BaseException | None], None]) -> None:
        self.waiting.append((ios, callback))
        self._fill()
        with self.arrived:
            self.read_requests += 1
            self.arrived.notify_all()

    def hosts(self, which: str) -> list[int]:
        """The file offsets of the requests running or waiting, in order."""
        return [ios[0][3] for ios, _ in getattr(self, which)]

    def end(self, n: int) -> None:
        """End the N oldest running reads (the data is read now), then start waiting ones."""
        for _ in range(n):
            ios, callback = self.running.pop(0)
            for fd, _fallback, buf, offset in ios:
                os.preadv(fd, [buf], offset)
            callback(None)
        self._fill()

    def _fill(self) -> None:
        while self.waiting and len(self.running) < self.capacity:
            self.running.append(self.waiting.popleft())
        if self.auto and self.running:
            asyncio.get_running_loop().call_soon(self.end, len(self.running))

    async def idle(self) -> None:
        assert not self.busy

    def close(self) -> None:
        pass


def test_a_client_gets_its_share_of_the_ring_however_much_another_queued(tmp_path: Path, image: Path) -> None:
    """A client with 40 cold reads queued fills the ring (16 here) only while it is alone; another
    client's read then runs as soon as one of the first's ends, not after all 40."""
    disk = open_disk(image, writable=True)
    disk.read_nowait = lambda offset, length, cached=False: None  # type: ignore[method-assign]  # nothing is cached
    top = disk.layers[0]
    assert isinstance(top, ParallelsImage)
    exp = Export("d", disk, read_only=False)
    ring = StandInRing(16)
    with in_process(tmp_path, {"d": exp}) as srv:
        srv.server.ring = ring  # type: ignore[assignment]
        # Every READ asks for its share once as it is dispatched (none ends before the test says).
        asked = threading.Condition()
        shares: list[int] = []
        real_share = srv.server.ring_share

        def ring_share(conn: Any) -> int:
            share = real_share(conn)
            with asked:
                shares.append(share)
                asked.notify_all()
            return share

        srv.server.ring_share = ring_share  # type: ignore[method-assign]

        async def state(end: int = 0) -> tuple[int, int, list[int], list[int]]:
            """On the loop: end the END oldest running reads, then (running, parked in connections,
            file offsets running, file offsets waiting in the ring)."""
            if end:
                ring.end(end)
            parked = sum(len(c._ring_waiting) for c in srv.server.connections)
            return len(ring.running), parked, ring.hosts("running"), ring.hosts("waiting")

        a = handle(srv.uri())
        offsets = [M1 + i * 8192 for i in range(40)]
        bufs = [nbd.Buffer(4096) for _ in offsets]
        cookies = [a.aio_pread(buf, off) for buf, off in zip(bufs, offsets, strict=True)]
        with asked:
            assert asked.wait_for(lambda: len(shares) == 40, 60)
        running, parked, _, in_ring_queue = srv.call(state())
        # 16 in the ring, the other 24 wait in the connection, not in the ring's queue.
        assert (running, parked, in_ring_queue) == (16, 24, [])

        b = handle(srv.uri())
        b_buf = nbd.Buffer(4096)
        b_cookie = b.aio_pread(b_buf, 9 * M1)
        b_host = top.host_offset(9)
        with ring.arrived:
            assert ring.arrived.wait_for(lambda: ring.read_requests == 17, 60)
        assert srv.call(state())[3] == [b_host]
        # One of A's reads ends: B's runs next; A, now past its share (8 of 16), starts none.
        running, parked, hosts, in_ring_queue = srv.call(state(end=1))
        assert b_host in hosts and (running, parked, in_ring_queue) == (16, 24, [])

        def finish() -> None:
            ring.auto = True
            ring.end(len(ring.running))

        srv.loop.call_soon_threadsafe(finish)
        wait_done(b, b_cookie)
        for cookie in cookies:
            wait_done(a, cookie)
        assert b_buf.to_bytearray() == pattern(9 * M1, 4096)
        for buf, off in zip(bufs, offsets, strict=True):
            assert buf.to_bytearray() == pattern(off, 4096), off
        assert ring.read_requests == 41
        a.shutdown()
        b.shutdown()


def test_stop_never_closes_an_image_under_io_still_running(tmp_path: Path, image: Path) -> None:
    """A stop aborts a connection that does not finish in time, then waits for its I/O before closing."""
    disk = open_disk(image, writable=True)
    gate = Gate(disk.write)
    disk.write = gate  # type: ignore[method-assign]
    exp = Export("d", disk, read_only=False)
    aborted = LogEvent(r"did not finish .*: aborting them")
    logging.getLogger("prlnbd").addHandler(aborted)
    try:
        with in_process(tmp_path, {"d": exp}) as srv:
            h = handle(srv.uri())
            h.aio_pwrite(b"s" * 4096, SLOW)
            assert gate.arrived.wait(30)
            stopping = asyncio.run_coroutine_threadsafe(srv.server.stop(timeout=0.1), srv.loop)
            assert aborted.event.wait(30)
            # The connection is gone, but its write still runs: the image must stay open.
            top = disk.layers[0]
            assert isinstance(top, ParallelsImage)
            assert top.fd >= 0 and not stopping.done()
            gate.opened.set()
            stopping.result(30)
            assert top.fd == -1
    finally:
        logging.getLogger("prlnbd").removeHandler(aborted)
    # Closed cleanly, with the write that finished after the abort in it.
    assert ParallelsImage.open(image).in_use is False
    assert support.nbd_pread  # the reference reading below goes through qemu-nbd
    with support.running(support.start_qemu_nbd(tmp_path / "q", image)) as ref:
        assert support.nbd_pread(ref.uri(), SLOW, 4096) == b"s" * 4096


def test_a_request_that_crashes_is_answered_and_its_connection_closed(tmp_path: Path, image: Path) -> None:
    """A bug in a handler: the request gets EIO, the connection ends cleanly, other clients go on."""
    disk = open_disk(image, writable=True)

    def broken(offset: int, length: int) -> None:
        raise ZeroDivisionError("a bug")

    disk.prefetch = broken  # type: ignore[method-assign]
    exp = Export("d", disk, read_only=False)
    with in_process(tmp_path, {"d": exp}) as srv:
        other = handle(srv.uri())
        with Client.unix(srv.sock) as c:
            c.connect()
            res = c.call(Cmd.CACHE, 0, 4096)
            assert res.error == 5  # EIO
            assert c.is_closed(timeout=10)
        assert other.pread(4096, 0) == pattern(0, 4096)
        other.shutdown()


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), ZeroDivisionError("a bug")])
def test_a_flush_that_fails_or_crashes_still_answers(tmp_path: Path, image: Path, error: BaseException) -> None:
    """FLUSH runs as a task: its failure, expected or not, still becomes its reply."""
    disk = open_disk(image, writable=True)

    def failing(token: object) -> None:
        raise error

    disk.flush_io = failing  # type: ignore[method-assign]
    exp = Export("d", disk, read_only=False)
    with in_process(tmp_path, {"d": exp}) as srv, Client.unix(srv.sock) as c:
        c.connect()
        assert not c.call(Cmd.WRITE, 0, 512, payload=b"w" * 512).error
        assert c.call(Cmd.FLUSH).error == 5  # EIO
        if isinstance(error, OSError):
            assert c.read(0, 512) == b"w" * 512  # an I/O error: the connection goes on
        else:
            assert c.is_closed(timeout=10)  # a bug: answered, then the connection ends


# ---------------------------------------------------------------- connection lifecycle


@pytest.mark.parametrize("loop", LOOPS)
def test_large_reads_then_disc_end_the_connection_once(tmp_path: Path, image: Path, loop: str) -> None:
    """Large READs, then DISC at once, over TCP: one closing line per connection, no traceback.

    The replies fill the transport's buffer (pause_writing); a client reading
    fast lets one send empty it, and the transport then calls resume_writing
    and, being closed, connection_lost itself: closing from inside
    resume_writing made plain asyncio call connection_lost twice.
    """
    env = dict(os.environ, PRLNBD_LOOP=loop)
    log = tmp_path / "tcp.log"
    with log.open("wb") as logf:
        proc = subprocess.Popen(
            [support.PYTHON, "-m", "prlnbd", "serve", "--read-only", "--bind", "127.0.0.1", "--port", "0", str(image)],
            stdout=logf, stderr=subprocess.STDOUT, cwd=support.ROOT, env=env,
        )
    srv = support.Server(proc, tmp_path / "none", log)
    with support.running(srv):
        m = re.search(r"serving .* on \('127\.0\.0\.1', (\d+)\)", srv.wait_for_log("serving", timeout=60))
        assert m is not None, srv.log_text()
        rounds = 10
        for _ in range(rounds):
            h = nbd.NBD()
            h.connect_uri(f"nbd://127.0.0.1:{m.group(1)}/")
            for _ in range(2):
                h.aio_pread(nbd.Buffer(SIZE), 0)
            h.aio_disconnect()
            while h.aio_in_flight():
                h.poll(-1)
            del h
    # Stopped: every connection's closing line is written before the server exits.
    assert srv.stop() == 0
    text = srv.log_text()
    assert "Traceback" not in text and "Error" not in text, text
    assert text.count("client disconnected") == rounds, text


# ---------------------------------------------------------------- cache modes


def bat_entry(image: Path, cluster: int) -> int:
    with image.open("rb") as f:
        f.seek(64 + 4 * cluster)
        value: int = struct.unpack("<I", f.read(4))[0]
        return value


def fd_flags(pid: int, path: Path) -> list[int]:
    """The open flags of every descriptor PID holds on PATH (from /proc)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                text = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
                m = re.search(r"^flags:\s+(\d+)", text, re.M)
                assert m is not None
                out.append(int(m.group(1), 8))
    return out


@pytest.mark.parametrize("mode", ["writeback", "unsafe"])
def test_flush_makes_bat_entries_durable_unless_unsafe(tmp_path: Path, mode: str) -> None:
    image = support.make_parallels(tmp_path / "d.hds", SIZE)
    srv = support.start_prlnbd(tmp_path, [f"d={image}"], f"--cache={mode}")
    with support.running(srv):
        h = handle(srv.uri("d"))
        h.pwrite(b"x" * 4096, 3 * M1)
        h.flush()
        on_disk = bat_entry(image, 3)
        h.shutdown()
    assert bool(on_disk) == (mode == "writeback")
    # A clean stop writes everything in either mode.
    assert bat_entry(image, 3) != 0
    assert support.run("qemu-img", "check", "-f", "parallels", image, check=False).returncode == 0


def test_cache_none_reads_and_writes_with_o_direct(tmp_path: Path, image: Path) -> None:
    srv = support.start_prlnbd(tmp_path, [f"d={image}"], "--cache=none")
    with support.running(srv):
        flags = fd_flags(srv.proc.pid, image.resolve())
        assert any(f & os.O_DIRECT for f in flags) and any(not f & os.O_DIRECT for f in flags), flags
        h = handle(srv.uri("d"))
        assert h.pread(M1, 2 * M1) == pattern(2 * M1, M1)  # aligned: direct
        assert h.pread(1000, 2 * M1 + 7) == pattern(2 * M1 + 7, 1000)  # unaligned: through the cache
        h.pwrite(b"a" * 8192, 20 * 4096)  # aligned, into an allocated cluster
        h.pwrite(b"b" * 100, 3 * M1 + 5)  # unaligned
        h.flush()
        assert h.pread(8192, 20 * 4096) == b"a" * 8192
        assert h.pread(100, 3 * M1 + 5) == b"b" * 100
        h.shutdown()
    expected = bytearray(pattern(0, SIZE))
    expected[20 * 4096 : 22 * 4096] = b"a" * 8192
    expected[3 * M1 + 5 : 3 * M1 + 105] = b"b" * 100
    with support.running(support.start_qemu_nbd(tmp_path / "q", image)) as ref:
        assert support.nbd_pread(ref.uri()) == bytes(expected)
    assert support.run("qemu-img", "check", "-f", "parallels", image, check=False).returncode == 0


def test_cache_none_on_a_file_system_without_direct_io_is_a_clear_error(
    tmp_path: Path, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def no_direct(path: Any, flags: int, *args: Any) -> int:
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *args)

    disk = open_disk(image, writable=False)
    monkeypatch.setattr(os, "open", no_direct)
    try:
        with pytest.raises(Exception, match=r"disk\.hds: its file system refuses direct I/O .* --cache=writeback"):
            Export("d", disk, read_only=True, cache="none")
    finally:
        disk.close()


def test_serve_with_an_unknown_cache_mode_is_refused(tmp_path: Path, image: Path) -> None:
    res = subprocess.run(
        [support.PYTHON, "-m", "prlnbd", "serve", "--cache=fast", str(image)], capture_output=True, text=True
    )
    assert res.returncode == 2 and "invalid choice: 'fast'" in res.stderr


# ---------------------------------------------------------------- the socket


def test_socket_path_holding_a_file_or_a_live_server_is_not_replaced(tmp_path: Path, image: Path) -> None:
    busy = tmp_path / "busy.sock"
    other = support.start_prlnbd(tmp_path / "o", [f"d={image}"], "--read-only")
    with support.running(other):
        for path, why in ((other.sock, "another server is listening"), (image, "is not a socket")):
            res = subprocess.run(
                [support.PYTHON, "-m", "prlnbd", "serve", "--read-only", "--socket", str(path), str(image)],
                capture_output=True, text=True, timeout=60,
            )
            assert res.returncode != 0 and why in res.stderr, res.stderr
            assert "Traceback" not in res.stderr
        # Both still there: the other server still answers, the image is untouched.
        assert support.nbd_pread(other.uri("d"), 0, 4096) == pattern(0, 4096)
    # A stale socket (nobody listening) is replaced.
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(busy))
    s.close()
    srv = support.start_prlnbd(tmp_path, [f"d={image}"], "--read-only")
    srv.stop()
    res = subprocess.Popen(
        [support.PYTHON, "-m", "prlnbd", "serve", "--read-only", "--socket", str(busy), str(image)],
        stderr=subprocess.PIPE,
    )
    try:
        support.wait_for_socket(busy, res, tmp_path / "none.log")
    finally:
        res.send_signal(signal.SIGTERM)
        assert res.wait(30) == 0


def test_socket_and_port_listen_on_both(tmp_path: Path, image: Path) -> None:
    srv = support.start_prlnbd(tmp_path, [f"d={image}"], "--read-only", "--port", "0")
    with support.running(srv):
        m = re.search(r"serving .* on .*\('127\.0\.0\.1', (\d+)\)", srv.wait_for_log("serving"))
        assert m is not None, srv.log_text()
        assert support.nbd_pread(srv.uri("d"), 0, 4096) == pattern(0, 4096)
        assert support.nbd_pread(f"nbd://127.0.0.1:{m.group(1)}/d", M1, 4096) == pattern(M1, 4096)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "-1"], "argument --port: -1 is not a TCP port (0 to 65535)"),
        (["--port", "99999"], "argument --port: 99999 is not a TCP port (0 to 65535)"),
        (["--port", "http"], "argument --port: 'http' is not a port number"),
        (["--bind", "256.1.1.1", "--port", "0"], "cannot listen on 256.1.1.1:0: "),
        (["--socket", "/missing/dir/s.sock"], "cannot listen on /missing/dir/s.sock: "),
    ],
)
def test_bad_listen_options_are_one_line_errors(tmp_path: Path, image: Path, args: list[str], message: str) -> None:
    res = subprocess.run(
        [support.PYTHON, "-m", "prlnbd", "serve", "--read-only", *args, str(image)],
        capture_output=True, text=True, timeout=60, cwd=support.ROOT,
    )
    assert res.returncode != 0
    assert message in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert len([line for line in res.stderr.splitlines() if "error" in line]) == 1, res.stderr


# ---------------------------------------------------------------- limits a hostile client meets


def greeted(sock: socket.socket) -> bool:
    """Whether the server greeted this connection (False: it was closed before the greeting)."""
    data = b""
    while len(data) < 8:
        chunk = sock.recv(8 - len(data))
        if not chunk:
            return False
        data += chunk
    return data == b"NBDMAGIC"


def rss(pid: int) -> int:
    m = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    assert m is not None
    return int(m.group(1)) * 1024


def test_connections_past_the_limit_are_closed_before_the_greeting(tmp_path: Path, image: Path) -> None:
    srv = support.start_prlnbd(tmp_path, [f"d={image}"], "--read-only", "--max-connections", "3")
    with support.running(srv):
        srv.wait_for_log("export None")  # start_server()'s probe has come and gone
        held = [Client.unix(srv.sock).connect() for _ in range(3)]
        refused = 0
        for _ in range(20):
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(30)
                s.connect(str(srv.sock))
                refused += not greeted(s)
        assert refused == 20
        # One of the three leaves; once the server has let it go, a good client gets in.
        held.pop().close()
        srv.wait_for_log("export 'd'")
        with Client.unix(srv.sock) as c:
            c.connect()
            assert c.read(0, 4096) == pattern(0, 4096)
        for c in held:
            assert c.read(M1, 512) == pattern(M1, 512)  # the others were never disturbed
            c.close()
    lines = [ln for ln in srv.log_text().splitlines() if "refused connection" in ln]
    # One line a second at most, each counting the refusals it stands for.
    assert 1 <= len(lines) <= 20 and "more than 3 connections (--max-connections)" in lines[0]
    assert "Traceback" not in srv.log_text()


def test_one_tcp_address_cannot_take_every_connection(tmp_path: Path, image: Path) -> None:
    srv = support.start_prlnbd(
        tmp_path, [f"d={image}"], "--read-only", "--port", "0", "--max-connections-per-address", "2"
    )
    with support.running(srv):
        m = re.search(r"serving .* on .*\('127\.0\.0\.1', (\d+)\)", srv.wait_for_log("serving"))
        assert m is not None
        port = int(m.group(1))
        held = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(2)]
        assert all(greeted(s) for s in held)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            assert not greeted(s)
        # Others (here: the Unix socket) are served as before.
        assert support.nbd_pread(srv.uri("d"), 0, 4096) == pattern(0, 4096)
        for s in held:
            s.close()
    assert "from 127.0.0.1 (--max-connections-per-address)" in srv.log_text()


def test_idle_connections_cost_little_memory(tmp_path: Path, image: Path) -> None:
    """Connections past the handshake that send nothing hold a small receive buffer, not 256 KiB."""
    srv = support.start_prlnbd(tmp_path, [f"d={image}"], "--read-only", "--max-connections", "400")
    with support.running(srv):
        warm = [Client.unix(srv.sock).connect() for _ in range(20)]
        before = rss(srv.proc.pid)
        idle = [Client.unix(srv.sock).connect() for _ in range(300)]
        grown = rss(srv.proc.pid) - before
        for c in warm + idle:
            c.close()
    assert grown < 300 * 64 * 1024, f"{grown / 300 / 1024:.0f} KiB per idle connection"


def test_a_client_that_never_reads_its_replies_holds_up_no_other(tmp_path: Path, image: Path) -> None:
    srv = support.start_prlnbd(tmp_path, [f"d={image}"], "--read-only")
    with support.running(srv):
        hostile = Client.unix(srv.sock, rcvbuf=4096).connect()
        # READs of 1 MiB, as many as the socket takes, and not one reply read.
        wanted = b"".join(hostile.pack(Cmd.READ, 0, M1)[1] for _ in range(4000))
        hostile.sock.setblocking(False)
        sent = 0
        with contextlib.suppress(BlockingIOError):
            while sent < len(wanted):
                sent += hostile.sock.send(wanted[sent : sent + 65536])
        assert sent > 64 * 28  # more than the server takes into flight at once
        with Client.unix(srv.sock) as good:
            good.connect()
            for i in range(8):
                assert good.read(i * M1, 4096) == pattern(i * M1, 4096)
        before = rss(srv.proc.pid)
        assert before < 512 << 20, f"server holds {before >> 20} MiB for one client"
        hostile.close()


def test_a_client_flooding_writes_holds_bounded_memory_and_up_no_other(tmp_path: Path, image: Path) -> None:
    srv = support.start_prlnbd(tmp_path, [f"d={image}"])
    with support.running(srv):
        hostile = Client.unix(srv.sock, rcvbuf=4096).connect()
        payload = b"h" * M1
        wanted = b"".join(hostile.pack(Cmd.WRITE, (i % 4) * M1, M1, payload=payload)[1] for i in range(400))
        hostile.sock.setblocking(False)
        sent = 0
        with contextlib.suppress(BlockingIOError):
            while sent < len(wanted):
                sent += hostile.sock.send(wanted[sent : sent + M1])
        with Client.unix(srv.sock) as good:
            good.connect()
            for i in range(8, 12):
                assert good.read(i * M1, 4096) == pattern(i * M1, 4096)
        held = rss(srv.proc.pid)
        assert held < 512 << 20, f"server holds {held >> 20} MiB for one client"
        hostile.close()
