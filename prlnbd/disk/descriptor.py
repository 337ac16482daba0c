"""DiskDescriptor.xml: disk parameters, storage images and the snapshot tree (specs/prl-xml.txt)."""

from __future__ import annotations

import logging
import os
import re
import stat
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lxml import etree

from prlnbd.errors import DescriptorError, SnapshotChainError
from prlnbd.image.format import MAX_DISK_SIZE

log = logging.getLogger(__name__)

DESCRIPTOR_NAME = "DiskDescriptor.xml"
ROOT_TAGS = ("Parallels_disk_image", "Virtuozzo_disk_image")
ZERO_GUID = "{00000000-0000-0000-0000-000000000000}"
DEFAULT_TOP_GUID = "{5fbaabe3-6958-40ff-92a7-860e329aab41}"
IMAGE_TYPES = ("Plain", "Compressed")
# A descriptor is a few KiB; refuse anything absurd before parsing it.
MAX_DESCRIPTOR_SIZE = 16 * 1024 * 1024


def _parser() -> etree.XMLParser:
    """An lxml parser that never resolves entities, loads a DTD or touches the network."""
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_comments=False,
    )


def normalize_guid(text: str) -> str:
    """A GUID in the braced lowercase form used for comparisons."""
    g = text.strip().lower()
    if not g.startswith("{"):
        g = "{" + g
    if not g.endswith("}"):
        g = g + "}"
    return g


@dataclass
class ImageEntry:
    """One Image element of the Storage: a layer's GUID, type and file.

    outside says where File leads out of the bundle directory (through "..", an
    absolute path or a symlink): such a file is only opened when allowed.
    """

    guid: str
    type: str
    file: Path
    outside: str | None = None


@dataclass
class Piece:
    """One Storage element: sectors [start, end) of the disk, held by one image per snapshot.

    A disk with one Storage has one piece covering it all; a split disk has
    several, each with its own chain of images (one per snapshot GUID).
    index is the Storage element's position in StorageData (0-based).
    """

    index: int
    start: int  # sectors
    end: int  # sectors
    blocksize: int
    images: dict[str, ImageEntry]

    @property
    def offset(self) -> int:
        """Where the piece starts on the disk, in bytes."""
        return self.start * 512

    @property
    def size(self) -> int:
        """The piece's size in bytes."""
        return (self.end - self.start) * 512


@dataclass
class Descriptor:
    """A parsed DiskDescriptor.xml.

    images and blocksize are those of the first piece (the only one of a disk
    that is not split); pieces holds every Storage, sorted by Start.
    """

    path: Path
    tree: etree._ElementTree
    disk_size: int  # sectors
    cylinders: int
    heads: int
    sectors: int
    blocksize: int  # sectors per cluster for Compressed images
    images: dict[str, ImageEntry]
    parents: dict[str, str]  # snapshot GUID -> parent GUID
    top_guid: str
    warnings: list[str] = field(default_factory=list)
    allow_outside: bool = False  # open images whose File leads out of the bundle directory
    key_id: str | None = None  # ploop's Encryption/KeyId: the image holds LUKS data, served as stored
    pieces: list[Piece] = field(default_factory=list)  # every Storage, sorted by Start

    @property
    def size(self) -> int:
        """The disk size in bytes."""
        return self.disk_size * 512

    @property
    def split(self) -> bool:
        """Whether the disk is split into several Storage pieces."""
        return len(self.pieces) > 1

    def chain(self, top: str | None = None) -> list[ImageEntry]:
        """The images from TOP (default: the top snapshot) down to the root (of the first piece)."""
        return self._chain_of(self._guids(top), self.images, None)

    def piece_chains(self, top: str | None = None) -> list[list[ImageEntry]]:
        """The chain from TOP down to the root of every piece, in disk order."""
        guids = self._guids(top)
        if not self.pieces:
            return [self._chain_of(guids, self.images, None)]
        return [self._chain_of(guids, piece.images, piece) for piece in self.pieces]

    def _guids(self, top: str | None) -> list[str]:
        """The snapshot GUIDs from TOP (default: the top snapshot) down to the root."""
        guid = normalize_guid(top) if top else self.top_guid
        if guid not in self.parents:
            raise SnapshotChainError(f"{self.path}: snapshot {guid} is not in Snapshots")
        seen: list[str] = []
        # Position of each GUID in seen: a list lookup per step made the walk quadratic.
        where: dict[str, int] = {}
        while guid != ZERO_GUID:
            if guid in where:
                loop = " -> ".join([*seen[where[guid] :], guid])
                raise SnapshotChainError(f"{self.path}: snapshot chain has a cycle: {loop}")
            where[guid] = len(seen)
            seen.append(guid)
            parent = self.parents.get(guid)
            if parent is None:
                raise SnapshotChainError(
                    f"{self.path}: snapshot {seen[-2] if len(seen) > 1 else guid} has ParentGUID {guid},"
                    " which is not a Shot"
                )
            guid = parent
        return seen

    def _chain_of(self, guids: list[str], images: dict[str, ImageEntry], piece: Piece | None) -> list[ImageEntry]:
        """The images of GUIDS in IMAGES (those of PIECE, when the disk is split), checked."""
        chain = []
        for g in guids:
            if g not in images:
                if piece is not None and self.split:
                    raise SnapshotChainError(
                        f"{self.path}: Storage {piece.index} (sectors {piece.start}..{piece.end}) has no Image"
                        f" for snapshot {g}"
                    )
                raise SnapshotChainError(f"{self.path}: snapshot {g} has no Image in StorageData")
            chain.append(images[g])
        if not self.allow_outside:
            for entry in chain:
                if entry.outside is not None:
                    raise DescriptorError(
                        f"{self.path}: image {entry.guid}: {entry.outside}; refused, so that a descriptor"
                        " cannot expose files outside its bundle (`prlnbd serve --allow-outside-bundle`"
                        " allows it)"
                    )
        for entry in chain[:-1]:
            if entry.type != "Compressed":
                raise DescriptorError(
                    f"{self.path}: image {entry.guid} is {entry.type}, but overlays must be Compressed"
                )
        return chain


