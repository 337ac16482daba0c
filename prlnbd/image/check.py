"""Check and repair one Parallels image file, reporting what `qemu-img check` reports and more."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from prlnbd.errors import ImageError, ImageLocked
from prlnbd.image import format as fmt
from prlnbd.image.extension import DirtyBitmap, Extension, encode_extension, read_extension, repair_hint
from prlnbd.image.locking import lock_image
from prlnbd.image.parallels import ParallelsImage

# Problem kinds that are corruption (exit 2); "leak" alone is exit 3.
CORRUPTION_KINDS = frozenset(
    ("busy", "in_use", "data_off", "below_data", "outside", "duplicate", "header", "extension", "chain")
)
# Kinds that only inform: they need no repair and do not change the exit code.
NOTICE_KINDS = frozenset(("bitmap", "free", "merge"))
# Free space inside the data area: reported in the totals, not as a problem.
FREE_KIND = "free"


@dataclass
class Finding:
    """One problem found in a disk: which file, what kind, what it means, and whether it was fixed."""

    file: str
    kind: str
    message: str
    fixed: bool = False
    leaked_bytes: int = 0
    free_bytes: int = 0

    @property
    def corruption(self) -> bool:
        """Whether this is corruption (as opposed to leaked space)."""
        return self.kind in CORRUPTION_KINDS

    def as_dict(self) -> dict[str, object]:
        """The JSON form."""
        return {"file": self.file, "kind": self.kind, "message": self.message, "fixed": self.fixed}


def check_image(path: Path, *, repair: bool = False) -> list[Finding]:
    """Check the expandable image at PATH; with REPAIR, fix what can be fixed without losing data.

    Repairs go in an order that is safe at every step: an extension whose clusters
    were cut off first (without it the image does not open), then copies of
    clusters, BAT entries, data_off, leaked space, and the in_use flag last.
    """
    name = str(path)
    findings: list[Finding] = []
    try:
        img = ParallelsImage.open(path, for_check=True)
    except ImageError as e:
        kind = "extension" if "extension" in str(e) or "bitmap" in str(e) else "header"
        first = Finding(name, kind, str(e))
        # An extension whose clusters `qemu-img check -r` cut off is reported, and with REPAIR
        # dropped, before the rest of the image can be checked.
        findings = _cut_extension(path, repair) if kind == "extension" else []
        if not findings or not all(f.fixed for f in findings):
            return findings or [first]
        try:
            img = ParallelsImage.open(path, for_check=True)
        except ImageError as e2:
            return [*findings, Finding(name, "header", str(e2))]
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC) if repair else -1
        try:
            if fd >= 0:
                try:
                    lock_image(fd, path, write=True)
                except ImageLocked as e:
                    # Repairing an image a live server (or QEMU) writes to would corrupt it: only report.
                    os.close(fd)
                    fd = -1
                    findings.append(Finding(name, "busy", f"{str(e).removeprefix(f'{path}: ')}: not repaired"))
            findings += _check(img, fd, name)
        finally:
            if fd >= 0:
                os.close(fd)
    finally:
        img.close()
    return findings


def _check(img: ParallelsImage, fd: int, name: str) -> list[Finding]:
    repair = fd >= 0
    cs = img.cluster_size
    unit = fmt.SECTOR if img.header.is_v1 else cs
    out: list[Finding] = []
    in_use = [p for p in img.problems if p.kind == "in_use"]
    new_data_off: int | None = None
    for p in img.problems:
        if p.kind == "data_off":
            f = Finding(name, "data_off", p.message)
            if repair:
                # As QEMU's check: the end of the BAT, rounded up. Clusters that lie below it
                # are copied out first (below_data), so no guest data is lost.
                new_data_off = img.min_data_off
                f.message += f"; fixed: data_off is now {new_data_off // fmt.SECTOR} (byte {new_data_off})"
                f.fixed = True
            out.append(f)
    bat_changes: dict[int, int] = {}
    # Everything in use ends here: the extension, and every cluster that starts inside the file
    # (a cluster cut short by the end of the file still owns its whole extent).
    high = img.data_off
    for c in img.allocated:
        host = int(img.bat[c])
        if host < img.file_size:
            high = max(high, host + cs)
    if img.extension is not None:
        for host in img.extension.clusters():
            high = max(high, host + cs)

    def append_at() -> int:
        return fmt.round_up(high, cs) if not img.header.is_v1 else high

    for p in img.problems:
        if p.kind == "outside" and p.cluster is not None:
            f = Finding(name, "outside", p.message)
            host = int(img.bat[p.cluster])
            if repair and host < img.file_size:
                # Partly in the file: its bytes there are served as data, the rest as zeros.
                # Growing the file to the cluster's end keeps exactly that (never unmap it).
                f.message += "; fixed by extending the file to the cluster's end, its data kept"
                f.fixed = True
            elif repair:
                # Wholly past the end: it reads as zeros. Unmapping it would show the layer
                # below instead, so point it at a new cluster of zeros.
                new_host = append_at()
                high = new_host + cs
                bat_changes[p.cluster] = new_host // unit
                f.message += f"; fixed by mapping it to a new cluster of zeros at byte {new_host}, as it read"
                f.fixed = True
            out.append(f)
    for p in img.problems:
        if p.kind == "below_data" and p.cluster is not None:
            f = Finding(name, "below_data", p.message)
            if repair:
                # The cluster overlaps the header and BAT, which the repair rewrites: copy the bytes
                # it reads now to a new cluster, so the guest reads exactly what it read before.
                new_host = append_at()
                data = os.pread(fd, cs, int(img.bat[p.cluster]))
                os.pwrite(fd, data.ljust(cs, b"\0"), new_host)
                high = new_host + cs
                bat_changes[p.cluster] = new_host // unit
                f.message += f"; fixed: its bytes, as they read, copied to a new cluster at byte {new_host}"
                f.fixed = True
            out.append(f)
    appended = 0
    for p in img.problems:
        if p.kind == "duplicate" and p.cluster is not None:
            f = Finding(name, "duplicate", p.message)
            if repair and p.cluster in bat_changes:
                f.message += "; fixed: it has its own copy now"
                f.fixed = True
            elif repair:
                # Give the second owner its own copy, appended past everything in use.
                new_host = append_at()
                data = os.pread(fd, cs, int(img.bat[p.cluster]))
                os.pwrite(fd, data.ljust(cs, b"\0"), new_host)
                high = new_host + cs
                appended += 1
                bat_changes[p.cluster] = new_host // unit
                f.fixed = True
            out.append(f)
    if repair and os.fstat(fd).st_size < high:
        # New space reads as zeros, as the bytes past the old end did.
        os.ftruncate(fd, high)
        os.fsync(fd)
    if bat_changes:
        os.fdatasync(fd)
        for cluster, value in bat_changes.items():
            os.pwrite(fd, fmt.BAT_ENTRY.pack(value), fmt.HEADER_SIZE + 4 * cluster)
        os.fsync(fd)
    if new_data_off is not None:
        img.header.data_off = new_data_off // fmt.SECTOR
        os.pwrite(fd, img.header.pack(), 0)
        os.fsync(fd)
    free = _free_space(img, high)
    if free is not None:
        out.append(free)
    size = os.fstat(fd).st_size if repair else img.file_size
    if size > high:
        leaked = size - high
        clusters = -(-leaked // cs)
        f = Finding(
            name,
            "leak",
            f"{leaked} bytes ({clusters} cluster{'s' if clusters != 1 else ''}) leaked past the last used cluster",
            leaked_bytes=leaked,
        )
        if repair:
            os.ftruncate(fd, high)
            os.fsync(fd)
            f.fixed = True
        out.append(f)
    if in_use and img.extension is not None:
        for bm in img.extension.bitmaps:
            if bm.l1 and all(e == fmt.L1_ALL_SET for e in bm.l1):
                out.append(
                    Finding(
                        name,
                        "bitmap",
                        f"dirty bitmap {bm.name} was invalidated by an unclean stop: it reads as all dirty,"
                        " so the next incremental backup from it copies everything",
                    )
                )
    for p in in_use:
        f = Finding(name, "in_use", p.message)
        if repair:
            img.header.in_use = fmt.IN_USE_CLOSED
            os.pwrite(fd, img.header.pack(), 0)
            os.fsync(fd)
            f.fixed = True
        out.append(f)
    return out


def _cut_extension(path: Path, repair: bool) -> list[Finding]:
    """The format extension's clusters the end of the file cut off (as `qemu-img check -r leaks` does), one
    finding per bitmap lost; none when that is not why the image cannot be opened.

    QEMU 7.2 counts the extension cluster and bitmap clusters past the last data
    cluster as leaked and truncates them. With REPAIR, what is gone is dropped:
    ext_off is cleared when the extension cluster itself is gone (its bitmaps
    with it), else the extension is rewritten without the bitmaps whose clusters
    are gone (cleared when nothing is left in it). Guest data is not touched.
    """
    name = str(path)
    try:
        # O_NONBLOCK: never wait in open(2) (a FIFO); the image opened as one just before, so it is a file.
        fd = os.open(path, (os.O_RDWR if repair else os.O_RDONLY) | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return []
    try:
        if repair:
            try:
                lock_image(fd, path, write=True)
            except ImageLocked:
                return []  # the first error is reported; the image is not touched while another holds it
        raw = os.pread(fd, fmt.HEADER.size, 0)
        if len(raw) < fmt.HEADER.size:
            return []
        h = fmt.Header.unpack(raw)
        cs = h.tracks * fmt.SECTOR
        file_size = os.fstat(fd).st_size
        ext_at = h.ext_off * fmt.SECTOR
        data_off = h.data_off * fmt.SECTOR
        if not h.ext_off or not cs or ext_at < data_off or ext_at < fmt.HEADER.size:
            return []
        cut = " (cut off, as `qemu-img check -r` cuts the clusters QEMU 7.2 counts as leaked)"
        if ext_at + cs > file_size:
            f = Finding(
                name,
                "extension",
                f"the format extension cluster at byte {ext_at} (ext_off {h.ext_off}) lies past the end of the"
                f" {file_size}-byte file{cut}: its dirty bitmaps are lost",
            )
            if repair:
                h.ext_off = 0
                os.pwrite(fd, h.pack(), 0)
                os.fsync(fd)
                f.message += "; fixed: ext_off cleared, the extension dropped"
                f.fixed = True
            else:
                f.message += f"; `prlnbd check --repair {path}` clears ext_off"
            return [f]
        lost: list[DirtyBitmap] = []
        try:
            ext = read_extension(path, fd, ext_at, cs, h.disk_sectors * fmt.SECTOR, data_off, cut_off=lost)
        except ImageError:
            return []
        findings = []
        for bm in lost:
            f = Finding(name, "extension", f"dirty bitmap {bm.name}: its clusters lie past the end of the"
                        f" {file_size}-byte file{cut}")
            if repair:
                f.message += "; fixed: the bitmap dropped (the next backup from it must copy everything)"
                f.fixed = True
            else:
                f.message += f"; {repair_hint(path)}"
            findings.append(f)
        if findings and repair:
            _rewrite_extension(fd, h, ext, cs)
        return findings
    finally:
        os.close(fd)


def _rewrite_extension(fd: int, h: fmt.Header, ext: Extension, cs: int) -> None:
    """Write EXT (what is left of the extension) back in place, or clear ext_off when nothing is left."""
    if ext.bitmaps or ext.features:
        # The unknown features are kept with their flags: dropping a bitmap is no reason to lose them.
        pairs = [(bm, list(bm.l1)) for bm in ext.bitmaps]
        os.pwrite(fd, encode_extension(pairs, ext.features, cs), ext.offset)
    else:
        # The cluster is unreferenced from now on: space the rest of the repair reports or cuts.
        h.ext_off = 0
        os.pwrite(fd, h.pack(), 0)
    os.fsync(fd)


def _is_hole(fd: int, offset: int, length: int) -> bool:
    """Whether [offset, offset+length) of FD holds no data (SEEK_DATA finds none in it)."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) >= offset + length
    except OSError as e:
        if e.errno == errno.ENXIO:  # no data from OFFSET to the end of the file
            return True
        raise


def _free_space(img: ParallelsImage, high: int) -> Finding | None:
    """The cluster slots before HIGH that no BAT entry or extension cluster uses.

    Those that are holes in the file (punched by a TRIM or WRITE_ZEROES) are free
    space, not leaks; those that still hold bytes (a write a crash left unmapped)
    are reported with them. A writer reuses both before it grows the file, and
    `qemu-img check` counts neither (it only counts space past the last cluster).
    """
    cs = img.cluster_size
    holes = stale = 0
    for host in img.unreferenced():
        if host + cs > high:
            break
        if _is_hole(img.fd, host, cs):
            holes += 1
        else:
            stale += 1
    if not holes and not stale:
        return None
    msg = f"{holes * cs} bytes ({holes} clusters) free: holes no BAT entry maps"
    if stale:
        msg += f"; {stale * cs} bytes ({stale} clusters) unused that still hold data"
    msg += "; a writer reuses them before the file grows, `prlnbd compact` gives them back"
    return Finding(img.path.as_posix(), FREE_KIND, msg, free_bytes=(holes + stale) * cs)
