"""TLS for the NBD server: credentials read from files, who may use which export, one TLS session in memory.

X.509 certificates go through Python's ssl module alone. TLS-PSK (psktool's
key files) needs PSK callbacks, which Python's ssl has only from 3.13: they
come from the optional sslpsk3 package.

Credentials are read and checked when the server starts (each error names its
file) and again on reload (SIGHUP); a connection keeps the context it started
with. The TLS session runs on memory buffers (ssl.SSLObject over two
ssl.MemoryBIO), fed by the server's own protocol: the bytes a client sends
right behind STARTTLS, which the NBD core has already received, go into the
session first, so a client that pipelines its ClientHello loses nothing.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import ssl
from collections.abc import Collection, Container, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from prlnbd.errors import PrlNbdError
from prlnbd.nbd.connection import TlsMode

log = logging.getLogger(__name__)

# The file names QEMU (tls-creds-x509 dir=) and nbdkit (--tls-certificates) use.
CA_CERT = "ca-cert.pem"
CA_CRL = "ca-crl.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
# Encrypted records carry at most 16 KiB: smaller buffers are joined into one record's worth
# before encryption, so a reply header never costs a record (and a MAC) of its own.
RECORD = 16 * 1024
# The section of an authorization file that applies to every export.
ALL_EXPORTS = "*"
# How a TLS-PSK client is named, for authorization and in the log.
PSK_PREFIX = "psk:"


class TlsError(PrlNbdError):
    """TLS credentials or settings are unusable."""


@dataclass(frozen=True)
class TlsSettings:
    """What the command line says about TLS."""

    mode: TlsMode = TlsMode.OFF
    certificates: Path | None = None  # a directory with the files named above
    verify_peer: bool = False  # clients must present a certificate signed by the CA
    authz: Path | None = None  # an authorization file (see Authz)
    psk: Path | None = None  # psktool's username:hexkey lines


# ---- authorization


class Authz:
    """Which client identities may use which export, read from a file.

    The file has one section per export, ``[NAME]`` (``[*]`` for every
    export), each followed by the identities allowed, one a line: a client
    certificate's subject as an RFC 4514 distinguished name, most specific
    part first (``CN=backup,O=Example``, as ``openssl x509 -noout -subject
    -nameopt RFC2253`` and ``certtool -i`` print it and prlnbd logs it).
    With ``--tls-psk``, a client is named ``psk:USERNAME`` instead. Blank
    lines and lines starting with ``#`` are ignored. An export no section
    names is open to no client.
    """

    def __init__(self, rules: Mapping[str, Collection[str]], path: Path | None = None) -> None:
        self.rules = {name: frozenset(_normalize(i) for i in ids) for name, ids in rules.items()}
        self.path = path

    @classmethod
    def load(cls, path: Path) -> Authz:
        """Read an authorization file; a malformed one is an error naming the file and line."""
        text = _read_text(path)
        rules: dict[str, set[str]] = {}
        section: str | None = None
        for lineno, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1].strip()
                rules.setdefault(section, set())
                continue
            if section is None:
                raise TlsError(f"{path}:{lineno}: {line!r} comes before any [EXPORT] section")
            if "=" not in line and not line.startswith(PSK_PREFIX):
                raise TlsError(
                    f"{path}:{lineno}: {line!r} is neither a distinguished name (like CN=client,O=Example)"
                    f" nor {PSK_PREFIX}USERNAME"
                )
            rules[section].add(line)
        return cls(rules, path)

    def allowed(self, identity: str | None) -> frozenset[str] | None:
        """The exports IDENTITY may use, or None when every export is allowed to it.

        The names are those of the sections; ``*`` among them stands for all.
        """
        if identity is None:
            return frozenset()
        key = _normalize(identity)
        if key in self.rules.get(ALL_EXPORTS, ()):
            return None
        return frozenset(name for name, ids in self.rules.items() if key in ids)

    def check(self, exports: Iterable[str]) -> list[str]:
        """Warnings for sections that name no export served, and exports no client may use."""
        names = set(exports)
        out = []
        for name in self.rules:
            if name != ALL_EXPORTS and name not in names:
                out.append(f"{self.path}: section [{name}] names no export being served")
        if not self.rules.get(ALL_EXPORTS):
            for name in sorted(names):
                if not self.rules.get(name):
                    out.append(f"{self.path}: no client may use export {name!r} (no [{name}] section lists one)")
        return out


def _normalize(identity: str) -> str:
    """An identity as compared: a PSK username exactly, a distinguished name loosely (_normalize_dn)."""
    identity = identity.strip()
    return identity if identity.startswith(PSK_PREFIX) else _normalize_dn(identity)


def _normalize_dn(dn: str) -> str:
    """A distinguished name compared loosely: attribute types in upper case, no spaces around , and =."""
    parts = []
    for part in _split_unescaped(dn.strip(), ","):
        key, sep, value = part.partition("=")
        parts.append(f"{key.strip().upper()}{sep}{value.strip()}")
    return ",".join(parts)


def _split_unescaped(text: str, sep: str) -> list[str]:
    out, cur, escaped = [], [], False
    for ch in text:
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\":
            cur.append(ch)
            escaped = True
        elif ch == sep:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


# ---- credentials


@dataclass
class Credentials:
    """What a new connection needs: the TLS context and the authorization rules."""

    context: ssl.SSLContext
    authz: Authz | None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TlsError(f"{path}: no such file") from None
    except OSError as e:
        raise TlsError(f"{path}: cannot read: {e.strerror or e}") from None


def _read_text(path: Path) -> str:
    try:
        return _read_bytes(path).decode("utf-8")
    except UnicodeDecodeError as e:
        raise TlsError(f"{path}: not UTF-8 text: {e}") from None


def _check_certificates(path: Path, what: str) -> None:
    """PATH holds PEM certificates, each valid now: else an error naming the file."""
    from cryptography import x509

    data = _read_bytes(path)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise TlsError(f"{path}: not a PEM {what}: {e}") from None
    now = datetime.datetime.now(datetime.UTC)
    for cert in certs:
        subject = cert.subject.rfc4514_string()
        if cert.not_valid_after_utc < now:
            raise TlsError(f"{path}: {what} {subject!r} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
        if cert.not_valid_before_utc > now:
            raise TlsError(
                f"{path}: {what} {subject!r} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
            )


def _check_key(path: Path) -> None:
    """PATH is readable and holds an unencrypted PEM key (OpenSSL itself judges the key when it loads it)."""
    data = _read_bytes(path)
    if b"-----BEGIN" not in data or b"PRIVATE KEY-----" not in data:
        raise TlsError(f"{path}: not a PEM private key")
    if b"ENCRYPTED" in data:
        raise TlsError(f"{path}: the private key is encrypted; prlnbd needs it unencrypted")


def _no_password() -> bytes:
    raise TlsError("the private key asks for a password")


def load_psk_file(path: Path) -> dict[str, bytes]:
    """psktool's key file: one username:hexkey a line."""
    keys: dict[str, bytes] = {}
    for lineno, raw in enumerate(_read_text(path).splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hexkey = line.partition(":")
        try:
            key = bytes.fromhex(hexkey)
        except ValueError:
            key = b""
        if not sep or not user or not key:
            raise TlsError(f"{path}:{lineno}: not a username:hexkey line")
        keys[user] = key
    if not keys:
        raise TlsError(f"{path}: no keys")
    return keys


class _Handshaking:
    """The session whose handshake is running: a PSK callback learns whose identity it is given.

    Handshakes run one at a time on the event loop, each step inside
    TlsSession.handshake(), which sets and clears this.
    """

    session: TlsSession | None = None


def _psk_context(path: Path) -> ssl.SSLContext:
    """A server context for TLS-PSK with the keys of PATH (sslpsk3: Python's ssl has PSK only from 3.13)."""
    keys = load_psk_file(path)
    try:
        from sslpsk3 import SSLPSKContext
    except ImportError:
        raise TlsError(f"{path}: TLS-PSK needs the sslpsk3 package (pip install 'prlnbd[psk]')") from None
    ctx = SSLPSKContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    ctx.num_tickets = 0
    ctx.set_ciphers("PSK")
    ctx.verify_mode = ssl.CERT_NONE

    def lookup(identity: str | None) -> bytes:
        # An unknown user gets no key: OpenSSL then fails the handshake.
        key = keys.get(identity or "", b"")
        session = _Handshaking.session
        if session is not None and key:
            session.psk_identity = identity
        return key

    ctx.set_psk_server_callback(lookup)
    return cast(ssl.SSLContext, ctx)


def load_credentials(settings: TlsSettings) -> Credentials:
    """Build the server's TLS context from SETTINGS, checking every file it names."""
    if settings.psk is not None:
        if settings.verify_peer:
            raise TlsError("--tls-verify-peer is for certificates; with --tls-psk every client proves its key")
        authz = Authz.load(settings.authz) if settings.authz is not None else None
        return Credentials(_psk_context(settings.psk), authz)
    directory = settings.certificates
    if directory is None:
        raise TlsError("--tls needs --tls-certificates DIR (or credentials passed by systemd)")
    if not directory.is_dir():
        raise TlsError(f"{directory}: not a directory (--tls-certificates)")
    cert, key, ca, crl = (directory / n for n in (SERVER_CERT, SERVER_KEY, CA_CERT, CA_CRL))
    _check_certificates(cert, "certificate")
    _check_key(key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    # Clients of a block device do not resume sessions: no tickets to make and send.
    ctx.num_tickets = 0
    try:
        ctx.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as e:
        if "KEY_VALUES_MISMATCH" in str(e) or "key values mismatch" in str(e):
            raise TlsError(f"{key}: the private key does not match the certificate in {cert}") from None
        # The certificate was read above: what OpenSSL refuses now is the key.
        raise TlsError(f"{key}: cannot load the private key: {e}") from None
    if settings.verify_peer or ca.exists():
        _check_certificates(ca, "CA certificate")
        try:
            ctx.load_verify_locations(cafile=str(ca))
        except ssl.SSLError as e:
            raise TlsError(f"{ca}: cannot load: {e}") from None
    if crl.exists():
        from cryptography import x509

        try:
            x509.load_pem_x509_crl(_read_bytes(crl))
            ctx.load_verify_locations(cafile=str(crl))
        except (ValueError, ssl.SSLError) as e:
            raise TlsError(f"{crl}: not a PEM certificate revocation list: {e}") from None
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    ctx.verify_mode = ssl.CERT_REQUIRED if settings.verify_peer else ssl.CERT_NONE
    authz = None
    if settings.authz is not None:
        if not settings.verify_peer:
            raise TlsError(
                "--tls-authz needs --tls-verify-peer (or --tls-psk): only a verified certificate names a client"
            )
        authz = Authz.load(settings.authz)
    return Credentials(ctx, authz)


def default_certificates() -> Path | None:
    """Where systemd put the credentials of LoadCredential= ($CREDENTIALS_DIRECTORY), if it did."""
    d = os.environ.get("CREDENTIALS_DIRECTORY")
    return Path(d) if d else None


class TlsServer:
    """The server's TLS policy and current credentials; reload() replaces them for new connections."""

    def __init__(self, settings: TlsSettings) -> None:
        self.settings = settings
        self.mode = settings.mode
        self.credentials = load_credentials(settings)

    def reload(self) -> bool:
        """Read the credentials again; on any error keep the current ones (and say why)."""
        try:
            self.credentials = load_credentials(self.settings)
        except PrlNbdError as e:
            log.error("TLS reload failed, keeping the previous credentials: %s", e)
            return False
        log.info("TLS credentials reloaded from %s", self.settings.psk or self.settings.certificates)
        return True

    def tls_only(self, exports: Container[str]) -> Container[str]:
        """Exports a client reaches only over TLS: all of them (EXPORTS, the live set: exports added while
        serving too) once clients are told apart by certificate."""
        return exports if self.credentials.authz is not None else frozenset()


# ---- one connection's TLS session


def peer_subject(obj: ssl.SSLObject) -> str | None:
    """The verified client certificate's subject as an RFC 4514 string (None without one)."""
    if obj.context.verify_mode == ssl.CERT_NONE:
        return None  # a certificate the client sent unasked was not verified: it names no one
    der = obj.getpeercert(binary_form=True)
    if not der:
        return None
    from cryptography import x509

    return x509.load_der_x509_certificate(der).subject.rfc4514_string()


class TlsSession:
    """A server-side TLS session on memory buffers: ciphertext in and out, plaintext read into given buffers."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        setup = getattr(context, "setup_psk_callbacks", None)
        if setup is not None:
            # sslpsk3 arms its callbacks in every do_handshake(), resetting a handshake under
            # way; with memory BIOs do_handshake() runs once per flight, so arm them once here.
            setup(self.obj)
        self.established = False
        self.subject: str | None = None
        self.psk_identity: str | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Ciphertext from the peer."""
        if data:
            self.incoming.write(data)

    def feed_eof(self) -> None:
        """The peer closed its side."""
        self.incoming.write_eof()

    def handshake(self) -> bool:
        """Advance the handshake with what was fed; True once it is done. Raises ssl.SSLError when it fails."""
        _Handshaking.session = self
        try:
            # The base class's: sslpsk3's override re-arms its callbacks (see __init__).
            ssl.SSLObject.do_handshake(self.obj)
        except ssl.SSLWantReadError:
            return False
        finally:
            _Handshaking.session = None
        self.established = True
        self.subject = peer_subject(self.obj)
        if self.psk_identity is not None:
            self.subject = f"{PSK_PREFIX}{self.psk_identity}"
        return True

    def read_into(self, buf: memoryview) -> int:
        """Decrypt into BUF; 0 when no whole record is waiting. Raises ssl.SSLZeroReturnError at close_notify."""
        try:
            return cast(int, self.obj.read(len(buf), buf))
        except ssl.SSLWantReadError:
            return 0

    def has_input(self) -> bool:
        """Whether ciphertext or decrypted bytes are waiting to be read."""
        return self.incoming.pending > 0 or self.obj.pending() > 0

    def encrypt(self, buffers: Iterable[bytes | bytearray | memoryview]) -> None:
        """Encrypt BUFFERS in order; small ones are joined so that records are full."""
        write = self.obj.write
        small = bytearray()
        for buf in buffers:
            n = len(buf)
            if n < RECORD:
                small += buf
                if len(small) >= RECORD:
                    write(small)
                    small = bytearray()
                continue
            if small:
                # Top the pending bytes up to a full record from the head of this buffer.
                view = memoryview(buf).cast("B")
                head = RECORD - len(small)
                small += view[:head]
                write(small)
                small = bytearray()
                buf = view[head:]
            write(buf)
        if small:
            write(small)

    def data_to_send(self) -> bytes:
        """Ciphertext waiting for the peer."""
        return self.outgoing.read()

    def close(self) -> None:
        """Queue a close_notify (the spec: close the TLS session before the connection)."""
        with contextlib.suppress(ssl.SSLError, ValueError):
            self.obj.unwrap()


def version_of(session: TlsSession) -> str:
    """The protocol version a session runs, for the log."""
    return session.obj.version() or "TLS"
