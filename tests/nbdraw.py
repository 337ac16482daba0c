"""A small raw-socket NBD client for protocol tests, written from doc/proto.md.

It sends exactly the bytes a test asks for, good or bad, and parses what comes
back without trusting it: every magic is checked and every length is honoured,
so tests can assert on the server's wire behaviour rather than a library's.
"""

from __future__ import annotations

import contextlib
import errno
import select
import socket
import struct
import time
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag

# Magic numbers (proto.md, "Newstyle negotiation" and "Transmission").
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# One struct per wire layout; all integers are big-endian.
GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
INFO_EXPORT = struct.Struct(">HQH")  # info type 0, size, transmission flags
INFO_BLOCK_SIZE = struct.Struct(">HIII")  # info type 3, min, preferred, max
HOLE = struct.Struct(">QI")  # offset, size
ERROR_HEAD = struct.Struct(">IH")  # error, message length
EXTENT = struct.Struct(">II")  # length, status flags

ZEROES_LEN = 124


class HandshakeFlag(IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(IntFlag):
    C_FIXED_NEWSTYLE = 1 << 0
    C_NO_ZEROES = 1 << 1


class Opt(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


class Rep(IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = (1 << 31) + 1
    ERR_POLICY = (1 << 31) + 2
    ERR_INVALID = (1 << 31) + 3
    ERR_PLATFORM = (1 << 31) + 4
    ERR_TLS_REQD = (1 << 31) + 5
    ERR_UNKNOWN = (1 << 31) + 6
    ERR_SHUTDOWN = (1 << 31) + 7
    ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
    ERR_TOO_BIG = (1 << 31) + 9
    ERR_EXT_HEADER_REQD = (1 << 31) + 10


REP_ERROR_BIT = 1 << 31


class Info(IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TxFlag(IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Cmd(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CmdFlag(IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class Chunk(IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


REPLY_FLAG_DONE = 1 << 0
CHUNK_ERROR_BIT = 1 << 15

STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1


class ProtocolViolation(AssertionError):
    """The server sent something the spec does not allow."""


class Closed(ConnectionError):
    """The server closed (or reset) the connection GOT bytes into an N-byte read."""

    def __init__(self, got: int = 0, n: int = 0, reset: bool = False) -> None:
        how = "reset" if reset else "closed"
        super().__init__(f"server {how} the connection after {got} of {n} bytes")
        self.got = got
        self.n = n
        self.reset = reset


@dataclass
class OptionReply:
    """One fixed-newstyle option reply."""

    option: int
    type: int
    data: bytes

    @property
    def is_error(self) -> bool:
        return bool(self.type & REP_ERROR_BIT)

    @property
    def message(self) -> str:
        return self.data.decode("utf-8", errors="strict")


@dataclass
class Reply:
    """One transmission-phase message: a simple reply or a structured chunk."""

    cookie: int
    structured: bool
    error: int = 0  # simple replies only
    flags: int = 0  # chunks only
    type: int = 0  # chunks only
    payload: bytes = b""

    @property
    def done(self) -> bool:
        return not self.structured or bool(self.flags & REPLY_FLAG_DONE)


@dataclass
class Result:
    """Everything the server sent for one request."""

    cookie: int
    replies: list[Reply] = field(default_factory=list)

    @property
    def structured(self) -> bool:
        return bool(self.replies) and self.replies[0].structured

    @property
    def error(self) -> int:
        """The first error (simple error field or error chunk errno), else 0."""
        for r in self.replies:
            if not r.structured and r.error:
                return r.error
            if r.structured and r.type & CHUNK_ERROR_BIT:
                return ERROR_HEAD.unpack_from(r.payload)[0]
        return 0

    def error_messages(self) -> list[str]:
        out = []
        for r in self.replies:
            if r.structured and r.type & CHUNK_ERROR_BIT:
                _, mlen = ERROR_HEAD.unpack_from(r.payload)
                out.append(r.payload[ERROR_HEAD.size : ERROR_HEAD.size + mlen].decode())
        return out


def pack_option(option: int, data: bytes = b"", length: int | None = None) -> bytes:
    return OPTION.pack(IHAVEOPT, option, len(data) if length is None else length) + data


def pack_request(
    cmd: int, offset: int = 0, length: int = 0, cookie: int = 0, flags: int = 0,
    magic: int = REQUEST_MAGIC,
) -> bytes:
    return REQUEST.pack(magic, flags, cmd, cookie, offset, length)


def pack_info_request(name: str | bytes, infos: tuple[int, ...] = ()) -> bytes:
    """The data of NBD_OPT_INFO / NBD_OPT_GO."""
    raw = name.encode() if isinstance(name, str) else name
    return U32.pack(len(raw)) + raw + U16.pack(len(infos)) + b"".join(U16.pack(i) for i in infos)


def pack_meta_request(name: str, queries: list[str]) -> bytes:
    """The data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT."""
    raw = name.encode()
    parts = [U32.pack(len(raw)), raw, U32.pack(len(queries))]
    for q in queries:
        qb = q.encode()
        parts += [U32.pack(len(qb)), qb]
    return b"".join(parts)


def parse_string_reply(data: bytes) -> tuple[str, bytes]:
    """NBD_REP_SERVER: u32 name length, name, rest."""
    (n,) = U32.unpack_from(data)
    if n > len(data) - 4:
        raise ProtocolViolation(f"REP_SERVER name length {n} exceeds reply length {len(data)}")
    return data[4 : 4 + n].decode(), data[4 + n :]


class Client:
    """A blocking NBD client over one socket that speaks whatever the test asks."""

    def __init__(self, sock: socket.socket, timeout: float = 10.0) -> None:
        self.sock = sock
        self.sock.settimeout(timeout)
        self.handshake_flags = 0
        self.size = 0
        self.tx_flags = 0
        self.structured = False
        self.contexts: dict[str, int] = {}
        self._read_len: dict[int, int] = {}  # pending simple READs: cookie -> length
        self._pending: set[int] = set()  # cookies sent and not finished
        self._stash: dict[int, Result] = {}  # replies that arrived for other cookies
        self._cookie = 0

    # -- connection -------------------------------------------------------
    @classmethod
    def unix(cls, path: object, timeout: float = 10.0, rcvbuf: int | None = None) -> Client:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if rcvbuf is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.settimeout(timeout)
        s.connect(str(path))
        return cls(s, timeout)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                k = self.sock.recv_into(view[got:], n - got)
            except ConnectionResetError as e:
                raise Closed(got, n, reset=True) from e
            if k == 0:
                raise Closed(got, n)
            got += k
        return bytes(buf)

    def wait_closed(self, timeout: float = 5.0) -> bytes:
        """Read until EOF (returning what came); fail if still open after TIMEOUT."""
        deadline = time.monotonic() + timeout
        out = bytearray()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"server kept the connection open ({len(out)} bytes read)")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                return bytes(out)
            except TimeoutError as e:
                raise TimeoutError(
                    f"server kept the connection open ({len(out)} bytes read)"
                ) from e
            if not chunk:
                return bytes(out)
            out += chunk

    def is_closed(self, timeout: float = 0.2) -> bool:
        """True if the server has closed (EOF/reset) within TIMEOUT, False if no data came."""
        r, _, _ = select.select([self.sock], [], [], timeout)
        if not r:
            return False
        try:
            return self.sock.recv(1, socket.MSG_PEEK) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True

    # -- handshake --------------------------------------------------------
    def read_greeting(self) -> int:
        magic, opt_magic, flags = GREETING.unpack(self.recv_exact(GREETING.size))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise ProtocolViolation(f"bad greeting {magic:#x} {opt_magic:#x}")
        self.handshake_flags = flags
        return flags

    def send_client_flags(self, flags: int) -> None:
        self.send(CLIENT_FLAGS.pack(flags))

    def start(self, flags: int = ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES) -> None:
        """Greeting and client flags: the connection is then in option haggling."""
        self.read_greeting()
        self.send_client_flags(flags)

    def send_option(self, option: int, data: bytes = b"", length: int | None = None) -> None:
        self.send(pack_option(option, data, length))

    def recv_option_reply(self) -> OptionReply:
        magic, option, rtype, length = OPTION_REPLY.unpack(self.recv_exact(OPTION_REPLY.size))
        if magic != REPLY_MAGIC:
            raise ProtocolViolation(f"bad option reply magic {magic:#x}")
        data = self.recv_exact(length) if length else b""
        return OptionReply(option, rtype, data)

    def option(
        self, option: int, data: bytes = b"", length: int | None = None
    ) -> list[OptionReply]:
        """Send one option and collect replies up to the final ACK or error."""
        self.send_option(option, data, length)
        replies = []
        while True:
            r = self.recv_option_reply()
            if r.option != option:
                raise ProtocolViolation(f"reply for option {r.option}, expected {option}")
            replies.append(r)
            if r.type == Rep.ACK or r.is_error:
                return replies

    def export_name(self, name: str = "", no_zeroes: bool = True) -> bytes:
        """NBD_OPT_EXPORT_NAME; returns the zero padding received (b"" with NO_ZEROES)."""
        self.send_option(Opt.EXPORT_NAME, name.encode())
        self.size, self.tx_flags = EXPORT_NAME_REPLY.unpack(self.recv_exact(EXPORT_NAME_REPLY.size))
        return b"" if no_zeroes else self.recv_exact(ZEROES_LEN)

    def structured_reply(self) -> None:
        replies = self.option(Opt.STRUCTURED_REPLY)
        if [r.type for r in replies] != [Rep.ACK]:
            raise ProtocolViolation(f"STRUCTURED_REPLY answered {replies}")
        self.structured = True

    def meta_context(self, option: int, name: str, queries: list[str]) -> list[OptionReply]:
        return self.option(option, pack_meta_request(name, queries))

    def set_meta_context(self, name: str, queries: list[str]) -> dict[str, int]:
        replies = self.meta_context(Opt.SET_META_CONTEXT, name, queries)
        if replies[-1].type != Rep.ACK:
            raise ProtocolViolation(f"SET_META_CONTEXT failed: {replies[-1]}")
        self.contexts = {}
        for r in replies[:-1]:
            if r.type != Rep.META_CONTEXT:
                raise ProtocolViolation(f"unexpected reply {r}")
            (cid,) = U32.unpack_from(r.data)
            self.contexts[r.data[4:].decode()] = cid
        return self.contexts

    def go(
        self, name: str = "", infos: tuple[int, ...] = (), option: int = Opt.GO
    ) -> list[OptionReply]:
        """NBD_OPT_GO (or INFO); on success records size and flags."""
        replies = self.option(option, pack_info_request(name, infos))
        for r in replies:
            if r.type == Rep.INFO and U16.unpack_from(r.data)[0] == Info.EXPORT:
                _, self.size, self.tx_flags = INFO_EXPORT.unpack(r.data)
        return replies

    def connect(
        self, name: str = "", structured: bool = True, contexts: list[str] | None = None
    ) -> Client:
        """A full handshake with GO: the connection is then in transmission."""
        self.start()
        if structured:
            self.structured_reply()
        if contexts:
            self.set_meta_context(name, contexts)
        replies = self.go(name)
        if replies[-1].type != Rep.ACK:
            raise ProtocolViolation(f"GO failed: {replies[-1]} {replies[-1].data!r}")
        return self

    # -- transmission -----------------------------------------------------
    def next_cookie(self) -> int:
        self._cookie += 1
        return self._cookie

    def pack(
        self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
        payload: bytes = b"", cookie: int | None = None,
    ) -> tuple[int, bytes]:
        """Register one request as pending and return (cookie, its bytes) unsent."""
        if cookie is None:
            cookie = self.next_cookie()
        if cmd == Cmd.READ and not self.structured:
            self._read_len[cookie] = length
        if cmd != Cmd.DISC:
            self._pending.add(cookie)
        return cookie, pack_request(cmd, offset, length, cookie, flags) + payload

    def request(
        self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
        payload: bytes = b"", cookie: int | None = None,
    ) -> int:
        """Send one request (without waiting); returns its cookie."""
        cookie, data = self.pack(cmd, offset, length, flags, payload, cookie)
        self.send(data)
        return cookie

    def recv_reply(self) -> Reply:
        head = self.recv_exact(4)
        (magic,) = U32.unpack(head)
        if magic == SIMPLE_REPLY_MAGIC:
            _, err, cookie = SIMPLE_REPLY.unpack(head + self.recv_exact(SIMPLE_REPLY.size - 4))
            length = self._read_len.pop(cookie, 0)
            payload = self.recv_exact(length) if (length and not err) else b""
            return Reply(cookie, False, error=err, payload=payload)
        if magic == STRUCTURED_REPLY_MAGIC:
            if not self.structured:
                raise ProtocolViolation("structured chunk without STRUCTURED_REPLY")
            _, flags, ctype, cookie, length = CHUNK.unpack(head + self.recv_exact(CHUNK.size - 4))
            payload = self.recv_exact(length) if length else b""
            return Reply(cookie, True, flags=flags, type=ctype, payload=payload)
        raise ProtocolViolation(f"bad reply magic {magic:#x}")

    def collect(self, cookies: list[int] | set[int]) -> dict[int, Result]:
        """Receive until every cookie in COOKIES has its final reply.

        Replies for other pending cookies are kept for a later collect().
        """
        want = set(cookies)
        results: dict[int, Result] = {}
        for cookie in list(want):
            res = self._stash.get(cookie)
            if res is not None and res.replies[-1].done:
                results[cookie] = self._stash.pop(cookie)
                want.discard(cookie)
        while want:
            r = self.recv_reply()
            if r.cookie not in self._pending:
                raise ProtocolViolation(f"reply for unknown or finished cookie {r.cookie}")
            res = self._stash.setdefault(r.cookie, Result(r.cookie))
            if res.replies and res.replies[0].structured != r.structured:
                raise ProtocolViolation(f"cookie {r.cookie} mixes simple and structured replies")
            res.replies.append(r)
            if r.done:
                self._pending.discard(r.cookie)
                if r.cookie in want:
                    results[r.cookie] = self._stash.pop(r.cookie)
                    want.discard(r.cookie)
        return results

    def incomplete(self) -> list[int]:
        """Cookies whose reply has started but not finished."""
        return [c for c, res in self._stash.items() if not res.replies[-1].done]

    def call(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
             payload: bytes = b"") -> Result:
        cookie = self.request(cmd, offset, length, flags, payload)
        return self.collect([cookie])[cookie]

    def read(self, offset: int, length: int, flags: int = 0) -> bytes:
        """READ and reassemble; raises OSError(errno) on an error reply."""
        res = self.call(Cmd.READ, offset, length, flags)
        if res.error:
            raise OSError(res.error, f"READ {offset}+{length} failed", res.error_messages())
        return assemble_read(res, offset, length, df=bool(flags & CmdFlag.DF))

    def disc(self) -> None:
        self.send(pack_request(Cmd.DISC, cookie=self.next_cookie()))


def assemble_read(res: Result, offset: int, length: int, df: bool = False) -> bytes:
    """Check a successful READ reply against every rule of proto.md and return the data."""
    if not res.structured:
        (r,) = res.replies
        if len(r.payload) != length:
            raise ProtocolViolation(f"simple READ reply carried {len(r.payload)} of {length} bytes")
        return r.payload
    check_chunks_done(res)
    buf = bytearray(length)
    covered: list[tuple[int, int]] = []
    content = 0
    for r in res.replies:
        if r.type == Chunk.OFFSET_DATA:
            if len(r.payload) < 9:
                raise ProtocolViolation(f"OFFSET_DATA length {len(r.payload)} < 9")
            (off,) = U64.unpack_from(r.payload)
            n = len(r.payload) - 8
            data = r.payload[8:]
        elif r.type == Chunk.OFFSET_HOLE:
            if len(r.payload) != HOLE.size:
                raise ProtocolViolation(f"OFFSET_HOLE length {len(r.payload)} != 12")
            off, n = HOLE.unpack(r.payload)
            if n == 0:
                raise ProtocolViolation("OFFSET_HOLE of size 0")
            data = bytes(n)
        elif r.type == Chunk.NONE:
            if r.payload:
                raise ProtocolViolation("NONE chunk with a payload")
            continue
        else:
            raise ProtocolViolation(f"unexpected chunk type {r.type:#x} in a READ reply")
        content += 1
        if off < offset or off + n > offset + length:
            raise ProtocolViolation(f"chunk {off}+{n} outside request {offset}+{length}")
        for a, b in covered:
            if off < b and a < off + n:
                raise ProtocolViolation(f"chunk {off}+{n} overlaps {a}..{b}")
        covered.append((off, off + n))
        buf[off - offset : off - offset + n] = data
    total = sum(b - a for a, b in covered)
    if total != length:
        raise ProtocolViolation(f"chunks cover {total} of {length} bytes")
    if df and content > 1:
        raise ProtocolViolation(f"DF read answered with {content} content chunks")
    return bytes(buf)


def check_chunks_done(res: Result) -> None:
    """DONE on the last chunk only; NONE only as the final chunk."""
    for i, r in enumerate(res.replies):
        last = i == len(res.replies) - 1
        if bool(r.flags & REPLY_FLAG_DONE) != last:
            raise ProtocolViolation(f"chunk {i} of {len(res.replies)} has flags {r.flags:#x}")
        if r.type == Chunk.NONE and not last:
            raise ProtocolViolation("NONE chunk before the end")


def parse_block_status(res: Result) -> dict[int, list[tuple[int, int]]]:
    """context id -> extents, checking the chunk layout."""
    if not res.structured:
        raise ProtocolViolation("BLOCK_STATUS answered with a simple reply")
    check_chunks_done(res)
    out: dict[int, list[tuple[int, int]]] = {}
    for r in res.replies:
        if r.type == Chunk.NONE:
            continue
        if r.type != Chunk.BLOCK_STATUS:
            raise ProtocolViolation(f"unexpected chunk {r.type:#x} in a BLOCK_STATUS reply")
        if len(r.payload) < 12 or (len(r.payload) - 4) % 8:
            raise ProtocolViolation(f"BLOCK_STATUS chunk length {len(r.payload)}")
        (cid,) = U32.unpack_from(r.payload)
        if cid in out:
            raise ProtocolViolation(f"two BLOCK_STATUS chunks for context {cid}")
        count = (len(r.payload) - 4) // 8
        out[cid] = [EXTENT.unpack_from(r.payload, 4 + 8 * i) for i in range(count)]
    return out


def errno_name(n: int) -> str:
    return errno.errorcode.get(n, str(n))
