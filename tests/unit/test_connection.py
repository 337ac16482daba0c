"""The sans-I/O NBD server core: handshake, transmission checks, reply layout, chunking, fuzzing.

The client side is written here from docs/nbd-protocol.md, independent of prlnbd.nbd.wire.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prlnbd.errors import ProtocolError
from prlnbd.nbd.connection import (
    MAX_OPTION_LENGTH,
    MAX_OPTIONS,
    Disconnect,
    ExportInfo,
    ExportSelected,
    Request,
    ServerConnection,
    StartTLS,
    State,
    TlsMode,
)

# ---- the protocol's numbers, spelled out again on the client side

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
CHUNK_MAGIC = 0x668E33EF

C_FIXED, C_NO_ZEROES = 1, 2
O_EXPORT_NAME, O_ABORT, O_LIST, O_PEEK, O_STARTTLS, O_INFO, O_GO = 1, 2, 3, 4, 5, 6, 7
O_STRUCTURED, O_LIST_META, O_SET_META, O_EXTENDED = 8, 9, 10, 11
R_ACK, R_SERVER, R_INFO, R_META = 1, 2, 3, 4
ERR = 1 << 31
R_UNSUP, R_POLICY, R_INVALID, R_UNKNOWN, R_TOO_BIG = ERR + 1, ERR + 2, ERR + 3, ERR + 6, ERR + 9
I_EXPORT, I_NAME, I_DESCRIPTION, I_BLOCK_SIZE = 0, 1, 2, 3
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS = range(8)
F_FUA, F_NO_HOLE, F_DF, F_REQ_ONE, F_FAST_ZERO = 1, 2, 4, 8, 16
T_HAS_FLAGS, T_READ_ONLY, T_SEND_DF = 1, 2, 1 << 7
C_NONE, C_DATA, C_HOLE, C_BLOCK_STATUS, C_ERROR = 0, 1, 2, 5, 0x8001
DONE = 1
EPERM, EINVAL, ENOSPC = 1, 22, 28
MAX_PAYLOAD = 32 * 1024 * 1024

KIB = 1024
MIB = 1024 * KIB

CONTEXTS = ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:bm1", "qemu:dirty-bitmap:bm2"]


def exports() -> dict[str, ExportInfo]:
    return {
        "disk": ExportInfo("disk", MIB, read_only=False, description="a test disk", contexts=CONTEXTS),
        "ro": ExportInfo("ro", 64 * KIB, read_only=True, contexts=["base:allocation"]),
    }


def new_conn(default: str | None = "disk") -> ServerConnection:
    return ServerConnection(exports(), default=default)


# ---- client-side encoders


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def string(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return u32(len(b)) + b


def client_flags(flags: int = C_FIXED | C_NO_ZEROES) -> bytes:
    return u32(flags)


def option(opt: int, data: bytes = b"", *, magic: int = IHAVEOPT, length: int | None = None) -> bytes:
    return struct.pack(">QII", magic, opt, len(data) if length is None else length) + data


def info_data(name: str, infos: list[int] = ()) -> bytes:  # type: ignore[assignment]
    return string(name) + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def meta_data(name: str, queries: list[str]) -> bytes:
    return string(name) + u32(len(queries)) + b"".join(string(q) for q in queries)


def request(
    cmd: int,
    *,
    flags: int = 0,
    cookie: int = 1,
    offset: int = 0,
    length: int = 0,
    payload: bytes = b"",
    magic: int = REQUEST_MAGIC,
) -> bytes:
    return struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length) + payload


# ---- client-side decoders


@dataclass
class OptReply:
    opt: int
    type: int
    data: bytes


def take(conn: ServerConnection) -> bytes:
    return b"".join(bytes(b) for b in conn.data_to_send())


def parse_option_replies(buf: bytes) -> list[OptReply]:
    out = []
    pos = 0
    while pos < len(buf):
        magic, opt, rtype, length = struct.unpack_from(">QIII", buf, pos)
        assert magic == REPLY_MAGIC, hex(magic)
        pos += 20
        out.append(OptReply(opt, rtype, buf[pos : pos + length]))
        assert len(out[-1].data) == length
        pos += length
    return out


@dataclass
class Simple:
    error: int
    cookie: int
    data: bytes = b""


@dataclass
class Chunk:
    flags: int
    type: int
    cookie: int
    payload: bytes


def parse_replies(buf: bytes, read_lengths: dict[int, int] | None = None) -> list[Simple | Chunk]:
    """Split transmission output; READ_LENGTHS says which cookies carry simple-reply data."""
    read_lengths = read_lengths or {}
    out: list[Simple | Chunk] = []
    pos = 0
    while pos < len(buf):
        (magic,) = struct.unpack_from(">I", buf, pos)
        if magic == SIMPLE_MAGIC:
            _, error, cookie = struct.unpack_from(">IIQ", buf, pos)
            pos += 16
            n = read_lengths.get(cookie, 0) if error == 0 else 0
            out.append(Simple(error, cookie, buf[pos : pos + n]))
            pos += n
        elif magic == CHUNK_MAGIC:
            _, flags, ctype, cookie, length = struct.unpack_from(">IHHQI", buf, pos)
            pos += 20
            out.append(Chunk(flags, ctype, cookie, buf[pos : pos + length]))
            assert len(out[-1].payload) == length
            pos += length
        else:
            raise AssertionError(f"bad reply magic {magic:#x} at {pos}")
    return out


def error_of(reply: Simple | Chunk) -> tuple[int, str]:
    """(errno, message) of an error reply, simple or structured."""
    if isinstance(reply, Simple):
        return reply.error, ""
    assert reply.type == C_ERROR and reply.flags & DONE
    errno, mlen = struct.unpack_from(">IH", reply.payload)
    assert len(reply.payload) == 6 + mlen
    return errno, reply.payload[6:].decode()


# ---- helpers that drive a connection


def handshake(
    conn: ServerConnection,
    *,
    structured: bool = True,
    contexts: list[str] | None = None,
    export: str = "disk",
) -> None:
    """Negotiate and enter transmission with GO."""
    take(conn)
    data = client_flags()
    if structured:
        data += option(O_STRUCTURED)
    if contexts is not None:
        data += option(O_SET_META, meta_data(export, contexts))
    data += option(O_GO, info_data(export))
    events = conn.receive_data(data)
    assert [type(e) for e in events] == [ExportSelected]
    assert conn.state is State.TRANSMISSION
    take(conn)


def transmission(
    *, structured: bool = True, contexts: list[str] | None = None, export: str = "disk"
) -> ServerConnection:
    conn = new_conn()
    handshake(conn, structured=structured, contexts=contexts, export=export)
    return conn


def options_phase() -> ServerConnection:
    conn = new_conn()
    take(conn)
    assert conn.receive_data(client_flags()) == []
    return conn


def ask(conn: ServerConnection, opt: int, data: bytes = b"") -> list[OptReply]:
    events = conn.receive_data(option(opt, data))
    assert events == [] or opt in (O_GO, O_ABORT)
    return parse_option_replies(take(conn))


# ---- greeting and client flags


def test_greeting() -> None:
    conn = new_conn()
    magic, ihaveopt, flags = struct.unpack(">QQH", take(conn))
    assert (magic, ihaveopt) == (NBDMAGIC, IHAVEOPT)
    assert flags == 0b11  # FIXED_NEWSTYLE | NO_ZEROES
    assert conn.state is State.CLIENT_FLAGS
    assert take(conn) == b""


@pytest.mark.parametrize("flags", [C_FIXED, C_FIXED | C_NO_ZEROES, C_NO_ZEROES])
def test_known_client_flags(flags: int) -> None:
    conn = new_conn()
    take(conn)
    assert conn.receive_data(client_flags(flags)) == []
    assert conn.state is State.OPTIONS
    assert conn.no_zeroes == bool(flags & C_NO_ZEROES)


@pytest.mark.parametrize("flags", [1 << 2, C_FIXED | 1 << 3, 1 << 31, 0xFFFFFFFF])
def test_unknown_client_flags_drop_the_connection(flags: int) -> None:
    conn = new_conn()
    take(conn)
    with pytest.raises(ProtocolError, match="client flags"):
        conn.receive_data(client_flags(flags))
    assert conn.state is State.CLOSED
    assert conn.receive_data(option(O_LIST)) == []  # a closed connection ignores input


# ---- options


def test_bad_option_magic() -> None:
    conn = options_phase()
    with pytest.raises(ProtocolError, match="magic"):
        conn.receive_data(option(O_LIST, magic=0x1234))


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name(no_zeroes: bool) -> None:
    conn = new_conn()
    take(conn)
    events = conn.receive_data(client_flags(C_FIXED | (C_NO_ZEROES if no_zeroes else 0)) + option(O_EXPORT_NAME, b"ro"))
    assert events == [ExportSelected(exports()["ro"])]
    assert conn.state is State.TRANSMISSION
    out = take(conn)
    assert len(out) == (10 if no_zeroes else 134)
    size, flags = struct.unpack_from(">QH", out)
    assert size == 64 * KIB
    assert flags & T_HAS_FLAGS and flags & T_READ_ONLY
    assert out[10:] == bytes(len(out) - 10)


def test_export_name_empty_selects_the_default() -> None:
    conn = options_phase()
    (ev,) = conn.receive_data(option(O_EXPORT_NAME, b""))
    assert isinstance(ev, ExportSelected) and ev.export.name == "disk"


@pytest.mark.parametrize(("name", "default"), [(b"nope", "disk"), (b"", None), (b"\xff\xfe", "disk")])
def test_export_name_unknown_disconnects(name: bytes, default: str | None) -> None:
    conn = new_conn(default)
    take(conn)
    with pytest.raises(ProtocolError, match="unknown export"):
        conn.receive_data(client_flags() + option(O_EXPORT_NAME, name))
    assert conn.state is State.CLOSED


def _infos(replies: list[OptReply]) -> dict[int, bytes]:
    out = {}
    for r in replies[:-1]:
        assert r.type == R_INFO
        (itype,) = struct.unpack_from(">H", r.data)
        assert itype not in out
        out[itype] = r.data[2:]
    assert replies[-1].type == R_ACK and replies[-1].data == b""
    return out


@pytest.mark.parametrize("opt", [O_INFO, O_GO])
def test_info_and_go(opt: int) -> None:
    conn = options_phase()
    events = conn.receive_data(option(opt, info_data("disk", [I_NAME, I_DESCRIPTION, I_BLOCK_SIZE, 77])))
    replies = parse_option_replies(take(conn))
    assert all(r.opt == opt for r in replies)
    infos = _infos(replies)
    size, flags = struct.unpack(">QH", infos[I_EXPORT])
    assert size == MIB and flags & T_HAS_FLAGS and not flags & T_READ_ONLY
    assert infos[I_NAME] == b"disk"
    assert infos[I_DESCRIPTION] == b"a test disk"
    assert struct.unpack(">III", infos[I_BLOCK_SIZE]) == (1, 4096, MAX_PAYLOAD)
    if opt == O_GO:
        assert events == [ExportSelected(exports()["disk"])]
        assert conn.state is State.TRANSMISSION
    else:
        assert events == []
        assert conn.state is State.OPTIONS


def test_info_without_requests_still_sends_export_info() -> None:
    conn = options_phase()
    infos = _infos(ask(conn, O_INFO, info_data("ro")))
    assert I_EXPORT in infos and I_NAME not in infos and I_DESCRIPTION not in infos
    # An export without a description sends none even when asked.
    infos = _infos(ask(conn, O_INFO, info_data("ro", [I_DESCRIPTION])))
    assert I_DESCRIPTION not in infos


def test_go_with_empty_name_uses_the_default() -> None:
    conn = options_phase()
    (ev,) = conn.receive_data(option(O_GO, info_data("")))
    assert isinstance(ev, ExportSelected) and ev.export.name == "disk"


@pytest.mark.parametrize("opt", [O_INFO, O_GO])
def test_info_go_unknown_export(opt: int) -> None:
    conn = options_phase()
    (r,) = ask(conn, opt, info_data("nope"))
    assert (r.opt, r.type) == (opt, R_UNKNOWN)
    assert b"nope" in r.data
    assert conn.state is State.OPTIONS


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x00",
        u32(10) + b"disk",  # name longer than the data
        string("disk"),  # no request count
        string("disk") + b"\x00",  # half a count
        string("disk") + struct.pack(">HH", 2, 1),  # 2 requests, 1 given
        string("disk") + struct.pack(">HH", 0, 1),  # trailing bytes
        u32(5000) + b"x" * 5000 + b"\x00\x00",  # name longer than 4096
        string(b"\xff\xfe") + b"\x00\x00",  # not UTF-8
    ],
)
@pytest.mark.parametrize("opt", [O_INFO, O_GO])
def test_info_go_inconsistent_lengths(opt: int, data: bytes) -> None:
    conn = options_phase()
    (r,) = ask(conn, opt, data)
    assert (r.opt, r.type) == (opt, R_INVALID)
    assert r.data  # a message for the user
    assert conn.state is State.OPTIONS


def test_list() -> None:
    conn = options_phase()
    replies = ask(conn, O_LIST)
    assert [r.type for r in replies] == [R_SERVER, R_SERVER, R_ACK]
    listed = {}
    for r in replies[:-1]:
        (n,) = struct.unpack_from(">I", r.data)
        listed[r.data[4 : 4 + n].decode()] = r.data[4 + n :].decode()
    assert listed == {"disk": "a test disk", "ro": ""}


def test_list_with_data_is_invalid() -> None:
    conn = options_phase()
    (r,) = ask(conn, O_LIST, b"x")
    assert r.type == R_INVALID and r.data


def test_abort() -> None:
    conn = options_phase()
    events = conn.receive_data(option(O_ABORT) + option(O_LIST))
    assert events == [Disconnect()]
    assert parse_option_replies(take(conn)) == [OptReply(O_ABORT, R_ACK, b"")]
    assert conn.state is State.CLOSED
    assert conn.receive_data(option(O_LIST)) == []
    assert take(conn) == b""


def test_structured_reply() -> None:
    conn = options_phase()
    assert ask(conn, O_STRUCTURED) == [OptReply(O_STRUCTURED, R_ACK, b"")]
    assert conn.structured


def test_structured_reply_with_data_is_invalid() -> None:
    conn = options_phase()
    (r,) = ask(conn, O_STRUCTURED, b"\x00")
    assert r.type == R_INVALID and r.data
    assert not conn.structured


def test_starttls_is_refused_by_policy() -> None:
    conn = options_phase()
    (r,) = ask(conn, O_STARTTLS)
    assert (r.opt, r.type) == (O_STARTTLS, R_POLICY)
    assert b"TLS" in r.data
    assert ask(conn, O_LIST)[-1].type == R_ACK  # the handshake goes on


@pytest.mark.parametrize("opt", [O_PEEK, O_EXTENDED, 12, 99, 0, 0xFFFFFFFF])
def test_unknown_option_is_unsupported(opt: int) -> None:
    conn = options_phase()
    (r,) = ask(conn, opt, b"some data")
    assert (r.opt, r.type) == (opt, R_UNSUP)
    assert str(opt).encode() in r.data
    assert conn.state is State.OPTIONS


def test_oversized_option() -> None:
    conn = options_phase()
    # The header alone is enough: nothing of the data needs to be buffered first.
    with pytest.raises(ProtocolError, match=str(MAX_OPTION_LENGTH)):
        conn.receive_data(option(O_LIST, length=MAX_OPTION_LENGTH + 1))
    (r,) = parse_option_replies(take(conn))
    assert r.type == R_TOO_BIG and r.data
    assert conn.state is State.CLOSED


def test_option_of_the_maximum_length_is_read() -> None:
    conn = options_phase()
    (r,) = ask(conn, 99, bytes(MAX_OPTION_LENGTH))
    assert r.type == R_UNSUP


def test_too_many_options() -> None:
    conn = options_phase()
    assert conn.receive_data(option(O_STARTTLS) * MAX_OPTIONS) == []
    assert len(parse_option_replies(take(conn))) == MAX_OPTIONS
    with pytest.raises(ProtocolError, match="options"):
        conn.receive_data(option(O_STARTTLS))


# ---- metadata contexts


def meta(conn: ServerConnection, opt: int, name: str, queries: list[str]) -> list[OptReply]:
    return ask(conn, opt, meta_data(name, queries))


def contexts_of(replies: list[OptReply]) -> dict[str, int]:
    assert replies[-1].type == R_ACK
    out = {}
    for r in replies[:-1]:
        assert r.type == R_META
        (cid,) = struct.unpack_from(">I", r.data)
        out[r.data[4:].decode()] = cid
    return out


@pytest.mark.parametrize("opt", [O_LIST_META, O_SET_META])
def test_meta_context_needs_structured_replies(opt: int) -> None:
    conn = options_phase()
    (r,) = meta(conn, opt, "disk", ["base:allocation"])
    assert r.type == R_INVALID and b"STRUCTURED_REPLY" in r.data


@pytest.mark.parametrize(
    ("queries", "expected"),
    [
        ([], CONTEXTS),
        (["qemu:"], ["qemu:allocation-depth", "qemu:dirty-bitmap:bm1", "qemu:dirty-bitmap:bm2"]),
        (["qemu:dirty-bitmap:"], ["qemu:dirty-bitmap:bm1", "qemu:dirty-bitmap:bm2"]),
        (["base:"], ["base:allocation"]),
        (["base:allocation"], ["base:allocation"]),
        (["qemu:dirty-bitmap:bm2"], ["qemu:dirty-bitmap:bm2"]),
        (["nbd-server:", "x-foo:bar", "qemu:dirty-bitmap:nope", "base:nothing"], []),
        (["x-foo:", "base:allocation", "base:"], ["base:allocation"]),
    ],
)
def test_list_meta_context(queries: list[str], expected: list[str]) -> None:
    conn = options_phase()
    ask(conn, O_STRUCTURED)
    replies = meta(conn, O_LIST_META, "disk", queries)
    assert sorted(contexts_of(replies)) == sorted(expected)
    assert conn.contexts == {}  # LIST selects nothing


def test_list_meta_context_ids_are_zero() -> None:
    conn = options_phase()
    ask(conn, O_STRUCTURED)
    assert set(contexts_of(meta(conn, O_LIST_META, "disk", [])).values()) == {0}


def test_set_meta_context_selects_and_replaces() -> None:
    conn = options_phase()
    ask(conn, O_STRUCTURED)
    first = contexts_of(meta(conn, O_SET_META, "disk", ["base:allocation", "qemu:dirty-bitmap:bm1", "x-no:pe"]))
    assert sorted(first) == ["base:allocation", "qemu:dirty-bitmap:bm1"]
    assert len(set(first.values())) == 2
    assert conn.contexts == {cid: name for name, cid in first.items()}
    second = contexts_of(meta(conn, O_SET_META, "disk", ["qemu:allocation-depth", "base:allocation"]))
    assert conn.contexts == {cid: name for name, cid in second.items()}
    assert second["base:allocation"] == first["base:allocation"]  # ids are connection-unique and stable
    assert second["qemu:allocation-depth"] not in first.values()
    # Zero queries select nothing.
    assert contexts_of(meta(conn, O_SET_META, "disk", [])) == {}
    assert conn.contexts == {}


@pytest.mark.parametrize("opt", [O_LIST_META, O_SET_META])
def test_meta_context_unknown_export(opt: int) -> None:
    conn = options_phase()
    ask(conn, O_STRUCTURED)
    (r,) = meta(conn, opt, "nope", [])
    assert r.type == R_UNKNOWN and b"nope" in r.data


@pytest.mark.parametrize(
    "data",
    [
        b"",
        string("disk"),
        string("disk") + u32(1),
        string("disk") + u32(1) + u32(50) + b"x",
        string("disk") + u32(0) + b"junk",
        string("disk") + u32(1) + string(b"\xc3"),
    ],
)
@pytest.mark.parametrize("opt", [O_LIST_META, O_SET_META])
def test_meta_context_malformed(opt: int, data: bytes) -> None:
    conn = options_phase()
    ask(conn, O_STRUCTURED)
    (r,) = ask(conn, opt, data)
    assert r.type == R_INVALID and r.data


def test_contexts_set_for_another_export_do_not_carry_over() -> None:
    conn = options_phase()
    ask(conn, O_STRUCTURED)
    contexts_of(meta(conn, O_SET_META, "disk", ["base:allocation"]))
    (ev,) = conn.receive_data(option(O_GO, info_data("ro")))
    assert isinstance(ev, ExportSelected) and ev.export.name == "ro"
    assert conn.contexts == {}
    take(conn)
    conn.receive_data(request(BLOCK_STATUS, length=4096))
    assert error_of(parse_replies(take(conn))[0])[0] == EINVAL


def test_contexts_set_with_the_default_name_carry_over() -> None:
    conn = options_phase()
    ask(conn, O_STRUCTURED)
    contexts_of(meta(conn, O_SET_META, "", ["base:allocation"]))
    conn.receive_data(option(O_GO, info_data("disk")))
    assert list(conn.contexts.values()) == ["base:allocation"]


# ---- transmission flags


def test_transmission_flags() -> None:
    conn = options_phase()
    ask(conn, O_STRUCTURED)
    infos = _infos(parse_option_replies((conn.receive_data(option(O_GO, info_data("disk"))), take(conn))[1]))
    _, flags = struct.unpack(">QH", infos[I_EXPORT])
    assert flags & T_HAS_FLAGS and flags & T_SEND_DF and not flags & T_READ_ONLY


@pytest.mark.parametrize("via", ["go", "export_name"])
def test_send_df_is_clear_without_structured_replies(via: str) -> None:
    conn = options_phase()
    if via == "go":
        conn.receive_data(option(O_GO, info_data("disk")))
        _, flags = struct.unpack(">QH", _infos(parse_option_replies(take(conn)))[I_EXPORT])
    else:
        conn.receive_data(option(O_EXPORT_NAME, b"disk"))
        _, flags = struct.unpack_from(">QH", take(conn))
    assert not flags & T_SEND_DF


# ---- transmission: valid requests become events


def test_valid_requests() -> None:
    conn = transmission(contexts=["base:allocation"])
    data = (
        request(READ, cookie=1, offset=0, length=4096)
        + request(READ, flags=F_FUA | F_DF, cookie=2, offset=MIB - 1, length=1)
        + request(WRITE, flags=F_FUA, cookie=3, offset=512, length=5, payload=b"hello")
        + request(FLUSH, cookie=4)
        + request(TRIM, cookie=5, offset=4096, length=8192)
        + request(CACHE, cookie=6, offset=0, length=MIB)
        + request(WRITE_ZEROES, flags=F_NO_HOLE | F_FAST_ZERO | F_FUA, cookie=7, offset=0, length=MIB)
        + request(BLOCK_STATUS, flags=F_REQ_ONE, cookie=8, offset=0, length=MIB)
        + request(READ, cookie=9, offset=MIB, length=0)
    )
    events = conn.receive_data(data)
    assert take(conn) == b""
    assert [(e.cmd, e.flags, e.cookie, e.offset, e.length) for e in events] == [  # type: ignore[union-attr]
        (READ, 0, 1, 0, 4096),
        (READ, F_FUA | F_DF, 2, MIB - 1, 1),
        (WRITE, F_FUA, 3, 512, 5),
        (FLUSH, 0, 4, 0, 0),
        (TRIM, 0, 5, 4096, 8192),
        (CACHE, 0, 6, 0, MIB),
        (WRITE_ZEROES, F_NO_HOLE | F_FAST_ZERO | F_FUA, 7, 0, MIB),
        (BLOCK_STATUS, F_REQ_ONE, 8, 0, MIB),
        (READ, 0, 9, MIB, 0),
    ]
    assert all(isinstance(e, Request) for e in events)
    assert bytes(events[2].payload) == b"hello"  # type: ignore[union-attr, arg-type]
    assert events[0].payload is None  # type: ignore[union-attr]


def test_write_and_read_of_the_maximum_payload() -> None:
    conn = ServerConnection({"big": ExportInfo("big", 64 * MIB, read_only=False)})
    take(conn)
    conn.receive_data(client_flags() + option(O_GO, info_data("big")))
    take(conn)
    events = conn.receive_data(
        request(WRITE, cookie=1, offset=MIB, length=MAX_PAYLOAD, payload=b"\x01" * MAX_PAYLOAD)
        + request(READ, cookie=2, offset=32 * MIB, length=MAX_PAYLOAD)
    )
    assert take(conn) == b""
    assert [(e.cmd, e.cookie, e.length) for e in events] == [(WRITE, 1, MAX_PAYLOAD), (READ, 2, MAX_PAYLOAD)]  # type: ignore[union-attr]
    assert bytes(events[0].payload) == b"\x01" * MAX_PAYLOAD  # type: ignore[union-attr, arg-type]


def test_payload_survives_later_input() -> None:
    conn = transmission()
    (ev,) = conn.receive_data(request(WRITE, length=4, payload=b"abcd"))
    conn.receive_data(request(WRITE, length=4, payload=b"wxyz")[:10])
    assert isinstance(ev, Request) and bytes(ev.payload) == b"abcd"  # type: ignore[arg-type]


def test_disc() -> None:
    conn = transmission()
    events = conn.receive_data(
        request(READ, cookie=1, length=1) + request(DISC, cookie=2) + request(READ, cookie=3, length=1)
    )
    assert [type(e) for e in events] == [Request, Disconnect]
    assert conn.state is State.CLOSED
    assert conn.receive_data(request(READ, length=1)) == []
    assert take(conn) == b""  # DISC has no reply


@pytest.mark.parametrize("magic", [0, 0x25609514, SIMPLE_MAGIC, 0xFFFFFFFF])
def test_bad_request_magic_disconnects(magic: int) -> None:
    conn = transmission()
    with pytest.raises(ProtocolError, match="magic"):
        conn.receive_data(request(READ, length=1, magic=magic))
    assert conn.state is State.CLOSED


# ---- the strict-server table: (export, structured, contexts, request bytes, errno)


def _past(cmd: int, export_size: int = MIB) -> bytes:
    payload = bytes(2) if cmd == WRITE else b""
    return request(cmd, cookie=77, offset=export_size - 1, length=2, payload=payload)


BAD_REQUESTS: dict[str, tuple[str, bool, list[str] | None, bytes, int]] = {
    "read-past-end": ("disk", True, None, _past(READ), EINVAL),
    "read-offset-past-end": ("disk", True, None, request(READ, cookie=77, offset=MIB + 1, length=0), EINVAL),
    "read-offset-overflow": ("disk", True, None, request(READ, cookie=77, offset=2**64 - 1, length=2), EINVAL),
    "trim-past-end": ("disk", True, None, _past(TRIM), EINVAL),
    "cache-past-end": ("disk", True, None, _past(CACHE), EINVAL),
    "block-status-past-end": ("disk", True, ["base:allocation"], _past(BLOCK_STATUS), EINVAL),
    "write-past-end": ("disk", True, None, _past(WRITE), ENOSPC),
    "write-zeroes-past-end": ("disk", True, None, _past(WRITE_ZEROES), ENOSPC),
    "write-read-only": ("ro", True, None, request(WRITE, cookie=77, length=3, payload=b"abc"), EPERM),
    "trim-read-only": ("ro", True, None, request(TRIM, cookie=77, length=512), EPERM),
    "write-zeroes-read-only": ("ro", True, None, request(WRITE_ZEROES, cookie=77, length=512), EPERM),
    "read-too-long": ("disk", True, None, request(READ, cookie=77, length=MAX_PAYLOAD + 1), EINVAL),
    "unknown-command-8": ("disk", True, None, request(8, cookie=77), EINVAL),
    "unknown-command-big": ("disk", True, None, request(0xFFFF, cookie=77, length=4), EINVAL),
    "read-req-one": ("disk", True, None, request(READ, flags=F_REQ_ONE, cookie=77, length=1), EINVAL),
    "read-no-hole": ("disk", True, None, request(READ, flags=F_NO_HOLE, cookie=77, length=1), EINVAL),
    "write-df": ("disk", True, None, request(WRITE, flags=F_DF, cookie=77, length=1, payload=b"x"), EINVAL),
    "write-zeroes-df": ("disk", True, None, request(WRITE_ZEROES, flags=F_DF, cookie=77, length=1), EINVAL),
    "block-status-df": (
        "disk",
        True,
        ["base:allocation"],
        request(BLOCK_STATUS, flags=F_DF, cookie=77, length=1),
        EINVAL,
    ),
    "flush-no-hole": ("disk", True, None, request(FLUSH, flags=F_NO_HOLE, cookie=77), EINVAL),
    "unknown-flag-bit": ("disk", True, None, request(READ, flags=1 << 7, cookie=77, length=1), EINVAL),
    "flag-bit-15": ("disk", True, None, request(FLUSH, flags=1 << 15, cookie=77), EINVAL),
    "df-without-structured": ("disk", False, None, request(READ, flags=F_DF, cookie=77, length=1), EINVAL),
    "block-status-without-context": ("disk", True, [], request(BLOCK_STATUS, cookie=77, length=512), EINVAL),
    "block-status-no-set": ("disk", True, None, request(BLOCK_STATUS, cookie=77, length=512), EINVAL),
    "block-status-without-structured": ("disk", False, None, request(BLOCK_STATUS, cookie=77, length=512), EINVAL),
    "block-status-length-0": ("disk", True, ["base:allocation"], request(BLOCK_STATUS, cookie=77), EINVAL),
    "flush-with-offset": ("disk", True, None, request(FLUSH, cookie=77, offset=4096), EINVAL),
    "flush-with-length": ("disk", True, None, request(FLUSH, cookie=77, length=1), EINVAL),
    "simple-read-past-end": ("disk", False, None, _past(READ), EINVAL),
    "simple-write-read-only": ("ro", False, None, request(WRITE, cookie=77, length=3, payload=b"abc"), EPERM),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_are_answered_by_the_connection(case: str) -> None:
    export, structured, contexts, data, errno = BAD_REQUESTS[case]
    conn = transmission(structured=structured, contexts=contexts, export=export)
    # The bad request, then a good one: the connection goes on and the good one is an event.
    events = conn.receive_data(data + request(FLUSH, cookie=78))
    assert [(type(e), getattr(e, "cookie", None)) for e in events] == [(Request, 78)]
    (reply,) = parse_replies(take(conn))
    assert reply.cookie == 77
    got, message = error_of(reply)
    assert got == errno
    if structured:
        assert isinstance(reply, Chunk) and message  # errors carry a message for the user
    else:
        assert isinstance(reply, Simple)


def test_oversized_write_is_discarded_in_pieces() -> None:
    conn = transmission()
    n = MAX_PAYLOAD + 1
    header = request(WRITE, cookie=5, length=n)
    assert conn.receive_data(header) == []
    (reply,) = parse_replies(take(conn))
    assert reply.cookie == 5 and error_of(reply)[0] == EINVAL
    payload = b"\x25\x60\x95\x13" * (n // 4) + b"\x00"  # looks like request magic: must not be parsed
    for i in range(0, n, 4 * MIB):
        assert conn.receive_data(payload[i : i + 4 * MIB]) == []
    assert take(conn) == b""
    (ev,) = conn.receive_data(request(READ, cookie=6, length=10))
    assert isinstance(ev, Request) and ev.cookie == 6


def test_oversized_write_discarded_then_next_request_in_the_same_buffer() -> None:
    conn = transmission()
    n = MAX_PAYLOAD + 1
    events = conn.receive_data(
        request(WRITE, cookie=5, length=n, payload=bytes(n)) + request(READ, cookie=6, length=10)
    )
    assert [getattr(e, "cookie", None) for e in events] == [6]


def test_far_oversized_write_disconnects() -> None:
    conn = transmission()
    with pytest.raises(ProtocolError, match="WRITE"):
        conn.receive_data(request(WRITE, cookie=5, length=0xFFFFFFFF))


# ---- replies


def test_send_ok_and_simple_error() -> None:
    conn = transmission(structured=False)
    conn.send_ok(0x1122334455667788)
    conn.send_error(9, 5, "ignored in a simple reply")
    assert parse_replies(take(conn)) == [Simple(0, 0x1122334455667788), Simple(5, 9)]


def test_structured_error_chunk() -> None:
    conn = transmission()
    conn.send_error(9, 5, "disk on fire")
    conn.send_error(10, 22)
    r1, r2 = parse_replies(take(conn))
    assert isinstance(r1, Chunk) and r1.type == C_ERROR and r1.flags == DONE and r1.cookie == 9
    assert error_of(r1) == (5, "disk on fire")
    assert error_of(r2) == (22, "")


def test_error_message_is_capped_at_4096_bytes() -> None:
    conn = transmission()
    conn.send_error(9, 5, "x" * 10000)
    (r,) = parse_replies(take(conn))
    _, msg = error_of(r)
    assert len(msg) == 4096


def test_error_message_cap_keeps_utf8_valid() -> None:
    conn = transmission()
    conn.send_error(9, 5, "\u20ac" * 2000)  # 6000 bytes; 4096 is not a multiple of 3
    (r,) = parse_replies(take(conn))
    error_of(r)  # decodes the message


def test_simple_read() -> None:
    conn = transmission(structured=False)
    conn.send_read(7, 4096, b"abc" * 10, holes=[(4096, 3)])
    assert parse_replies(take(conn), {7: 30}) == [Simple(0, 7, b"abc" * 10)]


def read_chunks(conn: ServerConnection, cookie: int) -> list[tuple[str, int, int, bytes, bool]]:
    """(kind, offset, length, data, done) per chunk of one structured READ reply."""
    out = []
    for c in parse_replies(take(conn)):
        assert isinstance(c, Chunk) and c.cookie == cookie
        done = bool(c.flags & DONE)
        if c.type == C_DATA:
            (off,) = struct.unpack_from(">Q", c.payload)
            out.append(("data", off, len(c.payload) - 8, c.payload[8:], done))
        elif c.type == C_HOLE:
            assert len(c.payload) == 12
            off, n = struct.unpack(">QI", c.payload)
            out.append(("hole", off, n, b"", done))
        elif c.type == C_NONE:
            assert c.payload == b""
            out.append(("none", 0, 0, b"", done))
        else:
            raise AssertionError(c)
    return out


def check_read_reply(chunks: list[tuple[str, int, int, bytes, bool]], offset: int, data: bytes) -> None:
    """Chunks cover the request exactly, in order, never empty, DONE on the last only."""
    assert [c[4] for c in chunks] == [False] * (len(chunks) - 1) + [True]
    pos = offset
    for kind, off, n, payload, _ in chunks:
        if kind == "none":
            continue
        assert off == pos and n > 0
        expect = data[off - offset : off - offset + n]
        if kind == "data":
            assert payload == expect
        else:
            assert expect == bytes(n)
        pos += n
    assert pos == offset + len(data)


def test_structured_read_without_holes() -> None:
    conn = transmission()
    data = bytes(range(256)) * 16
    conn.send_read(3, 8192, data)
    chunks = read_chunks(conn, 3)
    assert chunks == [("data", 8192, 4096, data, True)]


def test_structured_read_with_holes() -> None:
    conn = transmission()
    data = b"a" * 100 + bytes(50) + b"b" * 10 + bytes(40)
    off = 1000
    conn.send_read(3, off, data, holes=[(off + 100, 50), (off + 160, 40)])
    chunks = read_chunks(conn, 3)
    assert [(k, o, n, d) for k, o, n, d, _ in chunks] == [
        ("data", 1000, 100, b"a" * 100),
        ("hole", 1100, 50, b""),
        ("data", 1150, 10, b"b" * 10),
        ("hole", 1160, 40, b""),
    ]
    check_read_reply(chunks, off, data)


def test_structured_read_hole_first_and_adjacent_holes() -> None:
    conn = transmission()
    data = bytes(30) + b"z" * 5
    conn.send_read(4, 0, data, holes=[(0, 10), (10, 20)])
    chunks = read_chunks(conn, 4)
    assert [(k, o, n) for k, o, n, _, _ in chunks] == [("hole", 0, 10), ("hole", 10, 20), ("data", 30, 5)]
    check_read_reply(chunks, 0, data)


def test_structured_read_all_hole() -> None:
    conn = transmission()
    conn.send_read(5, 512, bytes(4096), holes=[(512, 4096)])
    assert read_chunks(conn, 5) == [("hole", 512, 4096, b"", True)]


def test_df_read_is_one_data_chunk_even_with_holes() -> None:
    conn = transmission()
    data = b"q" * 10 + bytes(4086)
    conn.send_read(6, 0, data, holes=[(10, 4086)], df=True)
    assert read_chunks(conn, 6) == [("data", 0, 4096, data, True)]


@pytest.mark.parametrize("df", [False, True])
def test_structured_read_of_zero_bytes(df: bool) -> None:
    conn = transmission()
    conn.send_read(8, 0, b"", df=df)
    assert read_chunks(conn, 8) == [("none", 0, 0, b"", True)]


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_structured_read_layout_property(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 300))
    cuts = sorted(set(data.draw(st.lists(st.integers(0, n), max_size=8))) | {0, n})
    holes = []
    buf = bytearray(data.draw(st.binary(min_size=n, max_size=n)))
    offset = data.draw(st.integers(0, MIB - n))
    for a, b in itertools.pairwise(cuts):
        if data.draw(st.booleans()):
            holes.append((offset + a, b - a))
            buf[a:b] = bytes(b - a)
    conn = transmission()
    conn.send_read(1, offset, buf, holes=holes)
    chunks = read_chunks(conn, 1)
    check_read_reply(chunks, offset, bytes(buf))
    assert sum(1 for c in chunks if c[0] == "hole") == len(holes)


def test_block_status_layout() -> None:
    conn = transmission(contexts=["base:allocation", "qemu:dirty-bitmap:bm1"])
    ids = sorted(conn.contexts)
    conn.send_block_status(11, [(ids[0], [(4096, 3), (8192, 0)]), (ids[1], [(12288, 1)])])
    c1, c2 = parse_replies(take(conn))
    assert isinstance(c1, Chunk) and isinstance(c2, Chunk)
    assert (c1.type, c1.flags, c1.cookie) == (C_BLOCK_STATUS, 0, 11)
    assert (c2.type, c2.flags, c2.cookie) == (C_BLOCK_STATUS, DONE, 11)
    assert struct.unpack(">IIIII", c1.payload) == (ids[0], 4096, 3, 8192, 0)
    assert struct.unpack(">III", c2.payload) == (ids[1], 12288, 1)


# ---- h11-style: whole, one byte at a time, and with trailing bytes of the next message


@dataclass
class Outcome:
    events: list[object]
    output: bytes
    error: bool
    state: State


def run(
    data: bytes, pieces: list[int] | None = None, setup: Callable[[ServerConnection], None] | None = None
) -> Outcome:
    """Feed DATA to a new connection, split at PIECES (sizes; None: whole, [] : one byte at a time)."""
    conn = new_conn()
    out = take(conn)
    if setup:
        setup(conn)
    events: list[object] = []
    chunks: list[bytes]
    if pieces is None:
        chunks = [data]
    elif not pieces:
        chunks = [data[i : i + 1] for i in range(len(data))]
    else:
        chunks, pos, i = [], 0, 0
        while pos < len(data):
            n = pieces[i % len(pieces)]
            chunks.append(data[pos : pos + n])
            pos += n
            i += 1
    error = False
    # The trailing empty call collects an error held back so the events before it were not lost.
    for chunk in [*chunks, b""]:
        try:
            events += conn.receive_data(chunk)
        except ProtocolError:
            error = True
            break
    # Answer every READ so its reply is part of the output; the layout must not depend on chunking.
    for ev in events:
        if isinstance(ev, Request) and ev.cmd == READ:
            conn.send_read(ev.cookie, ev.offset, bytes(ev.length))
    return Outcome(events, out + take(conn), error, conn.state)


HANDSHAKE_STRUCTURED = (
    client_flags()
    + option(O_STRUCTURED)
    + option(O_SET_META, meta_data("disk", ["base:allocation", "qemu:dirty-bitmap:bm2"]))
    + option(O_GO, info_data("disk", [I_NAME, I_BLOCK_SIZE]))
)

SCENARIOS: dict[str, bytes] = {
    "export-name-simple-read": client_flags(C_FIXED)
    + option(O_EXPORT_NAME, b"disk")
    + request(READ, cookie=1, offset=10, length=100)
    + request(DISC),
    "export-name-no-zeroes": client_flags() + option(O_EXPORT_NAME, b"ro") + request(WRITE, length=2, payload=b"xy"),
    "options-tour": client_flags()
    + option(O_LIST)
    + option(O_INFO, info_data("disk", [I_NAME, I_DESCRIPTION]))
    + option(O_INFO, info_data("nope"))
    + option(O_STARTTLS)
    + option(99, b"data")
    + option(O_LIST_META, meta_data("disk", ["qemu:"]))
    + option(O_STRUCTURED)
    + option(O_LIST_META, meta_data("disk", []))
    + option(O_INFO, b"\x00\x00\x00\x09bad")
    + option(O_ABORT),
    "structured-transmission": HANDSHAKE_STRUCTURED
    + request(READ, flags=F_DF, cookie=1, offset=0, length=300)
    + request(WRITE, flags=F_FUA, cookie=2, offset=7, length=9, payload=b"123456789")
    + request(BLOCK_STATUS, flags=F_REQ_ONE, cookie=3, length=MIB)
    + request(READ, cookie=4, offset=MIB, length=1)
    + request(WRITE, cookie=5, offset=MIB, length=4, payload=b"late")
    + request(42, cookie=6)
    + request(FLUSH, cookie=7)
    + request(WRITE_ZEROES, flags=F_NO_HOLE, cookie=8, offset=0, length=4096)
    + request(DISC, cookie=9)
    + request(READ, cookie=10, length=1),
    "bad-magic-after-requests": HANDSHAKE_STRUCTURED + request(TRIM, cookie=1, length=512) + request(READ, magic=7),
    "unknown-client-flag": client_flags(1 << 5) + option(O_LIST),
    "unknown-export-name": client_flags() + option(O_LIST) + option(O_EXPORT_NAME, b"missing"),
    "oversized-option": client_flags() + option(O_LIST) + option(O_INFO, length=MAX_OPTION_LENGTH + 1) + bytes(100),
}




@pytest.mark.parametrize(
    "name", sorted(SCENARIOS)
)
def test_scenario_whole_bytewise_and_with_trailing_bytes(name: str) -> None:
    data = SCENARIOS[name]
    whole = run(data)
    assert run(data, []) == whole  # one byte at a time
    assert run(data, [3, 17, 1, 28, 64]) == whole
    # Trailing bytes of a next message change nothing.
    for tail in (request(READ, cookie=99, length=1)[:27], option(O_LIST)[:15], b"\x00"):
        assert run(data + tail) == whole
        assert run(data + tail, []) == whole


def test_scenarios_reach_their_ends() -> None:
    assert run(SCENARIOS["export-name-simple-read"]).state is State.CLOSED
    assert run(SCENARIOS["options-tour"]).events == [Disconnect()]
    out = run(SCENARIOS["structured-transmission"])
    assert [getattr(e, "cookie", None) for e in out.events] == [None, 1, 2, 3, 7, 8, None]
    assert out.state is State.CLOSED
    for name in ("bad-magic-after-requests", "unknown-client-flag", "unknown-export-name", "oversized-option"):
        assert run(SCENARIOS[name]).error, name


def test_bad_magic_scenario_fed_bytewise() -> None:
    out = run(SCENARIOS["bad-magic-after-requests"], [])
    assert out.error
    assert [type(e) for e in out.events] == [ExportSelected, Request]


def test_events_before_a_protocol_error_are_not_lost() -> None:
    conn = transmission()
    data = request(WRITE, cookie=1, length=4, payload=b"abcd") + request(READ, magic=7)
    events: list[object] = []
    with contextlib.suppress(ProtocolError):
        events = conn.receive_data(data)
    assert [getattr(e, "cookie", None) for e in events] == [1]


def test_next_request_completes_after_trailing_bytes() -> None:
    conn = transmission()
    req = request(WRITE, cookie=3, length=4, payload=b"data")
    assert conn.receive_data(request(FLUSH, cookie=2) + req[:30]) != []
    (ev,) = conn.receive_data(req[30:])
    assert isinstance(ev, Request) and ev.cookie == 3 and bytes(ev.payload) == b"data"  # type: ignore[arg-type]


# ---- fuzzing: any input ends in events or ProtocolError


EVENT_TYPES = (ExportSelected, Request, Disconnect, StartTLS)


def feed_all(conn: ServerConnection, chunks: list[bytes]) -> tuple[list[object], bool]:
    """Feed CHUNKS until the end or a ProtocolError: (events, whether it ended in ProtocolError)."""
    events: list[object] = []
    # The trailing empty call collects an error held back so the events before it were not lost.
    for chunk in [*chunks, b""]:
        try:
            events += conn.receive_data(chunk)
        except ProtocolError:
            assert conn.state is State.CLOSED
            conn.data_to_send()
            return events, True
    conn.data_to_send()
    return events, False


def check_events(conn: ServerConnection, events: list[object]) -> None:
    """Every event is well-formed and every Request is one the server can act on."""
    limits = {"disk": MIB, "ro": 64 * KIB}
    for ev in events:
        assert isinstance(ev, EVENT_TYPES)
        if isinstance(ev, Request):
            assert conn.export is not None
            assert 0 <= ev.cmd <= 7 and ev.cmd != DISC
            if ev.cmd in (READ, WRITE, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS):
                assert ev.offset + ev.length <= limits[conn.export.name]
            if ev.cmd in (WRITE, TRIM, WRITE_ZEROES):
                assert not conn.export.read_only
            if ev.cmd == WRITE:
                assert ev.payload is not None and len(ev.payload) == ev.length
            if ev.cmd == BLOCK_STATUS:
                assert conn.contexts


def split(data: bytes, sizes: list[int]) -> list[bytes]:
    out, pos, i = [], 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)] if sizes else len(data)
        out.append(data[pos : pos + n])
        pos += n
        i += 1
    return out


small = st.integers(0, 2**16)
anyint = st.one_of(st.integers(0, 16), st.integers(0, 2**32 - 1))

requests = st.builds(
    lambda cmd, flags, cookie, offset, length, extra: (
        request(
            cmd,
            flags=flags,
            cookie=cookie,
            offset=offset,
            length=length,
            payload=bytes(min(length, 64)) if cmd == WRITE else b"",
        )
        + extra
    ),
    cmd=st.one_of(st.integers(0, 8), st.integers(0, 0xFFFF)),
    flags=st.one_of(st.integers(0, 31), st.integers(0, 0xFFFF)),
    cookie=st.integers(0, 2**64 - 1),
    offset=st.one_of(st.integers(0, MIB + 2), st.integers(0, 2**64 - 1)),
    length=st.one_of(st.integers(0, 70), st.integers(0, MIB + 2), st.integers(0, 2**32 - 1)),
    extra=st.binary(max_size=4),
)

options = st.builds(
    lambda opt, data, trailer: option(opt, data) + trailer,
    opt=st.one_of(st.integers(0, 12), st.integers(0, 2**32 - 1)),
    data=st.one_of(
        st.binary(max_size=40),
        st.builds(
            meta_data,
            st.sampled_from(["disk", "ro", "", "x"]),
            st.lists(
                st.sampled_from(
                    ["qemu:", "base:", "base:allocation", "qemu:dirty-bitmap:", "qemu:dirty-bitmap:bm1", "", "x-y:z"]
                ),
                max_size=4,
            ),
        ),
        st.builds(info_data, st.sampled_from(["disk", "ro", "", "x"]), st.lists(st.integers(0, 5), max_size=4)),
    ),
    trailer=st.binary(max_size=3),
)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300), sizes=st.lists(st.integers(1, 40), max_size=5))
def test_fuzz_raw_bytes_from_the_start(data: bytes, sizes: list[int]) -> None:
    conn = new_conn()
    check_events(conn, feed_all(conn, split(data, sizes))[0])


@settings(max_examples=300, deadline=None)
@given(
    flags=st.sampled_from([client_flags(), client_flags(C_FIXED), client_flags(0)]),
    opts=st.lists(options, max_size=8),
    reqs=st.lists(st.one_of(requests, st.binary(max_size=30)), max_size=6),
    sizes=st.lists(st.integers(1, 50), max_size=5),
)
def test_fuzz_options_then_requests(flags: bytes, opts: list[bytes], reqs: list[bytes], sizes: list[int]) -> None:
    data = flags + b"".join(opts) + option(O_GO, info_data("disk")) + b"".join(reqs)
    whole_conn = new_conn()
    whole, whole_error = feed_all(whole_conn, [data])
    check_events(whole_conn, whole)
    split_conn = new_conn()
    pieces, split_error = feed_all(split_conn, split(data, sizes))
    check_events(split_conn, pieces)
    assert whole_error == split_error
    # Events completed before a protocol error are delivered, however the bytes were split.
    assert pieces == whole


@settings(max_examples=400, deadline=None)
@given(
    export=st.sampled_from(["disk", "ro"]),
    structured=st.booleans(),
    reqs=st.lists(st.one_of(requests, st.binary(max_size=40)), max_size=8),
    sizes=st.lists(st.integers(1, 60), max_size=5),
)
def test_fuzz_after_handshake(export: str, structured: bool, reqs: list[bytes], sizes: list[int]) -> None:
    conn = transmission(structured=structured, contexts=["base:allocation"] if structured else None, export=export)
    data = b"".join(reqs)
    events, _ = feed_all(conn, split(data, sizes))
    check_events(conn, events)


def test_fuzz_random_garbage_smoke() -> None:
    rng = random.Random(1234)
    for _ in range(200):
        conn = transmission()
        data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(200)))
        check_events(conn, feed_all(conn, [data])[0])


# ---- the receive buffer


def test_an_idle_connection_holds_a_small_buffer_until_a_message_needs_more() -> None:
    conn = transmission()
    assert len(conn.get_buffer()) <= 4096
    # A 64 KiB WRITE arriving in pieces: the buffer grows to hold it, the request comes out whole.
    data = request(WRITE, cookie=3, length=64 * KIB) + bytes(range(256)) * 256
    events = []
    for i in range(0, len(data), 1000):
        events += conn.receive_data(data[i : i + 1000])
    (ev,) = events
    assert isinstance(ev, Request) and ev.payload is not None and bytes(ev.payload) == data[28:]


# ---- a refused WRITE's payload is skipped, never buffered


@pytest.mark.parametrize(
    ("export", "offset", "length", "errno"),
    [
        ("ro", 0, 32 * MIB, EPERM),  # read-only: refused before its payload arrives
        ("disk", MIB - 4096, 8192, ENOSPC),  # past the end
        ("disk", 0, MAX_PAYLOAD + 1, EINVAL),  # larger than the maximum
    ],
)
def test_refused_write_payload_is_skipped_not_buffered(export: str, offset: int, length: int, errno: int) -> None:
    conn = transmission(export=export)
    assert conn.receive_data(request(WRITE, cookie=9, offset=offset, length=length)) == []
    (reply,) = parse_replies(take(conn))
    assert reply.cookie == 9 and error_of(reply)[0] == errno
    # Answered from the header alone: nothing was allocated for the payload.
    assert len(conn._payload) == 0 and conn._write is None
    # The payload's bytes are skipped as they come, then the connection goes on.
    chunk = bytes(64 * KIB)
    for _ in range(length // len(chunk)):
        assert conn.receive_data(chunk) == []
    rest = bytes(length % len(chunk))
    events = conn.receive_data(rest + request(FLUSH, cookie=10))
    assert [(type(e), getattr(e, "cookie", None)) for e in events] == [(Request, 10)]
    assert len(conn._payload) == 0


# ---- what a client may learn


T_SEND_TRIM, T_SEND_WRITE_ZEROES, T_SEND_FAST_ZERO = 1 << 5, 1 << 6, 1 << 11


@pytest.mark.parametrize("read_only", [True, False])
def test_read_only_exports_offer_no_write_commands(read_only: bool) -> None:
    flags = ExportInfo("x", MIB, read_only=read_only).flags
    writes = T_SEND_TRIM | T_SEND_WRITE_ZEROES | T_SEND_FAST_ZERO
    assert bool(flags & T_READ_ONLY) == read_only
    assert flags & writes == (0 if read_only else writes)


@pytest.mark.parametrize("opt", [O_INFO, O_GO])
@pytest.mark.parametrize("name", ["n" * 4080, "é" * 2040])
def test_error_messages_echo_a_long_name_within_the_recommended_256_bytes(opt: int, name: str) -> None:
    conn = options_phase()
    (r,) = ask(conn, opt, info_data(name))
    assert (r.opt, r.type) == (opt, R_UNKNOWN)
    assert len(r.data) <= 256
    assert r.data.decode().startswith("no export named") and r.data.endswith(b"...")


# ---- STARTTLS (proto.md, "TLS support")

R_TLS_REQD = ERR + 5


def tls_conn(mode: TlsMode, tls_only: tuple[str, ...] = ()) -> ServerConnection:
    conn = ServerConnection(exports(), default="disk", tls=mode, tls_only=tls_only)
    take(conn)
    assert conn.receive_data(client_flags()) == []
    return conn


def start_tls(conn: ServerConnection, allowed: list[str] | None = None, after: bytes = b"") -> bytes:
    """STARTTLS, its ACK, and the handshake's success; returns the bytes handed to the TLS layer."""
    events = conn.receive_data(option(O_STARTTLS) + after)
    assert [type(e) for e in events] == [StartTLS]
    (r,) = parse_option_replies(take(conn))
    assert (r.opt, r.type, r.data) == (O_STARTTLS, R_ACK, b"")
    assert conn.state is State.TLS_HANDSHAKE
    early = conn.take_tls_bytes()
    conn.tls_started(allowed)
    return early


