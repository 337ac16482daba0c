"""Image locks QEMU also honours: open-file-description (OFD) byte-range locks.

QEMU's file driver (block/file-posix.c) publishes what an opener does with an
image as shared (read) locks on single bytes of the file: byte 100 + i says
"I use permission bit i", byte 200 + i says "I do not let others have
permission bit i". Before it goes on, an opener tests, for every permission
it wants, that nobody holds the matching 200 + i byte, and for every
permission it does not share, that nobody holds the 100 + i byte. prlnbd takes
the same bytes, so QEMU (qemu-io, qemu-img, qemu-nbd, a VM) and prlnbd never
write one image at once, and two prlnbd processes exclude each other the
same way (OFD locks conflict between open file descriptions, even in one
process).

The locks live on the file descriptor and go with its last close.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from prlnbd.errors import ImageError, ImageLocked

# Linux values; Python has the names since 3.9 on Linux, the fallback is for stubs that lack them.
F_OFD_GETLK: int = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK: int = getattr(fcntl, "F_OFD_SETLK", 37)

# struct flock (fcntl(2)): l_type, l_whence, l_start, l_len, l_pid, with the C alignment;
# the kernel's copy is padded at the end, so the buffer handed over is made larger.
FLOCK = struct.Struct("@hhqqi")
FLOCK_BUFFER = 64

PERM_BASE = 100  # RAW_LOCK_PERM_BASE: "I use permission i"
SHARED_BASE = 200  # RAW_LOCK_SHARED_BASE: "I do not share permission i"


class Perm(enum.IntFlag):
    """QEMU's block permissions (BLK_PERM_*), whose bit numbers give the lock bytes."""

    CONSISTENT_READ = 0x1
    WRITE = 0x2
    WRITE_UNCHANGED = 0x4
    RESIZE = 0x8


ALL_PERMS = Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED | Perm.RESIZE

# What prlnbd asks for, as QEMU asks for a format node's file when it opens it
# read-write (qemu-io) or read-only and sharing everything (qemu-io -r -U).
WRITER_USES = Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE
WRITER_UNSHARES = Perm.WRITE | Perm.RESIZE
READER_USES = Perm.CONSISTENT_READ
READER_UNSHARES = Perm(0)


def _bits(perms: Perm) -> list[int]:
    return [i for i in range(ALL_PERMS.bit_length()) if perms & (1 << i)]


def _flock(kind: int, start: int, length: int) -> bytes:
    return FLOCK.pack(kind, os.SEEK_SET, start, length, 0).ljust(FLOCK_BUFFER, b"\0")


def _set(fd: int, kind: int, start: int, length: int = 1) -> None:
    fcntl.fcntl(fd, F_OFD_SETLK, _flock(kind, start, length))


def _conflicts(fd: int, byte: int) -> bool:
    """Whether another open file description holds a lock on BYTE (a write lock there would conflict)."""
    out = fcntl.fcntl(fd, F_OFD_GETLK, _flock(fcntl.F_WRLCK, byte, 1))
    kind: int = FLOCK.unpack_from(out)[0]
    return kind != fcntl.F_UNLCK


