"""prlnbd.tls on its own: the authorization file, credential checks, and a TLS session in memory."""

from __future__ import annotations

import shutil
import ssl
from pathlib import Path

import pytest

from prlnbd.nbd.connection import TlsMode
from prlnbd.tls import Authz, TlsError, TlsSession, TlsSettings, load_credentials
from tests import support
from tests.tlspki import TlsPki, make_test_pki

needs_certtool = pytest.mark.skipif(not support.have("certtool"), reason="certtool (gnutls-bin) is needed")


def test_authz_file(tmp_path: Path) -> None:
    f = tmp_path / "authz"
    f.write_text("# comment\n\n[vm1]\nCN=backup, O=Example\ncn=hv1,O=Example\n[*]\nCN=admin\n[vm2]\n")
    a = Authz.load(f)
    assert a.allowed("CN=backup,O=Example") == {"vm1"}
    assert a.allowed("CN=hv1,O=Example") == {"vm1"}  # attribute names in any case
    assert a.allowed("CN=admin") is None  # every export
    assert a.allowed("CN=stranger") == frozenset()
    assert a.allowed(None) == frozenset()
    warnings = a.check(["vm1", "vm3"])
    assert any("[vm2]" in w for w in warnings)


def test_authz_escaped_comma(tmp_path: Path) -> None:
    f = tmp_path / "authz"
    f.write_text("[d]\nCN=Smith\\, John,O=Example\n")
    assert Authz.load(f).allowed("CN=Smith\\, John,O=Example") == {"d"}
    assert Authz.load(f).allowed("CN=Smith,O=Example") == frozenset()


@pytest.mark.parametrize(("text", "words"), [("CN=x\n", "before any"), ("[d]\nnot a dn\n", "distinguished name")])
def test_authz_errors_name_file_and_line(tmp_path: Path, text: str, words: str) -> None:
    f = tmp_path / "authz"
    f.write_text(text)
    with pytest.raises(TlsError, match=words) as e:
        Authz.load(f)
    assert f"{f}:" in str(e.value)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TlsPki:
    if not support.have("certtool"):
        pytest.skip("certtool (gnutls-bin) is needed")
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@needs_certtool
def test_credentials_need_a_directory(pki: TlsPki, tmp_path: Path) -> None:
    with pytest.raises(TlsError, match="--tls-certificates"):
        load_credentials(TlsSettings(TlsMode.REQUIRE, None))
    with pytest.raises(TlsError, match="not a directory"):
        load_credentials(TlsSettings(TlsMode.REQUIRE, tmp_path / "nope"))


@needs_certtool
def test_encrypted_key_is_refused(pki: TlsPki, tmp_path: Path) -> None:
    d = tmp_path / "certs"
    shutil.copytree(pki.server, d)
    key = (d / "server-key.pem").read_text()
    (d / "server-key.pem").write_text(key.replace("PRIVATE KEY", "ENCRYPTED PRIVATE KEY"))
    with pytest.raises(TlsError, match="encrypted"):
        load_credentials(TlsSettings(TlsMode.REQUIRE, d))


def _pair(pki: TlsPki, verify: bool = False) -> tuple[TlsSession, ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    creds = load_credentials(TlsSettings(TlsMode.REQUIRE, pki.server, verify_peer=verify))
    server = TlsSession(creds.context)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(pki.ca.cert))
    if verify:
        ctx.load_cert_chain(pki.client1 / "client-cert.pem", pki.client1 / "client-key.pem")
    cin, cout = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ctx.wrap_bio(cin, cout)
    for _ in range(10):
        try:
            client.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        server.feed(cout.read())
        server.handshake()
        cin.write(server.data_to_send())
        if done and server.established:
            break
    assert server.established
    return server, client, cin, cout


@needs_certtool
def test_session_round_trip_keeps_order_and_bytes(pki: TlsPki) -> None:
    server, client, cin, cout = _pair(pki, verify=True)
    assert server.subject == pki.subjects["client1"]
    big = bytes(range(256)) * 4096  # 1 MiB
    parts = [b"head", memoryview(big), b"x" * 100, bytearray(20000), b"tail"]
    server.encrypt(parts)
    cin.write(server.data_to_send())
    got = bytearray()
    while True:
        try:
            got += client.read(1 << 20)
        except ssl.SSLWantReadError:
            break
    assert bytes(got) == b"".join(bytes(p) for p in parts)
    # And the other way, into a given buffer.
    client.write(b"request" * 5000)
    server.feed(cout.read())
    buf = bytearray(1 << 16)
    n = 0
    while True:
        k = server.read_into(memoryview(buf)[n:])
        if not k:
            break
        n += k
    assert bytes(buf[:n]) == b"request" * 5000
    server.close()
    cin.write(server.data_to_send())
    try:
        end = client.read(10)
    except ssl.SSLZeroReturnError:
        end = b""
    assert end == b""  # close_notify came
