"""NBD wire-protocol conformance of `prlnbd serve`: handshake, transmission,
concurrency and lifecycle, through raw sockets (tests/nbdraw.py) and libnbd.

Set PRLNBD_PROTO_REF=qemu to run the same tests against `qemu-nbd -f parallels`,
the reference server, to prove the harness; prlnbd-only checks are skipped then.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import support
from tests.nbdraw import (
    STATE_HOLE,
    STATE_ZERO,
    U16,
    U32,
    Client,
    ClientFlag,
    Closed,
    Cmd,
    CmdFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    TxFlag,
    assemble_read,
    errno_name,
    pack_info_request,
    pack_option,
    pack_request,
    parse_block_status,
    parse_string_reply,
)

nbd = pytest.importorskip("nbd")

pytestmark = pytest.mark.skipif(
    not (support.have("qemu-img") and support.have("qemu-io")), reason="qemu-utils needed"
)

REF = os.environ.get("PRLNBD_PROTO_REF", "prlnbd")
QEMU = REF == "qemu"
prlnbd_only = pytest.mark.skipif(QEMU, reason="prlnbd-specific behaviour")

MiB = 1 << 20
# qemu-nbd advertises a 512-byte minimum block size; libnbd enforces it in strict mode.
ALIGN = 512 if QEMU else 1
# qemu-nbd 7.2 answers writes to a read-only export with EINVAL, not the spec's EPERM.
EPERM_RO = errno.EINVAL if QEMU else errno.EPERM
# ... and writes past the end with EINVAL, not the spec's ENOSPC.
ENOSPC_PAST = errno.EINVAL if QEMU else errno.ENOSPC
SIZE = 64 * MiB
MAX_PAYLOAD = 32 * MiB
# (offset, length, pattern) written into the 64 MiB image; 1 MiB clusters.
WRITES = [(0, MiB, 0x5A), (4 * MiB, 64 * 1024, 0xA5), (10 * MiB - 512, 3000, 0x11),
          (SIZE - 4096, 4096, 0x77)]
ALLOCATED = [(0, MiB), (4 * MiB, 5 * MiB), (9 * MiB, 11 * MiB), (63 * MiB, SIZE)]
BASE = "base:allocation"
DEPTH = "qemu:allocation-depth"


@dataclass
class Image:
    path: Path
    data: bytes  # the whole guest-visible content


def make_image(path: Path) -> None:
    support.run("qemu-img", "create", "-q", "-f", "parallels", path, str(SIZE))
    cmds: list[str] = []
    for off, n, pat in WRITES:
        cmds += ["-c", f"write -q -P {pat:#x} {off} {n}"]
    support.run("qemu-io", "-f", "parallels", *cmds, path)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    d = tmp_path_factory.mktemp("proto-img")
    path = d / "disk.hds"
    make_image(path)
    raw = d / "disk.raw"
    support.run("qemu-img", "convert", "-f", "parallels", "-O", "raw", path, raw)
    return Image(path, raw.read_bytes())


def start_server(tmp: Path, image: Path, *, read_only: bool = True,
                 env: dict[str, str] | None = None,
                 disks: list[str] | None = None) -> support.Server:
    """prlnbd (or qemu-nbd under PRLNBD_PROTO_REF=qemu) on IMAGE, export ""."""
    if QEMU:
        extra = ["-A", "--shared=0", *(["-r"] if read_only else [])]
        return support.start_qemu_nbd(tmp, image, *extra)
    extra = ["--read-only"] if read_only else []
    return support.start_prlnbd(tmp, disks or [str(image)], *extra, env=env)


@pytest.fixture(scope="module")
def ro(image: Image, tmp_path_factory: pytest.TempPathFactory):
    with support.running(start_server(tmp_path_factory.mktemp("ro"), image.path)) as s:
        yield s


@pytest.fixture(scope="module")
def rw(image: Image, tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("rw")
    copy = d / "rw.hds"
    shutil.copyfile(image.path, copy)
    with support.running(start_server(d, copy, read_only=False)) as s:
        yield s


def raw(server: support.Server, timeout: float = 10.0, **kw: object) -> Client:
    return Client.unix(server.sock, timeout=timeout, **kw)  # type: ignore[arg-type]


@contextlib.contextmanager
def lib(server: support.Server, *, strict: bool = True, contexts: tuple[str, ...] = (),
        structured: bool = True):
    """A connected libnbd handle, disconnected when the block ends."""
    h = nbd.NBD()
    if not strict:
        h.set_strict_mode(0)
    h.set_request_structured_replies(structured)
    for c in contexts:
        h.add_meta_context(c)
    h.connect_uri(server.uri())
    try:
        yield h
    finally:
        with contextlib.suppress(nbd.Error):
            h.shutdown()
        del h


def nbd_errno(fn, *args: object) -> int:
    """Call a libnbd function that must fail; return the NBD errno it reports."""
    with pytest.raises(nbd.Error) as ei:
        fn(*args)
    return ei.value.errnum


def assert_alive(server: support.Server, image: Image) -> None:
    """The server process runs and a fresh client reads correct data."""
    assert server.proc.poll() is None, f"server died:\n{server.log_text()[-3000:]}"
    with raw(server) as c:
        c.connect()
        assert c.read(0, 4096) == image.data[:4096]


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def assert_error_reply(r, want: int | tuple[int, ...]) -> None:
    wanted = want if isinstance(want, tuple) else (want,)
    assert r.type in wanted, f"reply {_rep(r.type)}, wanted {[_rep(w) for w in wanted]}"
    assert r.data, f"error reply {_rep(r.type)} carries no message"
    r.data.decode("utf-8")


def assert_errno(res, want: int) -> None:
    """RES failed with WANT; a structured error also carries a message."""
    assert errno_name(res.error) == errno_name(want)
    if res.structured:
        assert all(res.error_messages()), "structured error chunk without a message"


def _rep(t: int) -> str:
    try:
        return Rep(t).name
    except ValueError:
        return hex(t)


# ---------------------------------------------------------------------------
# 1. Handshake
# ---------------------------------------------------------------------------

def test_greeting(ro):
    with raw(ro) as c:
        flags = c.read_greeting()
        assert flags == HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES


@pytest.mark.parametrize("flags", [0x1 | 0x4, 0x3 | 0x8000_0000, 0xFFFF_FFFF])
def test_unknown_client_flags_disconnect(ro, flags):
    with raw(ro) as c:
        c.read_greeting()
        c.send_client_flags(flags)
        assert c.wait_closed(timeout=3.0) == b""


def test_export_name_no_zeroes(ro, image):
    with raw(ro) as c:
        c.start(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)
        assert c.export_name("", no_zeroes=True) == b""
        assert c.size == SIZE
        assert c.tx_flags & TxFlag.HAS_FLAGS
        assert c.tx_flags & TxFlag.READ_ONLY
        assert not c.tx_flags & TxFlag.SEND_DF, "SEND_DF without structured replies"
        # The next bytes must be the simple reply, not 124 zeroes.
        assert c.read(0, 4096) == image.data[:4096]


def test_export_name_zeroes_when_not_requested(ro, image):
    with raw(ro) as c:
        c.start(ClientFlag.C_FIXED_NEWSTYLE)
        assert c.export_name("", no_zeroes=False) == bytes(124)
        assert c.read(MiB - 100, 200) == image.data[MiB - 100 : MiB + 100]


def test_export_name_after_structured_reply(ro, image):
    with raw(ro) as c:
        c.start()
        c.structured_reply()
        c.export_name("")
        assert c.tx_flags & TxFlag.SEND_DF
        res = c.call(Cmd.READ, MiB - 512, 1024)
        assert res.structured
        assert assemble_read(res, MiB - 512, 1024) == image.data[MiB - 512 : MiB + 512]


def test_export_name_unknown_disconnects(ro):
    with raw(ro) as c:
        c.start()
        c.send_option(Opt.EXPORT_NAME, b"no-such-export")
        assert c.wait_closed() == b""


def test_info_then_go(ro, image):
    with raw(ro) as c:
        c.start()
        replies = c.go("", (Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE), option=Opt.INFO)
        assert replies[-1].type == Rep.ACK
        assert all(r.type == Rep.INFO for r in replies[:-1])
        infos = {U16.unpack_from(r.data)[0]: r.data for r in replies[:-1]}
        assert Info.EXPORT in infos
        assert len(infos[Info.EXPORT]) == 12
        assert c.size == SIZE and c.tx_flags & TxFlag.HAS_FLAGS
        assert Info.BLOCK_SIZE in infos, "BLOCK_SIZE requested but not sent"
        assert len(infos[Info.BLOCK_SIZE]) == 14
        mn, pref, mx = (U32.unpack_from(infos[Info.BLOCK_SIZE], 2 + 4 * i)[0] for i in range(3))
        if QEMU:
            assert mn <= 512 and mx == MAX_PAYLOAD
        else:
            assert (mn, pref, mx) == (1, 4096, MAX_PAYLOAD)
        for t in (Info.NAME, Info.DESCRIPTION):
            if t in infos:
                infos[t][2:].decode("utf-8")
        # INFO leaves the connection in negotiation: GO now, without requests.
        replies = c.go("")
        assert [r.type for r in replies][-1] == Rep.ACK
        assert any(r.type == Rep.INFO and U16.unpack_from(r.data)[0] == Info.EXPORT
                   for r in replies)
        assert c.read(0, 512) == image.data[:512]


@pytest.mark.parametrize("option", [Opt.INFO, Opt.GO])
def test_info_go_unknown_export(ro, image, option):
    with raw(ro) as c:
        c.start()
        (r,) = c.go("no-such-export", option=option)
        assert_error_reply(r, Rep.ERR_UNKNOWN)
        assert c.go("")[-1].type == Rep.ACK
        assert c.read(0, 512) == image.data[:512]


@pytest.mark.parametrize("option", [Opt.INFO, Opt.GO])
def test_info_go_inconsistent_lengths(ro, image, option):
    bad = [
        b"",  # no name length
        U32.pack(0) + b"\0",  # half the request count
        U32.pack(100) + b"abc" + U16.pack(0),  # name longer than the data
        U32.pack(0) + U16.pack(2) + U16.pack(Info.NAME),  # 2 requests, 1 present
        pack_info_request("", (Info.NAME,)) + b"\0",  # trailing byte
        U32.pack(0xFFFF_FFFF) + U16.pack(0),  # absurd name length
    ]
    with raw(ro) as c:
        c.start()
        for data in bad:
            (r,) = c.option(option, data)
            assert_error_reply(r, Rep.ERR_INVALID)
        assert c.go("")[-1].type == Rep.ACK
        assert c.read(0, 512) == image.data[:512]


def test_list_with_data_invalid(ro):
    with raw(ro) as c:
        c.start()
        (r,) = c.option(Opt.LIST, b"x")
        assert_error_reply(r, Rep.ERR_INVALID)
        assert c.option(Opt.LIST)[-1].type == Rep.ACK


def test_list_lists_exports(image, tmp_path):
    if QEMU:
        srv = support.start_qemu_nbd(tmp_path, image.path, "-r", "-x", "a")
        want = {"a"}
    else:
        for n in "ab":
            shutil.copyfile(image.path, tmp_path / f"{n}.hds")
        srv = support.start_prlnbd(tmp_path, [f"a={tmp_path / 'a.hds'}", f"b={tmp_path / 'b.hds'}"],
                                   "--read-only")
        want = {"a", "b"}
    with support.running(srv), raw(srv) as c:
        c.start()
        replies = c.option(Opt.LIST)
        assert replies[-1].type == Rep.ACK
        assert all(r.type == Rep.SERVER for r in replies[:-1])
        names = [parse_string_reply(r.data)[0] for r in replies[:-1]]
        assert set(names) == want and len(names) == len(want)
        for n in want:  # every listed export is reachable
            assert c.go(n, (Info.BLOCK_SIZE,), option=Opt.INFO)[-1].type == Rep.ACK
            assert c.size == SIZE


def test_structured_reply_with_data_invalid(ro):
    with raw(ro) as c:
        c.start()
        (r,) = c.option(Opt.STRUCTURED_REPLY, b"\0\0\0\0")
        assert_error_reply(r, Rep.ERR_INVALID)
        c.structured_reply()  # still possible afterwards


def test_set_meta_context_before_structured_invalid(ro):
    with raw(ro) as c:
        c.start()
        (r,) = c.meta_context(Opt.SET_META_CONTEXT, "", [BASE])
        assert_error_reply(r, Rep.ERR_INVALID)
        c.structured_reply()
        assert c.set_meta_context("", [BASE]).keys() == {BASE}


def _list_meta(c: Client, queries: list[str]) -> list[str]:
    replies = c.meta_context(Opt.LIST_META_CONTEXT, "", queries)
    assert replies[-1].type == Rep.ACK, replies[-1]
    assert all(r.type == Rep.META_CONTEXT for r in replies[:-1])
    return [r.data[4:].decode() for r in replies[:-1]]


def test_list_meta_context_all(ro):
    with raw(ro) as c:
        c.start()
        c.structured_reply()
        names = _list_meta(c, [])
        assert BASE in names and DEPTH in names
        assert len(names) == len(set(names))


def test_list_meta_context_qemu_namespace(ro):
    with raw(ro) as c:
        c.start()
        c.structured_reply()
        names = _list_meta(c, ["qemu:"])
        assert DEPTH in names
        assert all(n.startswith("qemu:") for n in names), names
        bitmaps = _list_meta(c, ["qemu:dirty-bitmap:"])
        assert all(n.startswith("qemu:dirty-bitmap:") for n in bitmaps), bitmaps
        assert _list_meta(c, [BASE]) == [BASE]


def test_meta_context_unknown_namespace_ignored(ro):
    with raw(ro) as c:
        c.start()
        c.structured_reply()
        assert _list_meta(c, ["x-nosuch:thing"]) == []
        assert c.set_meta_context("", ["x-nosuch:thing", BASE, "base:nosuch"]).keys() == {BASE}


def test_meta_context_unknown_export(ro):
    with raw(ro) as c:
        c.start()
        c.structured_reply()
        for opt in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            r = c.meta_context(opt, "no-such-export", [BASE])[-1]
            assert r.is_error, f"{opt.name} on an unknown export answered {_rep(r.type)}"
            assert r.data


def test_set_meta_context_replaces(ro):
    with raw(ro) as c:
        c.start()
        c.structured_reply()
        c.set_meta_context("", [BASE])
        ctx = c.set_meta_context("", [DEPTH])
        assert ctx.keys() == {DEPTH}
        assert c.go("")[-1].type == Rep.ACK
        res = c.call(Cmd.BLOCK_STATUS, 0, 2 * MiB)
        assert res.error == 0
        assert parse_block_status(res).keys() == {ctx[DEPTH]}


@pytest.mark.parametrize("option", [0x4242, Opt.PEEK_EXPORT, 0x7FFF_FFFF])
def test_unknown_option_unsup(ro, image, option):
    with raw(ro) as c:
        c.start()
        (r,) = c.option(option, b"some data")
        assert_error_reply(r, Rep.ERR_UNSUP)
        assert c.go("")[-1].type == Rep.ACK
        assert c.read(0, 512) == image.data[:512]


def test_starttls_policy(ro):
    with raw(ro) as c:
        c.start()
        (r,) = c.option(Opt.STARTTLS)
        assert_error_reply(r, Rep.ERR_POLICY)
        assert c.go("")[-1].type == Rep.ACK


def test_abort(ro):
    with raw(ro) as c:
        c.start()
        c.send_option(Opt.ABORT)
        try:
            r = c.recv_option_reply()
        except Closed:
            return
        assert (r.option, r.type) == (Opt.ABORT, Rep.ACK)
        assert c.wait_closed() == b""


def _send_in_background(c: Client, data: bytes) -> threading.Thread:
    def send() -> None:
        # The server may hang up before it has read everything.
        with contextlib.suppress(OSError):
            c.sock.sendall(data)

    t = threading.Thread(target=send, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("option", [Opt.INFO, Opt.LIST_META_CONTEXT, 0x4242])
def test_oversized_option(ro, image, option):
    big = MiB
    with raw(ro) as c:
        c.start()
        c.structured_reply()
        t = _send_in_background(c, pack_option(option, b"\xff" * big))
        try:
            r = c.recv_option_reply()
        except (Closed, ConnectionResetError):
            r = None
        if r is not None:
            assert r.is_error, f"{big}-byte option answered {_rep(r.type)}"
            assert r.data
        t.join(10)
    assert_alive(ro, image)


def test_absurd_option_length(ro, image):
    """A 4 GiB option length must not make the server buffer (or wait forever)."""
    with raw(ro) as c:
        c.start()
        c.send_option(Opt.INFO, b"\0" * 64, length=0xFFFF_FFFF)
        try:
            r = c.recv_option_reply()
            assert r.is_error
        except (Closed, ConnectionResetError, TimeoutError):
            pass
    assert_alive(ro, image)


@prlnbd_only
def test_handshake_timeout(image, tmp_path):
    env = {**os.environ, "PRLNBD_HANDSHAKE_TIMEOUT": "1.0"}
    srv = start_server(tmp_path, image.path, env=env)
    with support.running(srv):
        idle = raw(srv)
        partial = raw(srv)
        partial.start()
        partial.send(pack_option(Opt.INFO)[:10])  # half an option header, then silence
        ready = raw(srv).connect()  # finished the handshake: idling is allowed now
        try:
            t0 = time.monotonic()
            for c in (idle, partial):
                # The greeting may come first; then the server must hang up.
                c.wait_closed(timeout=6.0)
            assert time.monotonic() - t0 < 6.0
            time.sleep(max(0.0, 1.5 - (time.monotonic() - t0)))
            assert ready.read(0, 4096) == image.data[:4096], "transmission-phase client dropped"
        finally:
            for c in (idle, partial, ready):
                c.close()
        assert srv.proc.poll() is None


# ---------------------------------------------------------------------------
# 2. Transmission
# ---------------------------------------------------------------------------

@pytest.mark.parametrize(("offset", "length"), [(SIZE, 1), (SIZE - 512, 1024), (SIZE + MiB, 512),
                                                (2**63, 512)])
def test_past_end_einval(ro, offset, length):
    with lib(ro, strict=False, contexts=(BASE,)) as h:
        assert nbd_errno(h.pread, length, offset) == errno.EINVAL
        assert nbd_errno(h.cache, length, offset) == errno.EINVAL
        assert nbd_errno(h.block_status, length, offset, lambda *a: 0) == errno.EINVAL
        # TRIM on a read-only export: EPERM may win over the bounds check.
        assert nbd_errno(h.trim, length, offset) in (errno.EINVAL, errno.EPERM)
        assert h.pread(512, 0)


def test_past_end_writable(rw):
    with lib(rw, strict=False) as h:
        read_only = h.is_read_only()
        for fn, args in ((h.pwrite, (b"x" * 1024, SIZE - 512)), (h.zero, (1024, SIZE - 512)),
                         (h.pwrite, (b"x" * 512, SIZE))):
            want = EPERM_RO if read_only else ENOSPC_PAST
            got = nbd_errno(fn, *args)
            assert errno_name(got) == errno_name(want), (fn.__name__, args[-1])
        want = EPERM_RO if read_only else errno.EINVAL
        assert errno_name(nbd_errno(h.trim, 1024, SIZE - 512)) == errno_name(want)
        assert nbd_errno(h.pread, 1024, SIZE - 512) == errno.EINVAL


def test_read_only_eperm(ro, image):
    with lib(ro, strict=False) as h:
        assert h.is_read_only()
        assert nbd_errno(h.pwrite, b"\x01" * 65536, 0) == EPERM_RO
        assert nbd_errno(h.trim, 65536, 0) == EPERM_RO
        assert nbd_errno(h.zero, 65536, 0) == EPERM_RO
        assert h.pread(65536, 0) == image.data[:65536]


@pytest.mark.parametrize("structured", [True, False])
def test_read_only_write_payload_consumed(ro, image, structured):
    with raw(ro) as c:
        c.connect(structured=structured)
        payload = bytes(range(256)) * 256  # looks like requests to nobody
        res = c.call(Cmd.WRITE, 0, len(payload), payload=payload)
        assert res.error == EPERM_RO
        assert c.call(Cmd.WRITE_ZEROES, 0, 4096).error == EPERM_RO
        assert c.call(Cmd.TRIM, 0, 4096).error == EPERM_RO
        assert c.read(0, 8192) == image.data[:8192]


@pytest.mark.parametrize("structured", [True, False])
def test_read_too_long(ro, image, structured):
    with raw(ro) as c:
        c.connect(structured=structured)
        for length in (MAX_PAYLOAD + 1, 0xFFFF_FFFF):
            res = c.call(Cmd.READ, 0, length)
            assert_errno(res, errno.EINVAL)
            assert res.structured == structured, "READ must use structured replies iff negotiated"
        assert c.read(0, MAX_PAYLOAD) == image.data[:MAX_PAYLOAD]


def test_huge_write_payload(ro, image):
    """A WRITE above the maximum: error with the payload discarded, or a hang-up."""
    with raw(ro) as c:
        c.connect()
        n = MAX_PAYLOAD + MiB
        cookie, data = c.pack(Cmd.WRITE, 0, n, payload=bytes(n))
        t = _send_in_background(c, data)
        try:
            res = c.collect([cookie])[cookie]
        except (Closed, ConnectionResetError):
            res = None
        t.join(20)
        if res is not None:
            assert res.error in (errno.EINVAL, errno.EPERM), errno_name(res.error)
            # Either the payload was discarded and the stream is in sync, or it hung up.
            with contextlib.suppress(Closed, BrokenPipeError, ConnectionResetError):
                assert c.read(0, 4096) == image.data[:4096]
    assert_alive(ro, image)


@pytest.mark.parametrize("cmd", [8, 0x42, 0xFFFF])
@pytest.mark.parametrize("structured", [True, False])
def test_unknown_command(ro, image, cmd, structured):
    with raw(ro) as c:
        c.connect(structured=structured)
        assert_errno(c.call(cmd, 0, 512), errno.EINVAL)
        assert c.read(0, 512) == image.data[:512]


@pytest.mark.parametrize(("cmd", "flags"), [
    (Cmd.READ, CmdFlag.REQ_ONE), (Cmd.READ, CmdFlag.NO_HOLE), (Cmd.READ, CmdFlag.FAST_ZERO),
    (Cmd.READ, 1 << 15), (Cmd.BLOCK_STATUS, CmdFlag.DF), (Cmd.FLUSH, CmdFlag.REQ_ONE),
    (Cmd.CACHE, CmdFlag.DF), (Cmd.BLOCK_STATUS, 1 << 9),
])
def test_invalid_flag(ro, image, cmd, flags):
    with raw(ro) as c:
        c.connect(contexts=[BASE])
        offset, length = (0, 0) if cmd == Cmd.FLUSH else (0, 4096)
        assert_errno(c.call(cmd, offset, length, flags), errno.EINVAL)
        assert c.read(0, 512) == image.data[:512]


def test_df_without_structured_einval(ro, image):
    with raw(ro) as c:
        c.connect(structured=False)
        assert not c.tx_flags & TxFlag.SEND_DF
        res = c.call(Cmd.READ, 0, 4096, CmdFlag.DF)
        assert res.error == errno.EINVAL and not res.replies[0].payload
        assert c.read(0, 512) == image.data[:512]


@pytest.mark.parametrize("structured", [True, False])
def test_block_status_without_context(ro, image, structured):
    with raw(ro) as c:
        c.connect(structured=structured)
        assert_errno(c.call(Cmd.BLOCK_STATUS, 0, 4096), errno.EINVAL)
        assert c.read(0, 512) == image.data[:512]


@pytest.mark.parametrize("magic", [0, 0x25609514, 0x67446698])
def test_bad_request_magic_disconnects(ro, image, magic):
    with raw(ro) as c:
        c.connect()
        c.send(pack_request(Cmd.READ, 0, 512, cookie=1, magic=magic))
        # qemu-nbd sends an error chunk first; what matters is the hang-up.
        c.wait_closed()
    assert_alive(ro, image)


@pytest.mark.skipif(QEMU, reason="qemu-nbd drops in-flight replies on DISC")
def test_disc_finishes_inflight(ro, image):
    with raw(ro) as c:
        c.connect()
        reqs = [(i * 3 * MiB % SIZE, 2 * MiB) for i in range(10)]
        cookies = [c.request(Cmd.READ, off, n) for off, n in reqs]
        c.disc()
        results = c.collect(cookies)
        for cookie, (off, n) in zip(cookies, reqs, strict=True):
            assert assemble_read(results[cookie], off, n) == image.data[off : off + n]
        assert c.wait_closed() == b""


def test_flush_and_cache(ro):
    with raw(ro) as c:
        c.connect()
        assert c.tx_flags & TxFlag.SEND_FLUSH and c.tx_flags & TxFlag.SEND_CACHE
        assert c.call(Cmd.FLUSH).error == 0
        if QEMU:
            return  # qemu-nbd fails CACHE on parallels images with EPERM
        assert c.call(Cmd.CACHE, 0, 4 * MiB).error == 0
        assert c.call(Cmd.CACHE, SIZE - 512, 512).error == 0


def test_block_status_final_extent_runs_on(ro):
    """Without REQ_ONE the final extent runs on as far as its status does (the spec allows it).

    A client walking the disk then needs fewer requests. With REQ_ONE the one
    extent stays inside the request, as the spec demands.
    """
    hole = STATE_HOLE | STATE_ZERO
    with raw(ro) as c:
        c.connect(contexts=[BASE, DEPTH])
        base, depth = c.contexts[BASE], c.contexts[DEPTH]
        # [1 MiB, 4 MiB) is a hole.
        status = parse_block_status(c.call(Cmd.BLOCK_STATUS, 2 * MiB, 512, 0))
        assert status[base] == [(2 * MiB, hole)]
        assert status[depth] == [(2 * MiB, 0)]
        status = parse_block_status(c.call(Cmd.BLOCK_STATUS, 2 * MiB, 512, CmdFlag.REQ_ONE))
        assert status[base] == [(512, hole)] and status[depth] == [(512, 0)]
        status = parse_block_status(c.call(Cmd.BLOCK_STATUS, 0, MiB + 4096, 0))
        assert status[base] == [(MiB, 0), (3 * MiB, hole)]
        # The last extent of the disk ends at the disk's end.
        status = parse_block_status(c.call(Cmd.BLOCK_STATUS, 20 * MiB, 4096, 0))
        assert status[base] == [(43 * MiB, hole)]


def _overlaps_allocated(a: int, b: int) -> bool:
    return any(x < b and a < y for x, y in ALLOCATED)


def _inside_allocated(a: int, b: int) -> bool:
    return any(x <= a and b <= y for x, y in ALLOCATED)


@pytest.mark.parametrize(("offset", "length"), [
    (MiB // 2, 2 * MiB), (0, SIZE), (4 * MiB + 1000, 4096), (SIZE - 4097, 4097), (2 * MiB, 512),
    (3 * MiB + 5, 7 * MiB),
])
def test_block_status(ro, image, offset, length):
    with raw(ro) as c:
        c.connect(contexts=[BASE, DEPTH])
        ids = c.contexts
        assert len(set(ids.values())) == 2, "context ids must be unique"
        for flags in (0, CmdFlag.REQ_ONE):
            res = c.call(Cmd.BLOCK_STATUS, offset, length, flags)
            assert res.error == 0, errno_name(res.error)
            status = parse_block_status(res)
            assert status.keys() == set(ids.values())
            for name, cid in ids.items():
                extents = status[cid]
                assert extents and all(n > 0 for n, _ in extents), extents
                # Only the final extent may run past the request, and never with REQ_ONE.
                assert sum(n for n, _ in extents[:-1]) < length
                assert offset + sum(n for n, _ in extents) <= SIZE
                if flags:
                    assert sum(n for n, _ in extents) <= length
                    assert len(extents) == 1, f"REQ_ONE gave {len(extents)} extents for {name}"
                assert_true_extents(image, name, offset, extents)


def assert_true_extents(image: Image, name: str, offset: int, extents: list[tuple[int, int]]) -> None:
    """Every extent from OFFSET tells the truth about the test image, for context NAME."""
    pos = offset
    for n, state in extents:
        a, b = pos, pos + n
        if name == BASE:
            if state & STATE_HOLE:
                assert not _overlaps_allocated(a, b), (a, b, state)
            else:
                assert _inside_allocated(a, b), (a, b, state)
            if state & STATE_ZERO:
                assert image.data.count(0, a, b) == n, (a, b, state)
        else:
            want = 1 if _inside_allocated(a, b) else 0
            if not want:
                assert not _overlaps_allocated(a, b), (a, b, state)
            assert state == want, (a, b, state)
        pos = b


@pytest.mark.parametrize(("offset", "length"), [
    (MiB - 4096, 8192),  # data then hole
    (3 * MiB, 2 * MiB),  # hole then data
    (2 * MiB, 64 * 1024),  # hole only
    (10 * MiB - 1000, 5000),  # unaligned data
    (0, 65536),
])
def test_df_read_single_chunk(ro, image, offset, length):
    with raw(ro) as c:
        c.connect()
        assert c.tx_flags & TxFlag.SEND_DF
        res = c.call(Cmd.READ, offset, length, CmdFlag.DF)
        assert res.error == 0
        data = assemble_read(res, offset, length, df=True)
        assert data == image.data[offset : offset + length]


def test_df_large_read(ro, image):
    """Up to the maximum, DF gets one content chunk, or EOVERFLOW and no content."""
    with raw(ro) as c:
        c.connect()
        for off, n in ((0, 8 * MiB), (0, MAX_PAYLOAD)):
            res = c.call(Cmd.READ, off, n, CmdFlag.DF)
            if res.error:
                assert res.error == errno.EOVERFLOW
                assert all(r.type & 0x8000 or r.type == 0 for r in res.replies)
            else:
                assert assemble_read(res, off, n, df=True) == image.data[off : off + n]


@pytest.mark.parametrize(("offset", "length"), [
    (MiB - 4096, 8192), (3 * MiB - 7, 2 * MiB + 11), (2 * MiB, 64 * 1024),
    (10 * MiB - 1000, 5000), (0, MAX_PAYLOAD), (SIZE - 3 * MiB, 3 * MiB), (123, 1),
])
def test_structured_read_layout(ro, image, offset, length):
    with raw(ro) as c:
        c.connect()
        res = c.call(Cmd.READ, offset, length)
        assert res.error == 0
        assert assemble_read(res, offset, length) == image.data[offset : offset + length]
        if all(b <= offset or offset + length <= a for a, b in ALLOCATED):
            assert any(r.type == 2 for r in res.replies), "an unallocated range sent no hole"


def test_simple_read_replies(ro, image):
    with raw(ro) as c:
        c.connect(structured=False)
        reqs = [(0, 4096), (MiB - 100, 200), (2 * MiB, 65536), (10 * MiB - 1000, 5000),
                (SIZE - 1, 1), (4 * MiB, MiB)]
        cookies = [c.request(Cmd.READ, o, n) for o, n in reqs]
        results = c.collect(cookies)
        for cookie, (o, n) in zip(cookies, reqs, strict=True):
            (r,) = results[cookie].replies
            assert not r.structured and r.error == 0
            assert r.payload == image.data[o : o + n]


def test_zero_length_requests(ro):
    """Zero-length READ/CACHE/BLOCK_STATUS: any answer, but the stream stays in sync."""
    with raw(ro) as c:
        c.connect(contexts=[BASE])
        for cmd in (Cmd.READ, Cmd.CACHE, Cmd.BLOCK_STATUS):
            c.call(cmd, 0, 0)
        assert c.read(0, 512)


# ---------------------------------------------------------------------------
# 3. Concurrency
# ---------------------------------------------------------------------------

def _interesting_ranges(rng: random.Random, count: int) -> list[tuple[int, int]]:
    points = [0, MiB, 4 * MiB, 4 * MiB + 65536, 10 * MiB - 512, 63 * MiB, SIZE - 4096]
    out = []
    for _ in range(count):
        n = rng.choice([1, 512, 4096, 65536, 300_000, MiB, 3 * MiB])
        off = max(0, min(SIZE - n, rng.choice(points) + rng.randint(-n, n)))
        n = max(ALIGN, n - n % ALIGN)
        off -= off % ALIGN
        out.append((off, n))
    return out


def test_50_in_flight(ro, image):
    rng = random.Random(50)
    with lib(ro) as h:
        pending = []
        for off, n in _interesting_ranges(rng, 50):
            buf = nbd.Buffer(n)
            pending.append((h.aio_pread(buf, off), buf, off, n))
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for cookie, buf, off, n in pending:
            assert h.aio_command_completed(cookie)
            assert bytes(buf.to_bytearray()) == image.data[off : off + n], (off, n)


def test_raw_pipelined_out_of_order_ok(ro, image):
    """Many raw requests of mixed kinds in flight; every cookie answered exactly once."""
    with raw(ro) as c:
        c.connect(contexts=[BASE])
        reqs = _interesting_ranges(random.Random(7), 64)
        cookies = {}
        for i, (off, n) in enumerate(reqs):
            cmd = Cmd.BLOCK_STATUS if i % 5 == 4 else Cmd.READ
            cookies[c.request(cmd, off, n)] = (cmd, off, n)
        results = c.collect(list(cookies))
        for cookie, (cmd, off, n) in cookies.items():
            if cmd == Cmd.READ:
                assert assemble_read(results[cookie], off, n) == image.data[off : off + n]
            else:
                assert parse_block_status(results[cookie])


def test_20_clients(ro, image):
    n_clients = 20
    barrier = threading.Barrier(n_clients)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            with lib(ro) as h:
                barrier.wait(10)
                for off, n in _interesting_ranges(random.Random(seed), 12):
                    assert h.pread(n, off) == image.data[off : off + n], (off, n)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors[:3]


def test_slow_reader_does_not_stall_others(ro, image):
    pid = ro.proc.pid
    before = rss(pid)
    slow = raw(ro, rcvbuf=4096)
    slow.connect()
    try:
        slow.sock.setblocking(False)
        n_reqs = 1000  # 1 GiB of replies that are never read
        reqs = b"".join(pack_request(Cmd.READ, 0, MiB, cookie=i) for i in range(n_reqs))
        sent, deadline = 0, time.monotonic() + 3.0
        while sent < len(reqs) and time.monotonic() < deadline:
            select.select([], [slow.sock], [], 0.1)
            with contextlib.suppress(BlockingIOError):
                sent += slow.sock.send(reqs[sent:])
        peak = before
        with lib(ro) as h:
            for i, (off, n) in enumerate(_interesting_ranges(random.Random(3), 15)):
                t0 = time.monotonic()
                assert h.pread(n, off) == image.data[off : off + n]
                assert time.monotonic() - t0 < 2.0, f"read {i} took {time.monotonic() - t0:.1f}s"
                peak = max(peak, rss(pid))
                time.sleep(0.05)
        peak = max(peak, rss(pid))
        assert peak - before < 256 * MiB, (
            f"server RSS grew by {(peak - before) // MiB} MiB for a client that does not read")
    finally:
        slow.close()
    assert_alive(ro, image)


KILLED_CLIENT = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
from tests.nbdraw import Client, Cmd
c = Client.unix(sys.argv[2]).connect()
for i in range(40):
    c.request(Cmd.READ, 0, 4 << 20)
c.recv_exact(100_000)
print("ready", flush=True)
time.sleep(60)
"""


