"""The server side of one NBD connection as a sans-I/O state machine.

Bytes go in with receive_data(), which returns events; or, without a copy,
straight into get_buffer() (announced with buffer_updated()), the events then
taken one at a time with next_event(), so a server can stop taking requests
while its replies back up. Replies are built with the send_*() methods and
collected with data_to_send(). The class enforces every rule of the
fixed-newstyle handshake and validates each transmission request, answering
bad ones itself, so the server only ever sees requests it can act on.

TLS (NBD_OPT_STARTTLS) is decided here and done by the caller: the core
learns the policy (TlsMode) when it is made, answers STARTTLS, and after the
ACK yields StartTLS and parses nothing more; the bytes it already holds past
the option belong to the TLS handshake (take_tls_bytes()). Once the caller has
the TLS session up, tls_started() forgets everything negotiated before it and
the options go on, now in plaintext inside TLS.

Every request header is parsed and validated in one place (_next_request and
_check_request, by the rules in COMMANDS) before anything is allocated for it:
a WRITE that is refused has its payload skipped, never buffered.
"""

from __future__ import annotations

import struct
from collections.abc import Collection, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import NamedTuple

from prlnbd.errors import ProtocolError
from prlnbd.nbd import wire
from prlnbd.nbd.constants import (
    CHUNK_DONE,
    DIRTY_BITMAP_PREFIX,
    IHAVEOPT,
    MAX_PAYLOAD,
    MAX_STRING,
    MIN_BLOCK,
    NBDMAGIC,
    OPT_REPLY_MAGIC,
    PREFERRED_BLOCK,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Chunk,
    ClientFlag,
    Cmd,
    CmdFlag,
    Errno,
    HandshakeFlag,
    Info,
    Opt,
    Reply,
    TxFlag,
)

# Option error messages are cut to this many bytes, as the spec recommends.
MAX_ERROR_MESSAGE = 256
# Limits on what a client can make the server buffer during the handshake.
MAX_OPTION_LENGTH = 64 * 1024
MAX_OPTIONS = 1024
# A WRITE larger than the advertised maximum is discarded up to this size; beyond it, the
# client is broken or hostile and is disconnected.
MAX_DISCARD = 4 * MAX_PAYLOAD

# Bytes from the peer land in one receive buffer and are parsed in place. It must hold the
# largest option plus a partial next message; WRITE payloads up to RING_PAYLOAD are taken
# from it as views, larger ones are received straight into a buffer of their own.
RECV_BUFFER = 256 * 1024
INITIAL_BUFFER = 4096
RING_PAYLOAD = 64 * 1024
# get_buffer() offers at least this much room, so a ring payload or an option always fits.
_MIN_ROOM = max(RING_PAYLOAD, MAX_OPTION_LENGTH) + 64


class CommandRule(NamedTuple):
    """What the protocol allows one command: its flags, and whether it writes or names a range."""

    flags: int  # command flags it accepts (plain int: ~ on an IntFlag keeps unknown bits out)
    writes: bool  # refused on a read-only export
    ranged: bool  # offset and length name guest bytes (else both must be 0)
    past_end: Errno  # the errno for a range past the end of the export


# FUA is valid on every command once SEND_FUA is advertised.
_FUA_FLAG = int(CmdFlag.FUA)
COMMANDS: dict[int, CommandRule] = {
    Cmd.READ: CommandRule(int(_FUA_FLAG | CmdFlag.DF), False, True, Errno.EINVAL),
    Cmd.WRITE: CommandRule(_FUA_FLAG, True, True, Errno.ENOSPC),
    Cmd.DISC: CommandRule(_FUA_FLAG, False, False, Errno.EINVAL),
    Cmd.FLUSH: CommandRule(_FUA_FLAG, False, False, Errno.EINVAL),
    Cmd.TRIM: CommandRule(_FUA_FLAG, True, True, Errno.EINVAL),
    Cmd.CACHE: CommandRule(_FUA_FLAG, False, True, Errno.EINVAL),
    Cmd.WRITE_ZEROES: CommandRule(int(_FUA_FLAG | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO), True, True, Errno.ENOSPC),
    Cmd.BLOCK_STATUS: CommandRule(int(_FUA_FLAG | CmdFlag.REQ_ONE), False, True, Errno.EINVAL),
}
_CMDS: dict[int, Cmd] = {int(c): c for c in Cmd}
_WRITE = int(Cmd.WRITE)
_DISC = int(Cmd.DISC)
_BLOCK_STATUS = int(Cmd.BLOCK_STATUS)
_DF = int(CmdFlag.DF)
_DATA_COMMANDS = (int(Cmd.READ), _WRITE)  # the two whose length is bounded by MAX_PAYLOAD
_DONE_STATUS = (STRUCTURED_REPLY_MAGIC, CHUNK_DONE, int(Chunk.BLOCK_STATUS))
_MORE_STATUS = (STRUCTURED_REPLY_MAGIC, 0, int(Chunk.BLOCK_STATUS))
_DONE_DATA = (STRUCTURED_REPLY_MAGIC, CHUNK_DONE, int(Chunk.OFFSET_DATA))
_pack_status_chunk = wire.CHUNK_BLOCK_STATUS.pack


