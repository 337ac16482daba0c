"""Offline operations on whole disks: create, snapshot, check (with repair)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lxml import etree

from prlnbd.disk.chain import MAX_CHAIN_LENGTH, close_all, open_disk
from prlnbd.disk.descriptor import (
    DESCRIPTOR_NAME,
    ZERO_GUID,
    Descriptor,
    ImageEntry,
    add_element,
    build_descriptor,
    descriptor_path,
    fsync_directory,
    new_guid,
    parse_descriptor,
    save_descriptor,
)
from prlnbd.disk.split import join_bitmaps, new_split_bitmap
from prlnbd.disk.vm import is_vm_directory, vm_disks
from prlnbd.errors import DescriptorError, ImageBusy, PrlNbdError
from prlnbd.image import format as fmt
from prlnbd.image.check import FREE_KIND, NOTICE_KINDS, Finding, check_image
from prlnbd.image.compact import CompactResult, compact_image, planned_moves
from prlnbd.image.create import DEFAULT_CLUSTER_SIZE, check_geometry, write_image
from prlnbd.image.extension import DirtyBitmap, Extension, feature_space, kept_features, new_bitmap
from prlnbd.image.locking import lock_image
from prlnbd.image.parallels import ParallelsImage, open_file

# Parallels Desktop splits a disk into pieces of this many sectors (1948 MiB), the last one shorter.
SPLIT_PIECE_SECTORS = 3989504


def create_disk(
    path: Path, size: int, cluster_size: int = DEFAULT_CLUSTER_SIZE, *, split: bool = False
) -> Path:
    """Create a new disk: a single image when PATH ends in .hds, else a bundle directory.

    With SPLIT, the bundle's disk is split as Parallels Desktop splits one: a
    piece of SPLIT_PIECE_SECTORS sectors after another, the last shorter, each
    its own image NAME.N.{GUID}.hds. Returns the (first) image file created.
    """
    check_geometry(size, cluster_size)
    if split:
        if path.suffix == ".hds":
            raise PrlNbdError(f"{path}: a split disk is a bundle directory, not a single .hds image")
        if (SPLIT_PIECE_SECTORS * fmt.SECTOR) % cluster_size:
            raise PrlNbdError(
                f"{path}: split pieces are {SPLIT_PIECE_SECTORS} sectors, not a whole number of"
                f" {cluster_size}-byte clusters"
            )
    if path.suffix == ".hds":
        write_image(path, size, cluster_size=cluster_size)
        return path
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise PrlNbdError(f"{path}: already exists and is not an empty directory")
    path.mkdir(parents=True, exist_ok=True)
    guid = new_guid()
    if split:
        sectors = size // fmt.SECTOR
        starts = list(range(0, sectors, SPLIT_PIECE_SECTORS))
        pieces = []
        for k, start in enumerate(starts):
            end = min(sectors, start + SPLIT_PIECE_SECTORS)
            name = f"{path.name}.{k}.{guid}.hds"
            write_image(path / name, (end - start) * fmt.SECTOR, cluster_size=cluster_size)
            pieces.append((start, end, [(guid, "Compressed", name)]))
        tree = build_descriptor(size, cluster_size, [(guid, "Compressed", "")], pieces=pieces)
        save_descriptor(tree, path / DESCRIPTOR_NAME)
        return path / pieces[0][2][0][2]
    image = path / f"{path.name}.0.{guid}.hds"
    write_image(image, size, cluster_size=cluster_size)
    save_descriptor(build_descriptor(size, cluster_size, [(guid, "Compressed", image.name)]), path / DESCRIPTOR_NAME)
    return image


def snapshot_disk(path: Path) -> tuple[str, str]:
    """Freeze the current top of the bundle at PATH and add a new empty top image.

    Returns (the frozen snapshot's GUID, the new top's GUID). The new image
    is written and synced before DiskDescriptor.xml is replaced atomically,
    so a crash leaves either the old or the new chain. Elements of the
    descriptor prlnbd does not know are kept as they are. Dirty bitmaps of
    the old top are copied to the new one, so they go on tracking changes.
    """
    dpath = descriptor_path(path)
    if not dpath.exists():
        raise DescriptorError(f"{path}: snapshots need a bundle with {DESCRIPTOR_NAME}, not a single image")
    desc = parse_descriptor(dpath)
    if desc.split:
        return _snapshot_split(desc)
    top = desc.images[desc.top_guid]
    # Hold the top as a writer would for the whole change: a server (or QEMU) that has it open
    # refuses the snapshot, and none can open it while the chain changes under it.
    _, guard = open_file(top.file, writable=False)
    try:
        lock_image(guard, top.file, write=True)
        return _snapshot(desc, dpath)
    finally:
        os.close(guard)


def _top_geometry(top: ImageEntry, cluster_size: int) -> tuple[int, list[DirtyBitmap]]:
    """The cluster size a new image on top of TOP takes (CLUSTER_SIZE for a plain one) and TOP's bitmaps.

    Refuses a top image that is in use: a snapshot must not freeze a layer being written.
    """
    if top.type != "Compressed":
        return cluster_size, []
    img = ParallelsImage.open(top.file)
    try:
        if img.in_use:
            raise ImageBusy(f"{top.file}: top image is in use (being served, or not closed cleanly)")
        return img.cluster_size, list(img.extension.bitmaps) if img.extension else []
    finally:
        img.close()


def _snapshot(desc: Descriptor, dpath: Path) -> tuple[str, str]:
    cluster_size, bitmaps = _top_geometry(desc.images[desc.top_guid], desc.blocksize * fmt.SECTOR)
    guid = new_guid()
    (image,) = new_top_paths(desc, guid)
    make_top_image(image, desc.size, cluster_size, bitmaps)
    record_snapshot(desc, guid, [image])
    return desc.top_guid, guid


def new_top_paths(desc: Descriptor, guid: str) -> list[Path]:
    """Where the new top images of snapshot GUID go: one per Storage, NAME.N.{GUID}.hds (N: piece, or layer count)."""
    bundle = desc.path.parent
    if desc.split:
        return [bundle / f"{bundle.name}.{k}.{guid}.hds" for k in range(len(desc.pieces))]
    return [bundle / f"{bundle.name}.{len(desc.images)}.{guid}.hds"]


def make_top_image(path: Path, size: int, cluster_size: int, bitmaps: list[DirtyBitmap]) -> None:
    """Write a new empty image at PATH, synced, that carries copies of BITMAPS (to go on tracking changes)."""
    write_image(path, size, cluster_size=cluster_size)
    if bitmaps:
        new_top = ParallelsImage.open(path, writable=True)
        try:
            new_top.extension = Extension(offset=0, bitmaps=[b.copy() for b in bitmaps])
        finally:
            new_top.close()
    fsync_directory(path.parent)


def record_snapshot(desc: Descriptor, guid: str, images: list[Path]) -> None:
    """Name IMAGES (one per piece, in desc.pieces order) as the new top, snapshot GUID over the old top; save DESC
    atomically.

    New elements only: everything else stays as the writer left it (add_element).
    """
    root = desc.tree.getroot()
    storages = root.findall("StorageData/Storage")
    indexes = [piece.index for piece in desc.pieces] if desc.split else [0]
    for index, image in zip(indexes, images, strict=True):
        add_element(storages[index], "Image", children=[("GUID", guid), ("Type", "Compressed"), ("File", image.name)])
    _add_shot(root, desc.top_guid, guid)
    save_descriptor(desc.tree, desc.path)


def _add_shot(root: etree._Element, parent: str, guid: str) -> None:
    """Add snapshot GUID on top of PARENT to the descriptor's Snapshots (made if missing), as its TopGUID."""
    snaps = root.find("Snapshots")
    if snaps is None:
        snaps = add_element(root, "Snapshots")
    if not snaps.findall("Shot"):
        # A descriptor with no Shot had its only image as the implicit root.
        add_element(snaps, "Shot", children=[("GUID", parent), ("ParentGUID", ZERO_GUID)])
    add_element(snaps, "Shot", children=[("GUID", guid), ("ParentGUID", parent)])
    top_el = snaps.find("TopGUID")
    if top_el is None:
        top_el = add_element(snaps, "TopGUID", index=0)
    top_el.text = guid


