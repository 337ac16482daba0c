"""The control socket (`serve --control`) through `prlnbd ctl` and a raw JSON client."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests import support

M = 1024 * 1024
K = 1024
A = "11111111-2222-3333-4444-555555555555"
B = "66666666-7777-8888-9999-aaaaaaaaaaaa"


def prl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "prlnbd", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def ctl(control: Path, *args: str) -> dict[str, object]:
    res = prl("ctl", control, *args, "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    reply = json.loads(res.stdout)
    assert isinstance(reply, dict) and "return" in reply, reply
    result = reply["return"]
    assert isinstance(result, dict)
    return result


def serve(tmp_path: Path, *extra: str) -> tuple[support.Server, Path, Path]:
    disk = tmp_path / "d.hdd"
    if not disk.exists():
        assert prl("create", disk, "--size", "8M").returncode == 0
    control = tmp_path / "control.sock"
    srv = support.start_prlnbd(tmp_path, [f"d={disk}"], "--control", str(control), *extra)
    return srv, disk, control


class Raw:
    """A raw client of the control socket: lines of JSON out, lines of JSON back."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> dict[str, object]:
        line = self.file.readline()
        assert line.endswith(b"\n"), line
        reply = json.loads(line)
        assert isinstance(reply, dict)
        return reply

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def error_of(reply: dict[str, object]) -> tuple[str, str]:
    error = reply["error"]
    assert isinstance(error, dict), reply
    return error["class"], error["message"]


def test_control_socket_is_private_and_answers_query(tmp_path: Path) -> None:
    srv, disk, control = serve(tmp_path)
    with support.running(srv):
        st = os.lstat(control)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        # One NBD connection in transmission, to be listed.
        with _nbd(srv.uri("d")):
            result = ctl(control, "query")
        exports = result["exports"]
        assert isinstance(exports, list) and len(exports) == 1
        e = exports[0]
        assert e["name"] == "d" and e["size"] == 8 * M and e["read-only"] is False
        assert e["disk"] == str(disk / "DiskDescriptor.xml")
        assert len(e["layers"]) == 1 and e["layers"][0]["file"].startswith(str(disk))
        assert e["layers"][0]["guid"].startswith("{")
        assert e["bitmaps"] == []
        conns = result["connections"]
        assert isinstance(conns, list)
        assert [c["export"] for c in conns] == ["d"] and conns[0]["peer"] == "unix socket"
        human = prl("ctl", control, "query")
        assert human.returncode == 0 and "export d: 8 MiB, read-write" in human.stdout
        # A second server refuses to replace the live control socket.
        res = prl("serve", "--read-only", "--socket", tmp_path / "other.sock", "--control", control, f"d={disk}")
        assert res.returncode == 1 and "another server is listening" in res.stderr
        assert stat.S_ISSOCK(os.lstat(control).st_mode)
        assert ctl(control, "query")["exports"]
    # A clean stop removes the socket file.
    assert not control.exists()


class _nbd:
    """An open NBD connection to URI (nbdsh), held while the block runs."""

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def __enter__(self) -> _nbd:
        import nbd

        self.h = nbd.NBD()
        self.h.connect_uri(self.uri)
        self.h.pread(512, 0)
        return self

    def __exit__(self, *exc: object) -> None:
        self.h.shutdown()


def test_raw_client_gets_an_error_reply_for_every_bad_request(tmp_path: Path) -> None:
    srv, _, control = serve(tmp_path)
    with support.running(srv):
        raw = Raw(control)
        raw.send(b"this is not json\n")
        assert error_of(raw.reply())[0] == "ParseError"
        raw.send(b"[1, 2]\n")
        assert error_of(raw.reply())[0] == "InvalidRequest"
        raw.send(b'{"id": 7, "arguments": {}}\n')
        reply = raw.reply()
        assert reply["id"] == 7 and error_of(reply)[0] == "InvalidRequest"
        raw.send(b'{"id": "x", "command": "frobnicate"}\n')
        reply = raw.reply()
        cls, message = error_of(reply)
        assert reply["id"] == "x" and cls == "CommandNotFound" and "frobnicate" in message
        raw.send(b'{"id": 8, "command": "query", "arguments": {"verbose": true}}\n')
        cls, message = error_of(raw.reply())
        assert cls == "InvalidArguments" and "verbose" in message
        raw.send(b'{"id": 9, "command": "bitmap", "arguments": {"export": "d", "action": "add", "granularity": "x"}}\n')
        cls, message = error_of(raw.reply())
        assert cls == "InvalidArguments" and "granularity" in message
        raw.send(b'{"id": 10, "command": "bitmap", "arguments": {"export": "nope", "action": "add"}}\n')
        cls, message = error_of(raw.reply())
        assert cls == "Failed" and "nope" in message
        raw.send(b'{"id": 11, "command": "bitmap", "arguments": {"export": "d", "action": "explode", "name": "a"}}\n')
        assert error_of(raw.reply())[0] == "InvalidArguments"
        # Two requests in one write, answered in order.
        raw.send(b'{"id": 1, "command": "query"}\n{"id": 2, "command": "query", "arguments": {}}\n')
        assert raw.reply()["id"] == 1 and raw.reply()["id"] == 2
        # A line longer than 1 MiB: one error reply, then the connection closes.
        raw.send(b'{"id": 3, "command": "query", "pad": "' + b"x" * (M + 16))
        cls, message = error_of(raw.reply())
        assert cls == "InvalidRequest" and "longer" in message
        assert raw.file.readline() == b""
        raw.close()
        # The server goes on.
        assert ctl(control, "query")["exports"]
        assert srv.proc.poll() is None
        assert "Traceback" not in srv.log_text()