def lock_image(fd: int, path: Path, *, write: bool) -> None:
    """Take QEMU's lock bytes on FD for a writer (WRITE) or a reader that shares everything.

    Raises ImageLocked naming the file and, where it can be found, the
    process that holds it, when another opener's locks forbid this use; the
    bytes taken so far are released first.
    """
    uses = WRITER_USES if write else READER_USES
    unshares = WRITER_UNSHARES if write else READER_UNSHARES
    try:
        for i in _bits(uses):
            _set(fd, fcntl.F_RDLCK, PERM_BASE + i)
        for i in _bits(unshares):
            _set(fd, fcntl.F_RDLCK, SHARED_BASE + i)
        # Taken first, tested second, as QEMU does: of two openers racing, at least one sees the other.
        conflict = next((SHARED_BASE + i for i in _bits(uses) if _conflicts(fd, SHARED_BASE + i)), None)
        if conflict is None:
            conflict = next((PERM_BASE + i for i in _bits(unshares) if _conflicts(fd, PERM_BASE + i)), None)
    except OSError as e:
        unlock_image(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise ImageLocked(f"{path}: {_busy_message(None)}") from None
        raise ImageError(f"{path}: cannot take the image lock (fcntl F_OFD_SETLK): {e.strerror}") from e
    if conflict is not None:
        holder = find_holder(fd, conflict)
        unlock_image(fd)
        raise ImageLocked(f"{path}: {_busy_message(holder, write=write)}", holder)


def downgrade_to_reader(fd: int) -> None:
    """Keep only a reader's lock bytes on FD, which held a writer's: the image is frozen, others may write-lock it
    no more than before (they still see a reader), and at no moment is it unlocked."""
    for i in _bits(WRITER_USES & ~READER_USES):
        _set(fd, fcntl.F_UNLCK, PERM_BASE + i)
    for i in _bits(WRITER_UNSHARES & ~READER_UNSHARES):
        _set(fd, fcntl.F_UNLCK, SHARED_BASE + i)


def unlock_image(fd: int) -> None:
    """Release every lock byte this open file description holds."""
    with contextlib.suppress(OSError):
        _set(fd, fcntl.F_UNLCK, PERM_BASE, SHARED_BASE + ALL_PERMS.bit_length() - PERM_BASE)


@dataclass(frozen=True)
class Holder:
    """A process that holds lock bytes on an image, as /proc shows it."""

    pid: int
    argv: tuple[str, ...]  # its command line, or (its name,)

    @property
    def is_prlnbd(self) -> bool:
        """Whether the holder is a prlnbd process (`prlnbd ...` or `python -m prlnbd`): a server, most likely."""
        names = [a.rsplit("/", 1)[-1] for a in self.argv[:2]]
        return "prlnbd" in names or any(self.argv[i : i + 2] == ("-m", "prlnbd") for i in range(len(self.argv)))

    def __str__(self) -> str:
        what = "a prlnbd server" if self.is_prlnbd else (self.argv[0].rsplit("/", 1)[-1] if self.argv else "?")
        return f"{what}, process {self.pid}"


def find_holder(fd: int, byte: int) -> Holder | None:
    """The process whose open file of the same image holds a lock covering BYTE, if /proc shows one.

    OFD locks carry no owner pid (/proc/locks and F_OFD_GETLK give -1), so
    every readable /proc/PID/fd entry of the same file is looked at, and its
    fdinfo lists the locks of that open file description. Processes of other
    users are invisible unless run as root: then None.
    """
    st = os.fstat(fd)
    me = os.getpid()
    tag = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino} "
    try:
        pids = [int(n) for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for n in fds:
            if pid == me and int(n) == fd:
                continue
            try:
                other = os.stat(f"/proc/{pid}/fd/{n}")
                if (other.st_dev, other.st_ino) != (st.st_dev, st.st_ino):
                    continue
                with open(f"/proc/{pid}/fdinfo/{n}") as f:
                    info = f.read()
            except OSError:
                continue
            if any(_covers(line, tag, byte) for line in info.splitlines() if line.startswith("lock:")):
                return Holder(pid, _command(pid))
    return None


def _covers(line: str, tag: str, byte: int) -> bool:
    # "lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:2146316 201 201"
    if tag not in line:
        return False
    fields = line.split(tag, 1)[1].split()
    if len(fields) < 2:
        return False
    start, end = fields[0], fields[1]
    return int(start) <= byte and (end == "EOF" or byte <= int(end))


def _command(pid: int) -> tuple[str, ...]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = tuple(a.decode(errors="replace") for a in f.read().split(b"\0") if a)
        if argv:
            return argv
        with open(f"/proc/{pid}/comm") as f:
            return (f.read().strip(),)
    except OSError:
        return ("unknown",)


def _busy_message(holder: Holder | None, *, write: bool = True) -> str:
    who = f"another program ({holder})" if holder else "another program"
    if write:
        msg = f"{who} holds this image open for writing (or forbids writers): it cannot be opened for writing"
    else:
        msg = f"{who} holds this image so that it cannot be read consistently"
    if holder is not None and holder.is_prlnbd:
        msg += "; a disk a server holds is changed online through its control socket (`prlnbd ctl`)"
    return msg
