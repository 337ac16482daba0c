"""Snapshot merge: remove one frozen layer from a bundle's chain, keeping what every remaining state reads.

The engine comes in steps a running server can drive from worker threads:
plan_merge() decides, MergeCopy copies (step by step, idempotent), and
commit_merge() changes DiskDescriptor.xml crash-safely through a journal.
merge_disk() is the offline whole (`prlnbd merge DISK GUID`), holding the
top image with a writer's lock for the whole merge.

Two directions:
- "down": the clusters of GUID that its child does not hide are pulled into the
  child (copy-on-write from the layers below, so the child reads the same), then
  GUID leaves the descriptor and its file is deleted.
- "up": the child's clusters are written into GUID's file (the child hides them,
  so nothing remaining reads differently), then GUID's file takes the child's
  GUID and the child's old file is deleted.
Only the layer that stops being a separate state is ever written.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lxml import etree

from prlnbd.disk.chain import Disk, Layer, open_chain
from prlnbd.disk.descriptor import (
    DESCRIPTOR_NAME,
    Descriptor,
    ImageEntry,
    Piece,
    descriptor_path,
    fsync_directory,
    normalize_guid,
    parse_descriptor,
    save_descriptor,
)
from prlnbd.errors import DescriptorError, ImageBusy, ImageError, ImageLocked
from prlnbd.image.check import check_image
from prlnbd.image.extension import Extension, feature_space, kept_features
from prlnbd.image.locking import Holder
from prlnbd.image.parallels import ParallelsImage, open_file
from prlnbd.killpoints import KillPoints, no_kill

JOURNAL_NAME = ".prlnbd-merge.json"
JOURNAL_VERSION = 1
# Bytes copied between two syncs of the target offline: a crash loses at most this much progress.
SYNC_EVERY = 64 << 20
# Bytes one step() of the offline merge copies (one progress update).
STEP_BYTES = 8 << 20

Direction = Literal["down", "up"]


# ---------------------------------------------------------------- plan


@dataclass(frozen=True)
class MergePart:
    """What a merge does in one piece of the disk (the only one unless the disk is split).

    target is the image written, opened on target_chain (target first, down to the
    root); source the image read; delete the file removed once the descriptor no
    longer names it.
    """

    piece: Piece | None
    target: ImageEntry
    source: ImageEntry
    delete: Path
    target_chain: list[ImageEntry]


@dataclass
class MergePlan:
    """A checked merge of snapshot guid into the chain: its direction, the images it touches, the bytes it moves."""

    descriptor: Descriptor
    guid: str  # the snapshot removed
    child: str  # the snapshot whose parent guid is
    parent: str  # guid's parent (ZERO_GUID when guid is the root)
    direction: Direction
    parts: list[MergePart]
    down_bytes: int  # bytes "down" would write into the child
    up_bytes: int  # bytes "up" would write into guid's image
    child_is_top: bool

    @property
    def bytes(self) -> int:
        """The estimated bytes the chosen direction moves."""
        return self.down_bytes if self.direction == "down" else self.up_bytes

    @property
    def target(self) -> ImageEntry:
        """The image written (of the first piece)."""
        return self.parts[0].target

    @property
    def source(self) -> ImageEntry:
        """The image read (of the first piece)."""
        return self.parts[0].source

    @property
    def delete(self) -> list[Path]:
        """The files deleted at the end, one per piece."""
        return [part.delete for part in self.parts]


def _children(desc: Descriptor, guid: str) -> list[str]:
    return [g for g, parent in desc.parents.items() if parent == guid]


def plan_merge(
    desc: Descriptor, guid: str, *, online: bool = False, direction: Direction | None = None
) -> MergePlan:
    """Check that snapshot GUID can be merged away from DESC's chain and choose the direction.

    GUID must be a snapshot of the top's chain other than the top, with exactly
    one child; GUID and its child must be expandable (Compressed) images. The
    direction moving fewer bytes is chosen ("down" on a tie: nothing but data
    moves). ONLINE: the top is being written, so "up" into the top's parent is
    never chosen. DIRECTION forces one (an interrupted merge goes on the way it
    started). Opens the two images read-only to count their clusters.
    """
    g = normalize_guid(guid)
    where = desc.path
    if g not in desc.parents:
        raise DescriptorError(f"{where}: snapshot {g} is not in Snapshots")
    if g == desc.top_guid:
        raise DescriptorError(
            f"{where}: snapshot {g} is the top (TopGUID), the image being written; only a frozen snapshot is merged"
        )
    chain = desc._guids(None)
    if g not in chain:
        raise DescriptorError(f"{where}: snapshot {g} is not in the chain of the top {desc.top_guid}")
    kids = _children(desc, g)
    if len(kids) != 1:
        raise DescriptorError(
            f"{where}: snapshot {g} has {len(kids)} children ({', '.join(kids)}); only a snapshot with one child"
            " is merged"
        )
    child = kids[0]
    parent = desc.parents[g]
    pieces: list[Piece | None] = list(desc.pieces) if desc.split else [None]
    chains = desc.piece_chains()
    down = up = 0
    drafts: list[tuple[Piece | None, ImageEntry, ImageEntry, list[ImageEntry]]] = []
    for piece, top_chain in zip(pieces, chains, strict=True):
        images = piece.images if piece is not None else desc.images
        mine, kid = images[g], images[child]
        for entry, role in ((mine, "merged"), (kid, "its child")):
            if entry.type != "Compressed":
                raise DescriptorError(
                    f"{where}: image {entry.guid} ({entry.file.name}, {role}) is {entry.type}: a plain (raw)"
                    " layer cannot be merged"
                )
        at = next(i for i, e in enumerate(top_chain) if e.guid == g)
        below = top_chain[at:]  # guid's chain: guid first, down to the root
        d, u = _estimate(mine.file, kid.file)
        down += d
        up += u
        drafts.append((piece, mine, kid, below))
    child_is_top = child == desc.top_guid
    if direction is None:
        direction = "down" if down <= up or (online and child_is_top) else "up"
    elif direction == "up" and online and child_is_top:
        raise DescriptorError(f"{where}: snapshot {g} cannot be merged up into while its child, the top, is served")
    parts = []
    for piece, mine, kid, below in drafts:
        if direction == "down":
            kid_chain = [kid, *below]
            parts.append(MergePart(piece, kid, mine, mine.file, kid_chain))
        else:
            parts.append(MergePart(piece, mine, kid, kid.file, below))
    return MergePlan(desc, g, child, parent, direction, parts, down, up, child_is_top)


def _estimate(mine: Path, kid: Path) -> tuple[int, int]:
    """(bytes "down" writes into the child, bytes "up" writes into the merged image) for one piece.

    "down" fills whole child clusters where the merged image has data the child
    does not hide; "up" writes every cluster of the child.
    """
    a = ParallelsImage.open(mine)
    try:
        b = ParallelsImage.open(kid)
        try:
            cs, ks = a.cluster_size, b.cluster_size
            wanted = [(s * cs // ks, -(-(e * cs) // ks)) for s, e in a.allocated_runs(0, len(a.bat))]
            hidden = list(b.allocated_runs(0, len(b.bat)))
            pulls = sum(e - s for s, e in _minus(_union(wanted), hidden))
            size = b.size
            down = min(size, pulls * ks)
            up = sum(seg.length for seg in b.segments(0, size) if seg.host is not None)
            return down, up
        finally:
            b.close()
    finally:
        a.close()


def _union(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint union of half-open RUNS."""
    out: list[tuple[int, int]] = []
    for s, e in sorted(runs):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        elif s < e:
            out.append((s, e))
    return out