@dataclass
class ExportInfo:
    """What the protocol needs to know of one export."""

    name: str
    size: int
    read_only: bool
    description: str = ""
    contexts: Sequence[str] = ()  # metadata contexts this export offers
    multi_conn: bool = True

    @property
    def flags(self) -> int:
        """The transmission flags advertised for this export."""
        f = _EXPORT_FLAGS
        if self.read_only:
            # No write-side commands on offer: as qemu-nbd -r advertises.
            f = (f | _READ_ONLY_FLAG) & ~_WRITE_FLAGS
        if self.multi_conn:
            f |= _MULTI_CONN_FLAG
        return f


# Plain ints, computed once: IntFlag arithmetic is slow, and every connection needs these.
_EXPORT_FLAGS = int(
    TxFlag.HAS_FLAGS
    | TxFlag.SEND_FLUSH
    | TxFlag.SEND_FUA
    | TxFlag.SEND_DF
    | TxFlag.SEND_CACHE
    | TxFlag.SEND_TRIM
    | TxFlag.SEND_WRITE_ZEROES
    | TxFlag.SEND_FAST_ZERO
)
_READ_ONLY_FLAG = int(TxFlag.READ_ONLY)
_WRITE_FLAGS = int(TxFlag.SEND_TRIM | TxFlag.SEND_WRITE_ZEROES | TxFlag.SEND_FAST_ZERO)
_MULTI_CONN_FLAG = int(TxFlag.CAN_MULTI_CONN)
_GREETING = wire.GREETING.pack(NBDMAGIC, IHAVEOPT, HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES)


# Events handed to the server.


@dataclass
class ExportSelected:
    """The handshake ended: transmission on EXPORT begins."""

    export: ExportInfo


@dataclass(slots=True)
class Request:
    """A valid transmission request the server must answer (payload only for WRITE)."""

    cmd: Cmd
    flags: int
    cookie: int
    offset: int
    length: int
    payload: memoryview | None = None


@dataclass
class Disconnect:
    """The client asked to end the session (NBD_CMD_DISC or NBD_OPT_ABORT)."""


@dataclass
class StartTLS:
    """STARTTLS was acknowledged: send the ACK, then run the TLS handshake (server side).

    The core parses nothing more until tls_started(); take_tls_bytes() gives
    what the client sent after the option, the start of its handshake.
    """


Event = ExportSelected | Request | Disconnect | StartTLS


class State(Enum):
    """Where the connection is in the protocol."""

    CLIENT_FLAGS = auto()
    OPTIONS = auto()
    TLS_HANDSHAKE = auto()  # STARTTLS acknowledged; the caller runs the TLS handshake
    TRANSMISSION = auto()
    CLOSED = auto()


class TlsMode(Enum):
    """The server's TLS policy (proto.md, "TLS support")."""

    OFF = "off"  # NOTLS: STARTTLS is refused with ERR_POLICY
    ON = "on"  # SELECTIVETLS: TLS at the client's choice (exports in tls_only need it)
    REQUIRE = "require"  # FORCEDTLS: nothing but STARTTLS and ABORT before TLS


@dataclass
class _Query:
    """A parsed LIST/SET_META_CONTEXT option."""

    export: str
    queries: list[str] = field(default_factory=list)


