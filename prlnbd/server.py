"""The asyncio NBD server: sockets in, protocol events to exports, reply buffers out.

One request takes one path. The transport hands received bytes to the
protocol core (get_buffer/buffer_updated); the core yields a validated
Request; _dispatch() looks its command up in COMMANDS and runs the handler;
the handler answers at once when nothing can wait on storage (a READ of cached
data, BLOCK_STATUS) or hands the blocking part to the I/O pool, whose
completion answers later; every outcome goes through one error boundary,
_failed(). The event loop itself never waits on storage.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import socket
import ssl
import stat
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

from prlnbd.errors import PrlNbdError, ProtocolError, RequestError
from prlnbd.export import Buffer, Export
from prlnbd.iopool import DEFAULT_WORKERS, Callback, IoPool
from prlnbd.nbd.connection import Disconnect, ExportSelected, Request, ServerConnection, StartTLS, State, TlsMode
from prlnbd.nbd.constants import Cmd, CmdFlag, Errno
from prlnbd.tls import TlsServer, TlsSession
from prlnbd.uring import UringIO, why_unavailable

log = logging.getLogger(__name__)

DEFAULT_HANDSHAKE_TIMEOUT = 10.0
# Replies queued beyond this are written out before more requests are taken, so that
# pause_writing() can stop a client that does not read its replies.
FLUSH_BYTES = 1 << 20
# With a ring (--aio=io_uring or auto), READs longer than this that miss the cache still go to
# the pool: the kernel copies a ring read's pages on the event loop's thread as they arrive, a
# worker copies on the other core. 4 KiB reads gain from the ring, 1 MiB reads lose (tests/bench
# row cold-read-seq, with --aio threads beside the ring); the lengths between were not measured.
RING_READ_MAX = 64 << 10
# READs at least this long are answered by sendfile when they may be (NbdProtocol._lend): the
# page-cache pages go to the socket by reference. At 256 KiB, copying them into a buffer and
# again into the socket took the loop's thread 75-95 us, sendfile 9-11 us; the residency check
# (mincore) is about 3 us at 64 KiB. Much below this, the two copies cost no more than the check
# and the extra system calls.
SENDFILE_MIN = 64 << 10
# When the socket takes only part of a reply going by sendfile, this much more of it is copied
# into the transport, which then waits for the socket and says when it is empty.
LEND_PAGE = 4096
# The transport's write buffer limits and a Unix socket's send buffer: deep enough to keep a
# queue of large READ replies streaming, shallow enough that one write to a socket (the
# loop copies all that fits) stays short while other clients wait: a backup pulling the disk
# over four connections gave a VM's 4 KiB reads a p99 of 8-13 ms with 4 MiB and 8 MiB here,
# 4-5 ms with these (qemu-nbd 3-10 ms on the same run); a lone sequential reader loses some.
WRITE_HIGH_WATER = 2 << 20
WRITE_LOW_WATER = 512 << 10
UNIX_SNDBUF = 1 << 20
# What one connection may have in the I/O pool at once: requests, and bytes of WRITE
# payload held for them. Past either, its socket is not read until some complete, so a
# client that pipelines without end holds at most this much (plus one request arriving).
MAX_INFLIGHT = 64
MAX_INFLIGHT_BYTES = 64 << 20
# Connections served at once, in total and from one TCP address (Unix sockets count only in
# the total): past them a new connection is closed before the greeting.
DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_MAX_PER_ADDRESS = 32
# WRITE payload held for requests in flight over every connection; past it, connections
# take no more requests until some complete.
MAX_WRITE_BYTES = 512 << 20
# One connection's turn on the event loop: at most this many requests, or this many bytes
# of reads answered from the cache, before other clients get theirs.
TURN_REQUESTS = 16
TURN_BYTES = 256 << 10
# No client gets fewer workers of the I/O pool than this, however many share it.
MIN_POOL_SHARE = 4
# No client gets fewer requests in the io_uring than this, however many share it.
MIN_RING_SHARE = 8
# How long a stop waits for connections to finish what they have in flight before it
# aborts them (SIGTERM): a client that does not read its replies cannot hold a stop up.
STOP_TIMEOUT = 30.0
# Ciphertext is received into a buffer of this size before it is decrypted.
TLS_RECV_BUFFER = 256 * 1024

_DF = int(CmdFlag.DF)
_FUA = int(CmdFlag.FUA)
_REQ_ONE = int(CmdFlag.REQ_ONE)
_NO_HOLE = int(CmdFlag.NO_HOLE)
_FAST_ZERO = int(CmdFlag.FAST_ZERO)


class NbdProtocol(asyncio.BufferedProtocol):
    """One client connection: feeds bytes to the protocol core and acts on its events."""

    def __init__(self, server: NbdServer, unix: bool) -> None:
        self.server = server
        self.unix = unix  # a Unix socket (else TCP): known from the listener, not asked of each socket
        self.conn = ServerConnection(
            server.infos,
            server.default,
            tls=server.tls_mode,
            tls_only=server.tls.tls_only(server.infos) if server.tls is not None else (),
        )
        # The TLS session once the client sent STARTTLS; ciphertext arrives in _cipher.
        self.tls: TlsSession | None = None
        self._cipher = memoryview(b"")
        self.transport: asyncio.Transport | None = None
        self.export: Export | None = None
        self.peer = "?"
        self.started = time.monotonic()
        self.requests = 0
        self.bytes_read = 0
        self.bytes_by_reference = 0  # of bytes_read, those sent by sendfile
        self._sock = -1  # the socket's descriptor, for sendfile
        self._lending = False  # READ replies may go by sendfile (_selected)
        self._lent: collections.deque[Lent] = collections.deque()  # replies waiting to go by sendfile
        self._gap = False  # the first of them is partly sent: nothing else may be sent
        self.reason = "client closed"
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False  # no more requests are taken; the socket closes once nothing is in flight
        self._closed = False  # the transport was told to close (or is lost)
        self._lost = False  # connection_lost() came
        self._paused = False  # the client does not read its replies (pause_writing)
        self._reading = True
        self._queued = 0  # reply bytes built since the last flush
        self.inflight = 0  # requests in the I/O pool or waiting on a flush
        self._inflight_bytes = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.address: str | None = None  # the TCP peer's address, as counted by the server's limits
        self._quiet = False  # a refused connection: no closing line (the server logs refusals itself)
        self._resume_pending = False
        self._deferred = False  # requests are left for the next turn (_process)
        self._jobs = 0  # jobs of this connection in the I/O pool
        self._backlog: collections.deque[tuple[Callable[..., Any], tuple[Any, ...], Callback]] = collections.deque()
        self._ringed = 0  # requests of this connection in the io_uring
        self._ring_waiting: collections.deque[Request] = collections.deque()  # past its share of the ring
        # The loop, looked up once: asyncio.get_running_loop() makes a getpid() system call each time.
        self._loop = asyncio.get_running_loop()
        self.gone: asyncio.Future[None] = self._loop.create_future()  # set once forgotten

    # ---- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Send the greeting and arm the handshake timer."""
        self.transport = cast(asyncio.Transport, transport)
        with contextlib.suppress(Exception):
            self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            self._sock = sock.fileno()
        if self.unix:
            self.peer = "unix socket"  # a Unix socket's peer has no name
            # The default (~200 KiB) splits every large READ reply over several wake-ups; the
            # kernel caps this at net.core.wmem_max. TCP tunes its own buffer.
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SNDBUF)
        else:
            peer = self.transport.get_extra_info("peername")
            self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        why = self.server.admit(self, None if self.unix else self.peer.rpartition(":")[0])
        if why is not None:
            # Before the greeting: the client learns nothing, and costs no more than this.
            self.reason = f"refused: {why}"
            self._quiet = True
            self.server.refused(self.peer, why)
            self.abort()
            return
        self._timer = self._loop.call_later(self.server.handshake_timeout, self._handshake_timed_out)
        log.debug("%s: connected", self.peer)
        self._flush()
        if self.server.stopping:
            self.shutdown()

    def get_buffer(self, sizehint: int) -> memoryview:
        """Hand the transport the protocol core's receive buffer: no copy of what arrives.

        Under TLS, ciphertext goes into a buffer of its own; it is decrypted
        into the core's buffer as the core asks for more (_decrypt).
        """
        if self.tls is not None:
            return self._cipher
        return self.conn.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        """Take the requests the new bytes complete and act on them."""
        tls = self.tls
        if tls is None:
            self.conn.buffer_updated(nbytes)
            self._process()
            return
        tls.feed(self._cipher[:nbytes])
        if tls.established:
            self._process()
        else:
            self._tls_handshake()

    def eof_received(self) -> bool | None:
        """The client closed its side: close ours (once what is in flight is answered)."""
        tls = self.tls
        if tls is not None:
            tls.feed_eof()
            if not tls.established:
                self._tls_handshake()  # says how the handshake ended
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection; its summary line is logged once the socket is closed."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._closing = self._closed = self._lost = True
        if exc is not None and self.reason == "client closed":
            self.reason = f"connection lost: {exc}"
        if self.tls is not None and not self.tls.established and not self.reason.startswith("TLS"):
            self.reason = f"TLS handshake not finished: {self.reason}"
        # Replies waiting to go by sendfile go nowhere now.
        self.inflight -= len(self._lent)
        self._lent.clear()
        self._gap = False
        # Requests still in the pool finish (their replies go nowhere); the server counts the
        # connection as gone only then, so a stop never closes a disk under them.
        self._maybe_gone()

    def pause_writing(self) -> None:
        """The client is not reading: stop taking requests until it catches up."""
        self._paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        """The client caught up: answer the requests already received, then read more."""
        self._paused = False
        # Not from inside this callback: the transport is in the middle of its write path, and
        # closing it from here makes plain asyncio report the connection lost twice.
        self._loop.call_soon(self._drained)

    def _drained(self) -> None:
        """The transport sent what it held: replies waiting to go by sendfile go on, then requests."""
        if self._lent:
            self._lend()
        self._process()

    # ---- taking requests

    def _process(self) -> None:
        """Act on events until the input runs dry, the client stops reading, or too much is in flight.

        A turn takes at most TURN_REQUESTS requests or TURN_BYTES of reads: the
        rest waits for the next turn of the loop, after other clients' requests.
        """
        conn = self.conn
        self._deferred = False
        taken = 0
        start = self.bytes_read
        try:
            while not self._paused and not self._closing and not self._throttled():
                if taken >= TURN_REQUESTS or self.bytes_read - start >= TURN_BYTES:
                    self._deferred = True
                    self._loop.call_soon(self._process)
                    break
                ev = conn.next_event()
                if ev is None:
                    if self.tls is not None and self._decrypt():
                        continue
                    break
                if type(ev) is Request:
                    taken += 1
                    self._dispatch(ev)
                elif isinstance(ev, ExportSelected):
                    self._selected(ev)
                elif isinstance(ev, Disconnect):
                    self.reason = "client disconnected"
                    self._close()
                elif isinstance(ev, StartTLS):
                    self._start_tls()
        except ProtocolError as e:
            self.reason = f"protocol error: {e}"
            self._close()
        self._flush()
        self._update_reading()

    # ---- TLS

    def _start_tls(self) -> None:
        """STARTTLS was acknowledged: send the ACK in the clear, then run TLS on this connection."""
        tls_server = self.server.tls
        if tls_server is None:  # pragma: no cover - the core only says StartTLS when TLS is on
            raise ProtocolError("STARTTLS without TLS configured")
        self._flush()
        self.tls = TlsSession(tls_server.credentials.context)
        self._cipher = memoryview(bytearray(TLS_RECV_BUFFER))
        # What the client sent behind STARTTLS (a pipelined ClientHello) is the handshake's.
        self.tls.feed(self.conn.take_tls_bytes())
        self._tls_handshake()

    def _tls_handshake(self) -> None:
        tls = cast(TlsSession, self.tls)
        try:
            done = tls.handshake()
        except (ssl.SSLError, ValueError) as e:
            # Too late for plaintext: the ACK is sent. The alert goes out, then the connection closes.
            # (ValueError: a client certificate whose subject cannot be read.)
            self._send_tls()
            self.reason = f"TLS handshake failed: {getattr(e, 'reason', None) or e}"
            self._closing = True
            self._close()
            return
        self._send_tls()
        if not done:
            return
        authz = self.server.tls.credentials.authz if self.server.tls is not None else None
        allowed = authz.allowed(tls.subject) if authz is not None else None
        self.conn.tls_started(allowed)
        log.debug(
            "%s: %s up%s%s",
            self.peer,
            tls.obj.version(),
            f", client {tls.subject}" if tls.subject else "",
            "" if allowed is None else f", may use {sorted(allowed) or 'no export'}",
        )
        # Options may already be waiting behind the client's Finished.
        self._process()

    def _decrypt(self) -> bool:
        """Decrypt what the core can take next; False when nothing more is there (or TLS ended)."""
        tls = cast(TlsSession, self.tls)
        if not tls.established or self.conn.state is State.CLOSED:
            return False
        try:
            n = tls.read_into(self.conn.get_buffer())
        except ssl.SSLZeroReturnError:
            if self.reason == "client closed":
                self.reason = "client closed TLS"
            self._close()
            return False
        except ssl.SSLError as e:
            raise ProtocolError(f"TLS: {e.reason or e}") from e
        if n <= 0:
            return False
        self.conn.buffer_updated(n)
        return True

    def _send_tls(self) -> None:
        """Send the TLS layer's own output (handshake, alerts, close_notify)."""
        tls = self.tls
        transport = self.transport
        if tls is None or transport is None or transport.is_closing():
            return
        data = tls.data_to_send()
        if data:
            transport.write(data)

    def _throttled(self) -> bool:
        if self._gap:
            return True  # a READ reply is partly sent: no more requests until it is out
        if self.inflight >= MAX_INFLIGHT or self._inflight_bytes >= MAX_INFLIGHT_BYTES:
            return True  # resumed as its own requests complete
        if self.server.over_write_budget():
            self.server.wait_for_budget(self)
            return True
        return False

    def resume_taking(self) -> None:
        """The server's write budget has room again: take the requests waiting in the buffer."""
        if not self._closed:
            self._process()

    def _update_reading(self) -> None:
        """Read the socket exactly while requests can be taken."""
        transport = self.transport
        if transport is None or self._closed:
            return
        want = not self._paused and not self._closing and not self._deferred and not self._throttled()
        if want != self._reading:
            self._reading = want
            with contextlib.suppress(Exception):
                if want:
                    transport.resume_reading()
                else:
                    transport.pause_reading()

    def _selected(self, ev: ExportSelected) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        export = self.server.exports.get(ev.export.name)
        if export is None:  # removed (control socket) between the client's choice and now
            self.reason = f"export {ev.export.name!r} was removed"
            self._close()
            return
        self.export = export
        if self._sock >= 0 and self.tls is None and self.transport is not None:
            # Replies may go by sendfile (_lend), which needs the transport empty: a full socket is
            # waited for (pause_writing until every byte queued is sent) instead of copying more
            # replies into the transport's buffer.
            try:
                self.transport.set_write_buffer_limits(0, 0)
                self._lending = True
            except Exception:  # a transport without limits: replies are copied
                self._lending = False
        log.debug("%s: transmission on export %r", self.peer, self.export.name)

    # ---- one request: dispatch, handlers, completion, one error boundary

    def _dispatch(self, req: Request) -> None:
        self.requests += 1
        self._go(req)

    def _go(self, req: Request) -> None:
        """Handle REQ, or hold it if it writes while the export's chain changes."""
        export = self.export
        if export is not None and export.held is not None and COMMANDS[req.cmd].writes:
            # The export's chain is changing (an online snapshot): the write waits for the new top.
            self.inflight += 1
            export.held.append(partial(self._held, req))
            return
        self._handle(req)

    def _handle(self, req: Request) -> None:
        try:
            COMMANDS[req.cmd].handler(self, req)
        except BaseException as e:
            self._failed(req, e)

    def _held(self, req: Request) -> None:
        """A write held while the export's chain changed goes on."""
        self.inflight -= 1
        self._handle(req)
        self._resume()

    def _failed(self, req: Request, e: BaseException) -> None:
        """The one place a request's failure becomes its reply."""
        if isinstance(e, RequestError):
            self.conn.send_error(req.cookie, e.errno, str(e))
        elif isinstance(e, OSError):
            log.warning("%s: %s failed: %s", self.peer, req.cmd.name, e)
            self.conn.send_error(req.cookie, Errno.EIO, f"{req.cmd.name} failed: {e.strerror}")
        else:
            # A bug: answer the request, say where, and end this connection cleanly.
            log.error("%s: %s crashed", self.peer, req.cmd.name, exc_info=e)
            self.conn.send_error(req.cookie, Errno.EIO, f"{req.cmd.name} failed: internal error")
            self.reason = f"internal error in {req.cmd.name}: {e!r}"
            self._close()
            if not isinstance(e, Exception):
                raise e

    def _submit(self, req: Request, fn: Callable[..., Any], args: tuple[Any, ...], then: Done) -> None:
        """Run FN(*ARGS) in the I/O pool; THEN(req, result) answers the request back on the loop."""
        self._started(req)
        self._pool(fn, args, partial(self._completed, req, then))

    def _started(self, req: Request) -> None:
        """Count REQ in flight (its payload, and as a write of its export) until _completed()."""
        self.inflight += 1
        held = len(req.payload) if req.payload is not None else 0
        self._inflight_bytes += held
        self.server.write_bytes += held
        if COMMANDS[req.cmd].writes:
            cast(Export, self.export).write_started()

    def _pool(self, fn: Callable[..., Any], args: tuple[Any, ...], callback: Callback) -> None:
        """Hand a job to the I/O pool, or keep it back while this client has its fair share there.

        The pool's workers are shared out between the clients that have work
        for them: a backup with hundreds of reads queued takes no more workers
        than a VM with one, and the VM's read never waits behind its queue.
        """
        if self._jobs < self.server.pool_share(self):
            self._jobs += 1
            self.server.pool.submit(fn, args, partial(self._job_done, callback))
        else:
            self._backlog.append((fn, args, callback))

    def _job_done(self, callback: Callback, result: Any, exc: BaseException | None) -> None:
        self._jobs -= 1
        callback(result, exc)
        while self._backlog and self._jobs < self.server.pool_share(self):
            fn, args, then = self._backlog.popleft()
            self._jobs += 1
            self.server.pool.submit(fn, args, partial(self._job_done, then))
        if not self._jobs:
            self.server.pool_users.discard(self)

    def _ring_turn(self, req: Request) -> bool:
        """Whether REQ may go to the io_uring now: this connection has fewer requests there than its
        share. If not, REQ waits (counted in flight) and is handled again once one of them ends.

        The ring's room is shared out as the pool's workers are: a client with hundreds of cold
        reads queued fills no more of it than its share, and a VM's read never waits behind them.
        """
        if self._ringed < self.server.ring_share(self):
            return True
        self.inflight += 1
        self._ring_waiting.append(req)
        return False

    def _ring_started(self) -> None:
        self._ringed += 1
        self.server.ring_users.add(self)

    def _ring_done(self, req: Request, then: Done, result: Any, exc: BaseException | None) -> None:
        """A request's I/O through the ring ended: answer it, then start what waited for its share."""
        self._ringed -= 1
        self._completed(req, then, result, exc)
        waiting = self._ring_waiting
        while waiting and self._ringed < self.server.ring_share(self):
            self.inflight -= 1
            self._go(waiting.popleft())
        if not self._ringed and not waiting:
            self.server.ring_users.discard(self)

    def _completed(self, req: Request, then: Done, result: Any, exc: BaseException | None) -> None:
        """A request's pool job ended: bookkeeping, then THEN's reply or the error boundary's."""
        self.inflight -= 1
        held = len(req.payload) if req.payload is not None else 0
        self._inflight_bytes -= held
        self.server.write_bytes -= held
        if held:
            self.server.budget_freed()
        export = self.export
        if COMMANDS[req.cmd].writes and export is not None:
            export.write_ended()  # a pause waiting for it goes on only after this turn: changed() first
            # Even a write that failed part-way may have changed some clusters.
            export.changed(req.offset, req.length)
        if exc is None:
            try:
                then(self, req, result)
            except BaseException as e:
                exc = e
        if exc is not None:
            self._failed(req, exc)
        self._resume()

    def _spawn(self, req: Request, coro: Coroutine[Any, Any, None]) -> None:
        """Run a request that awaits (a flush) while others go on; its reply comes out of order."""
        self.inflight += 1
        task = self._loop.create_task(self._guarded(req, coro))
        self.tasks.add(task)
        self.server.tasks.add(task)
        task.add_done_callback(self._task_done)

    async def _guarded(self, req: Request, coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            self._failed(req, RequestError(Errno.ESHUTDOWN, f"{req.cmd.name} cancelled: server shutting down"))
            raise
        except BaseException as e:
            self._failed(req, e)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.server.tasks.discard(task)
        self.inflight -= 1
        self._resume()

    def _resume(self) -> None:
        """After completions: once this turn of the loop is over, send their replies together."""
        if not self._resume_pending:
            self._resume_pending = True
            self._loop.call_soon(self._resume_now)

    def _resume_now(self) -> None:
        """Send what is ready, take more requests, or finish closing."""
        self._resume_pending = False
        if self._closed:
            self._maybe_gone()  # the socket is closing: nothing more to send
            return
        self._flush()
        if self._closing:
            self._close()
        else:
            self._process()

    # ---- handlers: each answers now, or hands its blocking part to the pool

    def _read(self, req: Request) -> None:
        export = cast(Export, self.export)
        if self._lending and req.length >= SENDFILE_MIN:
            run = export.file_run(req.offset, req.length)
            if run is not None:
                if run[2]:
                    self._lend_reply(req, None, run)
                else:
                    # Known to miss: a preadv(RWF_NOWAIT) would only start the disk read here, and
                    # submitting that (readahead of megabytes) can wait for the device's queue.
                    self._read_stored(req, lendable=True)
                return
        got = export.read_nowait(req.offset, req.length)
        if got is not None:
            self._send_read(req, got)
        else:
            self._read_stored(req)

    def _read_stored(self, req: Request, lendable: bool = False) -> None:
        """A READ whose data is not all in the page cache: through the ring, or in the pool.

        LENDABLE: its reply may go by sendfile once the data is cached (Export.file_run()).
        """
        export = cast(Export, self.export)
        if self.server.ring is not None and req.length <= RING_READ_MAX:
            # With a ring (--aio=io_uring or auto): the runs are read by the ring, reaped on this
            # loop, with no thread hand-off per request. Earned on tests/bench rows cold-read-rand
            # and vm-backup-{copy,write}-cold against --aio threads. (The completion comes on a later
            # turn: counting the request after queueing it is in time, and nothing is counted if
            # queueing fails.)
            if not self._ring_turn(req):
                return
            export.read_via(self.server.ring, req.offset, req.length,
                            partial(self._ring_done, req, NbdProtocol._send_stored))
            self._started(req)
            self._ring_started()
        elif lendable:
            # The pool only brings the data into the page cache (Export.fill_cache: no copy out of
            # it, which costs the worker several times the CPU of the splice), and the reply goes
            # by sendfile. Earned on tests/bench row vm-backup-copy-cold (the VM's p99, the backup's MiB/s).
            self._submit(req, export.fill_cache, (req.offset, req.length), NbdProtocol._filled)
        else:
            self._submit(req, export.read, (req.offset, req.length), NbdProtocol._send_stored)

    def _filled(self, req: Request, filled: bool) -> None:
        """The data of a lendable READ was brought into the cache: lend it, or read it after all (it is
        not one run of one file any more, or its pages left the cache already)."""
        run = cast(Export, self.export).file_run(req.offset, req.length) if filled else None
        if run is not None and run[2]:
            self._lend_reply(req, None, run)
        else:
            self._read_stored(req)

    def _send_stored(self, req: Request, got: tuple[Any, list[tuple[int, int]]]) -> None:
        """Answer a READ read from storage: by sendfile when it may be (the read left its pages in
        the cache), which spares the loop copying the buffer into the socket; else the buffer."""
        if self._lending and req.length >= SENDFILE_MIN:
            run = cast(Export, self.export).file_run(req.offset, req.length)
            if run is not None and run[2]:
                self._lend_reply(req, got[0], run)
                return
        self._send_read(req, got)

    def _send_read(self, req: Request, got: tuple[Any, list[tuple[int, int]]]) -> None:
        buf, holes = got
        self.bytes_read += req.length
        self.conn.send_read(req.cookie, req.offset, buf, holes, df=req.flags & _DF != 0)
        self._queued += req.length
        if self._queued >= FLUSH_BYTES:
            self._flush()

    # ---- READ replies by sendfile

    def _lend_reply(self, req: Request, data: Buffer | None, run: tuple[int, int, bool]) -> None:
        """Answer REQ, whose data is RUN (Export.file_run(), found cached just now), by sendfile (_lend()).

        DATA: the bytes, when a read from storage has them already (for the case the
        pages leave the cache before they are sent). Counted in flight until sent.
        """
        self.bytes_read += req.length
        self.inflight += 1
        item = Lent(req, data)
        self._lent.append(item)
        self._lend(item, run)

    def _lend(self, fresh: Lent | None = None, fresh_run: tuple[int, int, bool] | None = None) -> None:
        """Send the queued replies of _lend_reply() while the socket takes them: the header, then the
        data by sendfile(), which hands the page-cache pages to the socket by reference.

        A reply starts only while the transport holds nothing, and nothing else is sent
        until its last byte is out (_gap), so nothing comes between a header and its data.
        When the socket is full, the rest waits for resume_writing(): the transport's limits
        are 0, 0 on a lending connection (_selected), so it calls that once every byte it
        holds is sent. Replies wait in the page cache meanwhile instead of being copied.
        FRESH, FRESH_RUN: a reply just queued and its file_run(), asked a moment ago.
        """
        lent = self._lent
        transport = self.transport
        export = cast(Export, self.export)
        while lent:
            if transport is None or self._closed or transport.is_closing():
                return  # connection_lost() drops them
            if not self._gap:
                self._flush()  # whole replies may go first: they never split one
            if transport.get_write_buffer_size():
                return  # resume_writing() goes on
            item = lent[0]
            if item.reading:
                return  # its rest is being read in the pool (_read_rest): _rest_read() goes on
            req = item.req
            if not self._gap:
                self._gap = True
                transport.write(self.conn.read_header(req.cookie, req.offset, req.length))
                continue
            offset, length = req.offset + item.sent, req.length - item.sent
            # Not asked twice in a row (mincore looks up every page).
            if item is fresh:
                run, fresh = fresh_run, None
            else:
                run = export.file_run(offset, length)
            if run is None or not run[2]:
                # The pages left the cache while the reply waited: never read them here.
                if item.data is None:
                    self._read_rest(item)
                    return
                transport.write(memoryview(item.data)[item.sent :])
                self._lent_done()
                continue
            try:
                n = os.sendfile(self._sock, run[0], run[1], length)
            except BlockingIOError:
                n = 0
            except OSError as e:
                self.abort(f"sendfile failed: {e.strerror}")
                return
            item.sent += n
            self.bytes_by_reference += n
            if item.sent == req.length:
                self._lent_done()
                continue
            # The socket is full. A page of the rest goes into the transport, which waits for the
            # socket and calls resume_writing() once that is sent.
            size = min(LEND_PAGE, req.length - item.sent)
            if item.data is not None:
                piece: Buffer = memoryview(item.data)[item.sent : item.sent + size]
            else:
                got = export.read_nowait(req.offset + item.sent, size, cached=True)
                if got is None:  # it left the cache just now
                    self._read_rest(item)
                    return
                piece = got[0]
            transport.write(piece)
            item.sent += size

    def _read_rest(self, item: Lent) -> None:
        """Read the rest of a lent reply, after what was sent, in the pool (its pages left the cache);
        nothing else is sent meanwhile, and the reply waits for that read (_rest_read)."""
        export = cast(Export, self.export)
        req = item.req
        item.reading = True
        args = (export, req.offset + item.sent, req.length - item.sent)
        self._submit(req, _read_or_error, args, NbdProtocol._rest_read)

    def _lent_done(self) -> None:
        self._lent.popleft()
        self._gap = False
        self.inflight -= 1
        self._resume()

    def _rest_read(self, req: Request, got: Buffer | RequestError) -> None:
        """The rest of a lent reply, read in the pool: send it, then go on with the others."""
        lent = self._lent
        transport = self.transport
        if not lent or lent[0].req is not req or transport is None or self._closed or transport.is_closing():
            return  # the connection is gone
        if isinstance(got, RequestError):
            # Its header is out: no error reply can follow it any more.
            log.warning("%s: READ failed after its reply began: %s", self.peer, got)
            self.abort(f"READ failed after its reply began: {got}")
            return
        transport.write(got)
        self._lent_done()
        self._lend()

    def _write(self, req: Request) -> None:
        export = cast(Export, self.export)
        payload = cast(memoryview, req.payload)
        ring = self.server.ring
        # With a ring: a write into clusters the top layer holds goes to the ring, as reads do
        # (earned on tests/bench rows write-rand, durable-write and vm-backup-write-cold against
        # --aio threads). One that allocates stays in the pool: copy-on-write and the cluster's
        # claim block. Past its share of the ring a write waits even if it will turn out to
        # allocate: only write_via() can tell, and it queues the write at once when it can.
        if ring is not None:
            if not self._ring_turn(req):
                return
            if export.write_via(ring, req.offset, payload, partial(self._ring_done, req, NbdProtocol._written)):
                self._started(req)
                self._ring_started()
                return
        self._submit(req, export.write, (req.offset, payload), NbdProtocol._written)

    def _zero(self, req: Request) -> None:
        export = cast(Export, self.export)
        kwargs = {
            "trim": req.cmd == Cmd.TRIM,
            "no_hole": req.flags & _NO_HOLE != 0,
            "fast": req.flags & _FAST_ZERO != 0,
        }
        self._submit(req, partial(export.zero, **kwargs), (req.offset, req.length), NbdProtocol._written)

    def _written(self, req: Request, _: object) -> None:
        if req.flags & _FUA:
            self._spawn(req, self._flush_then_reply(req))
        else:
            self.conn.send_ok(req.cookie)

    def _flush_cmd(self, req: Request) -> None:
        self._spawn(req, self._flush_then_reply(req))

    async def _flush_then_reply(self, req: Request) -> None:
        await cast(Export, self.export).flush(self.server.pool.run)
        self.conn.send_ok(req.cookie)

    def _cache(self, req: Request) -> None:
        export = cast(Export, self.export)
        self._submit(req, export.prefetch, (req.offset, req.length), NbdProtocol._ok)

    def _ok(self, req: Request, _: object) -> None:
        self.conn.send_ok(req.cookie)

    def _block_status(self, req: Request) -> None:
        # Answered from memory: the status indexes live in the export, no storage is touched.
        export = cast(Export, self.export)
        req_one = req.flags & _REQ_ONE != 0
        replies = [
            (cid, export.status_payload(name, req.offset, req.length, req_one=req_one))
            for cid, name in self.conn.contexts.items()
        ]
        self.conn.send_block_status(req.cookie, replies)

    # ---- helpers

    def _flush(self) -> None:
        if self._gap:
            return  # a READ reply is partly sent: nothing may go out before its last byte
        self._queued = 0
        out = self.conn.data_to_send()
        if out and self.transport is not None and not self._closed and not self.transport.is_closing():
            tls = self.tls
            if tls is not None and tls.established:
                tls.encrypt(out)
                self.transport.write(tls.data_to_send())
            else:
                self.transport.writelines(out)

    def _close(self) -> None:
        """Take no more requests; close the socket once every request in flight is answered."""
        self._closing = True
        self._update_reading()
        if self.inflight or self._closed:
            return
        self._flush()
        if self.tls is not None and self.tls.established:
            self.tls.close()
            self._send_tls()
        self._closed = True
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()

    def abort(self, reason: str = "aborted: did not finish within the stop timeout") -> None:
        """Drop the connection now, replies unsent (a stop whose timeout ran out, or REASON)."""
        self.reason = reason
        self._closing = True
        if self.transport is not None and not self._closed:
            self._closed = True
            self.transport.abort()

    def _maybe_gone(self) -> None:
        """Once the socket is closed and nothing is in flight, the connection is over."""
        if self.inflight or not self._lost or self not in self.server.connections:
            return
        self.server.forget(self)
        # The transport closes the socket when connection_lost returns, and a client that sent
        # DISC waits for that: log afterwards.
        self._loop.call_soon(self._log_closed)

    def _log_closed(self) -> None:
        if self._quiet:
            self.server.connection_closed()
            return
        tls = self.tls
        how = ""
        if tls is not None:
            how = f" ({tls.obj.version() or 'TLS'}{', ' + tls.subject if tls.subject else ''})"
        by_reference = f" ({self.bytes_by_reference} by sendfile)" if self.bytes_by_reference else ""
        log.info(
            "connection %s%s export %r: %d requests, %d bytes read%s, %.1fs, %s",
            self.peer,
            how,
            self.export.name if self.export else None,
            self.requests,
            self.bytes_read,
            by_reference,
            time.monotonic() - self.started,
            self.reason,
        )
        self.server.connection_closed()

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if self.conn.state in (State.CLIENT_FLAGS, State.OPTIONS, State.TLS_HANDSHAKE):
            self.reason = f"handshake not finished within {self.server.handshake_timeout:g}s"
            self._close()

    def shutdown(self, reason: str = "server shutting down") -> None:
        """Stop taking requests; close once what is in flight is answered."""
        self.reason = reason
        self._close()


def _read_or_error(export: Export, offset: int, length: int) -> Buffer | RequestError:
    """Export.read()'s data, or its error as a value: for a READ whose reply has begun, which can no
    longer be answered by the error boundary's error reply."""
    try:
        return export.read(offset, length)[0]
    except RequestError as e:
        return e
    except Exception as e:
        log.error("READ of %d bytes at %d crashed", length, offset, exc_info=e)
        return RequestError(Errno.EIO, f"read of {length} bytes at {offset}: internal error")


@dataclass
class Lent:
    """A READ reply going by sendfile (NbdProtocol._lend): its data bytes sent so far."""

    req: Request
    data: Buffer | None  # the bytes, when a read from storage has them already
    sent: int = 0
    reading: bool = False  # the rest is being read in the pool (_read_rest)


# What the server does for each command: the protocol core has already checked its flags,
# range and export (nbd.connection.COMMANDS); `writes` marks those whose completion changes
# the disk (bitmaps and block status are updated before the reply).
Done = Callable[[NbdProtocol, Request, Any], None]


@dataclass(frozen=True)
class Command:
    """How the server serves one NBD command."""

    handler: Callable[[NbdProtocol, Request], None]
    writes: bool


COMMANDS: dict[Cmd, Command] = {
    Cmd.READ: Command(NbdProtocol._read, writes=False),
    Cmd.WRITE: Command(NbdProtocol._write, writes=True),
    Cmd.FLUSH: Command(NbdProtocol._flush_cmd, writes=False),
    Cmd.TRIM: Command(NbdProtocol._zero, writes=True),
    Cmd.CACHE: Command(NbdProtocol._cache, writes=False),
    Cmd.WRITE_ZEROES: Command(NbdProtocol._zero, writes=True),
    Cmd.BLOCK_STATUS: Command(NbdProtocol._block_status, writes=False),
}


class NbdServer:
    """Serves a set of exports on listening sockets until stopped."""

    def __init__(
        self,
        exports: Mapping[str, Export],
        *,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        workers: int = DEFAULT_WORKERS,
        tls: TlsServer | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_per_address: int = DEFAULT_MAX_PER_ADDRESS,
        allow_outside_bundle: bool = False,
        aio: str = "auto",
    ) -> None:
        self.exports = dict(exports)
        self.tls = tls
        self.tls_mode = tls.mode if tls is not None else TlsMode.OFF
        self.infos = {name: export.info for name, export in self.exports.items()}
        self.default = next(iter(self.exports)) if len(self.exports) == 1 else None
        self.pool = IoPool(asyncio.get_running_loop(), workers)
        # READs that miss the page cache, and WRITEs into clusters the top holds, go to an io_uring
        # (--aio=io_uring, or auto where the system allows one). Asked for by name, a ring that
        # cannot be set up stops the start; auto says why and goes on with the pool alone.
        self.ring: UringIO | None = None
        if aio in ("auto", "io_uring"):
            try:
                self.ring = UringIO(asyncio.get_running_loop())
            except OSError as e:
                if aio == "io_uring":
                    raise PrlNbdError(f"--aio=io_uring: cannot set up an io_uring: {why_unavailable(e)}") from None
                log.info("no io_uring (%s): disk I/O goes to the thread pool (--aio=threads)", why_unavailable(e))
        elif aio != "threads":
            raise PrlNbdError(f"unknown --aio mode {aio!r}")
        self.handshake_timeout = handshake_timeout
        self.connections: set[NbdProtocol] = set()
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self._per_address: dict[str, int] = {}
        self._refused = 0  # connections refused since the last line saying so
        self._refused_logged = float("-inf")
        self.write_bytes = 0  # WRITE payload held for requests in flight, over every connection
        self._waiting_for_budget: set[NbdProtocol] = set()
        self.tasks: set[asyncio.Task[None]] = set()  # flushes in flight, of every connection
        self.pool_users: set[NbdProtocol] = set()  # connections with jobs in the I/O pool
        self.ring_users: set[NbdProtocol] = set()  # connections with requests in the io_uring
        self.changing: dict[str, Any] = {}  # export name -> the change in progress on it (prlnbd.online)
        self.allow_outside_bundle = allow_outside_bundle  # for exports opened while serving
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

    def add_export(self, export: Export) -> None:
        """Serve EXPORT too, from the next option a client sends (the control socket's export-snapshot)."""
        if export.name in self.exports:
            raise PrlNbdError(f"an export named {export.name!r} exists already")
        self.exports[export.name] = export
        self.infos[export.name] = export.info

    async def remove_export(self, name: str, *, force: bool = False) -> tuple[Export, int]:
        """Stop serving export NAME: refused while it has clients unless FORCE, which closes their connections
        once their requests in flight are answered. Returns the export, for the caller to close, and how many
        clients were disconnected."""
        export = self.exports.get(name)
        if export is None:
            raise PrlNbdError(f"no export named {name!r} (exports: {', '.join(self.exports) or 'none'})")
        clients = [c for c in self.connections if c.export is export]
        if clients and not force:
            raise PrlNbdError(
                f"export {name!r} has {len(clients)} client{'s' if len(clients) != 1 else ''}: remove it with"
                " force to disconnect them"
            )
        # Out of the list first: no client chooses it from now on.
        self.infos.pop(name, None)
        if self.default == name:
            self.default = None
        for conn in clients:
            conn.shutdown(f"export {name!r} removed")
        if clients:
            await asyncio.wait([c.gone for c in clients])
        del self.exports[name]
        return export, len(clients)

    def pool_share(self, conn: NbdProtocol) -> int:
        """How many jobs CONN may have in the I/O pool: the workers shared out between its users."""
        users = self.pool_users
        users.add(conn)
        return max(MIN_POOL_SHARE, self.pool.workers // len(users))

    def ring_share(self, conn: NbdProtocol) -> int:
        """How many requests CONN may have in the io_uring: its room shared out between its users."""
        users = len(self.ring_users) + (conn not in self.ring_users)
        return max(MIN_RING_SHARE, cast(UringIO, self.ring).capacity // users)

    def admit(self, conn: NbdProtocol, address: str | None) -> str | None:
        """Count a new connection from ADDRESS (None: a Unix socket); why it is refused, if it is."""
        if len(self.connections) > self.max_connections:
            return f"more than {self.max_connections} connections (--max-connections)"
        if address is not None:
            count = self._per_address.get(address, 0)
            if count >= self.max_per_address:
                return f"more than {self.max_per_address} connections from {address} (--max-connections-per-address)"
            self._per_address[address] = count + 1
            conn.address = address
        return None

    def refused(self, peer: str, why: str) -> None:
        """Log a refused connection: at most one line a second, counting the others."""
        self._refused += 1
        now = time.monotonic()
        if now - self._refused_logged >= 1.0:
            more = f" (and {self._refused - 1} more since the last such line)" if self._refused > 1 else ""
            log.warning("refused connection from %s: %s%s", peer, why, more)
            self._refused = 0
            self._refused_logged = now

    def forget(self, conn: NbdProtocol) -> None:
        """A connection is over: it no longer counts against the limits."""
        self.connections.discard(conn)
        if not conn.gone.done():
            conn.gone.set_result(None)
        if conn.address is not None:
            left = self._per_address.get(conn.address, 1) - 1
            if left:
                self._per_address[conn.address] = left
            else:
                self._per_address.pop(conn.address, None)
            conn.address = None

    def over_write_budget(self) -> bool:
        """Whether the WRITE payload held over every connection is at its bound."""
        return self.write_bytes >= MAX_WRITE_BYTES

    def wait_for_budget(self, conn: NbdProtocol) -> None:
        """CONN stopped taking requests for the total write budget: resume it once there is room."""
        self._waiting_for_budget.add(conn)

    def budget_freed(self) -> None:
        """Write payload was released: let the connections that waited for room go on."""
        if self._waiting_for_budget and not self.over_write_budget():
            waiting, self._waiting_for_budget = self._waiting_for_budget, set()
            for conn in waiting:
                conn.resume_taking()

    def connection_closed(self) -> None:
        """Note that a connection ended."""
        if not self.connections:
            self._idle.set()

    async def listen_unix(self, path: str) -> None:
        """Listen on a Unix socket at PATH (replacing a stale socket file, refusing anything else there)."""
        _remove_stale_socket(path)
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

    def addresses(self) -> list[str]:
        """Where the server listens, for the log."""
        out = []
        for srv in self._servers:
            for s in srv.sockets:
                out.append(str(s.getsockname()))
        return out

    async def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop listening, let in-flight requests finish, close every connection, then the exports.

        A connection that has not finished within TIMEOUT is aborted. The
        exports are closed only once no flush and no I/O is running any more:
        never under a worker thread still using an image.
        """
        self.stopping = True
        for srv in self._servers:
            srv.close()
        for conn in list(self.connections):
            conn.shutdown()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            log.warning("%d connections did not finish in %.0fs: aborting them", len(self.connections), timeout)
            for conn in list(self.connections):
                conn.abort()
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await srv.wait_closed()
        # Aborted connections may still have flushes and pool I/O running: wait for them all.
        ring = self.ring
        while self.tasks or self.pool.busy or (ring is not None and ring.busy):
            if self.tasks:
                await asyncio.wait(list(self.tasks))
            await self.pool.idle()
            if ring is not None:
                await ring.idle()
        for export in self.exports.values():
            export.close()
        self.pool.shutdown()
        if ring is not None:
            log.info("io_uring: %d reads for %d READs, %d writes for %d WRITEs%s",
                     ring.reads, ring.read_requests, ring.writes, ring.write_requests,
                     f"; completions fetched from the overflow list {ring.overflows} times" if ring.overflows else "")
            ring.close()


def _remove_stale_socket(path: str) -> None:
    """Remove the socket file at PATH if nobody answers on it; refuse a live socket or any other file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise PrlNbdError(f"{path}: exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as e:
        if e.errno != errno.ECONNREFUSED:
            raise PrlNbdError(f"{path}: cannot tell whether the socket there is in use: {e.strerror}") from e
    else:
        raise PrlNbdError(f"{path}: another server is listening on this socket; refusing to replace it")
    finally:
        probe.close()
    os.unlink(path)
