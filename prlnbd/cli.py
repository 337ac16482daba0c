"""The prlnbd command line: serve, info, demo; logging, signals, socket activation, uvloop."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import resource
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prlnbd import __version__
from prlnbd.control import ControlServer
from prlnbd.disk.chain import Disk, open_disk
from prlnbd.errors import PrlNbdError
from prlnbd.export import CACHE_MODES, Export
from prlnbd.nbd.connection import TlsMode
from prlnbd.server import DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_PER_ADDRESS, NbdServer
from prlnbd.tls import TlsError, TlsServer, TlsSettings, default_certificates

log = logging.getLogger("prlnbd")

DEFAULT_PORT = 10809
DEFAULT_BIND = "127.0.0.1"
SD_LISTEN_FDS_START = 3


def parse_size(text: str) -> int:
    """A size like 64M, 1G, 512, 252K or 1GiB (binary units) in bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGTP]?)(?:I?B)?\s*", text.upper())
    if m is None:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}")
    return int(m.group(1)) << (10 * " KMGTP".index(m.group(2) or " "))


def split_disk_arg(arg: str) -> tuple[str, Path]:
    """Split DISK as [NAME=]PATH; NAME defaults to the base name of the bundle or file."""
    name, path, _ = _split_disk_arg(arg)
    return name, path


def _split_disk_arg(arg: str) -> tuple[str, Path, bool]:
    """NAME, PATH and whether NAME was given."""
    name, sep, path = arg.partition("=")
    if not sep or "/" in name:
        path = arg
        p = Path(path)
        base = p.parent if p.name == "DiskDescriptor.xml" else p
        name = base.resolve().name if str(base) in (".", "") else base.name
        return name, Path(path), False
    return name, Path(path), True


def disk_exports(specs: Sequence[str], *, allow_outside_bundle: bool = False) -> list[tuple[str, Path]]:
    """(export name, path) for each DISK argument; a VM directory gives one per disk bundle.

    A VM directory's disks are named after their bundles (harddisk.hdd); NAME=VM.pvm
    names them NAME/harddisk.hdd, so that two VMs can be served side by side.
    """
    from prlnbd.disk.vm import is_vm_directory, vm_disks

    out: list[tuple[str, Path]] = []
    for spec in specs:
        name, path, named = _split_disk_arg(spec)
        if is_vm_directory(path):
            for disk, bundle in vm_disks(path, allow_outside=allow_outside_bundle):
                out.append((f"{name}/{disk}" if named and name else disk, bundle))
        else:
            out.append((name, path))
    return out