class ServerConnection:
    """One NBD connection's protocol state, from greeting to disconnect."""

    def __init__(
        self,
        exports: Mapping[str, ExportInfo],
        default: str | None = None,
        *,
        tls: TlsMode = TlsMode.OFF,
        tls_only: Container[str] = (),
    ) -> None:
        """Start a connection to serve EXPORTS (DEFAULT for the empty name).

        TLS is the
        server's TLS policy; with TlsMode.ON, the exports named in TLS_ONLY are
        served only once TLS is up (with REQUIRE, all of them are).
        """
        self.exports = exports
        self.default = default
        self.tls_mode = tls
        self.tls_only = tls_only  # a live view: exports added while serving count too
        self.tls_active = False
        # The exports this client may see once TLS is up (None: all): the server's authorization.
        self.allowed: frozenset[str] | None = None
        self._tls_rest = b""  # bytes given to receive_data() after a STARTTLS, not parsed
        self.state = State.CLIENT_FLAGS
        self.no_zeroes = False
        self.structured = False
        self.export: ExportInfo | None = None
        self.options_seen = 0
        # Metadata contexts selected by SET_META_CONTEXT: id -> name, for one export.
        self.contexts: dict[int, str] = {}
        self._contexts_export: str | None = None
        self._context_ids: dict[str, int] = {}
        # The receive buffer: bytes in [_pos, _end) are received and not yet parsed. _shared
        # says WRITE payloads were handed out as views of it: it is then never overwritten,
        # a fresh one replaces it once it is used up. It starts small, so an idle connection
        # costs little, and grows to RECV_BUFFER the first time a message does not fit.
        self._in = bytearray(INITIAL_BUFFER)
        self._view = memoryview(self._in)
        self._pos = 0
        self._end = 0
        self._shared = False
        self._discard = 0
        self._pending_error: ProtocolError | None = None
        # A WRITE whose payload is being received into its own buffer: the header fields,
        # the buffer, and how much of it has arrived.
        self._write: tuple[int, int, int, int] | None = None
        self._payload = bytearray()
        self._payload_view = memoryview(self._payload)
        self._payload_got = 0
        self._out: list[bytes | bytearray | memoryview] = [_GREETING]

    # ---- output

    def data_to_send(self) -> list[bytes | bytearray | memoryview]:
        """Take every buffer queued for the peer, in order."""
        out = self._out
        self._out = []
        return out

    # ---- input

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes from the peer; return the events they complete.

        Raises ProtocolError when the peer broke the protocol; the caller then
        sends what data_to_send() holds and closes the connection.
        """
        if self._pending_error is not None:
            error, self._pending_error = self._pending_error, None
            raise error
        if self.state is State.CLOSED:
            return []
        events: list[Event] = []
        src = memoryview(data).cast("B")
        pos = 0
        total = len(src)
        try:
            while True:
                ev = self.next_event()
                while ev is not None:
                    events.append(ev)
                    ev = self.next_event()
                if self.state is State.TLS_HANDSHAKE:
                    self._tls_rest = bytes(src[pos:])
                    return events
                if pos >= total or self._closed():
                    return events
                buf = self.get_buffer(total - pos)
                n = min(len(buf), total - pos)
                buf[:n] = src[pos : pos + n]
                self.buffer_updated(n)
                pos += n
        except ProtocolError as e:
            if not events:
                raise
            # Requests completed before the bad bytes still count: hand them out now and
            # raise the error on the next call.
            self._pending_error = e
            return events

    def _closed(self) -> bool:
        # A method, not an inline test: the state changes under mypy's narrowing above.
        return self.state is State.CLOSED

    # ---- TLS

    def take_tls_bytes(self) -> bytes:
        """After StartTLS: the bytes received past the STARTTLS option, for the TLS layer, and none kept here."""
        if self.state is not State.TLS_HANDSHAKE:
            raise ValueError("take_tls_bytes() belongs after a StartTLS event")
        early = bytes(self._view[self._pos : self._end]) + self._tls_rest
        self._tls_rest = b""
        self._pos = self._end = 0
        return early

    def tls_started(self, allowed: Collection[str] | None = None) -> None:
        """The TLS handshake succeeded: option haggling starts afresh, inside TLS.

        Everything negotiated before STARTTLS is forgotten (structured replies,
        metadata contexts). ALLOWED names the exports this client may see and
        use (None: all); the others are left out of LIST and unknown to it.
        """
        if self.state is not State.TLS_HANDSHAKE:
            raise ValueError("tls_started() belongs after a StartTLS event")
        self.tls_active = True
        self.allowed = None if allowed is None else frozenset(allowed)
        self.structured = False
        self.contexts = {}
        self._contexts_export = None
        self._context_ids = {}
        self.export = None
        self.state = State.OPTIONS

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next bytes from the peer go (asyncio.BufferedProtocol.get_buffer)."""
        if self._write is not None and self._payload_got < len(self._payload):
            return self._payload_view[self._payload_got :]
        if self._pos == self._end and not self._shared:
            # Everything received is parsed (the usual case between requests): start over.
            self._pos = self._end = 0
            return self._view
        if len(self._in) - self._end < _MIN_ROOM:
            self._compact()
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        """Note that NBYTES were written into the last get_buffer(); then call next_event()."""
        if self._write is not None and self._payload_got < len(self._payload):
            self._payload_got += nbytes
        else:
            self._end += nbytes

    def next_event(self) -> Event | None:
        """The next event the bytes received so far complete, or None until more arrive.

        Raises ProtocolError when the peer broke the protocol, as receive_data().
        """
        try:
            while self.state is not State.CLOSED and self.state is not State.TLS_HANDSHAKE:
                if self._discard:
                    skip = min(self._discard, self._end - self._pos)
                    self._pos += skip
                    self._discard -= skip
                    if self._discard:
                        return None
                ev: Event | bool | None
                if self.state is State.TRANSMISSION:
                    ev = self._next_request()
                elif self.state is State.OPTIONS:
                    ev = self._next_option()
                else:
                    ev = self._client_flags()
                if ev is None:
                    return None
                if ev is not True and ev is not False:
                    return ev
        except ProtocolError:
            self.state = State.CLOSED
            raise
        return None

    def _compact(self) -> None:
        """Move the unparsed bytes to the front, into a fresh buffer if views of the old one are out."""
        n = self._end - self._pos
        size = len(self._in)
        if size - n < _MIN_ROOM:
            size = RECV_BUFFER  # the small first buffer: this message needs the full one
        if self._shared or size > len(self._in):
            new = bytearray(size)
            new[:n] = self._view[self._pos : self._end]
            self._in = new
            self._view = memoryview(new)
            self._shared = False
        elif n:
            # memmove semantics are not promised for overlapping slices: copy through bytes then.
            chunk = self._view[self._pos : self._end]
            self._in[:n] = chunk if self._pos >= n else bytes(chunk)
        self._pos = 0
        self._end = n

    def _available(self) -> int:
        return self._end - self._pos

    # ---- handshake

    def _client_flags(self) -> bool | None:
        if self._available() < wire.CLIENT_FLAGS.size:
            return None
        (flags,) = wire.CLIENT_FLAGS.unpack_from(self._in, self._pos)
        self._pos += wire.CLIENT_FLAGS.size
        # int(): ~ on an IntFlag flips only the named bits, which would let unknown bits through.
        known = int(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)
        if flags & ~known:
            raise ProtocolError(f"client flags {flags:#x} carry bits the server did not offer")
        self.no_zeroes = bool(flags & ClientFlag.C_NO_ZEROES)
        self.state = State.OPTIONS
        return True

    def _next_option(self) -> Event | bool | None:
        if self._available() < wire.OPTION.size:
            return None
        magic, opt, length = wire.OPTION.unpack_from(self._in, self._pos)
        if magic != IHAVEOPT:
            raise ProtocolError(f"option magic is {magic:#x}, expected IHAVEOPT")
        if length > MAX_OPTION_LENGTH:
            self._error(opt, Reply.ERR_TOO_BIG, f"option data of {length} bytes exceeds {MAX_OPTION_LENGTH}")
            raise ProtocolError(f"option {opt} carries {length} bytes, more than {MAX_OPTION_LENGTH}")
        if self._available() < wire.OPTION.size + length:
            return None
        start = self._pos + wire.OPTION.size
        data = bytes(self._view[start : start + length])
        self._pos = start + length
        self.options_seen += 1
        if self.options_seen > MAX_OPTIONS:
            raise ProtocolError(f"client sent more than {MAX_OPTIONS} options")
        return self._handle_option(opt, data)

    def _handle_option(self, opt: int, data: bytes) -> Event | bool:
        if opt == Opt.ABORT:
            self._option_reply(opt, Reply.ACK)
            self.state = State.CLOSED
            return Disconnect()
        if opt == Opt.STARTTLS:
            return self._opt_starttls(data)
        if self.tls_mode is TlsMode.REQUIRE and not self.tls_active:
            if opt == Opt.EXPORT_NAME:
                # EXPORT_NAME cannot be answered with an error: the spec says to disconnect.
                raise ProtocolError("EXPORT_NAME before STARTTLS on a server that requires TLS")
            self._error(opt, Reply.ERR_TLS_REQD, "this server requires TLS: send STARTTLS first")
            return True
        if opt == Opt.EXPORT_NAME:
            return self._opt_export_name(data)
        if opt == Opt.LIST:
            self._opt_list(data)
        elif opt in (Opt.INFO, Opt.GO):
            return self._opt_info_go(opt, data)
        elif opt == Opt.STRUCTURED_REPLY:
            if data:
                self._error(opt, Reply.ERR_INVALID, "STRUCTURED_REPLY takes no data")
            else:
                self.structured = True
                self._option_reply(opt, Reply.ACK)
        elif opt in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            self._opt_meta_context(opt, data)
        else:
            self._error(opt, Reply.ERR_UNSUP, f"option {opt} is not supported")
        return True

    def _opt_starttls(self, data: bytes) -> Event | bool:
        if data:
            self._error(Opt.STARTTLS, Reply.ERR_INVALID, "STARTTLS takes no data")
        elif self.tls_mode is TlsMode.OFF:
            self._error(Opt.STARTTLS, Reply.ERR_POLICY, "TLS is not configured on this server")
        elif self.tls_active:
            self._error(Opt.STARTTLS, Reply.ERR_INVALID, "TLS is already running")
        else:
            self._option_reply(Opt.STARTTLS, Reply.ACK)
            self.state = State.TLS_HANDSHAKE
            return StartTLS()
        return True

    def _needs_tls(self, exp: ExportInfo) -> bool:
        """Whether EXP is out of reach until TLS is up (SELECTIVETLS: a TLS-only export)."""
        return not self.tls_active and (self.tls_mode is TlsMode.REQUIRE or exp.name in self.tls_only)

    def _visible(self, exp: ExportInfo) -> bool:
        """Whether this client may see EXP at all: not before TLS if it needs TLS, nor unless authorized."""
        if self._needs_tls(exp):
            return False
        return self.allowed is None or exp.name in self.allowed

    def _flags(self, exp: ExportInfo) -> int:
        """EXP's transmission flags as this client may see them: DF only with structured replies."""
        return exp.flags if self.structured else exp.flags & ~int(TxFlag.SEND_DF)

    def _lookup(self, name: str) -> ExportInfo | None:
        exp = self.exports.get(name)
        if exp is None and name == "" and self.default is not None:
            exp = self.exports.get(self.default)
        return exp

    def _opt_export_name(self, data: bytes) -> Event:
        name = data.decode("utf-8", "replace")
        exp = self._lookup(name)
        if exp is not None and self._needs_tls(exp):
            raise ProtocolError(f"EXPORT_NAME of TLS-only export {name!r} before STARTTLS")
        if exp is not None and not self._visible(exp):
            exp = None
        if exp is None:
            # EXPORT_NAME cannot be answered with an error: the spec says to disconnect.
            raise ProtocolError(f"unknown export {name!r} requested with EXPORT_NAME")
        self._out.append(wire.EXPORT_NAME_REPLY.pack(exp.size, self._flags(exp)))
        if not self.no_zeroes:
            self._out.append(bytes(124))
        return self._start_transmission(exp)

    def _start_transmission(self, exp: ExportInfo) -> Event:
        if self._contexts_export is not None and self._lookup(self._contexts_export) is not exp:
            # Contexts chosen for another export do not carry over.
            self.contexts = {}
        self.export = exp
        self.state = State.TRANSMISSION
        return ExportSelected(exp)

    def _opt_list(self, data: bytes) -> None:
        if data:
            self._error(Opt.LIST, Reply.ERR_INVALID, "LIST takes no data")
            return
        for exp in self.exports.values():
            if not self._visible(exp):
                continue
            name = exp.name.encode()
            payload = wire.U32.pack(len(name)) + name + exp.description.encode()
            self._option_reply(Opt.LIST, Reply.SERVER, payload)
        self._option_reply(Opt.LIST, Reply.ACK)

    def _opt_info_go(self, opt: int, data: bytes) -> Event | bool:
        try:
            name, pos = _read_string(data, 0)
            if len(data) < pos + 2:
                raise ValueError("no information request count")
            (n,) = wire.U16.unpack_from(data, pos)
            pos += 2
            if len(data) != pos + 2 * n:
                raise ValueError(f"{n} information requests need {2 * n} bytes, {len(data) - pos} given")
            requests = set(struct.unpack_from(f">{n}H", data, pos))
        except ValueError as e:
            self._error(opt, Reply.ERR_INVALID, f"malformed {Opt(opt).name} option: {e}")
            return True
        exp = self._lookup(name)
        if exp is not None and self._needs_tls(exp):
            self._error(opt, Reply.ERR_TLS_REQD, f"export {name!r} is served over TLS only: send STARTTLS first")
            return True
        if exp is None or not self._visible(exp):
            self._error(opt, Reply.ERR_UNKNOWN, f"no export named {name!r}")
            return True
        self._option_reply(opt, Reply.INFO, wire.INFO_EXPORT.pack(Info.EXPORT, exp.size, self._flags(exp)))
        if Info.NAME in requests:
            self._option_reply(opt, Reply.INFO, wire.U16.pack(Info.NAME) + exp.name.encode())
        if Info.DESCRIPTION in requests and exp.description:
            self._option_reply(opt, Reply.INFO, wire.U16.pack(Info.DESCRIPTION) + exp.description.encode())
        # Sent unasked too: with a minimum of 1 it constrains nothing a client might rely on.
        self._option_reply(
            opt, Reply.INFO, wire.INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, MIN_BLOCK, PREFERRED_BLOCK, MAX_PAYLOAD)
        )
        self._option_reply(opt, Reply.ACK)
        if opt == Opt.GO:
            return self._start_transmission(exp)
        return True

    def _opt_meta_context(self, opt: int, data: bytes) -> None:
        if not self.structured:
            self._error(opt, Reply.ERR_INVALID, f"{Opt(opt).name} needs STRUCTURED_REPLY first")
            return
        try:
            query = _parse_meta_query(data)
        except ValueError as e:
            self._error(opt, Reply.ERR_INVALID, f"malformed {Opt(opt).name} option: {e}")
            return
        exp = self._lookup(query.export)
        if exp is None or not self._visible(exp):
            self._error(opt, Reply.ERR_UNKNOWN, f"no export named {query.export!r}")
            return
        if opt == Opt.LIST_META_CONTEXT:
            names = _match_list(exp.contexts, query.queries)
        else:
            offered = set(exp.contexts)
            names = list(dict.fromkeys(q for q in query.queries if q in offered))
            self.contexts = {}
            self._contexts_export = query.export
        for name in names:
            # LIST replies carry id 0 (the spec reserves it there); SET gives each context its id.
            cid = 0
            if opt == Opt.SET_META_CONTEXT:
                cid = self._context_ids.setdefault(name, len(self._context_ids) + 1)
                self.contexts[cid] = name
            self._option_reply(opt, Reply.META_CONTEXT, wire.U32.pack(cid) + name.encode())
        self._option_reply(opt, Reply.ACK)

    def _option_reply(self, opt: int, reply: int, data: bytes = b"") -> None:
        self._out.append(wire.OPTION_REPLY.pack(OPT_REPLY_MAGIC, opt, reply, len(data)))
        if data:
            self._out.append(data)

    def _error(self, opt: int, reply: Reply, message: str) -> None:
        # The spec bounds the message (should be at most 256 bytes): what a client sent and
        # is echoed in it could make it longer, and some clients drop such a reply.
        self._option_reply(opt, reply, _clip(message, MAX_ERROR_MESSAGE))

    # ---- transmission

    def _next_request(self) -> Event | bool | None:
        """The next request: its header parsed and checked here, and only then its payload taken."""
        if self._write is not None:
            return self._finish_write()
        pos = self._pos
        start = pos + wire.REQUEST.size
        if self._end < start:
            return None
        magic, flags, cmd, cookie, offset, length = wire.REQUEST.unpack_from(self._in, pos)
        if magic != REQUEST_MAGIC:
            raise ProtocolError(f"request magic is {magic:#x}, expected {REQUEST_MAGIC:#x}")
        if cmd == _DISC:
            self._pos = start
            self.state = State.CLOSED
            return Disconnect()
        problem = self._check_request(cmd, flags, offset, length)
        if cmd != _WRITE:
            self._pos = start
            if problem is not None:
                self.send_error(cookie, *problem)
                return True
            return Request(_CMDS[cmd], flags, cookie, offset, length)
        if problem is not None:
            # The payload follows all the same: skip it without buffering it, unless it is so
            # large that the client is broken or hostile.
            if length > MAX_DISCARD:
                raise ProtocolError(f"refused WRITE of {length} bytes carries more than {MAX_DISCARD} to skip")
            self._pos = start
            self._discard = length
            self.send_error(cookie, *problem)
            return True
        have = self._end - start
        if have < length:
            if length <= RING_PAYLOAD:
                return None  # get_buffer() keeps room for it
            # Receive the rest of the payload straight into a buffer of its own.
            self._payload = bytearray(length)
            self._payload_view = memoryview(self._payload)
            self._payload_view[:have] = self._view[start : self._end]
            self._payload_got = have
            self._write = (flags, cookie, offset, length)
            self._pos = self._end
            return None
        self._shared = True
        self._pos = start + length
        return Request(Cmd.WRITE, flags, cookie, offset, length, self._view[start : start + length])

    def _finish_write(self) -> Event | None:
        """The WRITE whose payload is received into its own buffer, once all of it is in."""
        if self._write is None or self._payload_got < len(self._payload):
            return None
        flags, cookie, offset, length = self._write
        payload = self._payload_view
        self._write = None
        self._payload = bytearray()
        self._payload_view = memoryview(self._payload)
        self._payload_got = 0
        return Request(Cmd.WRITE, flags, cookie, offset, length, payload)

    def _check_request(self, cmd: int, flags: int, offset: int, length: int) -> tuple[Errno, str] | None:
        """Why the request must be refused, as (errno, message); None for a valid one."""
        exp = self.export
        if exp is None:  # pragma: no cover - TRANSMISSION always has an export
            raise ProtocolError("request before an export was chosen")
        rule = COMMANDS.get(cmd)
        if rule is None:
            return Errno.EINVAL, f"unknown command {cmd}"
        if flags & ~rule.flags:
            return Errno.EINVAL, f"flags {flags:#x} are not valid for {Cmd(cmd).name}"
        if flags & _DF and not self.structured:
            return Errno.EINVAL, "DF needs structured replies"
        if cmd == _BLOCK_STATUS:
            if not self.structured:
                return Errno.EINVAL, "BLOCK_STATUS needs structured replies"
            if not self.contexts:
                return Errno.EINVAL, "BLOCK_STATUS needs a metadata context selected with SET_META_CONTEXT"
            if length == 0:
                return Errno.EINVAL, "BLOCK_STATUS of length 0"
        if rule.writes and exp.read_only:
            return Errno.EPERM, f"{Cmd(cmd).name} on a read-only export"
        if rule.ranged:
            if length > MAX_PAYLOAD and cmd in _DATA_COMMANDS:
                return Errno.EINVAL, f"{Cmd(cmd).name} of {length} bytes exceeds the maximum {MAX_PAYLOAD}"
            if offset + length > exp.size:
                return rule.past_end, (
                    f"{Cmd(cmd).name} of {length} bytes at {offset} ends past the export size {exp.size}"
                )
        elif offset or length:
            return Errno.EINVAL, f"{Cmd(cmd).name} must have offset and length 0"
        return None

    # ---- replies

    def send_ok(self, cookie: int) -> None:
        """Answer a request that succeeded and returns no data."""
        self._out.append(wire.SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie))

    def send_error(self, cookie: int, errno: int, message: str = "") -> None:
        """Answer a request that failed with ERRNO, with a message when structured."""
        if self.structured:
            # Cut to the limit without splitting a UTF-8 character.
            msg = _clip(message, MAX_STRING)
            self._out.append(
                wire.CHUNK_ERROR.pack(
                    STRUCTURED_REPLY_MAGIC, CHUNK_DONE, Chunk.ERROR, cookie, 6 + len(msg), errno, len(msg)
                )
            )
            if msg:
                self._out.append(msg)
        else:
            self._out.append(wire.SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, errno, cookie))

    def read_header(self, cookie: int, offset: int, length: int) -> bytes:
        """The head of a READ reply whose LENGTH bytes of data the caller sends right after it.

        Not queued: for a caller that sends the data itself (sendfile), once every
        buffer data_to_send() gave out is on its way. One chunk, as with DF.
        """
        if length <= 0:
            raise ValueError("a READ reply sent in two parts needs data")
        if not self.structured:
            return wire.SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie)
        return wire.CHUNK_OFFSET_DATA.pack(*_DONE_DATA, cookie, 8 + length, offset)

    def send_read(
        self,
        cookie: int,
        offset: int,
        data: bytearray | bytes | memoryview,
        holes: Iterable[tuple[int, int]] = (),
        *,
        df: bool = False,
    ) -> None:
        """Answer a READ of len(DATA) bytes at OFFSET.

        HOLES lists (offset, length) stretches known to be zeros, sorted and
        inside the request; with structured replies they go out as
        OFFSET_HOLE chunks instead of zero bytes (unless DF asks for one chunk).
        """
        length = len(data)
        out = self._out
        if not self.structured:
            out.append(wire.SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie))
            if length:
                out.append(data)
            return
        if length and (df or not holes):
            # The common case: one data chunk.
            out.append(wire.CHUNK_OFFSET_DATA.pack(*_DONE_DATA, cookie, 8 + length, offset))
            out.append(data)
            return
        if not length:
            # OFFSET_DATA must carry at least one byte: an empty read is answered with NONE.
            out.append(wire.CHUNK.pack(STRUCTURED_REPLY_MAGIC, CHUNK_DONE, Chunk.NONE, cookie, 0))
            return
        view = memoryview(data)
        pieces: list[tuple[int, int, bool]] = []  # (start, length, is_hole) relative to offset
        pos = 0
        if not df:
            for hoff, hlen in holes:
                rel = hoff - offset
                if rel > pos:
                    pieces.append((pos, rel - pos, False))
                pieces.append((rel, hlen, True))
                pos = rel + hlen
        if pos < length or not pieces:
            pieces.append((pos, length - pos, False))
        last = len(pieces) - 1
        for i, (start, plen, hole) in enumerate(pieces):
            flags = CHUNK_DONE if i == last else 0
            if hole:
                out.append(
                    wire.CHUNK_OFFSET_HOLE.pack(
                        STRUCTURED_REPLY_MAGIC, flags, Chunk.OFFSET_HOLE, cookie, 12, offset + start, plen
                    )
                )
            else:
                out.append(
                    wire.CHUNK_OFFSET_DATA.pack(
                        STRUCTURED_REPLY_MAGIC, flags, Chunk.OFFSET_DATA, cookie, 8 + plen, offset + start
                    )
                )
                if plen:
                    out.append(view[start : start + plen])

    def send_block_status(self, cookie: int, replies: Sequence[tuple[int, Sequence[tuple[int, int]] | bytes]]) -> None:
        """Answer a BLOCK_STATUS with one chunk per context.

        Each reply is (context id, extents): a list of (length, flags), or the
        descriptors already packed as big-endian u32 pairs.
        """
        last = len(replies) - 1
        out = self._out
        for i, (cid, extents) in enumerate(replies):
            payload = extents if isinstance(extents, bytes) else pack_extents(extents)
            head = _DONE_STATUS if i == last else _MORE_STATUS
            out.append(_pack_status_chunk(*head, cookie, 4 + len(payload), cid))
            out.append(payload)