def _snapshot_split(desc: Descriptor) -> tuple[str, str]:
    """snapshot_disk() of a split disk: one new top image per piece, NAME.N.{GUID}.hds for piece N.

    Every new image is written and synced before the descriptor is replaced.
    Each piece's dirty bitmaps are copied to its new top, as snapshot_disk()
    copies a single image's: the split disk's bitmaps go on tracking changes.
    """
    guid = new_guid()
    # Every piece is looked at (refused while in use) before any new image is made.
    geometry = [_top_geometry(piece.images[desc.top_guid], piece.blocksize * fmt.SECTOR) for piece in desc.pieces]
    images = new_top_paths(desc, guid)
    for piece, image, (cluster_size, bitmaps) in zip(desc.pieces, images, geometry, strict=True):
        make_top_image(image, piece.size, cluster_size, bitmaps)
    record_snapshot(desc, guid, images)
    return desc.top_guid, guid


@dataclass
class CheckReport:
    """The outcome of checking a whole disk."""

    path: str
    findings: list[Finding] = field(default_factory=list)
    repaired: bool = False

    def remaining(self) -> list[Finding]:
        """Problems not fixed (notices are not problems)."""
        return [f for f in self.findings if not f.fixed and f.kind not in NOTICE_KINDS]

    @property
    def exit_code(self) -> int:
        """0 clean, 2 corruption, 3 leaks only: as `qemu-img check` (after repair: what remains)."""
        left = self.remaining()
        if any(f.corruption for f in left):
            return 2
        if left:
            return 3
        return 0

    def as_dict(self) -> dict[str, object]:
        """The JSON form."""
        left = self.remaining()
        return {
            "path": self.path,
            "corruptions": sum(1 for f in left if f.corruption),
            "leaks": sum(1 for f in left if f.kind == "leak"),
            "leaked-bytes": sum(f.leaked_bytes for f in left),
            "free-bytes": sum(f.free_bytes for f in self.findings),
            "repaired": self.repaired,
            "problems": [f.as_dict() for f in self.findings if f.kind != FREE_KIND],
        }


