"""Changes to a disk while it is served: snapshot, a snapshot's own export, removing an export, merge.

Each runs on the server's event loop (for the control socket) and hands what
may wait on storage to the server's I/O pool. The chain changes between
requests: writes are held for as long as it takes to freeze the old top and
name the new one in DiskDescriptor.xml (Export.writes_paused), reads never
stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from prlnbd.disk.chain import Disk, Layer, open_chain, open_disk
from prlnbd.disk.descriptor import Descriptor, new_guid, normalize_guid, parse_descriptor
from prlnbd.disk.merge import (
    MergeCopy,
    MergePlan,
    begin_merge,
    commit_merge,
    merge_kill_hook,
    move_bitmaps,
    plan_merge,
    read_journal,
)
from prlnbd.disk.tools import make_top_image, new_top_paths, record_snapshot
from prlnbd.errors import PrlNbdError
from prlnbd.export import Export
from prlnbd.image.extension import Extension
from prlnbd.image.parallels import ParallelsImage
from prlnbd.killpoints import KillPoints

if TYPE_CHECKING:
    from prlnbd.server import NbdServer

log = logging.getLogger(__name__)
T = TypeVar("T")


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
def _changing(server: NbdServer, export: Export, what: str, guid: str = "") -> Iterator[Busy]:
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


def _refuse_merging(server: NbdServer, guid: str) -> None:
    """Refuse to serve snapshot GUID while a merge removes it: merging up writes its child's bytes
    into its file, which that state never held, and either way the snapshot is going."""
    for name, busy in _busy(server).items():
        if busy.what == "merge" and busy.guid.lower() == guid.lower():
            raise PrlNbdError(f"snapshot {guid} is being merged away through export {name!r}: it cannot be served")


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
    The new top images are made and synced first. Then flushes are held (none
    may claim durability until the descriptor names the new tops), writes are
    held only while those in flight end and the layers are swapped, and go on
    into the new tops. Then the old tops are stored as a clean stop would (BAT,
    bitmaps, in_use) and synced, and the descriptor names the new tops
    (atomically). A crash before that leaves the disk as it was (writes since
    the swap were not yet durable), after it the disk with the snapshot. The
    dirty bitmaps go on tracking changes in the new tops.
    """
    if export.read_only:
        raise PrlNbdError(f"export {export.name!r} is read-only: it has no top to freeze")
    if export.failed is not None:
        raise PrlNbdError(f"export {export.name!r}: {export.failed}")
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
        olds = [part.top for part in parts]
        if not all(isinstance(top, ParallelsImage) and top.writable for top in olds):
            raise PrlNbdError(f"export {export.name!r}: a plain (raw) top image cannot be frozen while served")
        guid = new_guid()
        paths = new_top_paths(desc, guid)
        # Most of what is dirty goes to storage now: the old tops' seal then syncs little.
        await export.flush(run)
        made: list[Path] = []
        new_tops: list[ParallelsImage] = []
        try:
            for part, path in zip(parts, paths, strict=True):
                top = part.top
                assert isinstance(top, ParallelsImage)
                # Copies taken on the loop: the bitmaps do not change under the worker.
                copies = [b.copy() for b in top.extension.bitmaps] if top.extension is not None else []
                made.append(path)
                await run(make_top_image, path, part.size, top.cluster_size, copies)
                new_tops.append(await run(partial(ParallelsImage.open, writable=True), path))
        except BaseException:
            for img in new_tops:
                with contextlib.suppress(Exception):
                    img.close()
            for path in made:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise
        # Crash tests: PRLNBD_ONLINE_KILL_AT=N kills the server at step N: 1 new tops made, 2 layers swapped
        # (writes go to the new tops), 3 old tops sealed, 4 descriptor saved.
        kill = KillPoints("PRLNBD_ONLINE_KILL_AT")
        kill()
        # From here the snapshot runs to its end even if the control connection goes (a stop):
        # once writes went to the new tops, only the saved descriptor makes them durable.
        paused = await _to_the_end(_switch(server, export, olds, new_tops, desc, guid, paths, kill))
    frozen = disk.guids[1]
    log.info(
        "control: export %r: snapshot %s frozen, new top %s (writes held %.2f ms)",
        export.name,
        frozen,
        guid,
        paused * 1000,
    )
    return {"frozen": frozen, "top": guid, "paused-ms": round(paused * 1000, 3)}