def _text(path: Path, parent: etree._Element, tag: str, where: str) -> str:
    el = parent.find(tag)
    if el is None or el.text is None or not el.text.strip():
        raise DescriptorError(f"{path}: {where}/{tag} is missing or empty")
    return el.text.strip()


def _int(path: Path, parent: etree._Element, tag: str, where: str, *, optional: int | None = None) -> int:
    el = parent.find(tag)
    if el is None and optional is not None:
        return optional
    text = _text(path, parent, tag, where)
    # Only plain ASCII digits: int() alone would take "2_048", "+5" or other scripts' digits.
    if not re.fullmatch(r"[0-9]+", text):
        raise DescriptorError(f"{path}: {where}/{tag} is {text!r}, not a whole number")
    return int(text)


def locate_image(bundle: Path, text: str, guid: str, warnings: list[str]) -> tuple[Path, str | None]:
    """The file an Image's File names, and why it lies outside the bundle (None when inside).

    A relative File is relative to the bundle directory. An absolute File that no
    longer exists (a bundle moved from another machine) is looked up in the
    bundle, as Parallels does: the part after the bundle directory's own name in
    the path, else the file name alone; a warning names both paths.
    """
    file = Path(text)
    if file.is_absolute():
        if not os.path.lexists(file):
            parts = file.parts
            tails = [Path(*parts[i + 1 :]) for i, part in enumerate(parts[:-1]) if part == bundle.name]
            for tail in [*tails[-1:], Path(file.name)]:
                candidate = bundle / tail
                if os.path.lexists(candidate):
                    warnings.append(
                        f"image {guid}: File {file} does not exist; using {candidate} in the bundle instead"
                    )
                    file = candidate
                    break
    else:
        file = bundle / file
    try:
        real, home = file.resolve(), bundle.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        return file, f"File {text!r} cannot be resolved ({e})"
    if real != home and home not in real.parents:
        how = "is a symlink to" if os.path.islink(file) else "leads to"
        return file, f"File {text!r} {how} {real}, outside the bundle directory {home}"
    return file, None


def _check_encryption(path: Path, params: etree._Element) -> str | None:
    """Refuse a disk Parallels Desktop encrypted; return ploop's KeyId, if any.

    Parallels Desktop names its cipher in Encryption/Engine (the all-zero GUID: not
    encrypted); that encryption has no public specification, so such a disk cannot be
    read. ploop's Encryption/KeyId names the key of a LUKS volume inside the image: the
    bytes are served as stored and clients decrypt them.
    """
    enc = params.find("Encryption")
    if enc is None:
        return None
    engine = enc.findtext("Engine")
    if engine is not None and engine.strip() and normalize_guid(engine) != ZERO_GUID:
        raise DescriptorError(
            f"{path}: Disk_Parameters/Encryption/Engine is {engine.strip()!r}: the disk is encrypted by"
            " Parallels Desktop, whose encryption has no public specification; prlnbd cannot read it"
            " (decrypt it in Parallels Desktop first)"
        )
    key_id = enc.findtext("KeyId")
    return key_id.strip() if key_id is not None and key_id.strip() else None