def check_disk(path: Path, *, repair: bool = False, allow_outside_bundle: bool = False) -> CheckReport:
    """Check every layer of the disk at PATH and the chain itself (outside the bundle only if allowed).

    A VM directory's disks are each checked, in one report.
    """
    report = CheckReport(str(path), repaired=repair)
    if is_vm_directory(path):
        try:
            bundles = vm_disks(path, allow_outside=allow_outside_bundle)
        except PrlNbdError as e:
            report.findings.append(Finding(str(path), "chain", str(e)))
            return report
        for _, bundle in bundles:
            report.findings += check_disk(bundle, repair=repair, allow_outside_bundle=allow_outside_bundle).findings
        return report
    dpath = descriptor_path(path)
    if path.is_dir() or path.name.lower().endswith(".xml"):
        try:
            desc = parse_descriptor(dpath, allow_outside=allow_outside_bundle)
            chains = desc.piece_chains()
        except PrlNbdError as e:
            report.findings.append(Finding(str(dpath), "chain", str(e)))
            return report
        from prlnbd.disk.merge import journal_notice, journal_path

        notice = journal_notice(dpath)
        if notice is not None:
            report.findings.append(Finding(str(journal_path(dpath)), "merge", notice))
        if len(chains[0]) > MAX_CHAIN_LENGTH:
            msg = f"the snapshot chain has {len(chains[0])} layers, more than the {MAX_CHAIN_LENGTH} prlnbd opens"
            report.findings.append(Finding(str(dpath), "chain", msg))
            return report
        for entry in (entry for chain in chains for entry in chain):  # every piece of a split disk
            if not entry.file.exists():
                report.findings.append(Finding(str(entry.file), "chain", f"image {entry.guid} is missing"))
            elif entry.type == "Compressed":
                report.findings.extend(check_image(entry.file, repair=repair))
        if repair and desc.split:
            report.findings.extend(_drop_partial_bitmaps([chain[0] for chain in chains]))
        if not any(f.corruption and not f.fixed for f in report.findings):
            try:
                open_disk(path, allow_outside_bundle=allow_outside_bundle).close()
            except PrlNbdError as e:
                report.findings.append(Finding(str(dpath), "chain", str(e)))
        return report
    report.findings.extend(check_image(path, repair=repair))
    return report



