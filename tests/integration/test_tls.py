"""TLS: `prlnbd serve --tls=on|require` with real clients (nbdinfo, nbdcopy, libnbd, qemu-img, qemu-io),
the NBD rules for STARTTLS over a raw socket, client certificates and authorization, start-up checks of
the certificate files, reload on SIGHUP, and a stalled handshake.

Certificates are made with certtool (tests/tlspki.py). tests/run.sh runs this file on both event loops.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import support
from tests.nbdraw import Client, Closed, Cmd, Opt, Rep, pack_info_request, pack_option
from tests.tlspki import TlsPki, make_test_pki

nbd = pytest.importorskip("nbd")

pytestmark = pytest.mark.skipif(
    not all(support.have(t) for t in ("certtool", "qemu-img", "qemu-io", "nbdinfo", "nbdcopy")),
    reason="certtool (gnutls-bin), qemu-utils and libnbd-bin are needed",
)

MiB = 1 << 20
SIZE = 16 * MiB
WRITES = [(0x5A, 0, MiB), (0xA5, 3 * MiB + 512, 70000), (0x11, SIZE - 4096, 4096)]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TlsPki:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    d = tmp_path_factory.mktemp("tls-img")
    path = support.make_parallels(d / "disk.hds", SIZE, writes=WRITES)
    return path, bytes(support.apply_writes(bytearray(SIZE), WRITES))


def serve(tmp: Path, image: Path, *tls: str, read_only: bool = True, env: dict[str, str] | None = None,
          name: str = "disk") -> support.Server:
    extra = ["--read-only"] if read_only else []
    return support.start_prlnbd(tmp, [f"{name}={image}"], *extra, *tls, env=env)


@pytest.fixture(scope="module")
def required(pki: TlsPki, image: tuple[Path, bytes], tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[support.Server]:
    d = tmp_path_factory.mktemp("tls-require")
    with support.running(serve(d, image[0], "--tls=require", f"--tls-certificates={pki.server}")) as s:
        yield s


def tls_uri(server: support.Server, certs: Path, export: str = "disk") -> str:
    return f"nbds+unix:///{export}?socket={server.sock}&tls-certificates={certs}"


def tls_client_context(certs: Path | None = None, ca: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(ca))
    if certs is not None:
        ctx.load_cert_chain(certs / "client-cert.pem", certs / "client-key.pem")
    return ctx


def raw_starttls(c: Client, ctx: ssl.SSLContext) -> None:
    """STARTTLS, its ACK, then the TLS handshake on the raw client's socket."""
    (r,) = c.option(Opt.STARTTLS)
    assert (r.option, r.type) == (Opt.STARTTLS, Rep.ACK), r
    c.sock = ctx.wrap_socket(c.sock)


def log_after(server: support.Server, text: str) -> str:
    return server.wait_for_log(text)


# ---- real clients


def test_nbdinfo_nbds_unix(required: support.Server, pki: TlsPki) -> None:
    out = support.run("nbdinfo", "--json", tls_uri(required, pki.client1)).stdout
    info = json.loads(out)
    assert info["TLS"] is True
    (exp,) = info["exports"]
    assert exp["export-size"] == SIZE


def test_nbdinfo_map_and_list_over_tls(required: support.Server, pki: TlsPki) -> None:
    out = support.run("nbdinfo", "--list", "--json", tls_uri(required, pki.client1, "")).stdout
    assert [e["export-name"] for e in json.loads(out)["exports"]] == ["disk"]
    extents = support.nbdinfo_map(tls_uri(required, pki.client1))
    assert extents[0] == (0, MiB, 0)


def test_nbdcopy_nbds_unix(required: support.Server, pki: TlsPki, image: tuple[Path, bytes],
                           tmp_path: Path) -> None:
    out = tmp_path / "copy.raw"
    support.run("nbdcopy", tls_uri(required, pki.client1), out)
    assert out.read_bytes() == image[1]