@pytest.mark.parametrize("mode", [TlsMode.ON, TlsMode.REQUIRE])
def test_starttls_with_data_is_invalid(mode: TlsMode) -> None:
    conn = tls_conn(mode)
    (r,) = ask(conn, O_STARTTLS, b"x")
    assert (r.opt, r.type) == (O_STARTTLS, R_INVALID) and r.data
    assert conn.state is State.OPTIONS


@pytest.mark.parametrize("mode", [TlsMode.ON, TlsMode.REQUIRE])
def test_second_starttls_is_invalid(mode: TlsMode) -> None:
    conn = tls_conn(mode)
    start_tls(conn)
    (r,) = ask(conn, O_STARTTLS)
    assert (r.opt, r.type) == (O_STARTTLS, R_INVALID) and b"already" in r.data
    assert ask(conn, O_LIST)[-1].type == R_ACK


@pytest.mark.parametrize("opt", [O_LIST, O_INFO, O_GO, O_STRUCTURED, O_LIST_META, O_SET_META, O_PEEK, 99])
def test_require_refuses_options_before_tls(opt: int) -> None:
    conn = tls_conn(TlsMode.REQUIRE)
    data = info_data("disk") if opt in (O_INFO, O_GO) else b""
    (r,) = ask(conn, opt, data)
    assert (r.opt, r.type) == (opt, R_TLS_REQD) and r.data
    assert not conn.structured and conn.state is State.OPTIONS