def _drop_partial_bitmaps(tops: list[ImageEntry]) -> list[Finding]:
    """A split disk's bitmap is whole only in every piece's top: after a repair dropped one piece's part (cut off
    by `qemu-img check -r`), remove the others' parts too, saying so, so the disk opens again."""
    held: dict[bytes, list[Path]] = {}
    names: dict[bytes, str] = {}
    for entry in tops:
        if entry.type != "Compressed" or not entry.file.exists():
            continue
        try:
            img = ParallelsImage.open(entry.file)
        except PrlNbdError:
            return []  # a top that still does not open is reported by the checks above
        try:
            for bm in img.extension.bitmaps if img.extension else []:
                held.setdefault(bm.id, []).append(entry.file)
                names[bm.id] = bm.name
        finally:
            img.close()
    count = sum(1 for e in tops if e.type == "Compressed")
    findings = []
    for bid, files in held.items():
        if len(files) == count:
            continue
        for file in files:
            img = ParallelsImage.open(file, writable=True)
            try:
                ext = img.extension
                if ext is not None:
                    ext.bitmaps = [b for b in ext.bitmaps if b.id != bid]
            finally:
                img.close()
        findings.append(
            Finding(
                str(files[0]),
                "extension",
                f"dirty bitmap {names[bid]} is in {len(files)} of the {count} pieces' top images (a repair dropped"
                f" the rest); fixed: its parts removed from the others too (the next backup from it must copy"
                " everything)",
                fixed=True,
            )
        )
    return findings


def _top_image_paths(path: Path) -> tuple[Path, list[Path], Descriptor | None]:
    """The top image file of the disk at PATH: one, or one per piece of a split disk (then with its descriptor)."""
    dpath = descriptor_path(path)
    if path.is_dir() or path.name.lower().endswith(".xml"):
        desc = parse_descriptor(dpath)
        tops = [piece.images[desc.top_guid] for piece in desc.pieces]
        for top in tops:
            if top.type != "Compressed":
                raise PrlNbdError(f"{top.file}: a plain image cannot hold dirty bitmaps")
        return dpath, [top.file for top in tops], desc if desc.split else None
    return path, [path], None


def compact_disk(path: Path, progress: Callable[[int, int], None] | None = None) -> CompactResult:
    """Compact the top image of the disk at PATH (offline): see compact_image.

    For a split disk, every piece's top image, one after the other; PROGRESS
    counts the clusters of them all, and the result adds theirs up (each
    piece's is in its pieces).
    """
    tops = [path]
    if path.is_dir() or path.name.lower().endswith(".xml"):
        desc = parse_descriptor(descriptor_path(path))
        entries = [piece.images[desc.top_guid] for piece in desc.pieces]
        for entry in entries:
            if entry.type != "Compressed":
                raise PrlNbdError(f"{entry.file}: a plain image has no clusters to move")
        tops = [entry.file for entry in entries]
    if len(tops) == 1:
        return compact_image(tops[0], progress)
    # A split disk: the moves of every piece counted first, so progress runs once over them all.
    totals = [planned_moves(top) for top in tops]
    total = sum(totals)
    results: list[CompactResult] = []
    for k, top in enumerate(tops):
        before = sum(totals[:k])

        def piece_progress(done: int, _total: int, before: int = before) -> None:
            if progress is not None:
                progress(min(before + done, total), total)

        results.append(compact_image(top, piece_progress))
    return CompactResult(
        str(path),
        sum(r.moved for r in results),
        sum(r.size_before for r in results),
        sum(r.size_after for r in results),
        sum(r.allocated_before for r in results),
        sum(r.allocated_after for r in results),
        pieces=results,
    )


