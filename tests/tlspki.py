"""Test certificates made with GnuTLS's certtool: CAs, server and client certificates, in QEMU's layout.

A server directory holds ca-cert.pem, server-cert.pem and server-key.pem (what
`prlnbd serve --tls-certificates`, qemu-nbd and nbdkit read); a client
directory holds ca-cert.pem, client-cert.pem and client-key.pem (what libnbd's
tls-certificates= and QEMU's tls-creds-x509 endpoint=client read).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Cert:
    """A certificate and its key."""

    cert: Path
    key: Path
    subject: str  # RFC 4514, most specific first


def _certtool(*args: str | Path) -> None:
    res = subprocess.run(["certtool", *map(str, args)], capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise AssertionError(f"certtool {args} failed:\n{res.stdout}\n{res.stderr}")


class Pki:
    """Makes keys and certificates under DIRECTORY."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self._n = 0

    def _key(self, name: str) -> Path:
        key = self.dir / f"{name}-key.pem"
        # ECDSA: quick to make; GnuTLS and OpenSSL clients and servers all take it.
        _certtool("--generate-privkey", "--key-type=ecdsa", "--outfile", key)
        return key

    def _template(self, name: str, lines: list[str]) -> Path:
        path = self.dir / f"{name}.info"
        path.write_text("\n".join(lines) + "\n")
        return path

    @staticmethod
    def _dates(expired: bool) -> list[str]:
        if expired:
            return ['activation_date = "2020-01-01 00:00:00 UTC"', 'expiration_date = "2021-01-01 00:00:00 UTC"']
        return ["expiration_days = 3650"]

    def ca(self, name: str) -> Cert:
        """A self-signed CA."""
        key = self._key(name)
        tpl = self._template(name, [f'cn = "{name}"', "ca", "cert_signing_key", "crl_signing_key", *self._dates(False)])
        cert = self.dir / f"{name}-cert.pem"
        _certtool("--generate-self-signed", "--load-privkey", key, "--template", tpl, "--outfile", cert)
        return Cert(cert, key, f"CN={name}")

    def issue(
        self, ca: Cert, name: str, *, server: bool, cn: str, org: str = "Example", expired: bool = False
    ) -> Cert:
        """A certificate for a server (localhost, 127.0.0.1) or a client, signed by CA."""
        key = self._key(name)
        lines = [f'cn = "{cn}"', f'organization = "{org}"', "signing_key", *self._dates(expired)]
        if server:
            lines += ['dns_name = "localhost"', 'ip_address = "127.0.0.1"', "tls_www_server", "encryption_key"]
        else:
            lines += ["tls_www_client"]
        tpl = self._template(name, lines)
        cert = self.dir / f"{name}-cert.pem"
        _certtool(
            "--generate-certificate", "--load-privkey", key, "--load-ca-certificate", ca.cert,
            "--load-ca-privkey", ca.key, "--template", tpl, "--outfile", cert,
        )
        return Cert(cert, key, f"CN={cn},O={org}")

    def server_dir(self, name: str, ca: Cert, server: Cert) -> Path:
        """A --tls-certificates directory: CA, server certificate and key."""
        d = self.dir / name
        d.mkdir()
        shutil.copyfile(ca.cert, d / "ca-cert.pem")
        shutil.copyfile(server.cert, d / "server-cert.pem")
        shutil.copyfile(server.key, d / "server-key.pem")
        return d

    def client_dir(self, name: str, ca: Cert, client: Cert | None) -> Path:
        """A client's directory (libnbd tls-certificates=, QEMU tls-creds-x509 dir=)."""
        d = self.dir / name
        d.mkdir()
        shutil.copyfile(ca.cert, d / "ca-cert.pem")
        if client is not None:
            shutil.copyfile(client.cert, d / "client-cert.pem")
            shutil.copyfile(client.key, d / "client-key.pem")
        return d


@dataclass
class TlsPki:
    """Everything the TLS tests use."""

    ca: Cert
    other_ca: Cert
    server: Path  # server directory: the good CA and server certificate
    server_other_ca: Path  # a server whose certificate the other CA signed
    client1: Path  # CN=client1,O=Example
    client2: Path  # CN=client2,O=Example
    client_expired: Path
    client_other_ca: Path  # a client certificate from the other CA
    anonymous: Path  # the CA certificate only: no client certificate
    wrong_ca: Path  # trusts only the other CA
    pki: Pki
    subjects: dict[str, str]


def make_test_pki(directory: Path) -> TlsPki:
    """Build the test CAs, certificates and directories under DIRECTORY."""
    pki = Pki(directory)
    ca = pki.ca("prlnbd-test-ca")
    other = pki.ca("other-ca")
    server = pki.issue(ca, "server", server=True, cn="localhost")
    server_other = pki.issue(other, "server-other", server=True, cn="localhost")
    c1 = pki.issue(ca, "client1", server=False, cn="client1")
    c2 = pki.issue(ca, "client2", server=False, cn="client2")
    expired = pki.issue(ca, "client-expired", server=False, cn="expired", expired=True)
    c_other = pki.issue(other, "client-other", server=False, cn="client1")
    return TlsPki(
        ca=ca,
        other_ca=other,
        server=pki.server_dir("srv", ca, server),
        server_other_ca=pki.server_dir("srv-other", other, server_other),
        client1=pki.client_dir("cli1", ca, c1),
        client2=pki.client_dir("cli2", ca, c2),
        client_expired=pki.client_dir("cli-expired", ca, expired),
        client_other_ca=pki.client_dir("cli-other", ca, c_other),
        anonymous=pki.client_dir("cli-anon", ca, None),
        wrong_ca=pki.client_dir("cli-wrong-ca", other, c1),
        pki=pki,
        subjects={"client1": c1.subject, "client2": c2.subject},
    )
