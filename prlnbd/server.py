"""The asyncio NBD server: sockets in, protocol events to exports, reply buffers out."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import struct
import time
from collections.abc import Coroutine, Iterator, Mapping
from functools import partial
from typing import Any, cast

from prlnbd.errors import ProtocolError, RequestError
from prlnbd.export import Export
from prlnbd.nbd.connection import Disconnect, ExportSelected, Request, ServerConnection, State
from prlnbd.nbd.constants import Cmd, CmdFlag, Errno

log = logging.getLogger(__name__)

DEFAULT_HANDSHAKE_TIMEOUT = 10.0
# Replies queued beyond this are written out before more requests are taken, so that
# pause_writing() can stop a client that does not read its replies.
FLUSH_BYTES = 1 << 20
# The transport's write buffer limits: deep enough to keep a queue of large READ replies
# streaming, shallow enough to bound what a client that does not read can make us hold.
WRITE_HIGH_WATER = 8 << 20
WRITE_LOW_WATER = 2 << 20
UNIX_SNDBUF = 4 << 20
# READs at least this large whose bytes are one run in one file are sent with sendfile:
# the kernel passes page cache pages to the socket without copying them through us.
SENDFILE_MIN = 64 * 1024
# Receive buffers kept from closed connections for new ones (each is RECV_BUFFER bytes).
MAX_SPARE_BUFFERS = 4
# How long one turn of the warm-up (Export.warm_up) may hold the event loop before it lets
# requests in: a request arriving meanwhile waits at most this long.
WARM_UP_TURN = 0.0005
# NbdProtocol._walk(), the lane for a lone client walking the disk's block status:
# - LANE_GAP: a client that asks again sooner than this after a reply shares our CPU
#   (about 10 us here; one on another CPU takes about 50), and the lane does not help it;
# - the most steps, and seconds, before the event loop gets its turn again;
# - how long a blocking read waits for the next request (rounded up to kernel ticks).
LANE_GAP = 25e-6
LANE_STEPS = 64
LANE_BUDGET = 0.005
_LANE_TIMEVAL = struct.pack("ll", 0, 1000)
_clock = time.perf_counter
# NbdProtocol._sock before the socket is looked up, and when there is none to sendfile to.
_UNKNOWN = -1
_NO_SOCKET = -2

_READ = Cmd.READ
_WRITE = Cmd.WRITE
_BLOCK_STATUS = Cmd.BLOCK_STATUS
_REQ_ONE = int(CmdFlag.REQ_ONE)
_DF = int(CmdFlag.DF)
_FUA = int(CmdFlag.FUA)


class NbdProtocol(asyncio.BufferedProtocol):
    """One client connection: feeds bytes to the protocol core and acts on its events."""

    def __init__(self, server: NbdServer, unix: bool) -> None:
        self.server = server
        self.unix = unix  # a Unix socket (else TCP): known from the listener, not asked of each socket
        self.conn = ServerConnection(server.infos, server.default, buffer=server.spare_buffer())
        self.transport: asyncio.Transport | None = None
        self.export: Export | None = None
        self.peer = "?"
        self.started = time.monotonic()
        self.requests = 0
        self.lane_steps = 0  # requests _walk() answered
        self.bytes_read = 0
        self.reason = "client closed"
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False
        self._paused = False
        self._queued = 0  # reply bytes built since the last flush
        self._sock = _UNKNOWN  # the socket's descriptor, for sendfile: looked up at the first large READ
        # The transport asks for a buffer before every read: let it call the protocol core
        # directly rather than through a method of ours (one Python call less per request).
        self.get_buffer = self.conn.get_buffer  # type: ignore[method-assign]
        self.inflight: set[asyncio.Task[None]] = set()
        self._lane = False  # the socket has the timeouts _walk() relies on (set by _find_socket)
        self._replied = float("inf")  # when the last quick status reply went out

    # ---- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Send the greeting and arm the handshake timer."""
        self.transport = cast(asyncio.Transport, transport)
        with contextlib.suppress(Exception):
            self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        # Nothing here asks the socket anything (with uvloop each question is a system call):
        # the client is waiting for the greeting. A Unix socket's peer has no name anyway.
        if self.unix:
            self.peer = "unix socket"
        else:
            peer = self.transport.get_extra_info("peername")
            self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.server.handshake_timeout, self._handshake_timed_out)
        log.debug("%s: connected", self.peer)
        self._flush()
        if self.server.stopping:
            self.shutdown()

    def get_buffer(self, sizehint: int) -> memoryview:
        """Hand the transport the protocol core's receive buffer: no copy of what arrives."""
        return self.conn.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        """Take the requests the new bytes complete and answer them."""
        reply = self.conn.quick_status_reply(nbytes)
        if reply is None:
            self._process()
            return
        # One step of a block status walk, answered by the protocol core.
        arrived = _clock()
        self.requests += 1
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.writelines(reply)
            lane = arrived - self._replied > LANE_GAP and self._lane_open()
            self._replied = _clock()
            if lane:
                self._walk()

    def _lane_open(self) -> bool:
        """Whether _walk() may take the socket: the only connection, every reply sent, nothing else going on."""
        transport = self.transport
        return (
            transport is not None
            and not transport.get_write_buffer_size()
            and len(self.server.connections) == 1
            and not self.server.stopping
            and not self._paused
            and not self._closing
            and (self._sock if self._sock != _UNKNOWN else self._find_socket()) >= 0
            and self._lane
        )

    def _walk(self) -> None:
        """Serve the next steps of a lone client's block status walk straight from its socket.

        Through the event loop each request costs a wake-up for readiness, then
        a read; a blocking read is woken with the bytes. When client and server
        run on two CPUs (or machines) that is several microseconds less per
        round trip: 7-13 us of 41-50 here. So while the client takes long to ask
        again (more than LANE_GAP, which a client sharing our CPU does not), the
        socket is read blocking and plain status requests answered at once.
        Each wait is bounded by the socket's SO_RCVTIMEO (the kernel counts it
        in ticks: a few milliseconds), the lane by LANE_STEPS and LANE_BUDGET.
        Anything else the client sends goes the usual way, and the event loop
        gets its turn back.
        """
        fd = self._sock
        conn = self.conn
        rest: bytes | None = None
        process = False
        replied = self._replied
        deadline = replied + LANE_BUDGET
        os.set_blocking(fd, True)
        try:
            for _ in range(LANE_STEPS):
                try:
                    n = os.readv(fd, [conn.get_buffer()])
                except OSError:
                    return  # a quiet client (the wait ran out), or a broken socket: the loop finds out
                arrived = _clock()
                if not n:
                    return  # end of file: the loop sees it too
                reply = conn.quick_status_reply(n)
                if reply is None:
                    process = True
                    return
                self.requests += 1
                self.lane_steps += 1
                try:
                    sent = os.writev(fd, reply)
                except OSError:
                    sent = 0
                self._replied = _clock()
                if sent < sum(map(len, reply)):
                    rest = b"".join(reply)[sent:]  # the client is not reading: the transport keeps the rest
                    return
                if arrived - replied <= LANE_GAP or self._replied > deadline:
                    return  # the client now shares our CPU, or the loop has waited long enough
                replied = self._replied
        finally:
            os.set_blocking(fd, False)
            if rest is not None and self.transport is not None:
                self.transport.write(rest)
            if process:
                self._process()

    def _process(self) -> None:
        """Act on events until the input runs dry or the client stops reading replies."""
        conn = self.conn
        request = self._request
        try:
            while not self._paused and not self._closing:
                ev = conn.next_event()
                if ev is None:
                    break
                if type(ev) is Request:
                    request(ev)
                elif isinstance(ev, ExportSelected):
                    self._selected(ev)
                elif isinstance(ev, Disconnect):
                    self.reason = "client disconnected"
                    self._flush()
                    self._close()
                    return
        except ProtocolError as e:
            self.reason = f"protocol error: {e}"
            self._flush()
            self._close()
            return
        self._flush()

    def eof_received(self) -> bool | None:
        """The client closed its side: close ours."""
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection; its summary line is logged once the socket is closed."""
        if self._timer is not None:
            self._timer.cancel()
        if exc is not None and self.reason == "client closed":
            self.reason = f"connection lost: {exc}"
        self.server.connections.discard(self)
        self.server.keep_buffer(self.conn.release_buffer())
        # The transport closes the socket when this returns, and a client that sent DISC waits
        # for that: log afterwards. stop() waits for connection_closed(), so the line is written.
        asyncio.get_running_loop().call_soon(self._log_closed)

    def _log_closed(self) -> None:
        log.info(
            "connection %s export %r: %d requests, %d bytes read, %.1fs, %s%s",
            self.peer,
            self.export.name if self.export else None,
            self.requests,
            self.bytes_read,
            time.monotonic() - self.started,
            self.reason,
            f"; {self.lane_steps} of the requests answered in the walk lane" if self.lane_steps else "",
        )
        self.server.connection_closed()

    def pause_writing(self) -> None:
        """The client is not reading: stop reading requests until it catches up."""
        if self.transport is not None and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        """The client caught up: answer the requests already received, then read more."""
        if self.transport is not None and self._paused:
            self._paused = False
            if not self._closing:
                self._process()
                if not self._paused and not self._closing:
                    self.transport.resume_reading()

    # ---- protocol events

    def _selected(self, ev: ExportSelected) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        export = self.export = self.server.exports[ev.export.name]
        conn = self.conn
        conn.set_status_sources({cid: partial(export.packed_status, name) for cid, name in conn.contexts.items()})
        log.debug("%s: transmission on export %r", self.peer, self.export.name)

    def _request(self, req: Request) -> None:
        export = self.export
        if export is None:  # pragma: no cover - the protocol core only yields requests after GO
            return
        self.requests += 1
        conn = self.conn
        cmd = req.cmd
        try:
            if cmd is _READ:
                offset = req.offset
                length = req.length
                if length >= SENDFILE_MIN and (self._sock if self._sock != _UNKNOWN else self._find_socket()) >= 0:
                    where = export.locate(offset, length)
                    if where is not None and self._sendfile(req, export, *where):
                        self.bytes_read += length
                        return
                buf, holes = export.read(offset, length)
                self.bytes_read += length
                conn.send_read(req.cookie, offset, buf, holes, df=req.flags & _DF != 0)
                self._queued += length
                if self._queued >= FLUSH_BYTES:
                    self._flush()
            elif cmd is _WRITE:
                # Writes are applied here, in order; only their durability (FUA) waits.
                export.write(req.offset, req.payload if req.payload is not None else memoryview(b""))
                if req.flags & _FUA:
                    self._spawn(req, self._flush_then_reply(req))
                else:
                    conn.send_ok(req.cookie)
            elif cmd is _BLOCK_STATUS:
                offset = req.offset
                length = req.length
                req_one = req.flags & _REQ_ONE != 0
                replies = []  # a loop, not a comprehension: no extra frame on the hot path
                for cid, name in conn.contexts.items():
                    replies.append((cid, export.status_payload(name, offset, length, req_one=req_one)))
                conn.send_block_status(req.cookie, replies)
            elif cmd == Cmd.CACHE:
                export.cache(req.offset, req.length)
                conn.send_ok(req.cookie)
            elif cmd == Cmd.FLUSH:
                self._spawn(req, self._flush_then_reply(req))
            else:
                export.zero(
                    req.offset,
                    req.length,
                    trim=cmd == Cmd.TRIM,
                    no_hole=bool(req.flags & CmdFlag.NO_HOLE),
                    fast=bool(req.flags & CmdFlag.FAST_ZERO),
                )
                if req.flags & CmdFlag.FUA:
                    self._spawn(req, self._flush_then_reply(req))
                else:
                    conn.send_ok(req.cookie)
        except RequestError as e:
            conn.send_error(req.cookie, e.errno, str(e))
        except OSError as e:
            log.warning("%s: %s failed: %s", self.peer, req.cmd.name, e)
            conn.send_error(req.cookie, Errno.EIO, f"{req.cmd.name} failed: {e.strerror}")

    def _find_socket(self) -> int:
        """Look up the socket's descriptor for sendfile and _walk() (once); -2 when there is none to use."""
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        self._sock = _NO_SOCKET
        if sock is not None:
            self._sock = sock.fileno()
            if self.unix:
                # The default (~200 KiB) splits every large READ reply over several wakeups;
                # the kernel caps this at net.core.wmem_max. TCP tunes its own buffer.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SNDBUF)
            # The waits of _walk()'s blocking reads and writes. They change nothing while the
            # socket is non-blocking, as it is whenever the event loop has it.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _LANE_TIMEVAL)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _LANE_TIMEVAL)
                self._lane = True
        return self._sock

    def _sendfile(self, req: Request, export: Export, fd: int, host: int) -> bool:
        """Send a READ reply whose data is LENGTH bytes of FD at HOST, the data by sendfile.

        Only while the transport has nothing queued, so nothing can come between
        the header and the data; whatever the socket does not take at once is read
        and queued on the transport. False: nothing was sent, reply the usual way.
        """
        self._flush()
        transport = self.transport
        if transport is None or transport.is_closing() or transport.get_write_buffer_size():
            return False
        sock = self._sock
        length = req.length
        header = self.conn.read_header(req.cookie, req.offset, length)
        try:
            n = os.write(sock, header)
        except OSError:
            return False  # socket full, or broken: the transport finds out which
        sent = 0
        if n < len(header):
            transport.write(header[n:])
        else:
            with contextlib.suppress(OSError):
                sent = os.sendfile(sock, fd, host, length)
        if sent < length:
            # The socket is full (or the file ends early, or sendfile failed): the rest the usual way.
            try:
                buf, _ = export.read(req.offset + sent, length - sent)
            except RequestError as e:
                # The header promised the data: no error reply can follow it any more.
                self.reason = f"READ failed after its reply began: {e}"
                log.warning("%s: %s", self.peer, self.reason)
                self._closing = True
                transport.abort()
                return True
            transport.write(buf)
        return True

    def _spawn(self, req: Request, coro: Coroutine[Any, Any, None]) -> None:
        """Run a request that must wait (a flush) while others go on; its reply comes out of order."""
        task = asyncio.get_running_loop().create_task(coro)
        self.inflight.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.inflight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: request failed unexpectedly: %r", self.peer, task.exception())
        self._flush()
        if self._closing and not self.inflight:
            self._close()

    async def _flush_then_reply(self, req: Request) -> None:
        export = self.export
        if export is None:  # pragma: no cover
            return
        try:
            await export.flush()
        except RequestError as e:
            self.conn.send_error(req.cookie, e.errno, str(e))
        else:
            self.conn.send_ok(req.cookie)

    # ---- helpers

    def _flush(self) -> None:
        self._queued = 0
        out = self.conn.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(out)

    def _close(self) -> None:
        """Close the connection once every request in flight is answered."""
        self._closing = True
        if self.inflight:
            if self.transport is not None and not self.transport.is_closing():
                self.transport.pause_reading()
            return
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if self.conn.state in (State.CLIENT_FLAGS, State.OPTIONS):
            self.reason = f"handshake not finished within {self.server.handshake_timeout:g}s"
            self._close()

    def shutdown(self) -> None:
        """Stop taking requests; close once what is in flight is answered."""
        self.reason = "server shutting down"
        if self.transport is not None:
            with contextlib.suppress(Exception):
                self.transport.pause_reading()
        self._close()


