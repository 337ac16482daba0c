"""The control socket: a running server is queried and changed through it (`serve --control PATH`).

A Unix socket, mode 0600, separate from every NBD listener. The protocol is
line-oriented JSON, a much smaller cousin of QMP (at most MAX_CLIENTS connections
at once): one request object per line

    {"id": ANY, "command": "NAME", "arguments": {...}}

and one reply per line, in order, echoing the request's id (null when it had none):

    {"id": ANY, "return": {...}}
    {"id": ANY, "error": {"class": "CLASS", "message": "..."}}

Error classes: ParseError (the line is not JSON), InvalidRequest (not an
object, or no command), CommandNotFound, InvalidArguments, and Failed (the
command ran and failed: no such export, a read-only export, ...). A line
longer than MAX_LINE closes that connection after an InvalidRequest reply.
Commands run on the server's event loop, one at a time per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prlnbd import online
from prlnbd.errors import PrlNbdError
from prlnbd.image.extension import DirtyBitmap

if TYPE_CHECKING:
    from prlnbd.export import Export
    from prlnbd.server import NbdServer

log = logging.getLogger(__name__)

MAX_LINE = 1 << 20
# Control connections open at once; one more is told so and closed (the socket is the owner's
# alone, but a stuck script must not pile up connections without end).
MAX_CLIENTS = 16
DEFAULT_GRANULARITY = 64 * 1024


class CommandError(Exception):
    """A request that gets an error reply of CLASS."""

    def __init__(self, cls: str, message: str) -> None:
        super().__init__(message)
        self.cls = cls


def _arguments(args: dict[str, Any], required: dict[str, type], optional: dict[str, type]) -> dict[str, Any]:
    """Check ARGS against the names and types a command takes; raise InvalidArguments naming what is wrong."""
    for key in args:
        if key not in required and key not in optional:
            raise CommandError("InvalidArguments", f"unknown argument {key!r}")
    for key in required:
        if key not in args:
            raise CommandError("InvalidArguments", f"argument {key!r} is missing")
    for key, value in args.items():
        kind = required.get(key) or optional[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise CommandError("InvalidArguments", f"argument {key!r} must be of type {kind.__name__}")
    return args


def _bitmap_dict(bm: DirtyBitmap) -> dict[str, Any]:
    return {"name": bm.name, "granularity": bm.granularity, "dirty-bytes": bm.dirty_bytes()}


class ControlServer:
    """Answers control requests for one NbdServer on a Unix socket."""

    def __init__(self, server: NbdServer) -> None:
        self.server = server
        self.path: str | None = None
        self._ino: tuple[int, int] | None = None
        self._listener: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self.commands: dict[str, Callable[[dict[str, Any]], Any]] = {
            "query": self.query,
            "bitmap": self.bitmap,
            "snapshot": self.snapshot,
            "export-snapshot": self.export_snapshot,
            "remove-export": self.remove_export,
            "merge": self.merge,
        }

    async def listen(self, path: str) -> None:
        """Listen at PATH, mode 0600 from the start; refuse to replace a live socket or any other file."""
        from prlnbd.server import _remove_stale_socket

        _remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # bind() creates the file: under this umask it is never accessible to others, not even briefly.
            old = os.umask(0o177)
            try:
                sock.bind(path)
            finally:
                os.umask(old)
            os.chmod(path, 0o600)
            st = os.stat(path)
            sock.listen(16)
            sock.setblocking(False)
            self._listener = await asyncio.start_unix_server(self._client, sock=sock, limit=MAX_LINE)
        except OSError as e:
            sock.close()
            raise PrlNbdError(f"cannot listen on control socket {path}: {e.strerror or e}") from None
        self.path = path
        self._ino = (st.st_dev, st.st_ino)

    async def close(self) -> None:
        """Stop listening, end the connections, and remove the socket file (if it is still ours)."""
        if self._listener is not None:
            self._listener.close()
        for task in list(self._clients):
            task.cancel()
        if self._clients:
            await asyncio.wait(list(self._clients))
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.wait_closed()
        if self.path is not None:
            with contextlib.suppress(OSError):
                st = os.lstat(self.path)
                if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == self._ino:
                    os.unlink(self.path)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._clients) >= MAX_CLIENTS:
            error = {"class": "Failed", "message": f"more than {MAX_CLIENTS} control connections at once: closing"}
            with contextlib.suppress(ConnectionError):
                writer.write(json.dumps({"id": None, "error": error}).encode() + b"\n")
                await writer.drain()
            writer.close()
            return
        if task is not None:
            self._clients.add(task)
        try:
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError as e:
                    line = e.partial  # the last line, without its newline
                    if line.strip():
                        await self._answer(writer, line)
                    break
                except asyncio.LimitOverrunError:
                    error = {"class": "InvalidRequest", "message": f"line longer than {MAX_LINE} bytes: closing"}
                    reply = {"id": None, "error": error}
                    writer.write(json.dumps(reply).encode() + b"\n")
                    await writer.drain()
                    break
                if line.strip():
                    await self._answer(writer, line)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            if task is not None:
                self._clients.discard(task)

    async def _answer(self, writer: asyncio.StreamWriter, line: bytes) -> None:
        writer.write(json.dumps(await self.handle(line)).encode() + b"\n")
        await writer.drain()

    async def handle(self, line: bytes) -> dict[str, Any]:
        """The reply to one request line."""
        ident: Any = None
        try:
            try:
                request = json.loads(line)
            except (ValueError, UnicodeDecodeError) as e:
                raise CommandError("ParseError", f"the request is not JSON: {e}") from None
            if not isinstance(request, dict):
                raise CommandError("InvalidRequest", "the request must be a JSON object")
            ident = request.get("id")
            unknown = sorted(set(request) - {"id", "command", "arguments"})
            if unknown:
                raise CommandError("InvalidRequest", f"unknown member {unknown[0]!r} in the request")
            command = request.get("command")
            if not isinstance(command, str):
                raise CommandError("InvalidRequest", "the request has no \"command\" string")
            args = request.get("arguments", {})
            if not isinstance(args, dict):
                raise CommandError("InvalidRequest", "\"arguments\" must be an object")
            handler = self.commands.get(command)
            if handler is None:
                known = ", ".join(self.commands)
                raise CommandError("CommandNotFound", f"unknown command {command!r} (known: {known})")
            result = handler(args)
            if asyncio.iscoroutine(result):
                result = await result
            return {"id": ident, "return": result}
        except CommandError as e:
            return {"id": ident, "error": {"class": e.cls, "message": str(e)}}
        except PrlNbdError as e:
            return {"id": ident, "error": {"class": "Failed", "message": str(e)}}
        except OSError as e:  # storage refused (disk full, I/O error): the command failed, said in one line
            where = f"{e.filename}: " if e.filename else ""
            return {"id": ident, "error": {"class": "Failed", "message": f"{where}{e.strerror or e}"}}
        except Exception as e:  # the boundary: a bug fails one request, never the server
            log.exception("control request failed")
            return {"id": ident, "error": {"class": "Failed", "message": f"internal error: {e}"}}

    # ---- commands

    def query(self, args: dict[str, Any]) -> dict[str, Any]:
        """query: the exports, their disks, layers and bitmaps, and the connections."""
        _arguments(args, {}, {})
        exports = []
        for name, export in self.server.exports.items():
            disk = export.disk
            exports.append(
                {
                    "name": name,
                    "size": disk.size,
                    "read-only": export.read_only,
                    "disk": str(disk.path),
                    "layers": [
                        {"guid": guid or None, "file": str(layer.path), "kind": getattr(layer, "kind", "?")}
                        for guid, layer in zip(disk.guids, disk.layers, strict=True)
                    ],
                    "bitmaps": [_bitmap_dict(bm) for bm in export.bitmaps.values()],
                    "clients": sum(1 for c in self.server.connections if c.export is export),
                }
            )
        connections = [
            {"peer": c.peer, "export": c.export.name if c.export is not None else None, "requests": c.requests}
            for c in self.server.connections
        ]
        return {"exports": exports, "connections": connections, "operations": online.progress(self.server)}

    def bitmap(self, args: dict[str, Any]) -> dict[str, Any]:
        """bitmap: add, remove or clear a dirty bitmap of a served export's top image."""
        _arguments(args, {"export": str, "action": str}, {"name": str, "granularity": int})
        export = self._export(args["export"])
        action = args["action"]
        name = args.get("name")
        if action == "add":
            granularity = args.get("granularity", DEFAULT_GRANULARITY)
            bm = export.add_bitmap(name, granularity)
        elif action in ("remove", "clear"):
            if "granularity" in args:
                raise CommandError("InvalidArguments", f"argument 'granularity' is for add, not {action}")
            if name is None:
                raise CommandError("InvalidArguments", f"argument 'name' is missing (needed by {action})")
            bm = export.remove_bitmap(name) if action == "remove" else export.clear_bitmap(name)
        else:
            raise CommandError("InvalidArguments", f"argument 'action' must be add, remove or clear, not {action!r}")
        log.info("control: bitmap %s %s on export %r", action, bm.name, export.name)
        return _bitmap_dict(bm)

    async def snapshot(self, args: dict[str, Any]) -> dict[str, Any]:
        """snapshot: freeze the served disk's top under a new snapshot; writes go on into a new top."""
        _arguments(args, {"export": str}, {})
        return await online.snapshot(self.server, self._export(args["export"]))

    async def export_snapshot(self, args: dict[str, Any]) -> dict[str, Any]:
        """export-snapshot: serve the disk as it was at a snapshot, read-only, as a new export."""
        _arguments(args, {"export": str, "guid": str}, {"name": str})
        new = await online.export_snapshot(
            self.server,
            self._export(args["export"]),
            args["guid"],
            args.get("name"),
            allow_outside_bundle=self.server.allow_outside_bundle,
        )
        return {"name": new.name, "guid": new.disk.guids[0], "size": new.disk.size, "contexts": list(new.info.contexts)}

    async def remove_export(self, args: dict[str, Any]) -> dict[str, Any]:
        """remove-export: stop serving an export (refused while it has clients, unless force)."""
        _arguments(args, {"name": str}, {"force": bool})
        return await online.remove_export(self.server, args["name"], force=args.get("force", False))

    async def merge(self, args: dict[str, Any]) -> dict[str, Any]:
        """merge: remove a snapshot from a served disk's chain while it is served (progress in query)."""
        _arguments(args, {"export": str, "guid": str}, {})
        return await online.merge(self.server, self._export(args["export"]), args["guid"])

    def _export(self, name: str) -> Export:
        export = self.server.exports.get(name)
        if export is None:
            raise CommandError("Failed", f"no export named {name!r} (exports: {', '.join(self.server.exports)})")
        return export