async def _switch(
    server: NbdServer,
    export: Export,
    olds: list[Layer],
    new_tops: list[ParallelsImage],
    desc: Descriptor,
    guid: str,
    paths: list[Path],
    kill: Callable[[], None],
) -> float:
    """The snapshot's switch to the new tops (see snapshot()); returns how long writes were held, in seconds."""
    disk = export.disk
    async with export.flushes_held():
        started = time.monotonic()
        async with export.writes_paused():
            for old, new in zip(olds, new_tops, strict=True):
                assert isinstance(old, ParallelsImage)
                _hand_over_bitmaps(old, new)
            disk.push_top(list(new_tops), guid)
            export.chain_changed()
        paused = time.monotonic() - started
        kill()
        try:
            await server.pool.run(_seal_and_record, olds, desc, guid, paths, kill)
        except BaseException as e:
            # The new tops take writes already: the disk is served as it is, but no flush may
            # claim durability for what the descriptor does not name.
            export.failed = f"the snapshot {guid} could not be recorded ({e}): writes are not durable"
            log.error("export %r: %s", export.name, export.failed)
            raise
    return paused


async def _to_the_end(coro: Coroutine[Any, Any, T]) -> T:
    """Await CORO to its end even when the caller is cancelled meanwhile; then pass the cancellation on."""
    task = asyncio.ensure_future(coro)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                break
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return task.result()


def _hand_over_bitmaps(old: ParallelsImage, new: ParallelsImage) -> None:
    """The dirty bitmaps the export marks move on to NEW (the new top); OLD keeps copies, stored when sealed."""
    live = list(old.extension.bitmaps) if old.extension is not None else []
    if not live:
        return
    assert old.extension is not None
    old.extension.bitmaps = [b.copy() for b in live]
    stored = {b.id: b for b in new.extension.bitmaps} if new.extension is not None else {}
    for bm in live:
        # What the new top's file holds for it (all dirty until a clean stop), never the old top's
        # clusters: a later open frees what these entries name.
        bm.l1 = stored[bm.id].l1 if bm.id in stored else []
    if new.extension is None:
        new.extension = Extension(offset=0)
    new.extension.bitmaps = live


def _seal_and_record(
    olds: list[Layer], desc: Descriptor, guid: str, paths: list[Path], kill: Callable[[], None]
) -> None:
    """Store the old tops as a clean stop would and sync them, then name the new tops in the descriptor.

    For a worker thread, with flushes held; the old tops take no writes any more.
    """
    for old in olds:
        assert isinstance(old, ParallelsImage)
        old.seal()
    kill()
    record_snapshot(desc, guid, paths)
    kill()


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
    _refuse_merging(server, key)
    name = name if name is not None else f"{export.name}@{key.strip('{}').lower()}"
    if not name or len(name.encode()) > 4096:
        raise PrlNbdError("an export name must be 1 to 4096 bytes")
    if name in server.exports:
        raise PrlNbdError(f"an export named {name!r} exists already")
    disk = await server.pool.run(
        lambda: open_disk(dpath, writable=False, snapshot=key, allow_outside_bundle=allow_outside_bundle)
    )
    try:
        _refuse_merging(server, key)  # again: a merge may have begun while the disk was opened
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
    removed, clients = await server.remove_export(name, force=force)
    await server.pool.run(removed.close)
    log.info("control: export %r removed%s", name, f" ({clients} clients disconnected)" if clients else "")
    return {"name": name, "disconnected": clients}


# ---- merge

# Bytes one pool job of an online merge copies: the merge yields to requests between jobs.
MERGE_STEP = 4 << 20