def test_require_export_name_before_tls_disconnects() -> None:
    conn = tls_conn(TlsMode.REQUIRE)
    with pytest.raises(ProtocolError, match="TLS"):
        conn.receive_data(option(O_EXPORT_NAME, b"disk"))
    assert take(conn) == b""
    assert conn.state is State.CLOSED


def test_require_abort_before_tls() -> None:
    conn = tls_conn(TlsMode.REQUIRE)
    assert [type(e) for e in conn.receive_data(option(O_ABORT))] == [Disconnect]
    (r,) = parse_option_replies(take(conn))
    assert r.type == R_ACK


def test_require_after_tls_serves_everything() -> None:
    conn = tls_conn(TlsMode.REQUIRE)
    start_tls(conn)
    names = [parse_string(r.data) for r in ask(conn, O_LIST)[:-1]]
    assert names == ["disk", "ro"]
    handshake_after_tls(conn)


def parse_string(data: bytes) -> str:
    (n,) = struct.unpack_from(">I", data)
    return data[4 : 4 + n].decode()


def handshake_after_tls(conn: ServerConnection, export: str = "disk") -> None:
    events = conn.receive_data(option(O_STRUCTURED) + option(O_GO, info_data(export)))
    assert [type(e) for e in events] == [ExportSelected]
    take(conn)


