"""Residency: which pages of a file are in the page cache, asked without reading them."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from prlnbd.disk.pagecache import CAP_FOWNER, MAX_QUERY, PAGE, Residency, mincore_tells

SIZE = 64 * PAGE


def made(path: Path) -> int:
    path.write_bytes(os.urandom(SIZE))
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return fd


def test_only_pages_read_count_as_cached(tmp_path: Path) -> None:
    fd = made(tmp_path / "f")
    r = Residency(fd)
    try:
        assert not r.cached(0, SIZE)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead past what is read
        os.pread(fd, 8 * PAGE, 4 * PAGE)
        assert r.cached(4 * PAGE, 8 * PAGE)
        assert r.cached(4 * PAGE + 100, 8 * PAGE - 200)  # unaligned, inside
        assert not r.cached(3 * PAGE, 2 * PAGE)  # its first page was not read
        assert not r.cached(11 * PAGE, PAGE + 1)  # its last page was not read
    finally:
        r.close()
        os.close(fd)


def test_ranges_it_cannot_answer_are_not_cached(tmp_path: Path) -> None:
    fd = made(tmp_path / "f")
    empty = os.open(tmp_path / "empty", os.O_RDWR | os.O_CREAT)
    r = Residency(fd)
    e = Residency(empty)
    try:
        os.pread(fd, SIZE, 0)
        assert r.cached(0, SIZE)
        assert not r.cached(0, SIZE + 1)  # past the end of the file as it was mapped
        assert not r.cached(-PAGE, PAGE)
        assert not r.cached(0, 0)
        assert not e.cached(0, 1)
        big = os.open(tmp_path / "big", os.O_RDWR | os.O_CREAT)
        os.ftruncate(big, 2 * MAX_QUERY)
        b = Residency(big)
        assert not b.cached(0, MAX_QUERY + PAGE)  # longer than one question covers
        b.close()
        os.close(big)
    finally:
        r.close()
        e.close()
        os.close(fd)
        os.close(empty)
    assert not r.cached(0, PAGE)  # closed: unmapped


def test_a_file_it_cannot_map_is_not_available(tmp_path: Path) -> None:
    empty = os.open(tmp_path / "empty", os.O_RDWR | os.O_CREAT)
    r = Residency(empty)
    try:
        assert not r.available
        assert not r.cached(0, PAGE)
    finally:
        r.close()
        os.close(empty)
    gone = Residency(1 << 20)  # a descriptor that is not open: nothing to ask
    assert not gone.available
    gone.close()


def test_mincore_tells_only_owners_writers_and_cap_fowner() -> None:
    assert mincore_tells(1000, 1000, 0, False)  # the owner
    assert mincore_tells(0, 1000, 1 << CAP_FOWNER, False)
    assert mincore_tells(0, 1000, 0, True)  # could open it for writing
    assert not mincore_tells(0, 1000, ~(1 << CAP_FOWNER), False)


def as_user(uid: int, check: Callable[[], bool]) -> bool:
    """CHECK() in a child process that runs as UID (without capabilities)."""
    pid = os.fork()
    if pid == 0:
        code = 2
        try:
            os.setgid(uid)
            os.setuid(uid)
            code = 0 if check() else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, 1), f"the child failed ({code})"
    return code == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as another user")
def test_a_process_mincore_would_lie_to_gets_no_answers(tmp_path: Path) -> None:
    """To a reader that neither owns nor may write the file, Linux says every page is resident: that
    reader's Residency is not available, and the owner's is."""
    fd = made(tmp_path / "f")  # root's, mode 0644, evicted
    try:
        assert not as_user(65534, lambda: Residency(fd).available)
        os.fchown(fd, 65534, 65534)
        assert as_user(65534, lambda: Residency(fd).available)
    finally:
        os.close(fd)