def _minus(runs: list[tuple[int, int]], cuts: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """RUNS (sorted, disjoint) less CUTS (sorted, disjoint)."""
    out: list[tuple[int, int]] = []
    k = 0
    for s, e in runs:
        pos = s
        while k < len(cuts) and cuts[k][1] <= pos:
            k += 1
        j = k
        while j < len(cuts) and cuts[j][0] < e:
            if cuts[j][0] > pos:
                out.append((pos, cuts[j][0]))
            pos = max(pos, cuts[j][1])
            j += 1
        if pos < e:
            out.append((pos, e))
    return out


# ---------------------------------------------------------------- copy


class MergeCopy:
    """The data half of a merge in one piece: copy step by step into TARGET, a Disk open on the part's target_chain.

    "down": TARGET's top is the child and SOURCE (= TARGET.layers[1]) the merged
    image: every child cluster through which the merged image's data shows is
    filled with what it shows, under the Disk's allocation lock, and only when
    the child does not hold it yet, so guest writes to the child may run at the
    same time (online). "up": TARGET's top is the merged image and SOURCE the
    child, opened apart: each of the child's data runs is written into it.
    step() and finish() block: for a worker thread. Copying again after a crash
    is correct: the same data is written again, or nothing is left to pull.

    Online, "down" into the served top: TARGET is the served Disk itself and
    SOURCE its layers[1]; a pull changes no guest byte, so no dirty bitmap is
    marked. The server makes the copy durable as it flushes (begin_flush on
    its loop thread, flush_io in a worker, end_flush), rather than through
    sync()/finish(), which run all three in the calling thread.
    """

    def __init__(
        self, plan: MergePlan, target: Disk, source: Layer, *, hook: Callable[[], None] | None = None
    ) -> None:
        self.plan = plan
        self.target = target
        self.source = source
        self.done = 0
        self._hook = hook or no_kill
        top = target.top
        if not isinstance(top, ParallelsImage) or not top.writable:
            raise ImageError(f"{top.path}: the merge target must be an expandable image open for writing")
        self._top = top
        # Work list: ("down") runs of child clusters to pull, or ("up") (offset, length, host) of the child's data.
        self._pulls: list[tuple[int, int]] = []
        self._runs: list[tuple[int, int, int]] = []
        if plan.direction == "down":
            if len(target.layers) < 2 or target.layers[1] is not source:
                raise ImageError(f"{top.path}: merging down needs the merged image right below the child")
            cs = top.cluster_size
            wanted = [
                (r.offset // cs, -(-(r.offset + r.length) // cs))
                for r in target.map(0, target.size)
                if r.layer is source
            ]
            self._pulls = _union(wanted)
            self.total = min(target.size, sum(e - s for s, e in self._pulls) * cs)
        else:
            if not isinstance(source, ParallelsImage):
                raise ImageError(f"{source.path}: merging up reads an expandable image")
            self._runs = [(s.offset, s.length, s.host) for s in source.segments(0, target.size) if s.host is not None]
            self.total = sum(n for _, n, _ in self._runs)
        self._cursor = 0  # index into the work list
        self._within = 0  # clusters (down) or bytes (up) of the current item already done

    def step(self, max_bytes: int = STEP_BYTES) -> int:
        """Copy the next runs, about MAX_BYTES (at least one cluster); return the bytes copied, 0 when done."""
        n = self._step_down(max_bytes) if self.plan.direction == "down" else self._step_up(max_bytes)
        self.done += n
        return n

    def _step_down(self, max_bytes: int) -> int:
        top = self._top
        cs = top.cluster_size
        copied = 0
        while self._cursor < len(self._pulls) and (copied == 0 or copied + cs <= max_bytes):
            first, end = self._pulls[self._cursor]
            cluster = first + self._within
            self._hook()
            self.target.pull_cluster(cluster)
            copied += min(cs, self.target.size - cluster * cs)
            self._within += 1
            if cluster + 1 >= end:
                self._cursor += 1
                self._within = 0
        return copied

    def _step_up(self, max_bytes: int) -> int:
        cs = self._top.cluster_size
        copied = 0
        while self._cursor < len(self._runs) and copied < max_bytes:
            offset, length, host = self._runs[self._cursor]
            at = offset + self._within
            # One target cluster per write: a crash (or the kill hook) falls between clusters.
            n = min(length - self._within, cs - at % cs)
            data = _pread(self.source.fd, n, host + self._within, self.source.path)
            self._hook()
            self.target.write(at, data)
            copied += n
            self._within += n
            if self._within >= length:
                self._cursor += 1
                self._within = 0
        return copied

    def sync(self) -> None:
        """Make what was copied so far durable: data, then the BAT entries mapping it."""
        self._hook()
        token = self.target.begin_flush()
        try:
            self.target.flush_io(token)
        except BaseException:
            self.target.end_flush(token, False)
            raise
        self.target.end_flush(token, True)

    def finish(self) -> None:
        """Make the target durable once every step is done: flush, then fsync of the file."""
        self.sync()
        self._hook()
        os.fsync(self._top.fd)

    @property
    def finished(self) -> bool:
        """Whether every run has been copied."""
        return self._cursor >= (len(self._pulls) if self.plan.direction == "down" else len(self._runs))


def _pread(fd: int, length: int, offset: int, path: Path) -> bytes:
    """LENGTH bytes at OFFSET of FD; what lies past the end of the file reads as zeros."""
    data = os.pread(fd, length, offset)
    if len(data) < length:
        # A cluster cut short by the end of the file: its missing bytes read as zeros.
        data += bytes(length - len(data))
    return data


def move_bitmaps(plan: MergePlan, target: Disk, source: Layer) -> None:
    """"up": give the merged image (TARGET's top) the child's dirty bitmaps, stored at its clean close.

    The merged file takes the child's place, so it takes its bitmaps too (the
    top's, when the child is the top), as copies; bitmaps the merged image held
    as a snapshot go. Checked to fit before anything is written.
    """
    top = target.top
    if plan.direction != "up" or not isinstance(top, ParallelsImage) or not isinstance(source, ParallelsImage):
        return
    theirs = [b.copy() for b in source.extension.bitmaps] if source.extension else []
    ext = top.extension
    if ext is None:
        if theirs:
            top.extension = Extension(offset=0, bitmaps=theirs)
        return
    if feature_space(theirs, kept_features(ext), top.cluster_size) > top.cluster_size:
        raise ImageError(
            f"{top.path}: the dirty bitmaps of {source.path} do not fit in its {top.cluster_size}-byte"
            " extension cluster"
        )
    ext.bitmaps = theirs


def check_bitmaps_fit(plan: MergePlan) -> None:
    """Refuse an "up" merge whose child's bitmaps cannot be stored in the merged image, before any write."""
    if plan.direction != "up":
        return
    for part in plan.parts:
        src = ParallelsImage.open(part.source.file)
        try:
            theirs = list(src.extension.bitmaps) if src.extension else []
        finally:
            src.close()
        if not theirs:
            continue
        dst = ParallelsImage.open(part.target.file)
        try:
            kept = kept_features(dst.extension) if dst.extension else []
            if feature_space(theirs, kept, dst.cluster_size) > dst.cluster_size:
                raise ImageError(
                    f"{part.target.file}: the dirty bitmaps of {part.source.file} do not fit in its"
                    f" {dst.cluster_size}-byte extension cluster; merge {plan.guid} needs the other direction"
                )
        finally:
            dst.close()


# ---------------------------------------------------------------- journal and descriptor


def journal_path(desc_path: Path) -> Path:
    """The merge journal of the bundle whose DiskDescriptor.xml is DESC_PATH."""
    return desc_path.parent / JOURNAL_NAME


def _rel(bundle: Path, file: Path) -> str:
    """FILE as the journal names it: relative to the bundle when inside it (the bundle may move)."""
    try:
        return str(file.relative_to(bundle))
    except ValueError:
        return str(file)


def _write_journal(plan: MergePlan, phase: str, hook: Callable[[], None]) -> None:
    """Write the journal atomically and durably: temporary file, fsync, rename, fsync of the directory."""
    dpath = plan.descriptor.path
    bundle = dpath.parent
    body = {
        "version": JOURNAL_VERSION,
        "phase": phase,
        "guid": plan.guid,
        "child": plan.child,
        "parent": plan.parent,
        "direction": plan.direction,
        "targets": [_rel(bundle, p.target.file) for p in plan.parts],
        "delete": [_rel(bundle, p.delete) for p in plan.parts],
        "bytes": plan.bytes,
    }
    path = journal_path(dpath)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    hook()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, json.dumps(body, indent=2).encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_directory(bundle)


@dataclass
class Journal:
    """A merge journal found in a bundle: which merge, how far it got, which files it deletes."""

    path: Path
    phase: str
    guid: str
    child: str
    parent: str
    direction: str
    targets: list[Path]
    delete: list[Path]
    bytes: int = 0


def read_journal(desc_path: Path) -> Journal | None:
    """The merge journal next to DESC_PATH, if any; DescriptorError naming it when it cannot be read."""
    path = journal_path(desc_path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise DescriptorError(f"{path}: cannot read the merge journal: {e.strerror}") from e
    try:
        body = json.loads(raw)
        bundle = desc_path.parent
        return Journal(
            path=path,
            phase=str(body["phase"]),
            guid=normalize_guid(str(body["guid"])),
            child=normalize_guid(str(body["child"])),
            parent=normalize_guid(str(body["parent"])),
            direction=str(body["direction"]),
            targets=[bundle / str(p) for p in body["targets"]],
            delete=[bundle / str(p) for p in body["delete"]],
            bytes=int(body.get("bytes", 0)),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise DescriptorError(f"{path}: the merge journal is not valid ({e.__class__.__name__}: {e}); remove it"
                              " once no merge runs") from None


def journal_notice(desc_path: Path) -> str | None:
    """What a merge journal left in the bundle means, for `check`; None when there is none."""
    try:
        j = read_journal(desc_path)
    except DescriptorError as e:
        return str(e)
    if j is None:
        return None
    bundle = desc_path.parent
    return (
        f"an interrupted merge of snapshot {j.guid} ({j.direction}, {j.phase} phase) left {JOURNAL_NAME};"
        f" `prlnbd merge {bundle} {j.guid}` finishes it (a served disk: the server's merge)"
    )


def rewrite_descriptor(tree: etree._ElementTree, plan: MergePlan) -> etree._ElementTree:
    """A copy of TREE without snapshot plan.guid, as the merge leaves it; other bytes stay as written.

    Removes GUID's Shot and (in every Storage) its Image; the child's Shot gets
    GUID's ParentGUID (its text as written). "up": the child's Image takes GUID's
    File, since GUID's file now holds the child's state.
    """
    new = copy.deepcopy(tree)
    root = new.getroot()
    where = plan.descriptor.path
    for index, storage in enumerate(root.findall("StorageData/Storage")):
        mine = _find_by_guid(storage, "Image", plan.guid)
        kid = _find_by_guid(storage, "Image", plan.child)
        if mine is None or kid is None:
            raise DescriptorError(
                f"{where}: Storage {index} has no Image for snapshot {plan.guid if mine is None else plan.child}"
            )
        if plan.direction == "up":
            mine_file, kid_file = mine.find("File"), kid.find("File")
            if mine_file is None or kid_file is None:  # pragma: no cover - parse_descriptor checked them
                raise DescriptorError(f"{where}: Storage {index}: an Image has no File")
            kid_file.text = mine_file.text
        _remove(mine)
    snaps = root.find("Snapshots")
    shot = _find_by_guid(snaps, "Shot", plan.guid) if snaps is not None else None
    kid_shot = _find_by_guid(snaps, "Shot", plan.child) if snaps is not None else None
    if shot is None or kid_shot is None:
        raise DescriptorError(f"{where}: Snapshots has no Shot for {plan.guid if shot is None else plan.child}")
    parent_el, kid_parent = shot.find("ParentGUID"), kid_shot.find("ParentGUID")
    if parent_el is None or kid_parent is None:  # pragma: no cover - parse_descriptor checked them
        raise DescriptorError(f"{where}: a Shot has no ParentGUID")
    kid_parent.text = parent_el.text
    _remove(shot)
    return new


def _find_by_guid(parent: etree._Element, tag: str, guid: str) -> etree._Element | None:
    for el in parent.findall(tag):
        text = el.findtext("GUID")
        if text is not None and text.strip() and normalize_guid(text) == guid:
            return el
    return None


def _remove(el: etree._Element) -> None:
    """Remove EL, keeping the whitespace around its siblings as it was (the last one's tail moves up)."""
    parent = el.getparent()
    if parent is None:  # pragma: no cover - never the root
        return
    if el.getnext() is None:
        prev = el.getprevious()
        if prev is not None:
            prev.tail = el.tail
        else:
            parent.text = el.tail
    parent.remove(el)


def begin_merge(plan: MergePlan, *, hook: Callable[[], None] | None = None) -> None:
    """Record in the bundle's journal that the copy of PLAN starts (before its first write).

    A later `prlnbd merge` of the same GUID then knows that the target images
    may have been left open (in_use) by this merge and repairs them first.
    """
    _write_journal(plan, "copy", hook or no_kill)


def commit_merge(plan: MergePlan, *, hook: Callable[[], None] | None = None) -> list[Path]:
    """Change the descriptor after a finished copy, crash-safely; return the files deleted.

    The journal (phase "commit", fsynced) names the files to delete; then the new
    descriptor is saved atomically; then the removed files are deleted; then the
    journal. The descriptor is read again first and must still hold GUID between
    the child and the parent (a snapshot taken meanwhile is kept).
    """
    step = hook or no_kill
    dpath = plan.descriptor.path
    current = parse_descriptor(dpath, allow_outside=plan.descriptor.allow_outside)
    if current.parents.get(plan.guid) != plan.parent or current.parents.get(plan.child) != plan.guid:
        raise DescriptorError(
            f"{dpath}: the snapshot tree changed during the merge of {plan.guid}: not committed"
        )
    if _children(current, plan.guid) != [plan.child]:
        raise DescriptorError(f"{dpath}: snapshot {plan.guid} got another child during the merge: not committed")
    tree = rewrite_descriptor(current.tree, plan)
    _write_journal(plan, "commit", step)
    step()
    save_descriptor(tree, dpath)
    return _finish_commit(dpath, plan.delete, step)


def _finish_commit(dpath: Path, files: list[Path], step: Callable[[], None]) -> list[Path]:
    """Delete FILES the descriptor no longer names, then the journal; return the files deleted."""
    desc = parse_descriptor(dpath, allow_outside=True)
    named = {e.file for piece in desc.pieces for e in piece.images.values()} | {e.file for e in desc.images.values()}
    deleted = []
    for f in files:
        if f in named:
            raise DescriptorError(f"{dpath}: still names {f}, which the merge deletes: left in place")
        if os.path.lexists(f):
            step()
            f.unlink()
            deleted.append(f)
    step()
    fsync_directory(dpath.parent)
    step()
    with contextlib.suppress(FileNotFoundError):
        journal_path(dpath).unlink()
    fsync_directory(dpath.parent)
    return deleted


# ---------------------------------------------------------------- offline merge


@dataclass
class MergeResult:
    """What `prlnbd merge` did."""

    path: str
    guid: str
    child: str
    parent: str
    direction: str
    bytes_moved: int
    deleted: list[str] = field(default_factory=list)
    resumed: bool = False  # an interrupted merge was finished

    def as_dict(self) -> dict[str, object]:
        """The JSON form."""
        return {
            "path": self.path,
            "guid": self.guid,
            "child": self.child,
            "parent": self.parent,
            "direction": self.direction,
            "bytes-moved": self.bytes_moved,
            "deleted": self.deleted,
            "resumed": self.resumed,
        }


def merge_disk(
    path: Path, guid: str, progress: Callable[[int, int], None] | None = None
) -> MergeResult:
    """Merge snapshot GUID away from the bundle at PATH, offline (`prlnbd merge`).

    Refused while a server or QEMU holds the top image. A rerun after a crash
    finishes the merge: before the descriptor changed, the copy is redone (it is
    idempotent) and committed; after, the leftover file and journal are removed.
    """
    dpath = descriptor_path(path)
    if not dpath.exists():
        raise DescriptorError(f"{path}: merging snapshots needs a bundle with {DESCRIPTOR_NAME}, not a single image")
    g = normalize_guid(guid)
    hook = merge_kill_hook()
    desc = parse_descriptor(dpath)
    journal = read_journal(dpath)
    if journal is not None and journal.guid not in desc.parents:
        # The descriptor changed: only the deletions were left to do (none if the copy never got that far).
        deleted = _finish_commit(dpath, journal.delete if journal.phase == "commit" else [], hook)
        result = MergeResult(str(path), journal.guid, journal.child, journal.parent, journal.direction,
                             0, [str(f) for f in deleted], resumed=True)
        if journal.guid == g:
            return result
        desc = parse_descriptor(dpath)
        journal = None
    if journal is not None and journal.guid != g:
        raise DescriptorError(
            f"{dpath}: the merge of snapshot {journal.guid} was interrupted; finish it first"
            f" (`prlnbd merge {path} {journal.guid}`)"
        )
    resume: Direction | None = None
    if journal is not None and journal.direction in ("down", "up"):
        resume = "down" if journal.direction == "down" else "up"
    plan = plan_merge(desc, g, direction=resume)
    guards = _lock_tops(desc, plan, path)
    try:
        if parse_descriptor(dpath).top_guid != desc.top_guid:
            # A snapshot was taken between the plan and the locks: the top held is no longer the top.
            raise DescriptorError(f"{dpath}: the top changed while the merge started; run it again")
        if journal is not None:
            # Our own interrupted copy may have left its targets open (in_use): close them as check --repair does.
            _repair_targets(plan, guards)
        _refuse_in_use(desc, plan)
        check_bitmaps_fit(plan)
        try:
            begin_merge(plan, hook=hook)
            moved = _copy(plan, guards, hook, progress)
            deleted = commit_merge(plan, hook=hook)
        except OSError as e:
            where = f" ({e.filename})" if e.filename else ""
            raise ImageError(
                f"{dpath}: merging snapshot {plan.guid} failed: {e.strerror or e}{where}; every state still reads"
                f" as before; `prlnbd merge {path} {plan.guid}` finishes it once the cause is fixed"
            ) from e
    finally:
        for fd in guards.values():
            os.close(fd)
    return MergeResult(str(path), plan.guid, plan.child, plan.parent, plan.direction, moved,
                       [str(f) for f in deleted], resumed=journal is not None)


def _lock_tops(desc: Descriptor, plan: MergePlan, path: Path) -> dict[Path, int]:
    """Hold every piece's top image as a writer would, for the whole merge; return {file: fd}.

    A server (or QEMU) that has the disk open refuses the merge, and none can
    open it while the chain changes under it. The fds are opened read-write: the
    target of a "down" merge into the top is opened through them (see _open_target).
    """
    guards: dict[Path, int] = {}
    try:
        for chain in desc.piece_chains():
            top = chain[0]
            _, fd = _open_guard(top.file, plan, path)
            guards[top.file] = fd
    except BaseException:
        for fd in guards.values():
            os.close(fd)
        raise
    return guards


def _open_guard(file: Path, plan: MergePlan, path: Path) -> tuple[Path, int]:
    try:
        return open_file(file, writable=True)
    except ImageLocked as e:
        holder = e.holder
        msg = str(e)
        if isinstance(holder, Holder) and holder.is_prlnbd:
            msg = msg.split("; a disk a server holds", 1)[0]
            msg += (
                f"; a served disk is merged online by its server: `prlnbd ctl PATH merge EXPORT {plan.guid}`"
                " (PATH: the server's control socket)"
            )
        raise ImageLocked(msg, holder) from None


def _repair_targets(plan: MergePlan, guards: dict[Path, int]) -> None:
    """Clear the in_use flag an interrupted merge left on its targets (and cut the space it leaked)."""
    for part in plan.parts:
        img = ParallelsImage.open(part.target.file)
        try:
            busy = img.in_use
        finally:
            img.close()
        if not busy:
            continue
        guard = guards.get(part.target.file)
        if guard is not None:
            # check_image takes its own writer's lock: hand it over for the repair.
            os.close(guard)
            del guards[part.target.file]
        try:
            findings = check_image(part.target.file, repair=True)
        finally:
            if guard is not None:
                _, guards[part.target.file] = open_file(part.target.file, writable=True)
        left = [f for f in findings if f.corruption and not f.fixed]
        if left:
            raise ImageError(f"{part.target.file}: left by an interrupted merge and not repaired: {left[0].message}")


def _refuse_in_use(desc: Descriptor, plan: MergePlan) -> None:
    """Refuse images of the merge marked in use (being written elsewhere, or not closed cleanly)."""
    for part in plan.parts:
        for entry in (part.target, part.source):
            img = ParallelsImage.open(entry.file)
            try:
                busy = img.in_use
            finally:
                img.close()
            if busy:
                raise ImageBusy(
                    f"{entry.file}: image is in use (being served, or not closed cleanly): not merged;"
                    f" `prlnbd check --repair {desc.path.parent}` first"
                )


def _copy(
    plan: MergePlan, guards: dict[Path, int], hook: Callable[[], None], progress: Callable[[int, int], None] | None
) -> int:
    """Copy every piece of PLAN, syncing now and then; return the bytes copied."""
    total = plan.bytes
    done = 0
    if progress is not None:
        progress(0, total)
    for part in plan.parts:
        target, source = open_part(plan, part, guards)
        try:
            mc = MergeCopy(plan, target, source, hook=hook)
            since_sync = 0
            while n := mc.step(STEP_BYTES):
                done += n
                since_sync += n
                if since_sync >= SYNC_EVERY:
                    mc.sync()
                    since_sync = 0
                if progress is not None:
                    progress(done, max(total, done))
            mc.finish()
            move_bitmaps(plan, target, source)
            hook()
        finally:
            close_part(plan, target, source)
    if progress is not None:
        progress(max(total, done), max(total, done))
    return done


def open_part(plan: MergePlan, part: MergePart, guards: dict[Path, int] | None = None) -> tuple[Disk, Layer]:
    """Open what the copy of PART needs: (the target Disk, writable, on part.target_chain; the source layer).

    "down": the source is the target Disk's layers[1]. "up": the source, the
    child, is opened read-only on its own. Close both with close_part(). (A
    server merging down into its served top passes its own Disk and layers[1]
    to MergeCopy instead.)
    """
    target = _open_target(plan, part, guards or {})
    if plan.direction == "down":
        return target, target.layers[1]
    try:
        return target, ParallelsImage.open(part.source.file)
    except BaseException:
        target.close()
        raise


def close_part(plan: MergePlan, target: Disk, source: Layer) -> None:
    """Close what open_part() opened: the source (for "up"), then the target with a clean stop.

    The clean stop makes the BAT durable, stores the dirty bitmaps (those
    move_bitmaps() gave it) and clears in_use: only after it may the
    descriptor change (commit_merge).
    """
    try:
        if plan.direction == "up":
            source.close()
    finally:
        target.close()


def _open_target(plan: MergePlan, part: MergePart, guards: dict[Path, int]) -> Disk:
    """The Disk a part's copy writes: opened on target_chain with the target writable.

    Where the target is a top image this process holds with a guard, it is opened
    through a duplicate of the guard's descriptor (one open file description, so
    its lock), never released meanwhile.
    """
    desc = plan.descriptor
    guard = guards.get(part.target.file)
    if guard is None:
        return open_chain(desc, part.target_chain, writable=True, piece=part.piece)
    disk = open_chain(desc, part.target_chain, writable=False, piece=part.piece)
    fd = os.dup(guard)
    try:
        img = ParallelsImage._load(part.target.file, fd, True)
        img._start_writing()
    except BaseException:
        os.close(fd)
        disk.close()
        raise
    ro = disk.layers[0]
    disk.layers[0] = img
    ro.close()
    return disk


def merge_kill_hook() -> Callable[[], None]:
    """The hook a merge calls before each write, sync, journal or descriptor step: crash tests set
    PRLNBD_MERGE_KILL_AT=N to have the Nth kill the process (prlnbd.killpoints)."""
    return KillPoints("PRLNBD_MERGE_KILL_AT")