def test_starttls_stops_parsing_and_hands_over_the_bytes_after_it() -> None:
    conn = tls_conn(TlsMode.ON)
    # A client that pipelines its TLS ClientHello (and more) behind STARTTLS: none of it is an option.
    hello = b"\x16\x03\x01\x00\x05hello" + option(O_LIST) + option(O_ABORT)
    events = conn.receive_data(option(O_STARTTLS) + hello)
    assert [type(e) for e in events] == [StartTLS]
    assert parse_option_replies(take(conn))[0].type == R_ACK
    assert take(conn) == b""
    assert conn.next_event() is None
    assert conn.take_tls_bytes() == hello
    assert conn.take_tls_bytes() == b""


def test_starttls_bytes_fed_through_the_buffer() -> None:
    conn = tls_conn(TlsMode.ON)
    data = option(O_STARTTLS) + b"\x16\x03\x01 early"
    # One byte at a time through get_buffer/buffer_updated, as a BufferedProtocol feeds it.
    events = []
    for i in range(len(data)):
        buf = conn.get_buffer(1)
        buf[0] = data[i]
        conn.buffer_updated(1)
        ev = conn.next_event()
        if ev is not None:
            events.append(ev)
        if conn.state is State.TLS_HANDSHAKE:
            rest = data[i + 1 :]
            break
    assert [type(e) for e in events] == [StartTLS]
    assert conn.take_tls_bytes() + rest == b"\x16\x03\x01 early"