def _piece(p: Path, index: int, st: etree._Element, disk_size: int, warnings: list[str]) -> Piece:
    """The Storage element ST, the INDEX-th of StorageData, with its images."""
    w = "StorageData/Storage" if index == 0 else f"StorageData/Storage {index}"
    start = _int(p, st, "Start", w, optional=0)
    end = _int(p, st, "End", w, optional=disk_size)
    if end <= start:
        raise DescriptorError(f"{p}: Storage {index} has Start {start} and End {end}: it holds no sector")
    blocksize = _int(p, st, "Blocksize", w, optional=2048)
    if blocksize == 0:
        raise DescriptorError(f"{p}: {w}/Blocksize is 0")
    images: dict[str, ImageEntry] = {}
    for el in st.findall("Image"):
        wi = f"{w}/Image"
        guid = normalize_guid(_text(p, el, "GUID", wi))
        itype = _text(p, el, "Type", wi)
        if itype not in IMAGE_TYPES:
            raise DescriptorError(f"{p}: image {guid} has Type {itype!r}; expected Plain or Compressed")
        file, outside = locate_image(p.parent, _text(p, el, "File", wi), guid, warnings)
        if guid in images:
            raise DescriptorError(f"{p}: image GUID {guid} appears twice" + (f" in Storage {index}" if index else ""))
        images[guid] = ImageEntry(guid, itype, file, outside)
    if not images:
        raise DescriptorError(f"{p}: Storage {index} has no Image" if index else f"{p}: Storage has no Image")
    return Piece(index, start, end, blocksize, images)


def _check_tiling(p: Path, pieces: list[Piece], disk_size: int) -> None:
    """Sort PIECES by Start and check that they cover sectors 0..disk_size exactly once."""
    pieces.sort(key=lambda piece: piece.start)
    if len(pieces) == 1:
        only = pieces[0]
        if only.start != 0 or only.end != disk_size:
            raise DescriptorError(
                f"{p}: Storage covers sectors {only.start}..{only.end}, not the whole disk 0..{disk_size}"
                " (Disk_size)"
            )
        return
    pos = 0
    prev: Piece | None = None
    for piece in pieces:
        if piece.start < pos:
            assert prev is not None
            raise DescriptorError(
                f"{p}: Storage {piece.index} (sectors {piece.start}..{piece.end}) overlaps Storage {prev.index}"
                f" (sectors {prev.start}..{prev.end})"
            )
        if piece.start > pos:
            where = f"after Storage {prev.index} (sectors {prev.start}..{prev.end})" if prev else "at the start"
            raise DescriptorError(
                f"{p}: sectors {pos}..{piece.start} are in no Storage: a gap {where},"
                f" before Storage {piece.index} (sectors {piece.start}..{piece.end})"
            )
        pos = piece.end
        prev = piece
    assert prev is not None
    if pos != disk_size:
        raise DescriptorError(
            f"{p}: the last piece, Storage {prev.index} (sectors {prev.start}..{prev.end}), ends at sector {pos},"
            f" but Disk_size is {disk_size}"
        )


def descriptor_path(path: Path) -> Path:
    """The DiskDescriptor.xml for PATH, a bundle directory or the file itself."""
    return path / DESCRIPTOR_NAME if path.is_dir() else path