def _clip(text: str, limit: int) -> bytes:
    """TEXT as UTF-8, cut to LIMIT bytes without splitting a character ("..." marks a cut)."""
    data = text.encode()
    if len(data) <= limit:
        return data
    return data[: limit - 3].decode("utf-8", "ignore").encode() + b"..."


def pack_extents(extents: Sequence[tuple[int, int]]) -> bytes:
    """Block status descriptors on the wire: (u32 length, u32 flags) each, big-endian."""
    return struct.pack(f">{2 * len(extents)}I", *[v for ext in extents for v in ext])


def _read_string(data: bytes, pos: int) -> tuple[str, int]:
    """Decode a u32-length-prefixed UTF-8 string at POS."""
    if len(data) < pos + 4:
        raise ValueError("string length is missing")
    (n,) = wire.U32.unpack_from(data, pos)
    pos += 4
    if n > MAX_STRING:
        raise ValueError(f"string of {n} bytes is longer than {MAX_STRING}")
    if len(data) < pos + n:
        raise ValueError(f"string of {n} bytes runs past the option data")
    try:
        text = data[pos : pos + n].decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("string is not valid UTF-8") from None
    return text, pos + n


def _parse_meta_query(data: bytes) -> _Query:
    """Decode the data of LIST/SET_META_CONTEXT: export name, then the queries."""
    export, pos = _read_string(data, 0)
    if len(data) < pos + 4:
        raise ValueError("query count is missing")
    (n,) = wire.U32.unpack_from(data, pos)
    pos += 4
    q = _Query(export)
    for _ in range(n):
        text, pos = _read_string(data, pos)
        q.queries.append(text)
    if pos != len(data):
        raise ValueError(f"{len(data) - pos} bytes follow the last query")
    return q


def _match_list(offered: Sequence[str], queries: Sequence[str]) -> list[str]:
    """Contexts a LIST_META_CONTEXT answers: all with no query, else by exact name or namespace."""
    if not queries:
        return list(offered)
    out: dict[str, None] = {}
    for q in queries:
        for name in offered:
            if name == q:
                out[name] = None
            elif q.endswith(":") and name.startswith(q):
                # "base:", "qemu:" and "qemu:dirty-bitmap:" list a whole namespace.
                out[name] = None
            elif q == DIRTY_BITMAP_PREFIX[:-1] and name.startswith(DIRTY_BITMAP_PREFIX):
                out[name] = None
    return list(out)