async def merge(server: NbdServer, export: Export, guid: str) -> dict[str, Any]:
    """Merge snapshot GUID away from the chain of the served EXPORT (see prlnbd.disk.merge).

    The copy runs a step at a time in the I/O pool beside the clients'
    requests. Into the top ("down" with the top as child) it goes through the
    served disk's own allocation, so guest writes to the same clusters are
    ordered with it; otherwise it writes a frozen image opened apart, whose
    clusters no reader of a remaining state sees. Then the descriptor is
    committed through the journal and the served chain drops the layer.
    Progress is in `query` meanwhile.
    """
    if export.read_only:
        raise PrlNbdError(f"export {export.name!r} is read-only: merge through the export that writes the disk")
    dpath = _descriptor_of(export, "a merge")
    run = server.pool.run
    disk = export.disk
    key = normalize_guid(guid)
    with _changing(server, export, "merge", key) as state:
        desc: Descriptor = await run(partial(parse_descriptor, allow_outside=server.allow_outside_bundle), dpath)
        if await run(read_journal, dpath) is not None:
            raise PrlNbdError(f"{dpath}: an interrupted merge left its journal; finish it offline with `prlnbd merge`")
        plan: MergePlan = await run(partial(plan_merge, online=True), desc, key)
        guids = [g.lower() for g in disk.guids]
        if plan.guid.lower() not in guids or guids.index(plan.guid.lower()) == 0:
            raise PrlNbdError(f"export {export.name!r}: snapshot {plan.guid} is not below its top")
        index = guids.index(plan.guid.lower())
        for other in server.exports.values():
            if other is not export and other.disk.guids and other.disk.guids[0].lower() == plan.guid.lower():
                raise PrlNbdError(
                    f"export {other.name!r} serves snapshot {plan.guid}: remove it first (`prlnbd ctl PATH"
                    f" remove-export {other.name}`)"
                )
        into_top = plan.direction == "down" and plan.child_is_top
        state.total = plan.bytes
        hook = merge_kill_hook()  # the crash tests' SIGKILL at a chosen step, as offline
        await run(partial(begin_merge, hook=hook), plan)
        opened: list[Disk] = []
        try:
            for part, live in zip(plan.parts, disk.parts, strict=True):
                if into_top:
                    target, source = live, live.layers[index]
                else:
                    target = await run(partial(open_chain, desc, part.target_chain, writable=True, piece=part.piece))
                    opened.append(target)
                    # "down" into a frozen child reads the merged image under it; "up" reads the child.
                    source = target.layers[1] if plan.direction == "down" else live.layers[index - 1]
                copier = MergeCopy(plan, target, source, hook=hook)
                state.total = max(state.total, state.done + copier.total)
                while n := await run(copier.step, MERGE_STEP):
                    state.done += n
                if into_top:
                    await export.flush(run)  # one flush at a time on the served top
                else:
                    await run(copier.finish)
                    await run(move_bitmaps, plan, target, source)
            for target in opened:
                await run(target.close)  # the clean stop of the written image
            opened = []
            deleted: list[Path] = await run(partial(commit_merge, hook=hook), plan)
        finally:
            for target in opened:
                with contextlib.suppress(Exception):
                    await run(target.close)
        # The served chain drops the layer; what it reads does not change.
        if into_top:
            disk.replace_layers(index, 1, [], [])
        else:
            fresh = [await run(ParallelsImage.open, part.target.file) for part in plan.parts]
            disk.replace_layers(index - 1, 2, list(fresh), [plan.child])
        export.chain_changed()
        # The layers taken out are closed in the pool: the last close of a deleted file frees its storage.
        await run(disk.close_retired)
    log.info(
        "control: export %r: snapshot %s merged %s (%d bytes moved)", export.name, plan.guid, plan.direction, state.done
    )
    return {
        "guid": plan.guid,
        "child": plan.child,
        "direction": plan.direction,
        "bytes-moved": state.done,
        "deleted": [str(p) for p in deleted],
    }