def test_client_killed_mid_request(ro, image):
    stop = threading.Event()
    errors: list[BaseException] = []
    reads = [0]

    def steady() -> None:
        try:
            with lib(ro) as h:
                while not stop.is_set():
                    assert h.pread(65536, MiB - 32768) == image.data[MiB - 32768 : MiB + 32768]
                    reads[0] += 1
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=steady)
    t.start()
    try:
        for _ in range(3):
            # In-process: hang up with requests and replies in flight.
            c = raw(ro).connect()
            for _ in range(40):
                c.request(Cmd.READ, 0, 4 * MiB)
            c.recv_exact(100_000)
            c.close()
            # Another process killed with SIGKILL mid-transfer.
            p = subprocess.Popen([support.PYTHON, "-c", KILLED_CLIENT, str(support.ROOT),
                                  str(ro.sock)], stdout=subprocess.PIPE)
            assert p.stdout is not None
            assert p.stdout.readline().strip() == b"ready"
            p.kill()
            p.wait()
        time.sleep(0.2)
    finally:
        stop.set()
        t.join(10)
    assert not errors, errors
    assert reads[0] > 0
    assert_alive(ro, image)


_offsets = st.sampled_from([0, 1, 4096, SIZE - 1, SIZE, SIZE + 1, 2**63, 2**64 - 1]) | st.integers(
    0, 2**64 - 1)
