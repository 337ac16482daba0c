"""Whether a file's bytes are in the page cache and ready, asked without reading them (mincore).

For the event loop: a range found cached here can be sent by sendfile
without the loop waiting on storage. mincore() needs the file mapped; the
mapping is read-only, shared, and never touched, so it costs address space
and no memory. It says a page is resident only once its data is up to date:
a page the kernel is still reading ahead counts as missing (cachestat()
would count it, and a sendfile from it would wait for the disk).
"""

from __future__ import annotations

import ctypes
import mmap
import os

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_munmap = _libc.munmap
_munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_mincore = _libc.mincore
_mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
_MAP_FAILED = ctypes.c_void_p(-1).value

PAGE = mmap.PAGESIZE
CAP_FOWNER = 3
# The longest range one question may cover: NBD's largest request (32 MiB) and then some.
MAX_QUERY = 64 << 20


def mincore_tells(owner: int, euid: int, capabilities: int, may_write: bool) -> bool:
    """Whether mincore() tells this process the page cache state of a file it maps.

    Linux tells only the file's owner, a process with CAP_FOWNER, or one that
    could open the file for writing; to any other it says every page is
    resident (mm/mincore.c, can_do_mincore), which would send reads of
    uncached data to sendfile on the event loop.
    """
    return owner == euid or bool(capabilities >> CAP_FOWNER & 1) or may_write


def _effective_capabilities() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return 0


class Residency:
    """Which pages of one open file are cached and up to date, and a descriptor to send them from.

    Not thread-safe: one buffer serves every question (the event loop's).
    A file that cannot be mapped (empty, or a file system without mmap) or
    opened again, or whose page cache state mincore() does not tell this
    process (mincore_tells), is not `available`, and answers False to every
    question.
    """

    def __init__(self, fd: int) -> None:
        self._addr = 0
        self._size = 0
        # The descriptor to send from: the same file, marked for random access, so that a read
        # from the loop never starts the kernel's readahead there (submitting that I/O can wait
        # for the device's queue); reads that miss the cache, in the pool, still start it.
        self.fd = -1
        try:
            st = os.fstat(fd)
            self._size = st.st_size
            path = f"/proc/self/fd/{fd}"
            if not mincore_tells(st.st_uid, os.geteuid(), _effective_capabilities(),
                                 os.access(path, os.W_OK, effective_ids=True)):
                return
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)
        except OSError:
            self.close()
            return
        if self._size:
            addr = _mmap(None, self._size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr is not None and addr != _MAP_FAILED:
                self._addr = addr
        self._vec = bytearray(MAX_QUERY // PAGE)
        self._cvec = (ctypes.c_char * len(self._vec)).from_buffer(self._vec)

    @property
    def available(self) -> bool:
        """Whether questions get real answers (the file is mapped and opened again)."""
        return bool(self._addr) and self.fd >= 0

    def cached(self, offset: int, length: int) -> bool:
        """Whether every page of [OFFSET, OFFSET+LENGTH) is in the page cache with its data read."""
        if not self._addr or length <= 0 or offset < 0 or offset + length > self._size:
            return False
        start = offset - offset % PAGE
        pages = (offset + length - start + PAGE - 1) // PAGE
        if pages > len(self._vec):
            return False
        if _mincore(self._addr + start, pages * PAGE, self._cvec) != 0:
            return False
        # Bit 0 of each byte: resident (the other bits are reserved).
        return self._vec.count(0, 0, pages) == 0

    def close(self) -> None:
        """Unmap the file and close the second descriptor (the caller still owns FD)."""
        if self._addr:
            _munmap(self._addr, self._size)
            self._addr = 0
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