def test_negotiation_before_starttls_is_forgotten() -> None:
    conn = tls_conn(TlsMode.ON)
    conn.receive_data(option(O_STRUCTURED) + option(O_SET_META, meta_data("disk", ["base:allocation"])))
    take(conn)
    assert conn.structured and conn.contexts
    start_tls(conn)
    assert not conn.structured and not conn.contexts
    # SET_META_CONTEXT needs STRUCTURED_REPLY again.
    (r,) = ask(conn, O_SET_META, meta_data("disk", ["base:allocation"]))
    assert r.type == R_INVALID
    events = conn.receive_data(option(O_GO, info_data("disk")))
    assert [type(e) for e in events] == [ExportSelected]
    take(conn)
    # Simple replies, no contexts: BLOCK_STATUS is refused.
    conn.receive_data(request(BLOCK_STATUS, cookie=5, length=512))
    (reply,) = parse_replies(take(conn))
    assert isinstance(reply, Simple) and reply.error == EINVAL


def test_on_serves_plaintext_clients() -> None:
    conn = tls_conn(TlsMode.ON)
    assert len(ask(conn, O_LIST)) == 3
    handshake_after_tls(conn)


def test_on_tls_only_exports() -> None:
    conn = tls_conn(TlsMode.ON, tls_only=("disk",))
    names = [parse_string(r.data) for r in ask(conn, O_LIST)[:-1]]
    assert names == ["ro"]
    (r,) = ask(conn, O_INFO, info_data("disk"))
    assert r.type == R_TLS_REQD
    (r,) = ask(conn, O_GO, info_data(""))  # the default export is "disk"
    assert r.type == R_TLS_REQD
    conn.receive_data(option(O_STRUCTURED))
    take(conn)
    (r,) = ask(conn, O_LIST_META, meta_data("disk", []))
    assert r.type == R_UNKNOWN  # TLS_REQD is for INFO and GO only
    with pytest.raises(ProtocolError, match="TLS"):
        conn.receive_data(option(O_EXPORT_NAME, b"disk"))