_lengths = st.sampled_from([0, 1, 512, 65536, MAX_PAYLOAD + 1, 2**32 - 1]) | st.integers(
    0, 2**32 - 1)
_header = st.builds(
    lambda flags, cmd, cookie, off, n: pack_request(cmd, off, n, cookie, flags),
    st.sampled_from([0, 1, 4, 8, 0x8000]) | st.integers(0, 0xFFFF),
    st.sampled_from(list(Cmd)) | st.integers(0, 0xFFFF),
    st.integers(0, 2**64 - 1), _offsets, _lengths,
)
_garbage = st.binary(min_size=1, max_size=64)
_stream = st.lists(_header | _garbage | _header.map(lambda h: h[:-3]), min_size=1, max_size=8)


@settings(max_examples=200, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(structured=st.booleans(), parts=_stream)
def test_hostile_bytes(ro, image, structured, parts):
    with raw(ro) as c:
        c.connect(structured=structured)
        try:
            c.send(b"".join(parts))
            c.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may already have hung up
        # Whatever it made of that, once the client is gone the server hangs up too.
        c.wait_closed(timeout=10.0)
    assert_alive(ro, image)


# ---------------------------------------------------------------------------
# 4. Lifecycle
# ---------------------------------------------------------------------------

STOP_RE = re.compile(r"(?i)\b(stop|stopped|stopping|shut ?down|shutting down|exit)")


def test_sigterm_with_inflight_requests(image, tmp_path):
    # A server that only ever saw the start-up probe: how many lines does it log?
    idle = start_server(tmp_path / "idle", image.path)
    assert idle.stop() == 0
    idle_lines = len(idle.log_text().splitlines())

    srv = start_server(tmp_path, image.path)
    answered = 0
    try:
        # Connect at once, as a real client would (no settling delay after start-up).
        c = raw(srv).connect()
        cookies = [c.request(Cmd.READ, 0, 4 * MiB) for _ in range(20)]
        first = c.collect([cookies[0]])[cookies[0]]
        assert assemble_read(first, 0, 4 * MiB) == image.data[: 4 * MiB]
        answered = 1
        srv.proc.send_signal(signal.SIGTERM)
        # Everything that still comes must be whole replies: data or ESHUTDOWN.
        for cookie in cookies[1:]:
            try:
                res = c.collect([cookie])[cookie]
            except Closed as e:
                # (qemu-nbd does cut the stream: it does not drain on SIGTERM.)
                assert QEMU or (e.got == 0 and not c.incomplete()), (
                    f"reply stream cut mid-message after SIGTERM ({e}; {answered} of 20 "
                    f"replies complete)")
                break
            if res.error:
                assert res.error == errno.ESHUTDOWN, errno_name(res.error)
            else:
                assert assemble_read(res, 0, 4 * MiB) == image.data[: 4 * MiB]
            answered += 1
        c.close()
        rc = srv.proc.wait(15)
    finally:
        rc2 = srv.stop(signal.SIGKILL)
    log = srv.log_text()
    assert rc == 0 == rc2, f"exit status {rc}:\n{log[-3000:]}"
    assert "Traceback" not in log, log[-3000:]
    if not QEMU:
        assert STOP_RE.search(log), log
        # One more connection than the idle server: one more log line.
        assert len(log.splitlines()) == idle_lines + 1, (
            f"the interrupted connection was not logged ({answered} of 20 replies):\n{log}")


@prlnbd_only
def test_the_event_loop_asked_for_is_used(image, tmp_path):
    """PRLNBD_LOOP=asyncio (as tests/run.sh's second pass sets it) really runs plain asyncio."""
    want = "asyncio" if os.environ.get("PRLNBD_LOOP") == "asyncio" else "uvloop"
    srv = start_server(tmp_path, image.path)
    with support.running(srv):
        # The server may log its first line just after it starts listening.
        log = srv.wait_for_log(" loop, aio ")
        assert f"({want} loop, aio " in log, log


@prlnbd_only
def test_one_log_line_per_connection(image, tmp_path):
    srv = start_server(tmp_path, image.path)
    with support.running(srv):
        # The connection start_server() probed the socket with logs its line first.
        before = srv.wait_for_log("export None").splitlines()
        n = 4
        with raw(srv) as c:  # GO + READ + DISC
            c.connect()
            c.read(0, 512)
            c.disc()
            c.wait_closed()
        with raw(srv) as c:  # EXPORT_NAME then hang-up
            c.start()
            c.export_name("")
        with raw(srv) as c:  # ABORT
            c.start()
            c.send_option(Opt.ABORT)
            c.wait_closed()
        with raw(srv) as c:  # refused: unknown export
            c.start()
            c.send_option(Opt.EXPORT_NAME, b"nope")
            c.wait_closed()
        # A stop writes every connection's closing line before the server exits.
        assert srv.stop() == 0
        new = [ln for ln in srv.log_text().splitlines()[len(before):] if ln.strip() and "connection " in ln]
    assert len(new) == n, "expected one log line per connection, got:\n" + "\n".join(new)
    assert "Traceback" not in "\n".join(new)


@prlnbd_only
def test_connection_summary_counts_every_request(image, tmp_path):
    """The summary line counts every request, block status steps and large reads too."""
    srv = start_server(tmp_path, image.path)
    with support.running(srv):
        before = len(srv.wait_for_log("export None").splitlines())  # start_server()'s probe
        with raw(srv) as c:
            c.connect(contexts=["base:allocation"])
            for i in range(5):  # one at a time, as a walking client sends them
                c.call(Cmd.BLOCK_STATUS, i * MiB, MiB)
            c.read(0, 128 * 1024)
            c.read(0, 512)
            c.disc()
            c.wait_closed()
        assert srv.stop() == 0
        new = [ln for ln in srv.log_text().splitlines()[before:] if "connection " in ln]
    assert len(new) == 1, new
    assert re.search(r"connection unix socket export '.*': 7 requests, 131584 bytes read"
                     r"( \(131072 by sendfile\))?, .*client disconnected", new[0]), new
