"""Changes to a disk while it is served: snapshot, a snapshot's own export, removing an export.

Each runs on the server's event loop (for the control socket) and hands what
may wait on storage to the server's I/O pool. The chain changes between
requests: writes are held for as long as it takes to freeze the old top and
name the new one in DiskDescriptor.xml (Export.writes_paused), reads never
stop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prlnbd.disk.chain import Disk, open_disk
from prlnbd.disk.descriptor import Descriptor, new_guid, normalize_guid, parse_descriptor
from prlnbd.disk.tools import make_top_image, new_top_paths, record_snapshot
from prlnbd.errors import PrlNbdError
from prlnbd.export import Export
from prlnbd.image.extension import DirtyBitmap, Extension
from prlnbd.image.parallels import ParallelsImage

if TYPE_CHECKING:
    from prlnbd.server import NbdServer

log = logging.getLogger(__name__)


def _crash_point(step: int) -> None:
    """Test hook: PRLNBD_ONLINE_KILL_AT=STEP kills the server with SIGKILL at that step of a snapshot:
    1 new tops made, 2 old tops sealed, 3 descriptor saved."""
    if os.environ.get("PRLNBD_ONLINE_KILL_AT") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Busy:
    """A change in progress on an export: one at a time."""

    what: str
    guid: str = ""
    done: int = 0
    total: int = 0


def _busy(server: NbdServer) -> dict[str, Busy]:
    busy: dict[str, Busy] = server.changing
    return busy


@contextlib.contextmanager
def _changing(server: NbdServer, export: Export, what: str, guid: str = "") -> Any:
    """Mark EXPORT as being changed by WHAT; refuse a second change at once."""
    busy = _busy(server)
    now = busy.get(export.name)
    if now is not None:
        raise PrlNbdError(f"export {export.name!r} is busy: a {now.what} is in progress; try again when it ends")
    state = busy[export.name] = Busy(what, guid)
    try:
        yield state
    finally:
        del busy[export.name]


def progress(server: NbdServer) -> list[dict[str, Any]]:
    """The changes in progress, for `query`."""
    return [
        {"export": name, "operation": b.what, "guid": b.guid or None, "done": b.done, "total": b.total}
        for name, b in _busy(server).items()
    ]


def _descriptor_of(export: Export, what: str) -> Path:
    disk = export.disk
    desc = disk.descriptor
    if desc is None:
        raise PrlNbdError(
            f"export {export.name!r} serves a single image ({disk.path}): {what} needs a bundle with a"
            " DiskDescriptor.xml"
        )
    return desc.path


# ---- snapshot


async def snapshot(server: NbdServer, export: Export) -> dict[str, Any]:
    """Freeze the served disk's top under a new snapshot and go on writing into a new empty top.

    Returns the frozen GUID, the new top's GUID and how long writes were held.
    The new top images are made and synced before writes are held; during the
    pause the old tops are stored as a clean stop would (BAT, bitmaps, in_use),
    then the descriptor names the new tops (atomically): a crash before that
    leaves the disk as it was, after it the disk with the snapshot. The dirty
    bitmaps go on tracking changes in the new top.
    """
    if export.read_only:
        raise PrlNbdError(f"export {export.name!r} is read-only: it has no top to freeze")
    dpath = _descriptor_of(export, "a snapshot")
    run = server.pool.run
    disk = export.disk
    with _changing(server, export, "snapshot"):
        desc: Descriptor = await run(partial(parse_descriptor, allow_outside=server.allow_outside_bundle), dpath)
        if desc.top_guid != disk.guids[0]:
            raise PrlNbdError(
                f"{dpath}: names {desc.top_guid} as the top, but the server writes {disk.guids[0]}: the descriptor"
                " was changed under the server"
            )
        parts = disk.parts
        tops = [part.top for part in parts]
        if not all(isinstance(top, ParallelsImage) and top.writable for top in tops):
            raise PrlNbdError(f"export {export.name!r}: a plain (raw) top image cannot be frozen while served")
        guid = new_guid()
        paths = new_top_paths(desc, guid)
        # Most of what is dirty goes to storage before writes are held: the pause then syncs little.
        await export.flush(run)
        made: list[Path] = []
        new_tops: list[ParallelsImage] = []
        recorded = False
        try:
            for part, path in zip(parts, paths, strict=True):
                top = part.top
                assert isinstance(top, ParallelsImage)
                bitmaps = list(top.extension.bitmaps) if top.extension is not None else []
                # Copies made now, on the loop: the bitmaps do not change under the worker.
                copies = [b.copy() for b in bitmaps]
                made.append(path)
                await run(make_top_image, path, part.size, top.cluster_size, copies)
                new_tops.append(await run(partial(ParallelsImage.open, writable=True), path))
            _crash_point(1)
            started = time.monotonic()
            async with export.writes_paused():
                await run(_freeze, parts, new_tops, desc, guid, paths)
                recorded = True
                disk.push_top(list(new_tops), guid)
                export.chain_changed()
            paused = time.monotonic() - started
        except BaseException:
            if not recorded:
                for img in new_tops:
                    with contextlib.suppress(Exception):
                        img.close()
                for path in made:
                    with contextlib.suppress(OSError):
                        os.unlink(path)
            raise
    frozen = disk.guids[1]
    log.info(
        "control: export %r: snapshot %s frozen, new top %s (writes held %.1f ms)",
        export.name,
        frozen,
        guid,
        paused * 1000,
    )
    return {"frozen": frozen, "top": guid, "paused-ms": round(paused * 1000, 3)}


def _freeze(parts: list[Disk], new_tops: list[ParallelsImage], desc: Descriptor, guid: str, paths: list[Path]) -> None:
    """With writes held: hand the live bitmaps to the new tops, seal the old ones, then name the new ones.

    For a worker thread. When it fails before the descriptor is saved, the old tops take writes again.
    """
    sealed: list[tuple[ParallelsImage, list[DirtyBitmap]]] = []
    try:
        for part, new in zip(parts, new_tops, strict=True):
            old = part.top
            assert isinstance(old, ParallelsImage)
            live = list(old.extension.bitmaps) if old.extension is not None else []
            if old.extension is not None:
                # The frozen layer stores copies; the objects the export marks move on to the new top.
                old.extension.bitmaps = [b.copy() for b in live]
            part.seal_top()
            sealed.append((old, live))
            _crash_point(2)
            if live:
                stored = {b.id: b for b in new.extension.bitmaps} if new.extension is not None else {}
                for bm in live:
                    # What the new top's file holds for it (all dirty until a clean stop), never the old
                    # top's clusters: a later open frees what these entries name.
                    bm.l1 = stored[bm.id].l1 if bm.id in stored else []
                if new.extension is None:
                    new.extension = Extension(offset=0)
                new.extension.bitmaps = live
        record_snapshot(desc, guid, paths)
        _crash_point(3)
    except BaseException:
        for old, live in sealed:
            try:
                old.unseal()
                if old.extension is not None:
                    old.extension.bitmaps = live
            except Exception:
                log.exception("%s: could not take writes again after a failed snapshot", old.path)
        raise


# ---- a snapshot's own export


async def export_snapshot(
    server: NbdServer, export: Export, guid: str, name: str | None = None, *, allow_outside_bundle: bool = False
) -> Export:
    """Serve the disk of EXPORT as it was at snapshot GUID, read-only, as a new export (default EXPORT@GUID).

    It offers the same contexts as any export: base:allocation, allocation
    depth, the dirty bitmaps the snapshot stored, and since-GUID for every
    older snapshot.
    """
    dpath = _descriptor_of(export, "a snapshot's export")
    key = normalize_guid(guid)
    guids = [g.lower() for g in export.disk.guids]
    if key.lower() == guids[0] and not export.read_only:
        raise PrlNbdError(f"{key} is the top of export {export.name!r}, being written: take a snapshot first")
    if key.lower() not in guids:
        known = ", ".join(export.disk.guids[1:]) or "none"
        raise PrlNbdError(f"export {export.name!r} has no snapshot {key} (its snapshots: {known})")
    name = name if name is not None else f"{export.name}@{key.strip('{}').lower()}"
    if not name or len(name.encode()) > 4096:
        raise PrlNbdError("an export name must be 1 to 4096 bytes")
    if name in server.exports:
        raise PrlNbdError(f"an export named {name!r} exists already")
    disk = await server.pool.run(
        lambda: open_disk(dpath, writable=False, snapshot=key, allow_outside_bundle=allow_outside_bundle)
    )
    try:
        new = Export(name, disk, read_only=True, cache=export.cache if export.cache != "unsafe" else "writeback")
        server.add_export(new)
    except BaseException:
        disk.close()
        raise
    log.info("control: export %r serves snapshot %s of export %r", name, key, export.name)
    return new


async def remove_export(server: NbdServer, name: str, *, force: bool = False) -> dict[str, Any]:
    """Stop serving export NAME and close its disk (a clean stop for a writable one)."""
    export = server.exports.get(name)
    if export is not None and export.name in _busy(server):
        raise PrlNbdError(f"export {name!r} is busy: a {_busy(server)[name].what} is in progress")
    clients = sum(1 for c in server.connections if c.export is export) if export is not None else 0
    removed = await server.remove_export(name, force=force)
    await server.pool.run(removed.close)
    log.info("control: export %r removed%s", name, f" ({clients} clients disconnected)" if clients else "")
    return {"name": name, "disconnected": clients}