def test_authorization_hides_exports() -> None:
    conn = tls_conn(TlsMode.REQUIRE)
    start_tls(conn, allowed=["ro"])
    names = [parse_string(r.data) for r in ask(conn, O_LIST)[:-1]]
    assert names == ["ro"]
    for opt in (O_INFO, O_GO):
        (r,) = ask(conn, opt, info_data("disk"))
        assert r.type == R_UNKNOWN
    conn.receive_data(option(O_STRUCTURED))
    take(conn)
    (r,) = ask(conn, O_LIST_META, meta_data("disk", []))
    assert r.type == R_UNKNOWN
    handshake_after_tls(conn, "ro")


def test_authorization_export_name_of_a_hidden_export_disconnects() -> None:
    conn = tls_conn(TlsMode.REQUIRE)
    start_tls(conn, allowed=[])
    assert len(ask(conn, O_LIST)) == 1
    with pytest.raises(ProtocolError, match="unknown export"):
        conn.receive_data(option(O_EXPORT_NAME, b"disk"))


def test_tls_calls_out_of_order_are_refused() -> None:
    conn = tls_conn(TlsMode.ON)
    with pytest.raises(ValueError):
        conn.take_tls_bytes()
    with pytest.raises(ValueError):
        conn.tls_started()


def feed_until_tls(conn: ServerConnection, chunks: list[bytes]) -> tuple[list[object], bool, bytes]:
    """As feed_all, but stop at StartTLS: (events, ended in ProtocolError, the bytes the TLS layer gets)."""
    events: list[object] = []
    for i, chunk in enumerate([*chunks, b""]):
        try:
            events += conn.receive_data(chunk)
        except ProtocolError:
            assert conn.state is State.CLOSED
            return events, True, b""
        if conn.state is State.TLS_HANDSHAKE:
            assert isinstance(events[-1], StartTLS)
            return events, False, conn.take_tls_bytes() + b"".join(chunks[i + 1 :])
    return events, False, b""