@contextlib.contextmanager
def tcp_server(tmp: Path, image: Path, *tls: str) -> Iterator[tuple[support.Server, int]]:
    """prlnbd on 127.0.0.1 and a free port; yields the server and the port."""
    tmp.mkdir(parents=True, exist_ok=True)
    log = tmp / f"tcp-{time.monotonic_ns()}.log"
    cmd = [support.PYTHON, "-m", "prlnbd", "serve", "--bind", "127.0.0.1", "--port", "0", "--read-only",
           *tls, f"disk={image}"]
    with log.open("wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=support.ROOT)
    server = support.Server(proc, tmp / "none", log)
    with support.running(server):
        text = server.wait_for_log("serving")
        m = re.search(r"\('127\.0\.0\.1', (\d+)\)", text)
        assert m, text
        yield server, int(m.group(1))


def test_nbdcopy_nbds_tcp(pki: TlsPki, image: tuple[Path, bytes], tmp_path: Path) -> None:
    with tcp_server(tmp_path, image[0], "--tls=require", f"--tls-certificates={pki.server}") as (_, port):
        uri = f"nbds://127.0.0.1:{port}/disk?tls-certificates={pki.client1}"
        out = tmp_path / "copy.raw"
        support.run("nbdcopy", uri, out)
        assert out.read_bytes() == image[1]
        res = support.run("nbdinfo", f"nbd://127.0.0.1:{port}/disk", check=False)
        assert res.returncode != 0


def tls_pread(sock: Path, certs: Path, offset: int, length: int, export: str = "disk") -> bytes:
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(str(certs))
    h.set_export_name(export)
    h.connect_unix(str(sock))
    try:
        data: bytes = h.pread(length, offset)
    finally:
        h.shutdown()
    return data


def test_libnbd_set_tls(required: support.Server, pki: TlsPki, image: tuple[Path, bytes]) -> None:
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(str(pki.client1))
    h.set_export_name("disk")
    h.add_meta_context("base:allocation")
    h.connect_unix(str(required.sock))
    try:
        assert h.get_tls_negotiated()
        assert h.get_size() == SIZE
        assert h.can_meta_context("base:allocation")
        assert h.pread(MiB + 4096, 0) == image[1][: MiB + 4096]
        assert h.pread(70000, 3 * MiB + 512) == image[1][3 * MiB + 512 : 3 * MiB + 512 + 70000]
        seen: list[int] = []
        h.block_status(2 * MiB, 0, lambda ctx, off, entries, err: seen.extend(entries) or 0)
        assert seen[:2] == [MiB, 0]
    finally:
        h.shutdown()


def test_libnbd_tls_allow_against_on(pki: TlsPki, image: tuple[Path, bytes], tmp_path: Path) -> None:
    """--tls=on serves plaintext and TLS clients alike."""
    with support.running(serve(tmp_path, image[0], "--tls=on", f"--tls-certificates={pki.server}")) as srv:
        assert support.nbd_pread(srv.uri("disk"), 0, 4096) == image[1][:4096]
        h = nbd.NBD()
        h.set_tls(nbd.TLS_ALLOW)
        h.set_tls_certificates(str(pki.client1))
        h.set_export_name("disk")
        h.connect_unix(str(srv.sock))
        assert h.get_tls_negotiated()
        assert h.pread(4096, SIZE - 4096) == image[1][-4096:]
        h.shutdown()


def qemu_opts(sock: Path, export: str = "disk") -> str:
    return f"driver=nbd,server.type=unix,server.path={sock},export={export},tls-creds=tls0,tls-hostname=localhost"


def qemu_creds(certs: Path) -> list[str]:
    return ["--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={certs}"]


def test_qemu_img_tls_creds_x509(required: support.Server, pki: TlsPki, image: tuple[Path, bytes],
                                  tmp_path: Path) -> None:
    out = tmp_path / "out.raw"
    support.run("qemu-img", "convert", *qemu_creds(pki.client1), "--image-opts", qemu_opts(required.sock),
                "-O", "raw", out)
    assert out.read_bytes() == image[1]
    info = support.run("qemu-img", "info", "--output=json", *qemu_creds(pki.client1), "--image-opts",
                       qemu_opts(required.sock)).stdout
    assert json.loads(info)["virtual-size"] == SIZE


def test_qemu_io_writes_over_tls(pki: TlsPki, image: tuple[Path, bytes], tmp_path: Path) -> None:
    copy = tmp_path / "rw.hds"
    shutil.copyfile(image[0], copy)
    srv = serve(tmp_path, copy, "--tls=require", f"--tls-certificates={pki.server}", read_only=False)
    with support.running(srv):
        support.run("qemu-io", *qemu_creds(pki.client1), "--image-opts", qemu_opts(srv.sock),
                    "-c", "write -P 0x33 1M 3M", "-c", "write -P 0x44 100 1000", "-c", "flush",
                    "-c", "read -P 0x33 1M 3M", "-c", "read -P 0x44 100 1000")
    assert srv.proc.returncode == 0
    res = support.run("qemu-io", "-f", "parallels", "-r", "-c", "read -P 0x33 1M 3M", copy)
    assert "Pattern verification failed" not in res.stdout
    assert support.run("qemu-img", "check", "-f", "parallels", copy, check=False).returncode == 0


# ---- the NBD rules, on a raw socket


def test_plaintext_client_against_require(required: support.Server, image: tuple[Path, bytes]) -> None:
    res = support.run("nbdinfo", required.uri("disk"), check=False)
    assert res.returncode != 0
    with Client.unix(required.sock) as c:
        c.start()
        for opt, data in [(Opt.LIST, b""), (Opt.INFO, pack_info_request("disk")),
                          (Opt.GO, pack_info_request("disk")), (Opt.STRUCTURED_REPLY, b""), (0x4242, b"")]:
            (r,) = c.option(opt, data)
            assert r.type == Rep.ERR_TLS_REQD, (opt, r)
        c.send_option(Opt.EXPORT_NAME, b"disk")
        assert c.wait_closed() == b""
    with Client.unix(required.sock) as c:
        c.start()
        c.send_option(Opt.ABORT)
        with contextlib.suppress(Closed):
            assert c.recv_option_reply().type == Rep.ACK


def test_starttls_with_data_then_twice(required: support.Server, pki: TlsPki, image: tuple[Path, bytes]) -> None:
    with Client.unix(required.sock) as c:
        c.start()
        (r,) = c.option(Opt.STARTTLS, b"junk")
        assert r.type == Rep.ERR_INVALID
        raw_starttls(c, tls_client_context(ca=pki.ca.cert))
        (r,) = c.option(Opt.STARTTLS)
        assert r.type == Rep.ERR_INVALID
        assert c.go("disk")[-1].type == Rep.ACK
        assert c.read(0, 4096) == image[1][:4096]
        c.disc()
        assert c.sock.recv(1) == b""  # close_notify, then the end


def test_negotiation_before_starttls_is_forgotten(pki: TlsPki, image: tuple[Path, bytes], tmp_path: Path) -> None:
    with support.running(serve(tmp_path, image[0], "--tls=on", f"--tls-certificates={pki.server}")) as srv, \
            Client.unix(srv.sock) as c:
        c.start()
        c.structured_reply()
        c.set_meta_context("disk", ["base:allocation"])
        raw_starttls(c, tls_client_context(ca=pki.ca.cert))
        c.structured = False
        assert c.go("disk")[-1].type == Rep.ACK
        res = c.call(Cmd.READ, 0, 512)
        assert not res.structured, "structured replies from before STARTTLS stayed on"
        assert c.call(Cmd.BLOCK_STATUS, 0, 512).error != 0, "metadata contexts from before STARTTLS stayed"


def test_pipelined_client_hello(required: support.Server, pki: TlsPki, image: tuple[Path, bytes]) -> None:
    """STARTTLS and the ClientHello in one write, then the first option right behind the Finished."""
    ctx = tls_client_context(ca=pki.ca.cert)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    with Client.unix(required.sock) as c:
        c.start()
        c.send(pack_option(Opt.STARTTLS) + hello)
        r = c.recv_option_reply()
        assert (r.option, r.type) == (Opt.STARTTLS, Rep.ACK)
        while True:
            data = c.sock.recv(65536)
            assert data, "server closed during the handshake"
            incoming.write(data)
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                c.send(outgoing.read())
                continue
            break
        # The Finished and two options in one write.
        obj.write(pack_option(Opt.STRUCTURED_REPLY) + pack_option(Opt.GO, pack_info_request("disk")))
        c.send(outgoing.read())
        got = b""
        replies = []
        while not replies or replies[-1][2] != Rep.ACK or replies[-1][1] != Opt.GO:
            while True:
                try:
                    got += obj.read(65536)
                except ssl.SSLWantReadError:
                    break
            while len(got) >= 20:
                magic, opt, rtype, length = struct.unpack(">QIII", got[:20])
                if len(got) < 20 + length:
                    break
                replies.append((magic, opt, rtype))
                got = got[20 + length:]
            if not replies or replies[-1][1:] != (Opt.GO, Rep.ACK):
                data = c.sock.recv(65536)
                assert data, f"server closed after {replies}"
                incoming.write(data)
        assert replies[0][1:] == (Opt.STRUCTURED_REPLY, Rep.ACK)
    assert "Traceback" not in required.log_text()


def test_stalled_tls_handshake_times_out(pki: TlsPki, image: tuple[Path, bytes], tmp_path: Path) -> None:
    env = {**os.environ, "PRLNBD_HANDSHAKE_TIMEOUT": "1.0"}
    srv = serve(tmp_path, image[0], "--tls=require", f"--tls-certificates={pki.server}", env=env)
    with support.running(srv), Client.unix(srv.sock) as c:
        c.start()
        (r,) = c.option(Opt.STARTTLS)
        assert r.type == Rep.ACK
        c.send(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, then silence
        c.wait_closed(timeout=20)
        assert "handshake not finished" in srv.wait_for_log("handshake not finished")
        assert srv.proc.poll() is None


def test_garbage_instead_of_tls_closes(required: support.Server) -> None:
    with Client.unix(required.sock) as c:
        c.start()
        (r,) = c.option(Opt.STARTTLS)
        assert r.type == Rep.ACK
        # No fallback to plaintext: an NBD option where the handshake belongs ends the connection.
        c.send(pack_option(Opt.LIST))
        c.wait_closed()
    assert "TLS handshake failed" in required.wait_for_log("TLS handshake failed")


# ---- certificates


def test_wrong_ca(required: support.Server, pki: TlsPki, image: tuple[Path, bytes], tmp_path: Path) -> None:
    """A client that trusts another CA refuses the server (libnbd 1.14 checks only with a host name: TCP)."""
    res = support.run("qemu-img", "info", *qemu_creds(pki.wrong_ca), "--image-opts", qemu_opts(required.sock),
                      check=False)
    assert res.returncode != 0
    assert "certificate" in res.stderr.lower(), res.stderr
    with tcp_server(tmp_path, image[0], "--tls=require", f"--tls-certificates={pki.server}") as (srv, port):
        res = support.run("nbdinfo", f"nbds://127.0.0.1:{port}/disk?tls-certificates={pki.wrong_ca}", check=False)
        assert res.returncode != 0
        assert "certificate" in res.stderr.lower() or "tls" in res.stderr.lower(), res.stderr
        assert "TLS handshake" in srv.wait_for_log("TLS handshake")
        assert support.run("nbdinfo", f"nbds://127.0.0.1:{port}/disk?tls-certificates={pki.client1}").returncode == 0


@pytest.fixture(scope="module")
def verifying(pki: TlsPki, image: tuple[Path, bytes], tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[support.Server]:
    d = tmp_path_factory.mktemp("tls-verify")
    with support.running(serve(d, image[0], "--tls=require", f"--tls-certificates={pki.server}",
                               "--tls-verify-peer")) as s:
        yield s


def test_verify_peer_accepts_a_signed_client(verifying: support.Server, pki: TlsPki,
                                            image: tuple[Path, bytes]) -> None:
    assert tls_pread(verifying.sock, pki.client1, 0, 4096) == image[1][:4096]
    assert "CN=client1,O=Example" in verifying.wait_for_log("CN=client1")


@pytest.mark.parametrize("client", ["anonymous", "client_expired", "client_other_ca"])
def test_verify_peer_refuses(verifying: support.Server, pki: TlsPki, client: str) -> None:
    res = support.run("nbdinfo", tls_uri(verifying, getattr(pki, client)), check=False)
    assert res.returncode != 0, res.stdout
    log = verifying.wait_for_log("TLS handshake failed")
    assert "TLS handshake failed" in log


def test_authz_per_export(pki: TlsPki, image: tuple[Path, bytes], tmp_path: Path) -> None:
    authz = tmp_path / "authz"
    authz.write_text(f"# who may use what\n[disk]\n{pki.subjects['client1']}\n\n[other]\nCN=nobody\n")
    srv = support.start_prlnbd(
        tmp_path, [f"disk={image[0]}", f"other={image[0]}"], "--read-only", "--tls=require",
        f"--tls-certificates={pki.server}", "--tls-verify-peer", f"--tls-authz={authz}")
    with support.running(srv):
        def names(certs: Path) -> list[str]:
            h = nbd.NBD()
            h.set_tls(nbd.TLS_REQUIRE)
            h.set_tls_certificates(str(certs))
            h.set_opt_mode(True)
            h.connect_unix(str(srv.sock))
            got: list[str] = []
            h.opt_list(lambda name, desc: got.append(name) or 0)
            h.opt_abort()
            return got

        assert names(pki.client1) == ["disk"]
        assert names(pki.client2) == []
        assert tls_pread(srv.sock, pki.client1, 0, 512) == image[1][:512]
        for client, export in [(pki.client2, "disk"), (pki.client1, "other")]:
            res = support.run("nbdinfo", tls_uri(srv, client, export), check=False)
            assert res.returncode != 0
            # libnbd words ERR_UNKNOWN as ENOENT.
            assert "no such file" in res.stderr.lower(), res.stderr
        # A plaintext client sees nothing either.
        with Client.unix(srv.sock) as c:
            c.start()
            (r,) = c.option(Opt.LIST)
            assert r.type == Rep.ERR_TLS_REQD


def test_authz_under_on_makes_exports_tls_only(pki: TlsPki, image: tuple[Path, bytes], tmp_path: Path) -> None:
    authz = tmp_path / "authz"
    authz.write_text(f"[*]\n{pki.subjects['client2']}\n")
    srv = serve(tmp_path, image[0], "--tls=on", f"--tls-certificates={pki.server}", "--tls-verify-peer",
                f"--tls-authz={authz}")
    with support.running(srv):
        with Client.unix(srv.sock) as c:
            c.start()
            (r,) = c.option(Opt.LIST)
            assert r.type == Rep.ACK  # an empty list
            (r,) = c.option(Opt.GO, pack_info_request("disk"))
            assert r.type == Rep.ERR_TLS_REQD
        assert tls_pread(srv.sock, pki.client2, 0, 512) == image[1][:512]
        assert support.run("nbdinfo", tls_uri(srv, pki.client1), check=False).returncode != 0


# ---- start-up checks


def _start_error(tmp: Path, image: Path, *args: str) -> str:
    res = subprocess.run(
        [support.PYTHON, "-m", "prlnbd", "serve", "--socket", str(tmp / "x.sock"), *args, f"disk={image}"],
        capture_output=True, text=True, timeout=60, cwd=support.ROOT)
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    assert not (tmp / "x.sock").exists()
    return res.stderr


def _broken(pki: TlsPki, tmp: Path, how: str) -> Path:
    d = tmp / f"certs-{how}"
    shutil.copytree(pki.server, d)
    if how == "missing-key":
        (d / "server-key.pem").unlink()
    elif how == "missing-cert":
        (d / "server-cert.pem").unlink()
    elif how == "mismatched-key":
        shutil.copyfile(pki.pki.dir / "client2-key.pem", d / "server-key.pem")
    elif how == "expired-cert":
        shutil.copyfile(pki.pki.dir / "client-expired-cert.pem", d / "server-cert.pem")
        shutil.copyfile(pki.pki.dir / "client-expired-key.pem", d / "server-key.pem")
    elif how == "garbage-cert":
        (d / "server-cert.pem").write_text("not a certificate\n")
    elif how == "unreadable-key":
        # Root reads any file whatever its mode: a directory in the key's place cannot be read.
        (d / "server-key.pem").unlink()
        (d / "server-key.pem").mkdir()
    elif how == "missing-ca":
        (d / "ca-cert.pem").unlink()
    return d


@pytest.mark.parametrize(("how", "file", "words"), [
    ("missing-key", "server-key.pem", "no such file"),
    ("missing-cert", "server-cert.pem", "no such file"),
    ("mismatched-key", "server-key.pem", "does not match"),
    ("expired-cert", "server-cert.pem", "expired"),
    ("garbage-cert", "server-cert.pem", "not a PEM"),
    ("unreadable-key", "server-key.pem", "cannot read"),
    ("missing-ca", "ca-cert.pem", "no such file"),
])
def test_bad_certificate_files_fail_at_start(pki: TlsPki, image: tuple[Path, bytes], tmp_path: Path,
                                             how: str, file: str, words: str) -> None:
    d = _broken(pki, tmp_path, how)
    err = _start_error(tmp_path, image[0], "--tls=require", f"--tls-certificates={d}", "--tls-verify-peer")
    assert str(d / file) in err and words in err, err


@pytest.mark.parametrize("args", [
    ["--tls=require"],  # no certificates
    ["--tls-verify-peer"],  # without --tls
    ["--tls=require", "--tls-authz=/nonexistent"],  # authz without verify-peer
    ["--tls=require", "--tls-psk=/tmp/keys.psk", "--tls-certificates=/tmp"],  # one or the other
    ["--tls-psk=/tmp/keys.psk"],  # without --tls
])
def test_contradictory_tls_options(pki: TlsPki, image: tuple[Path, bytes], tmp_path: Path,
                                   args: list[str]) -> None:
    extra = [f"--tls-certificates={pki.server}"] if "--tls-authz=/nonexistent" in args else []
    err = _start_error(tmp_path, image[0], *args, *extra)
    assert "--tls" in err, err


# ---- reload


def _server_cert_subject(sock: Path, ca: Path) -> str:
    ctx = tls_client_context(ca=ca)
    with Client.unix(sock) as c:
        c.start()
        raw_starttls(c, ctx)
        cert = c.sock.getpeercert()
        assert cert is not None
        return ",".join(f"{k}={v}" for rdn in cert["subject"] for k, v in rdn)


def test_sighup_reloads_certificates_without_dropping_clients(pki: TlsPki, image: tuple[Path, bytes],
                                                                tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    shutil.copytree(pki.server, certs)
    srv = serve(tmp_path, image[0], "--tls=require", f"--tls-certificates={certs}")
    with support.running(srv):
        assert "organizationName=Example" in _server_cert_subject(srv.sock, pki.ca.cert)
        h = nbd.NBD()
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(str(pki.client1))
        h.set_export_name("disk")
        h.connect_unix(str(srv.sock))
        assert h.pread(512, 0) == image[1][:512]
        # Rotate: a new server certificate from the same CA.
        new = pki.pki.issue(pki.ca, f"rotated-{os.getpid()}", server=True, cn="localhost", org="Rotated")
        shutil.copyfile(new.cert, certs / "server-cert.pem")
        shutil.copyfile(new.key, certs / "server-key.pem")
        srv.proc.send_signal(signal.SIGHUP)
        assert "TLS credentials reloaded" in srv.wait_for_log("TLS credentials reloaded")
        assert "organizationName=Rotated" in _server_cert_subject(srv.sock, pki.ca.cert)
        assert h.pread(512, 0) == image[1][:512], "the client connected before the reload was dropped"
        # A broken rotation keeps the certificates in use.
        (certs / "server-key.pem").write_text("garbage\n")
        srv.proc.send_signal(signal.SIGHUP)
        assert "TLS reload failed" in srv.wait_for_log("TLS reload failed")
        assert "organizationName=Rotated" in _server_cert_subject(srv.sock, pki.ca.cert)
        assert h.pread(512, SIZE - 512) == image[1][-512:]
        h.shutdown()
    assert srv.proc.returncode == 0


def test_unix_socket_still_speaks_nbd_after_tls_failures(required: support.Server, image: tuple[Path, bytes],
                                                         pki: TlsPki) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(required.sock))
    s.close()
    assert tls_pread(required.sock, pki.client1, 0, 4096) == image[1][:4096]


# ---- TLS-PSK (sslpsk3)


@pytest.fixture(scope="module")
def psk_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not support.have("psktool"):
        pytest.skip("psktool (gnutls-bin) is needed")
    pytest.importorskip("sslpsk3")
    d = tmp_path_factory.mktemp("psk")
    keys = d / "keys.psk"
    for user in ("alice", "bob"):
        support.run("psktool", "-u", user, "-p", keys)
    return keys


def psk_handle(keys: Path, user: str) -> Any:
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_psk_file(str(keys))
    h.set_tls_username(user)
    h.set_export_name("disk")
    return h


def test_psk_with_libnbd_nbdinfo_and_qemu(psk_keys: Path, image: tuple[Path, bytes], tmp_path: Path) -> None:
    srv = serve(tmp_path, image[0], "--tls=require", f"--tls-psk={psk_keys}")
    with support.running(srv):
        h = psk_handle(psk_keys, "alice")
        h.connect_unix(str(srv.sock))
        assert h.get_tls_negotiated()
        assert h.pread(MiB, 0) == image[1][:MiB]
        h.shutdown()
        out = support.run("nbdinfo", "--json",
                          f"nbds+unix://bob@/disk?socket={srv.sock}&tls-psk-file={psk_keys}").stdout
        assert json.loads(out)["exports"][0]["export-size"] == SIZE
        qdir = tmp_path / "qemu-psk"
        qdir.mkdir()
        shutil.copyfile(psk_keys, qdir / "keys.psk")
        info = support.run("qemu-img", "info", "--output=json", "--object",
                           f"tls-creds-psk,id=tls0,endpoint=client,dir={qdir},username=alice",
                           "--image-opts", qemu_opts(srv.sock)).stdout
        assert json.loads(info)["virtual-size"] == SIZE
        log = srv.wait_for_log("psk:bob")
        assert "(TLSv1.3, psk:alice) export 'disk'" in log and "psk:bob" in log, log


def test_psk_wrong_key_or_unknown_user_is_refused(psk_keys: Path, image: tuple[Path, bytes],
                                                  tmp_path: Path) -> None:
    srv = serve(tmp_path, image[0], "--tls=require", f"--tls-psk={psk_keys}")
    wrong = tmp_path / "wrong.psk"
    support.run("psktool", "-u", "alice", "-p", wrong)  # alice, another key
    support.run("psktool", "-u", "carol", "-p", wrong)  # a user the server does not know
    with support.running(srv):
        for user in ("alice", "carol"):
            h = psk_handle(wrong, user)
            with pytest.raises(nbd.Error):
                h.connect_unix(str(srv.sock))
        assert "TLS handshake failed" in srv.wait_for_log("TLS handshake failed")
        h = psk_handle(psk_keys, "bob")
        h.connect_unix(str(srv.sock))
        h.shutdown()


def test_psk_authz(psk_keys: Path, image: tuple[Path, bytes], tmp_path: Path) -> None:
    authz = tmp_path / "authz"
    authz.write_text("[disk]\npsk:alice\n")
    srv = serve(tmp_path, image[0], "--tls=require", f"--tls-psk={psk_keys}", f"--tls-authz={authz}")
    with support.running(srv):
        h = psk_handle(psk_keys, "alice")
        h.connect_unix(str(srv.sock))
        assert h.pread(512, 0) == image[1][:512]
        h.shutdown()
        h = psk_handle(psk_keys, "bob")
        with pytest.raises(nbd.Error, match=r"No such file|unknown"):
            h.connect_unix(str(srv.sock))


def test_bad_psk_file_fails_at_start(image: tuple[Path, bytes], tmp_path: Path) -> None:
    keys = tmp_path / "keys.psk"
    keys.write_text("alice:00112233\nbob-without-a-key\n")
    err = _start_error(tmp_path, image[0], "--tls=require", f"--tls-psk={keys}")
    assert f"{keys}:2" in err, err
    err = _start_error(tmp_path, image[0], "--tls=require", f"--tls-psk={tmp_path / 'missing.psk'}")
    assert "missing.psk: no such file" in err, err