def _whole_number(text: str, what: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def positive_int(text: str) -> int:
    """A count given on the command line: a whole number of at least 1."""
    value = _whole_number(text, "a whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is less than 1")
    return value


def tcp_port(text: str) -> int:
    """A --port value: a whole number from 0 to 65535."""
    port = _whole_number(text, "a port number")
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (0 to 65535)")
    return port


def listen_addresses(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """Where to listen: (socket path, "", 0) per --socket, ("", host, port) per --bind.

    TCP on --bind (or the default address) when --bind or --port is given, or
    when no --socket is: so `--socket S --port N` listens on both.
    """
    out: list[tuple[str, str, int]] = [(path, "", 0) for path in args.socket]
    if args.bind or args.port is not None or not args.socket:
        port = DEFAULT_PORT if args.port is None else args.port
        out += [("", host, port) for host in args.bind or [DEFAULT_BIND]]
    return out


def _add_listen_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--socket", metavar="PATH", action="append", default=[], help="listen on a Unix socket (may be repeated)"
    )
    p.add_argument(
        "--bind",
        metavar="ADDR",
        action="append",
        default=[],
        help=f"listen on TCP at ADDR (may be repeated; default {DEFAULT_BIND} unless only --socket is given)",
    )
    p.add_argument(
        "--port", type=tcp_port, default=None, help=f"TCP port (default {DEFAULT_PORT}; 0: any free port)"
    )
    p.add_argument(
        "--handshake-timeout",
        type=float,
        default=float(os.environ.get("PRLNBD_HANDSHAKE_TIMEOUT", DEFAULT_HANDSHAKE_TIMEOUT)),
        help="seconds a client may take to finish the handshake (default %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="prlnbd", description="NBD server for Parallels disks")
    parser.add_argument("--version", action="version", version=f"prlnbd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve disks over NBD")
    _add_listen_options(serve)
    serve.add_argument("--read-only", action="store_true", help="refuse writes")
    serve.add_argument(
        "--cache",
        choices=CACHE_MODES,
        default="writeback",
        help="writeback: through the page cache, FLUSH syncs (default); none: data I/O with O_DIRECT;"
        " unsafe: FLUSH is ignored (as qemu-nbd --cache)",
    )
    serve.add_argument(
        "--aio",
        choices=("auto", "threads", "io_uring"),
        default="auto",
        help="how disk I/O leaves the event loop: io_uring: READs that miss the page cache, and WRITEs into"
        " clusters the top image holds, go through an io_uring reaped on the event loop, the rest to a pool of"
        " worker threads; threads: everything to the pool; auto: io_uring where this system allows one,"
        " else threads, saying why (default)",
    )
    serve.add_argument(
        "--max-connections",
        type=positive_int,
        default=DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help="connections served at once; more are closed before the greeting (default %(default)s)",
    )
    serve.add_argument(
        "--max-connections-per-address",
        type=positive_int,
        default=DEFAULT_MAX_PER_ADDRESS,
        metavar="N",
        help="connections served at once from one TCP address (default %(default)s)",
    )
    serve.add_argument(
        "--snapshot", metavar="GUID", help="export the disk as it was at snapshot GUID (implies --read-only)"
    )
    serve.add_argument(
        "--control",
        metavar="PATH",
        help="answer control requests (`prlnbd ctl`) on a Unix socket at PATH, mode 0600",
    )
    serve.add_argument("disks", nargs="+", metavar="DISK", help="[NAME=]PATH: bundle dir, DiskDescriptor.xml or .hds")
    tls = serve.add_argument_group("TLS")
    tls.add_argument(
        "--tls",
        choices=[m.value for m in TlsMode],
        default=TlsMode.OFF.value,
        help="off: no TLS (default); on: TLS at the client's choice; require: TLS before anything else",
    )
    tls.add_argument(
        "--tls-certificates",
        metavar="DIR",
        type=Path,
        help="server-cert.pem, server-key.pem, ca-cert.pem (with --tls-verify-peer), optional ca-crl.pem"
        " (default: $CREDENTIALS_DIRECTORY, from systemd's LoadCredential=)",
    )
    tls.add_argument(
        "--tls-verify-peer",
        action="store_true",
        help="clients must present a certificate signed by ca-cert.pem",
    )
    tls.add_argument(
        "--tls-authz",
        metavar="FILE",
        type=Path,
        help="which client certificate subjects may use which export ([EXPORT] sections; needs --tls-verify-peer)",
    )
    tls.add_argument(
        "--tls-psk",
        metavar="FILE",
        type=Path,
        help="TLS-PSK instead of certificates: psktool's username:hexkey lines (needs the sslpsk3 package)",
    )

    info = sub.add_parser("info", help="describe a disk: geometry, chain, allocation, bitmaps")
    info.add_argument("path", metavar="PATH")
    info.add_argument("--json", action="store_true", help="machine-readable output")

    create = sub.add_parser("create", help="create a new disk: a bundle directory, or one image if PATH ends in .hds")
    create.add_argument("path", metavar="PATH")
    create.add_argument("--size", type=parse_size, required=True, help="disk size, e.g. 64G")
    create.add_argument("--cluster-size", type=parse_size, default=1 << 20, help="cluster size (default 1M)")
    create.add_argument(
        "--split",
        action="store_true",
        help="split the disk as Parallels Desktop does: one image per 3989504 sectors (1948 MiB), the last shorter",
    )

    snap = sub.add_parser("snapshot", help="freeze the top image of a bundle and add a new empty top")
    snap.add_argument("path", metavar="PATH")

    check = sub.add_parser("check", help="check every layer and the chain; exit 0 clean, 2 corrupt, 3 leaks")
    check.add_argument("path", metavar="PATH")
    check.add_argument("--repair", action="store_true", help="fix what can be fixed without losing data")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    for p in (serve, info, check):
        p.add_argument(
            "--allow-outside-bundle",
            action="store_true",
            help="open images a descriptor names outside its bundle directory (.., absolute paths, symlinks)",
        )

    compact = sub.add_parser(
        "compact",
        help="move the top image's clusters into its free space and shorten the file (offline; every piece's top"
        " image of a split disk)",
    )
    compact.add_argument("path", metavar="PATH")
    compact.add_argument("--json", action="store_true", help="machine-readable output")

    merge = sub.add_parser(
        "merge", help="delete snapshot GUID from a bundle's chain, merging its data into a neighbour (offline)"
    )
    merge.add_argument("path", metavar="DISK")
    merge.add_argument("guid", metavar="GUID", help="the snapshot to remove (not the top)")
    merge.add_argument("--json", action="store_true", help="machine-readable output")

    bitmap = sub.add_parser(
        "bitmap", help="manage the dirty bitmaps of the top image (offline; of a split disk: in every piece's top)"
    )
    bitmap.add_argument("path", metavar="PATH")
    bsub = bitmap.add_subparsers(dest="action", required=True)
    bsub.add_parser("list", help="list bitmaps").add_argument("--json", action="store_true")
    badd = bsub.add_parser("add", help="add a clean bitmap (name: a UUID, generated when left out)")
    badd.add_argument("name", nargs="?")
    badd.add_argument("--granularity", type=parse_size, default=64 * 1024, help="bytes per bit (default 64K)")
    bsub.add_parser("remove", help="remove a bitmap").add_argument("name")
    bsub.add_parser("clear", help="mark a bitmap all clean").add_argument("name")

    ctl = sub.add_parser("ctl", help="query or change a running server through its control socket")
    ctl.add_argument("control", metavar="PATH", help="the server's --control socket")
    ctl.add_argument("--json", action="store_true", help="print the JSON reply")
    csub = ctl.add_subparsers(dest="ctl_command", required=True)
    csub.add_parser("query", help="exports, disks, layers, bitmaps and connections")
    cbm = csub.add_parser("bitmap", help="add, remove or clear a dirty bitmap of a served export")
    cbm.add_argument("export", metavar="EXPORT")
    cbm.add_argument("action", choices=("add", "remove", "clear"))
    cbm.add_argument("name", nargs="?", help="the bitmap (a UUID; add generates one when left out)")
    cbm.add_argument("--granularity", type=parse_size, default=None, help="bytes per bit, for add (default 64K)")
    csnap = csub.add_parser("snapshot", help="freeze the served disk under a new snapshot; writes go to a new top")
    csnap.add_argument("export", metavar="EXPORT")
    cexp = csub.add_parser("export-snapshot", help="serve the disk as it was at snapshot GUID, read-only")
    cexp.add_argument("export", metavar="EXPORT")
    cexp.add_argument("guid", metavar="GUID")
    cexp.add_argument("--name", help="the new export's name (default EXPORT@GUID)")
    crm = csub.add_parser("remove-export", help="stop serving an export")
    crm.add_argument("name", metavar="NAME")
    crm.add_argument("--force", action="store_true", help="disconnect its clients (after their requests in flight)")
    cmerge = csub.add_parser("merge", help="remove snapshot GUID from a served disk's chain, while serving it")
    cmerge.add_argument("export", metavar="EXPORT")
    cmerge.add_argument("guid", metavar="GUID")
    for p in (csub.choices["query"], cbm, csnap, cexp, crm, cmerge):
        # SUPPRESS: a --json given before COMMAND is not reset by the subcommand's default.
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the JSON reply")

    demo = sub.add_parser("demo", help="build a demo disk with a 3-layer snapshot chain and serve it")
    demo.add_argument("--dir", default="prlnbd-demo", help="where to build the demo bundle")
    _add_listen_options(demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = build_parser().parse_args(argv)
    # A file size limit must fail the write (EFBIG -> ENOSPC), not kill the server.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "serve": cmd_serve,
        "info": cmd_info,
        "demo": cmd_demo,
        "create": cmd_create,
        "snapshot": cmd_snapshot,
        "check": cmd_check,
        "bitmap": cmd_bitmap,
        "compact": cmd_compact,
        "merge": cmd_merge,
        "ctl": cmd_ctl,
    }
    try:
        return handlers[args.command](args)
    except PrlNbdError as e:
        print(f"prlnbd: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


# ---- serve


def inherited_sockets() -> list[socket.socket]:
    """Listening sockets passed by systemd socket activation (LISTEN_PID/LISTEN_FDS)."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        socks.append(socket.socket(fileno=fd))
    return socks


def _open_exports(
    specs: Sequence[str],
    *,
    read_only: bool,
    snapshot: str | None = None,
    cache: str = "writeback",
    allow_outside_bundle: bool = False,
) -> dict[str, Export]:
    exports: dict[str, Export] = {}
    try:
        for name, path in disk_exports(specs, allow_outside_bundle=allow_outside_bundle):
            if name in exports:
                raise PrlNbdError(
                    f"two disks share the export name {name!r}; name them NAME=PATH"
                    " (NAME=VM.pvm names a VM's disks NAME/DISK.hdd)"
                )
            disk = open_disk(
                path,
                writable=not read_only and snapshot is None,
                snapshot=snapshot,
                allow_outside_bundle=allow_outside_bundle,
            )
            for warning in disk.warnings:
                log.warning("%s: %s", disk.path, warning)
            try:
                exports[name] = Export(name, disk, read_only=read_only or snapshot is not None, cache=cache)
            except BaseException:
                disk.close()
                raise
    except BaseException:
        for export in exports.values():
            export.close()
        raise
    return exports


def _new_loop() -> asyncio.AbstractEventLoop:
    if os.environ.get("PRLNBD_LOOP", "uvloop") != "asyncio":
        try:
            import uvloop

            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            return loop
        except ImportError:
            pass
    return asyncio.new_event_loop()


async def _serve(server: NbdServer, args: argparse.Namespace, announce: Callable[[], None] | None = None) -> None:
    control: ControlServer | None = None
    try:
        if getattr(args, "control", None):
            # Before the NBD listeners: once a client can connect, the control socket answers too.
            control = ControlServer(server)
            await control.listen(args.control)
        await _listen(server, args)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        tls = server.tls
        if tls is not None:
            # New connections get the new certificates; those already up keep theirs.
            loop.add_signal_handler(signal.SIGHUP, tls.reload)
        log.info(
            "serving %s on %s (%s loop, aio %s%s)%s",
            ", ".join(repr(n) for n in server.exports),
            ", ".join(server.addresses()),
            type(loop).__module__.split(".")[0],
            "io_uring" if server.ring is not None else "threads",
            f", TLS {server.tls_mode.value}" if tls is not None else "",
            f", control socket {args.control}" if control is not None else "",
        )
        if announce is not None:
            announce()
        await stop.wait()
    finally:
        if control is not None:
            await control.close()
    log.info("stopping: finishing in-flight requests")
    await server.stop()
    log.info("stopped cleanly")


async def _listen(server: NbdServer, args: argparse.Namespace) -> None:
    inherited = inherited_sockets()
    if inherited:
        for sock in inherited:
            await server.listen_socket(sock)
        return
    for path, host, port in listen_addresses(args):
        where = path or f"{host}:{port}"
        try:
            if path:
                await server.listen_unix(path)
            else:
                await server.listen_tcp(host, port)
        except OSError as e:
            raise PrlNbdError(f"cannot listen on {where}: {e.strerror or e}") from None


def tls_settings(args: argparse.Namespace) -> TlsSettings | None:
    """The TLS settings the command line asks for (None: no TLS); contradictions are errors."""
    mode = TlsMode(getattr(args, "tls", "off"))
    psk = getattr(args, "tls_psk", None)
    if mode is TlsMode.OFF and psk is not None:
        raise TlsError("--tls-psk needs --tls=on or --tls=require")
    if mode is TlsMode.OFF:
        for opt in ("tls_verify_peer", "tls_authz"):
            if getattr(args, opt, None):
                raise TlsError(f"--{opt.replace('_', '-')} needs --tls=on or --tls=require")
        return None
    certificates = getattr(args, "tls_certificates", None)
    if psk is not None and certificates is not None:
        raise TlsError("--tls-psk and --tls-certificates: choose one")
    if psk is None and certificates is None:
        certificates = default_certificates()
    return TlsSettings(
        mode=mode,
        certificates=certificates,
        verify_peer=bool(getattr(args, "tls_verify_peer", False)),
        authz=getattr(args, "tls_authz", None),
        psk=psk,
    )


def make_tls(args: argparse.Namespace) -> TlsServer | None:
    """Read and check the TLS credentials now, before any image is opened: errors name their file."""
    settings = tls_settings(args)
    return TlsServer(settings) if settings is not None else None


def run_server(
    exports: dict[str, Export],
    args: argparse.Namespace,
    announce: Callable[[], None] | None = None,
    tls: TlsServer | None = None,
) -> int:
    """Serve EXPORTS until SIGTERM or SIGINT."""
    authz = tls.credentials.authz if tls is not None else None
    if authz is not None:
        for warning in authz.check(exports):
            log.warning("%s", warning)
    with asyncio.Runner(loop_factory=_new_loop) as runner:
        server = runner.run(_make_server(exports, args, tls))
        try:
            runner.run(_serve(server, args, announce))
        except BaseException:
            for export in exports.values():
                export.close()
            raise
    return 0


async def _make_server(exports: dict[str, Export], args: argparse.Namespace, tls: TlsServer | None) -> NbdServer:
    return NbdServer(
        exports,
        handshake_timeout=args.handshake_timeout,
        tls=tls,
        max_connections=getattr(args, "max_connections", DEFAULT_MAX_CONNECTIONS),
        max_per_address=getattr(args, "max_connections_per_address", DEFAULT_MAX_PER_ADDRESS),
        allow_outside_bundle=getattr(args, "allow_outside_bundle", False),
        aio=getattr(args, "aio", "auto"),
    )


# Descriptors the server needs besides its connections: images, listeners, the loop's own.
RESERVED_FDS = 64


def ensure_descriptors(connections: int) -> None:
    """Raise the open-file limit to the hard limit, and check it leaves room for CONNECTIONS.

    With room for every connection admitted, accept() never runs out of
    descriptors (plain asyncio logs a line for each such failure, thousands a
    second): a connection past --max-connections is accepted and closed.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    if connections + RESERVED_FDS > soft:
        raise PrlNbdError(
            f"--max-connections {connections} needs {connections + RESERVED_FDS} file descriptors;"
            f" the limit (ulimit -n) is {soft}"
        )


def cmd_serve(args: argparse.Namespace) -> int:
    """prlnbd serve: export disks over NBD."""
    ensure_descriptors(args.max_connections)
    tls = make_tls(args)
    exports = _open_exports(
        args.disks,
        read_only=args.read_only,
        snapshot=args.snapshot,
        cache=args.cache,
        allow_outside_bundle=args.allow_outside_bundle,
    )
    return run_server(exports, args, tls=tls)


# ---- info


_UNITS = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB")


def _human(n: int) -> str:
    """N bytes for people, in the largest unit that fits: whole when exact, else two decimals."""
    unit = 0
    while unit < len(_UNITS) - 1 and n >= 1024 ** (unit + 1):
        unit += 1
    scale = 1024**unit
    return f"{n // scale} {_UNITS[unit]}" if n % scale == 0 else f"{n / scale:.2f} {_UNITS[unit]}"


def _describe_layers(disk: Disk) -> list[dict[str, object]]:
    """The layers of DISK's chain, top first, as `info --json` shows them."""
    from prlnbd.image.parallels import ParallelsImage

    layers = []
    for depth, (layer, guid) in enumerate(zip(disk.layers, disk.guids, strict=True), start=1):
        entry: dict[str, object] = {
            "depth": depth,
            "guid": guid or None,
            "file": str(layer.path),
            "size": layer.size,
            "problems": [p.message for p in layer.problems],
        }
        if isinstance(layer, ParallelsImage):
            entry.update(
                {
                    "type": "Compressed",
                    "format": layer.format_name,
                    "version": layer.version,
                    "cluster-size": layer.cluster_size,
                    "allocated-clusters": len(layer.allocated),
                    "allocated-bytes": layer.allocated_bytes(),
                    "data-offset": layer.data_off,
                    "in-use": layer.in_use,
                    "ext-offset": layer.header.ext_off * 512,
                }
            )
        else:
            entry.update({"type": "Plain", "format": "raw"})
        layers.append(entry)
    return layers


def describe(disk: Disk) -> dict[str, object]:
    """What `prlnbd info --json` prints about DISK.

    For a split disk, layers is the first piece's chain and pieces lists every
    piece (in disk order) with its sectors and its own chain.
    """
    from prlnbd.disk.split import SplitDisk

    layers = _describe_layers(disk)
    pieces: list[dict[str, object]] | None = None
    if isinstance(disk, SplitDisk) and disk.descriptor is not None:
        pieces = [
            {
                "storage": piece.index,
                "start-sector": piece.start,
                "end-sector": piece.end,
                "offset": piece.offset,
                "size": piece.size,
                "layers": _describe_layers(part),
            }
            for piece, part in zip(disk.descriptor.pieces, disk.pieces, strict=True)
        ]
    bitmaps = [
        {"name": b.name, "granularity": b.granularity, "dirty-bytes": b.dirty_bytes()} for b in disk.bitmaps()
    ]
    key_id = disk.descriptor.key_id if disk.descriptor is not None else None
    return {
        "path": str(disk.path),
        "format": "parallels-bundle" if disk.descriptor is not None else "parallels",
        "encryption": {"key-id": key_id} if key_id is not None else None,
        "virtual-size": disk.size,
        "top-guid": disk.guids[0] or None,
        "layers": layers,
        "pieces": pieces,
        "bitmaps": bitmaps,
        "warnings": disk.warnings,
    }


def _describe_path(path: Path, allow_outside_bundle: bool) -> dict[str, object]:
    disk = open_disk(path, writable=False, allow_outside_bundle=allow_outside_bundle)
    try:
        return describe(disk)
    finally:
        disk.close()


def cmd_info(args: argparse.Namespace) -> int:
    """prlnbd info: print what a disk (or each disk of a VM directory) is made of."""
    from prlnbd.disk.vm import is_vm_directory, vm_disks

    path = Path(args.path)
    if is_vm_directory(path):
        disks = [
            {"name": name, **_describe_path(bundle, args.allow_outside_bundle)}
            for name, bundle in vm_disks(path, allow_outside=args.allow_outside_bundle)
        ]
        if args.json:
            print(json.dumps({"path": str(path), "format": "parallels-vm", "disks": disks}, indent=2))
            return 0
        print(f"VM directory: {path}, {len(disks)} disk{'s' if len(disks) != 1 else ''}")
        for d in disks:
            print(f"\ndisk {d['name']}:")
            _print_info(d)
        return 0
    d = _describe_path(path, args.allow_outside_bundle)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    _print_info(d)
    return 0


def _print_layers(layers: list[dict[str, Any]], indent: str) -> None:
    """The snapshot chain LAYERS (top first), each line prefixed by INDENT."""
    print(f"{indent}snapshot chain ({len(layers)} layer{'s' if len(layers) != 1 else ''}, top first):")
    for layer in layers:
        head = f"{indent}  [{layer['depth']}] {layer['file']}"
        if layer["guid"]:
            head += f" {layer['guid']}"
        print(head)
        if layer["type"] == "Compressed":
            print(
                f"{indent}      {layer['format']} (v{layer['version']}), cluster size {_human(layer['cluster-size'])},"
                f" {layer['allocated-clusters']} clusters allocated ({_human(layer['allocated-bytes'])}),"
                f" in use: {'yes' if layer['in-use'] else 'no'}"
            )
        else:
            print(f"{indent}      plain (raw) image")
        for problem in layer["problems"]:
            print(f"{indent}      problem: {problem}")


def _print_info(d: dict[str, object]) -> None:
    size = int(str(d["virtual-size"]))
    print(f"image: {d['path']}")
    print(f"file format: {d['format']}")
    print(f"virtual size: {_human(size)} ({size} bytes)")
    encryption = d["encryption"]
    if isinstance(encryption, dict):
        print(
            f"encryption: ploop LUKS volume inside the image (KeyId {encryption['key-id']}),"
            " served as stored: clients decrypt"
        )
    pieces = d.get("pieces")
    if isinstance(pieces, list):
        print(f"split into {len(pieces)} pieces (Storage elements), each with its own snapshot chain:")
        for k, piece in enumerate(pieces):
            print(
                f"piece {k}: sectors {piece['start-sector']}..{piece['end-sector']}"
                f" ({_human(piece['size'])} at offset {piece['offset']}), Storage {piece['storage']}"
            )
            _print_layers(piece["layers"], "  ")
    else:
        layers = d["layers"]
        assert isinstance(layers, list)
        _print_layers(layers, "")
    bitmaps = d["bitmaps"]
    assert isinstance(bitmaps, list)
    if bitmaps:
        print("dirty bitmaps:")
        for b in bitmaps:
            print(f"  {b['name']}: granularity {_human(b['granularity'])}, {_human(b['dirty-bytes'])} dirty")
    for w in d["warnings"]:  # type: ignore[attr-defined]
        print(f"warning: {w}")


# ---- demo


def cmd_demo(args: argparse.Namespace) -> int:
    """prlnbd demo: build a 3-layer demo bundle (unless it exists) and serve it."""
    from prlnbd.demo import build_demo

    bundle = Path(args.dir)
    if not (bundle / "DiskDescriptor.xml").exists():
        build_demo(bundle)
        print(f"built demo disk {bundle} (3-layer snapshot chain)", flush=True)
    name = "demo"
    exports = _open_exports([f"{name}={bundle}"], read_only=False)
    path, host, port = listen_addresses(args)[0]
    uri = f"nbd+unix:///{name}?socket={Path(path).resolve()}" if path else f"nbd://{host}:{port}/{name}"

    def announce() -> None:
        print(f"serving {uri}", flush=True)
        print("try, in another terminal:", flush=True)
        print(f"  nbdinfo --map '{uri}'", flush=True)
        print(f"  qemu-img convert -p -O raw '{uri}' demo.raw", flush=True)
        print(f"  nbdcopy '{uri}' demo-copy.raw", flush=True)
        print("stop with Ctrl-C", flush=True)

    return run_server(exports, args, announce)


# ---- offline tools


def cmd_create(args: argparse.Namespace) -> int:
    """prlnbd create: a new empty disk."""
    from prlnbd.disk.tools import create_disk

    image = create_disk(Path(args.path), args.size, args.cluster_size, split=args.split)
    print(f"created {args.path} ({_human(args.size)}, {_human(args.cluster_size)} clusters): {image}")
    return 0


def cmd_snapshot(args: argparse.Namespace) -> int:
    """prlnbd snapshot: freeze the top and add a new one."""
    from prlnbd.disk.tools import snapshot_disk

    frozen, top = snapshot_disk(Path(args.path))
    print(f"snapshot {frozen}")
    print(f"new top {top}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """prlnbd check: report (and with --repair fix) problems; exit codes as qemu-img check."""
    from prlnbd.disk.tools import check_disk

    report = check_disk(Path(args.path), repair=args.repair, allow_outside_bundle=args.allow_outside_bundle)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return report.exit_code
    for f in report.findings:
        label = "Leaked" if f.kind == "leak" else "Free" if f.kind == "free" else "ERROR"
        print(f"{label} {f.file}: {f.message}{' [fixed]' if f.fixed else ''}")
    d = report.as_dict()
    if report.exit_code == 0:
        problems = [f for f in report.findings if f.kind != "free"]
        print("No errors were found on the disk." if not problems else "All problems were repaired.")
    else:
        print(f"{d['corruptions']} errors and {d['leaks']} leaks remain.")
    return report.exit_code


def cmd_compact(args: argparse.Namespace) -> int:
    """prlnbd compact: fill the top image's holes with its last clusters, truncate, report the space."""
    from prlnbd.disk.tools import compact_disk

    bar = _progress_bar("compact") if sys.stderr.isatty() else None
    result = compact_disk(Path(args.path), bar)
    if bar is not None:
        print(file=sys.stderr)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return 0
    # A split disk: one line per piece's top image, then the sums over them all.
    for r in [*result.pieces, result]:
        print(
            f"{r.path}: moved {r.moved} clusters; file {r.size_before} -> {r.size_after} bytes,"
            f" allocated {r.allocated_before} -> {r.allocated_after} bytes;"
            f" gave back {r.given_back} bytes ({_human(r.given_back)})"
        )
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """prlnbd merge: remove a snapshot from a bundle's chain (offline), with a progress bar on a terminal."""
    from prlnbd.disk.merge import merge_disk

    bar: Callable[[int, int], None] | None = None
    if sys.stderr.isatty():

        def bar(done: int, total: int, width: int = 40) -> None:
            frac = done / total if total else 1.0
            fill = int(frac * width)
            sys.stderr.write(
                f"\rmerge: [{'#' * fill}{' ' * (width - fill)}] {frac:6.1%} {_human(done)}/{_human(total)}"
            )
            sys.stderr.flush()

    result = merge_disk(Path(args.path), args.guid, bar)
    if bar is not None:
        print(file=sys.stderr)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return 0
    if result.resumed and not result.bytes_moved:
        print(f"{result.path}: the interrupted merge of snapshot {result.guid} is finished")
    else:
        how = (
            f"its data merged down into its child {result.child}"
            if result.direction == "down"
            else f"its child {result.child} merged up into its file, which now holds {result.child}"
        )
        print(
            f"{result.path}: snapshot {result.guid} removed: {how};"
            f" direction {result.direction}, {result.bytes_moved} bytes moved ({_human(result.bytes_moved)})"
        )
    for f in result.deleted:
        print(f"deleted {f}")
    return 0


def _progress_bar(label: str, width: int = 40) -> Callable[[int, int], None]:
    """A progress callback drawing one line on stderr (a terminal)."""

    def show(done: int, total: int) -> None:
        frac = done / total if total else 1.0
        fill = int(frac * width)
        sys.stderr.write(f"\r{label}: [{'#' * fill}{' ' * (width - fill)}] {frac:6.1%} {done}/{total} clusters")
        sys.stderr.flush()

    return show


def cmd_bitmap(args: argparse.Namespace) -> int:
    """prlnbd bitmap: list, add, remove or clear the top image's dirty bitmaps."""
    from prlnbd.disk.tools import manage_bitmaps

    result = manage_bitmaps(Path(args.path), args.action, getattr(args, "name", None), getattr(args, "granularity", 0))
    if args.action == "list":
        if getattr(args, "json", False):
            print(json.dumps(result, indent=2))
        elif not result:
            print("no bitmaps")
        else:
            for b in result:
                print(f"{b['name']}  granularity {_human(int(str(b['granularity'])))}  {b['dirty-bytes']} bytes dirty")
    else:
        for b in result:
            print(f"{args.action}: {b['name']}")
    return 0


# ---- the control socket's client


def control_request(path: str, command: str, arguments: dict[str, object]) -> dict[str, object]:
    """Send one request to the control socket at PATH and return the reply object."""
    request = json.dumps({"id": 1, "command": command, "arguments": arguments}).encode() + b"\n"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(path)
            s.sendall(request)
            with s.makefile("rb") as f:
                line = f.readline()
    except OSError as e:
        raise PrlNbdError(f"{path}: cannot reach the control socket: {e.strerror or e}") from None
    try:
        reply = json.loads(line)
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        raise PrlNbdError(f"{path}: no valid reply from the control socket")
    return reply


def cmd_ctl(args: argparse.Namespace) -> int:
    """prlnbd ctl: one request to a running server's control socket."""
    arguments: dict[str, object] = {}
    if args.ctl_command == "bitmap":
        arguments = {"export": args.export, "action": args.action}
        if args.name is not None:
            arguments["name"] = args.name
        if args.granularity is not None:
            arguments["granularity"] = args.granularity
    elif args.ctl_command == "snapshot":
        arguments = {"export": args.export}
    elif args.ctl_command == "export-snapshot":
        arguments = {"export": args.export, "guid": args.guid}
        if args.name is not None:
            arguments["name"] = args.name
    elif args.ctl_command == "remove-export":
        arguments = {"name": args.name, "force": args.force}
    elif args.ctl_command == "merge":
        arguments = {"export": args.export, "guid": args.guid}
    reply = control_request(args.control, args.ctl_command, arguments)
    if args.json:
        print(json.dumps(reply, indent=2))
    error = reply.get("error")
    if error is not None:
        message = error.get("message") if isinstance(error, dict) else error
        print(f"prlnbd: error: {message}", file=sys.stderr)
        return 1
    if not args.json:
        _print_ctl(args, reply.get("return"))
    return 0


def _print_ctl(args: argparse.Namespace, result: object) -> None:
    if not isinstance(result, dict):
        return
    if args.ctl_command == "bitmap":
        print(f"{args.action}: {result.get('name')} on export {args.export}")
        return
    if args.ctl_command == "snapshot":
        print(f"export {args.export}: snapshot {result.get('frozen')} frozen, new top {result.get('top')}")
        return
    if args.ctl_command == "export-snapshot":
        print(f"export {result.get('name')}: snapshot {result.get('guid')} of {args.export}, read-only")
        return
    if args.ctl_command == "merge":
        print(
            f"export {args.export}: snapshot {result.get('guid')} merged {result.get('direction')}"
            f" ({_human(int(result.get('bytes-moved', 0)))} moved)"
        )
        return
    if args.ctl_command == "remove-export":
        n = result.get("disconnected", 0)
        print(f"export {result.get('name')} removed" + (f" ({n} clients disconnected)" if n else ""))
        return
    for e in result.get("exports", []):
        mode = "read-only" if e["read-only"] else "read-write"
        print(f"export {e['name']}: {_human(e['size'])}, {mode}, disk {e['disk']}")
        for layer in e["layers"]:
            print(f"  layer {layer['guid'] or '-'} {layer['kind']} {layer['file']}")
        for b in e["bitmaps"]:
            print(f"  bitmap {b['name']}: granularity {_human(b['granularity'])}, {b['dirty-bytes']} bytes dirty")
    for op in result.get("operations", []):
        print(f"{op['operation']} on export {op['export']}: {op['guid'] or ''} {op['done']}/{op['total']} bytes")
    conns = result.get("connections", [])
    if not conns:
        print("no connections")
    for c in conns:
        print(f"connection {c['peer']} export {c['export'] or '-'}: {c['requests']} requests")