@settings(max_examples=300, deadline=None)
@given(
    mode=st.sampled_from([TlsMode.ON, TlsMode.REQUIRE]),
    opts=st.lists(st.one_of(options, st.just(option(O_STARTTLS)), st.just(option(O_STARTTLS, b"x"))), max_size=8),
    tail=st.binary(max_size=60),
    sizes=st.lists(st.integers(1, 50), max_size=5),
)
def test_fuzz_tls_policies(mode: TlsMode, opts: list[bytes], tail: bytes, sizes: list[int]) -> None:
    """Under any TLS policy, however the bytes are split: the same events, and after STARTTLS's ACK
    exactly the bytes that followed the option go to the TLS layer, none parsed as NBD."""
    data = client_flags() + b"".join(opts) + tail
    whole_conn = ServerConnection(exports(), default="disk", tls=mode)
    whole = feed_until_tls(whole_conn, [data])
    split_conn = ServerConnection(exports(), default="disk", tls=mode)
    pieces = feed_until_tls(split_conn, split(data, sizes))
    assert whole == pieces
    check_events(whole_conn, whole[0])
    if whole[0] and isinstance(whole[0][-1], StartTLS):
        out = take(whole_conn)
        # The last thing sent in the clear is STARTTLS's ACK.
        assert out.endswith(struct.pack(">QIII", REPLY_MAGIC, O_STARTTLS, R_ACK, 0))
        assert data.endswith(whole[2])
    if mode is TlsMode.REQUIRE:
        assert not any(isinstance(e, (ExportSelected, Request)) for e in whole[0])