def parse_descriptor(path: str | Path, *, allow_outside: bool = False) -> Descriptor:
    """Parse and validate DiskDescriptor.xml at PATH (or in the bundle directory PATH).

    Images whose File leads outside the bundle directory are refused unless ALLOW_OUTSIDE.
    """
    p = descriptor_path(Path(path))
    try:
        # O_NONBLOCK: a FIFO must not hang open(2); only a regular file is read.
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise DescriptorError(f"{p}: cannot read descriptor: {e.strerror}") from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DescriptorError(f"{p}: is not a regular file")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_DESCRIPTOR_SIZE + 1)
    except OSError as e:
        raise DescriptorError(f"{p}: cannot read descriptor: {e.strerror}") from e
    finally:
        os.close(fd)
    if len(data) > MAX_DESCRIPTOR_SIZE:
        raise DescriptorError(f"{p}: descriptor is larger than {MAX_DESCRIPTOR_SIZE} bytes")
    try:
        root = etree.fromstring(data, _parser())
    except etree.XMLSyntaxError as e:
        raise DescriptorError(f"{p}: malformed XML: {e}") from None
    tree = root.getroottree()
    if tree.docinfo.internalDTD is not None or tree.docinfo.doctype:
        raise DescriptorError(f"{p}: a DOCTYPE/DTD is not allowed in a disk descriptor")
    for _ in root.iter(etree.Entity):
        raise DescriptorError(f"{p}: entity references are not allowed in a disk descriptor")
    if root.tag not in ROOT_TAGS:
        raise DescriptorError(f"{p}: root element is <{root.tag}>, expected one of {', '.join(ROOT_TAGS)}")

    params = root.find("Disk_Parameters")
    if params is None:
        raise DescriptorError(f"{p}: Disk_Parameters is missing")
    w = "Disk_Parameters"
    disk_size = _int(p, params, "Disk_size", w)
    if disk_size == 0:
        raise DescriptorError(f"{p}: Disk_Parameters/Disk_size is 0")
    if disk_size * 512 > MAX_DISK_SIZE:
        raise DescriptorError(
            f"{p}: Disk_Parameters/Disk_size {disk_size} sectors is more than {MAX_DISK_SIZE} bytes,"
            " the largest disk QEMU and NBD clients accept"
        )
    cylinders = _int(p, params, "Cylinders", w, optional=0)
    heads = _int(p, params, "Heads", w, optional=0)
    sectors = _int(p, params, "Sectors", w, optional=0)
    padding = _int(p, params, "Padding", w, optional=0)
    if padding != 0:
        raise DescriptorError(f"{p}: Disk_Parameters/Padding is {padding}; only 0 is supported")
    key_id = _check_encryption(p, params)
    warnings = []
    if cylinders * heads * sectors != disk_size:
        warnings.append(
            f"Cylinders*Heads*Sectors = {cylinders * heads * sectors} differs from Disk_size {disk_size}"
        )

    storage_data = root.find("StorageData")
    if storage_data is None:
        raise DescriptorError(f"{p}: StorageData is missing")
    storages = storage_data.findall("Storage")
    if not storages:
        raise DescriptorError(f"{p}: StorageData has no Storage")
    pieces = [_piece(p, index, st, disk_size, warnings) for index, st in enumerate(storages)]
    _check_tiling(p, pieces, disk_size)
    files: dict[Path, int] = {}
    for piece in pieces:
        for entry in piece.images.values():
            other = files.setdefault(entry.file, piece.index)
            if other != piece.index:
                raise DescriptorError(
                    f"{p}: File {entry.file.name} is named by Storage {other} and Storage {piece.index}"
                )
    first = pieces[0]
    images = first.images
    blocksize = first.blocksize

    parents: dict[str, str] = {}
    top_guid: str | None = None
    snaps = root.find("Snapshots")
    if snaps is not None:
        top_el = snaps.find("TopGUID")
        if top_el is not None and top_el.text and top_el.text.strip():
            top_guid = normalize_guid(top_el.text)
        for shot in snaps.findall("Shot"):
            w = "Snapshots/Shot"
            guid = normalize_guid(_text(p, shot, "GUID", w))
            parent = normalize_guid(_text(p, shot, "ParentGUID", w))
            if guid in parents:
                raise SnapshotChainError(f"{p}: snapshot {guid} appears twice in Snapshots")
            parents[guid] = parent
    if not parents:
        if len(images) != 1:
            raise SnapshotChainError(f"{p}: no Snapshots, but {len(images)} images: cannot tell the chain")
        only = next(iter(images))
        parents[only] = ZERO_GUID
        top_guid = only
    roots = [g for g, parent in parents.items() if parent == ZERO_GUID]
    if len(roots) != 1:
        raise SnapshotChainError(
            f"{p}: the snapshot tree has {len(roots)} roots ({', '.join(roots) or 'none'}); exactly one is allowed"
        )
    if top_guid is None:
        top_guid = DEFAULT_TOP_GUID
    if top_guid not in parents:
        raise SnapshotChainError(f"{p}: top snapshot {top_guid} is not a Shot in Snapshots")
    desc = Descriptor(
        path=p,
        tree=tree,
        disk_size=disk_size,
        cylinders=cylinders,
        heads=heads,
        sectors=sectors,
        blocksize=blocksize,
        images=images,
        parents=parents,
        top_guid=top_guid,
        warnings=warnings,
        allow_outside=allow_outside,
        key_id=key_id,
        pieces=pieces,
    )
    desc.piece_chains()  # validate the top chain of every piece now, so errors surface at open
    for msg in warnings:
        log.warning("%s: %s", p, msg)
    return desc


def new_guid() -> str:
    """A fresh braced lowercase GUID."""
    return "{" + str(uuid.uuid4()) + "}"