class NbdServer:
    """Serves a set of exports on listening sockets until stopped."""

    def __init__(
        self,
        exports: Mapping[str, Export],
        *,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    ) -> None:
        self.exports = dict(exports)
        self.infos = {name: export.info for name, export in self.exports.items()}
        self.default = next(iter(self.exports)) if len(self.exports) == 1 else None
        # Receive buffers of closed connections, for new ones to reuse.
        self._spare_buffers: list[bytearray] = []
        self.handshake_timeout = handshake_timeout
        self.connections: set[NbdProtocol] = set()
        self.stopping = False
        self._servers: list[asyncio.Server] = []
        self._idle = asyncio.Event()
        self._idle.set()

    def _factory(self, unix: bool) -> NbdProtocol:
        # Counted from here, not from connection_made(): another connection closing in
        # between must not make the server look idle to stop().
        proto = NbdProtocol(self, unix)
        self.connections.add(proto)
        self._idle.clear()
        return proto

    def spare_buffer(self) -> bytearray | None:
        """A receive buffer a closed connection left, if any."""
        return self._spare_buffers.pop() if self._spare_buffers else None

    def keep_buffer(self, buffer: bytearray | None) -> None:
        """Keep a closed connection's receive buffer (a few at most) for the next connection."""
        if buffer is not None and len(self._spare_buffers) < MAX_SPARE_BUFFERS:
            self._spare_buffers.append(buffer)

    def connection_closed(self) -> None:
        """Note that a connection ended."""
        if not self.connections:
            self._idle.set()

    async def listen_unix(self, path: str) -> None:
        """Listen on a Unix socket at PATH (replacing a stale socket file)."""
        with contextlib.suppress(FileNotFoundError):
            if os.path.exists(path) and not os.path.isdir(path):
                os.unlink(path)
        loop = asyncio.get_running_loop()
        self._servers.append(await loop.create_unix_server(partial(self._factory, True), path))

    async def listen_tcp(self, host: str, port: int) -> None:
        """Listen on TCP HOST:PORT."""
        loop = asyncio.get_running_loop()
        self._servers.append(await loop.create_server(partial(self._factory, False), host, port, reuse_address=True))

    async def listen_socket(self, sock: socket.socket) -> None:
        """Serve an already listening socket (systemd socket activation)."""
        loop = asyncio.get_running_loop()
        server: asyncio.Server
        if sock.family == socket.AF_UNIX:
            server = await loop.create_unix_server(partial(self._factory, True), sock=sock)
        else:
            server = await loop.create_server(partial(self._factory, False), sock=sock)
        self._servers.append(server)

    def start_warm_up(self) -> None:
        """Build the exports' bitmap status windows (Export.warm_up) in turns while nothing else runs."""
        steps = itertools.chain.from_iterable(export.warm_up() for export in self.exports.values())
        asyncio.get_running_loop().call_soon(self._warm_up_turn, steps, _clock(), 0)

    def _warm_up_turn(self, steps: Iterator[None], started: float, done: int) -> None:
        if self.stopping:
            return
        deadline = _clock() + WARM_UP_TURN
        try:
            for _ in steps:
                done += 1
                if _clock() > deadline:
                    # Let the loop poll for requests first: they come before the warm-up.
                    asyncio.get_running_loop().call_soon(self._warm_up_turn, steps, started, done)
                    return
        except Exception as e:  # the windows are built on demand instead; nothing else is lost
            log.warning("building bitmap status ahead of need failed: %s", e)
            return
        if done:
            elapsed = (_clock() - started) * 1e3
            log.info("bitmap block status ready: %d windows, %.1f ms after serving began", done, elapsed)

    def addresses(self) -> list[str]:
        """Where the server listens, for the log."""
        out = []
        for srv in self._servers:
            for s in srv.sockets:
                out.append(str(s.getsockname()))
        return out

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop listening, let in-flight requests finish, close every connection and export."""
        self.stopping = True
        for srv in self._servers:
            srv.close()
        for conn in list(self.connections):
            conn.shutdown()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            log.warning("%d connections did not close in %.0fs", len(self.connections), timeout)
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await srv.wait_closed()
        for export in self.exports.values():
            export.close()