def manage_bitmaps(path: Path, action: str, name: str | None, granularity: int) -> list[dict[str, object]]:
    """list/add/remove/clear the dirty bitmaps of the top image; return the bitmaps concerned.

    Changes go through a normal writable open and clean close, so they are
    stored exactly as a served image's bitmaps are. For a split disk, every
    piece's top image at once (see _split_bitmaps).
    """
    where, tops, desc = _top_image_paths(path)
    if desc is not None:
        return _split_bitmaps(where, desc, tops, action, name, granularity)
    top = tops[0]
    if action == "list":
        img = ParallelsImage.open(top)
        try:
            bms = img.extension.bitmaps if img.extension else []
            return [_listed(b) for b in bms]
        finally:
            img.close()
    img = ParallelsImage.open(top, writable=True)
    try:
        ext = img.extension
        if action == "add":
            bm = new_bitmap(img.size, granularity, name, chunk=img.cluster_size)
            if ext is None:
                ext = img.extension = Extension(offset=0)
            if any(b.id == bm.id for b in ext.bitmaps):
                raise PrlNbdError(f"{top}: bitmap {bm.name} already exists")
            if feature_space([*ext.bitmaps, bm], kept_features(ext), img.cluster_size) > img.cluster_size:
                raise PrlNbdError(f"{top}: no room for another bitmap in the {img.cluster_size}-byte extension cluster")
            ext.bitmaps.append(bm)
            return [{"name": bm.name}]
        found = [b for b in (ext.bitmaps if ext else []) if name is not None and b.name == name.lower()]
        if ext is None or not found:
            raise PrlNbdError(f"{top}: no dirty bitmap named {name}")
        if action == "remove":
            ext.bitmaps.remove(found[0])
        else:
            found[0].clear()
        return [{"name": found[0].name}]
    finally:
        img.close()


def _listed(bm: DirtyBitmap) -> dict[str, object]:
    """How `prlnbd bitmap list` shows one bitmap."""
    return {"name": bm.name, "granularity": bm.granularity, "dirty-bytes": bm.dirty_bytes()}


def _split_bitmaps(
    dpath: Path, desc: Descriptor, tops: list[Path], action: str, name: str | None, granularity: int
) -> list[dict[str, object]]:
    """manage_bitmaps() of a split disk: a bitmap is the same bitmap (id, granularity) in every piece's top.

    list shows each once, its dirty bytes those of all pieces; add puts a clean
    part in every top; clear clears every part. A bitmap some pieces lack, or
    with another granularity in one, is an error naming that piece's file,
    except for remove, which takes it from every top that holds it: the way
    out of such a mismatch. Nothing is written unless every top could be opened.
    """
    images: list[ParallelsImage] = []
    try:
        for top in tops:
            images.append(ParallelsImage.open(top, writable=action != "list"))
        if action == "add":
            offsets = [piece.offset for piece in desc.pieces]
            parts = new_split_bitmap(dpath, images, offsets, name, granularity)
            for img, part in zip(images, parts, strict=True):
                if img.extension is None:
                    img.extension = Extension(offset=0)
                img.extension.bitmaps.append(part)
            return [{"name": parts[0].name}]
        if action == "remove":
            held = [
                (img.extension, b)
                for img in images
                for b in (img.extension.bitmaps if img.extension else [])
                if name is not None and b.name == name.lower()
            ]
            if not held:
                raise PrlNbdError(f"{dpath}: no dirty bitmap named {name} in any piece's top image")
            for ext, b in held:
                if ext is not None:
                    ext.bitmaps.remove(b)
            return [{"name": held[0][1].name}]
        joined = join_bitmaps(dpath, desc.pieces, images)
        if action == "list":
            return [_listed(b) for b in joined]
        found = [b for b in joined if name is not None and b.name == name.lower()]
        if not found:
            raise PrlNbdError(f"{dpath}: no dirty bitmap named {name}")
        found[0].clear()
        return [{"name": found[0].name}]
    finally:
        close_all(images)