def build_descriptor(
    size: int,
    cluster_size: int,
    chain: list[tuple[str, str, str]],
    *,
    pieces: Sequence[tuple[int, int, list[tuple[str, str, str]]]] = (),
) -> etree._ElementTree:
    """A new DiskDescriptor.xml tree for CHAIN: (guid, type, file) from top to root.

    With PIECES, a split disk: one Storage per (start sector, end sector, chain
    of that piece, top to root); CHAIN then only gives the snapshots' GUIDs.
    """
    from prlnbd.image.create import geometry

    sectors = size // 512
    cyl, heads, spt = geometry(size)
    root = etree.Element("Parallels_disk_image", Version="1.0")
    params = etree.SubElement(root, "Disk_Parameters")
    for tag, value in (
        ("Disk_size", sectors),
        ("Cylinders", cyl),
        ("Heads", heads),
        ("Sectors", spt),
        ("Padding", 0),
    ):
        etree.SubElement(params, tag).text = str(value)
    storage_data = etree.SubElement(root, "StorageData")
    for start, end, piece_chain in pieces or [(0, sectors, chain)]:
        storage = etree.SubElement(storage_data, "Storage")
        etree.SubElement(storage, "Start").text = str(start)
        etree.SubElement(storage, "End").text = str(end)
        etree.SubElement(storage, "Blocksize").text = str(cluster_size // 512)
        for guid, itype, file in reversed(piece_chain):
            image = etree.SubElement(storage, "Image")
            etree.SubElement(image, "GUID").text = guid
            etree.SubElement(image, "Type").text = itype
            etree.SubElement(image, "File").text = file
    snaps = etree.SubElement(root, "Snapshots")
    etree.SubElement(snaps, "TopGUID").text = chain[0][0]
    parents = [g for g, _, _ in chain[1:]] + [ZERO_GUID]
    for (guid, _, _), parent in reversed(list(zip(chain, parents, strict=True))):
        shot = etree.SubElement(snaps, "Shot")
        etree.SubElement(shot, "GUID").text = guid
        etree.SubElement(shot, "ParentGUID").text = parent
    etree.indent(root, space="  ")
    return etree.ElementTree(root)


def _line_indent(space: str | None) -> str | None:
    """The indentation a whitespace run ends with (after its last newline); None if it has no newline."""
    if space is None or space.strip() or "\n" not in space:
        return None
    return space.rsplit("\n", 1)[1]


def add_element(
    parent: etree._Element,
    tag: str,
    *,
    text: str | None = None,
    children: Sequence[tuple[str, str]] = (),
    index: int | None = None,
) -> etree._Element:
    """Add <TAG>TEXT or CHILDREN</TAG> to PARENT (at INDEX, default last), laid out as its siblings are.

    Only the new element and the whitespace next to it are written: every other
    element keeps its text, attributes and indentation, so a descriptor another
    program wrote stays byte for byte what it was. Where the file has no
    indentation, none is added.
    """
    el = etree.Element(tag)
    el.text = text
    for child_tag, child_text in children:
        etree.SubElement(el, child_tag).text = child_text
    root = parent.getroottree().getroot()
    step = _line_indent(root.text) or "  "
    if len(parent):
        inner, outer = _line_indent(parent.text), _line_indent(parent[-1].tail)
    else:
        before = parent.getprevious()
        up = parent.getparent()
        outer = _line_indent(before.tail if before is not None else up.text if up is not None else None)
        inner = None if outer is None else outer + step
    if inner is None or outer is None:
        parent.append(el) if index is None else parent.insert(index, el)
        return el
    if index is not None and index < len(parent):
        el.tail = "\n" + inner
        parent.insert(index, el)
    elif len(parent):
        last = parent[-1]
        el.tail = last.tail
        last.tail = parent[-2].tail if len(parent) > 1 else parent.text
        parent.append(el)
    else:
        parent.text = "\n" + inner
        el.tail = "\n" + outer
        parent.append(el)
    if len(el):
        el.text = "\n" + inner + step
        for child in el:
            child.tail = "\n" + inner + step
        el[-1].tail = "\n" + inner
    return el


def save_descriptor(tree: etree._ElementTree, path: Path) -> None:
    """Write TREE to PATH atomically: temporary file, fsync, rename, fsync of the directory."""
    # No pretty printing: it would re-indent elements other programs wrote.
    data = etree.tostring(tree, xml_declaration=True, encoding="UTF-8")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_directory(path.parent)


def fsync_directory(path: Path) -> None:
    """Make the entries of directory PATH durable (a file created, renamed or removed in it)."""
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
