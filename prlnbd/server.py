"""The asyncio NBD server: sockets in, protocol events to exports, reply buffers out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Coroutine, Mapping
from typing import Any, cast

from prlnbd.errors import ProtocolError, RequestError
from prlnbd.export import Export
from prlnbd.nbd.connection import Disconnect, ExportSelected, Request, ServerConnection, State
from prlnbd.nbd.constants import Cmd, CmdFlag, Errno

log = logging.getLogger(__name__)

DEFAULT_HANDSHAKE_TIMEOUT = 10.0


class NbdProtocol(asyncio.Protocol):
    """One client connection: feeds bytes to the protocol core and acts on its events."""

    def __init__(self, server: NbdServer) -> None:
        self.server = server
        self.conn = ServerConnection({n: e.info for n, e in server.exports.items()}, server.default)
        self.transport: asyncio.Transport | None = None
        self.export: Export | None = None
        self.peer = "?"
        self.started = time.monotonic()
        self.requests = 0
        self.bytes_read = 0
        self.reason = "client closed"
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False
        self._paused = False
        self.inflight: set[asyncio.Task[None]] = set()

    # ---- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Send the greeting and arm the handshake timer."""
        self.transport = cast(asyncio.Transport, transport)
        peer = self.transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else (peer or "unix socket")
        self.server.connections.add(self)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.server.handshake_timeout, self._handshake_timed_out)
        log.debug("%s: connected", self.peer)
        self._flush()

    def data_received(self, data: bytes) -> None:
        """Run the protocol on new bytes and answer what they complete."""
        try:
            events = self.conn.receive_data(data)
        except ProtocolError as e:
            self.reason = f"protocol error: {e}"
            self._flush()
            self._close()
            return
        for ev in events:
            if isinstance(ev, Request):
                self._request(ev)
            elif isinstance(ev, ExportSelected):
                self._selected(ev)
            elif isinstance(ev, Disconnect):
                self.reason = "client disconnected"
                self._flush()
                self._close()
                return
        self._flush()

    def eof_received(self) -> bool | None:
        """The client closed its side: close ours."""
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        """Log the connection's one summary line and forget it."""
        if self._timer is not None:
            self._timer.cancel()
        if exc is not None and self.reason == "client closed":
            self.reason = f"connection lost: {exc}"
        self.server.connections.discard(self)
        log.info(
            "connection %s export %r: %d requests, %d bytes read, %.1fs, %s",
            self.peer,
            self.export.name if self.export else None,
            self.requests,
            self.bytes_read,
            time.monotonic() - self.started,
            self.reason,
        )
        self.server.connection_closed()

    def pause_writing(self) -> None:
        """The client is not reading: stop reading requests until it catches up."""
        if self.transport is not None and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        """The client caught up: read requests again."""
        if self.transport is not None and self._paused:
            self._paused = False
            if not self._closing:
                self.transport.resume_reading()

    # ---- protocol events

    def _selected(self, ev: ExportSelected) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.export = self.server.exports[ev.export.name]
        log.debug("%s: transmission on export %r", self.peer, self.export.name)

    def _request(self, req: Request) -> None:
        export = self.export
        if export is None:  # pragma: no cover - the protocol core only yields requests after GO
            return
        self.requests += 1
        conn = self.conn
        try:
            cmd = req.cmd
            if cmd == Cmd.READ:
                buf, holes = export.read(req.offset, req.length)
                self.bytes_read += req.length
                conn.send_read(req.cookie, req.offset, buf, holes, df=bool(req.flags & CmdFlag.DF))
            elif cmd == Cmd.BLOCK_STATUS:
                req_one = bool(req.flags & CmdFlag.REQ_ONE)
                replies = [
                    (cid, export.extents(name, req.offset, req.length, req_one=req_one))
                    for cid, name in conn.contexts.items()
                ]
                conn.send_block_status(req.cookie, replies)
            elif cmd == Cmd.CACHE:
                export.cache(req.offset, req.length)
                conn.send_ok(req.cookie)
            elif cmd == Cmd.FLUSH:
                self._spawn(req, self._flush_then_reply(req))
            else:
                # Writes are applied here, in order; only their durability (FUA) waits.
                if cmd == Cmd.WRITE:
                    export.write(req.offset, req.payload if req.payload is not None else memoryview(b""))
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
        self.default = next(iter(self.exports)) if len(self.exports) == 1 else None
        self.handshake_timeout = handshake_timeout
        self.connections: set[NbdProtocol] = set()
        self._servers: list[asyncio.Server] = []
        self._idle = asyncio.Event()
        self._idle.set()

    def _factory(self) -> NbdProtocol:
        self._idle.clear()
        return NbdProtocol(self)

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
        self._servers.append(await loop.create_unix_server(self._factory, path))

    async def listen_tcp(self, host: str, port: int) -> None:
        """Listen on TCP HOST:PORT."""
        loop = asyncio.get_running_loop()
        self._servers.append(await loop.create_server(self._factory, host, port, reuse_address=True))

    async def listen_socket(self, sock: socket.socket) -> None:
        """Serve an already listening socket (systemd socket activation)."""
        loop = asyncio.get_running_loop()
        server: asyncio.Server
        if sock.family == socket.AF_UNIX:
            server = await loop.create_unix_server(self._factory, sock=sock)
        else:
            server = await loop.create_server(self._factory, sock=sock)
        self._servers.append(server)

    def addresses(self) -> list[str]:
        """Where the server listens, for the log."""
        out = []
        for srv in self._servers:
            for s in srv.sockets:
                out.append(str(s.getsockname()))
        return out

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop listening, let in-flight requests finish, close every connection and export."""
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