def test_bitmap_added_online_marks_writes_and_is_offered_to_new_connections(tmp_path: Path) -> None:
    srv, disk, control = serve(tmp_path)
    with support.running(srv):
        added = ctl(control, "bitmap", "d", "add", A, "--granularity", "64K")
        assert added == {"name": A, "granularity": 64 * K, "dirty-bytes": 0}
        context = f"qemu:dirty-bitmap:{A}"
        assert support.nbdinfo_map(srv.uri("d"), context) == [(0, 8 * M, 0)]
        support.run("qemu-io", "-f", "raw", "-c", f"write -P 5 {1 * M} {64 * K}", srv.uri("d"))
        want = [(0, M, 0), (M, 64 * K, 1), (M + 64 * K, 7 * M - 64 * K, 0)]
        assert support.nbdinfo_map(srv.uri("d"), context) == want
        bitmaps = ctl(control, "query")["exports"][0]["bitmaps"]  # type: ignore[index]
        assert bitmaps == [{"name": A, "granularity": 64 * K, "dirty-bytes": 64 * K}]
        # A second bitmap, then clear the first and remove the second.
        ctl(control, "bitmap", "d", "add", B)
        assert prl("ctl", control, "bitmap", "d", "add", B).returncode == 1
        ctl(control, "bitmap", "d", "clear", A)
        assert support.nbdinfo_map(srv.uri("d"), context) == [(0, 8 * M, 0)]
        ctl(control, "bitmap", "d", "remove", B)
        res = prl("ctl", control, "bitmap", "d", "remove", B)
        assert res.returncode == 1 and "no dirty bitmap" in res.stderr
        listed = support.run("nbdinfo", "--list", "--content", srv.uri("d"), check=False).stdout
        assert B not in listed
        support.run("qemu-io", "-f", "raw", "-c", f"write -P 6 0 {4 * K}", srv.uri("d"))
    # Stored at the clean stop: the first bitmap with the write made after it was cleared.
    listed = json.loads(prl("bitmap", disk, "list", "--json").stdout)
    assert listed == [{"name": A, "granularity": 64 * K, "dirty-bytes": 64 * K}]


def test_bitmap_changes_are_refused_on_a_read_only_export(tmp_path: Path) -> None:
    srv, _, control = serve(tmp_path, "--read-only")
    with support.running(srv):
        res = prl("ctl", control, "bitmap", "d", "add", A)
        assert res.returncode == 1
        assert res.stderr.strip() == "prlnbd: error: export 'd' is read-only: cannot add a bitmap"
        res = prl("ctl", control, "bitmap", "d", "add", A, "--json")
        assert res.returncode == 1 and json.loads(res.stdout)["error"]["class"] == "Failed"


@pytest.mark.parametrize("what", ["file", "missing-dir"])
def test_control_path_that_cannot_be_a_socket_is_refused(tmp_path: Path, what: str) -> None:
    disk = tmp_path / "d.hdd"
    assert prl("create", disk, "--size", "8M").returncode == 0
    control = tmp_path / ("plain" if what == "file" else "no/such/dir.sock")
    if what == "file":
        control.write_text("keep me")
    res = prl("serve", "--socket", tmp_path / "n.sock", "--control", control, f"d={disk}")
    assert res.returncode == 1 and str(control) in res.stderr
    if what == "file":
        assert control.read_text() == "keep me"


def test_a_connection_that_chose_a_removed_bitmap_gets_einval_for_it_and_goes_on(tmp_path: Path) -> None:
    import nbd

    srv, _, control = serve(tmp_path)
    with support.running(srv):
        ctl(control, "bitmap", "d", "add", A)
        context = f"qemu:dirty-bitmap:{A}"
        h = nbd.NBD()
        h.add_meta_context(context)
        h.connect_uri(srv.uri("d"))
        try:
            assert h.can_meta_context(context)
            seen: list[int] = []
            h.block_status(64 * K, 0, lambda ctx, offset, entries, err: seen.extend(entries) or 0)
            assert seen[1] == 0
            ctl(control, "bitmap", "d", "remove", A)
            with pytest.raises(nbd.Error) as info:
                h.block_status(64 * K, 0, lambda ctx, offset, entries, err: 0)
            assert "Invalid argument" in str(info.value)
            assert h.pread(512, 0) == bytes(512)
        finally:
            h.shutdown()
        assert "Traceback" not in srv.log_text()


def test_control_connections_are_bounded(tmp_path: Path) -> None:
    from prlnbd.control import MAX_CLIENTS

    srv, _, control = serve(tmp_path)
    with support.running(srv):
        held = [Raw(control) for _ in range(MAX_CLIENTS)]
        for raw in held:  # every one of them answered: all are being served
            raw.send(b'{"id": 1, "command": "query"}\n')
            assert "return" in raw.reply()
        extra = Raw(control)
        cls, message = error_of(extra.reply())
        assert cls == "Failed" and f"more than {MAX_CLIENTS}" in message
        assert extra.file.readline() == b""  # and closed
        extra.close()
        held.pop().close()
        # A connection closed makes room: wait for the server to notice, by asking until it answers.
        while True:
            again = Raw(control)
            again.send(b'{"id": 2, "command": "query"}\n')
            reply = again.reply()
            again.close()
            if "return" in reply:
                break
        for raw in held:
            raw.close()
