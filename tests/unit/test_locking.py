"""QEMU's lock bytes as prlnbd takes them (prlnbd.image.locking), within one process: OFD locks still conflict."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from prlnbd.errors import ImageLocked
from prlnbd.image import locking
from prlnbd.image.locking import FLOCK, Holder, find_holder, lock_image, unlock_image


def held(fd: int, byte: int) -> bool:
    """Whether some other open file description holds BYTE (asked from FD)."""
    return locking._conflicts(fd, byte)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    p = tmp_path / "img"
    p.write_bytes(b"\0" * 4096)
    return p


def opened(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def test_flock_layout_is_the_kernel_struct() -> None:
    # x86-64 / arm64: two shorts, padding, two 64-bit offsets, the pid.
    assert FLOCK.size >= 28
    assert (locking.F_OFD_GETLK, locking.F_OFD_SETLK) == (36, 37)  # Linux's values


def test_writer_holds_qemus_bytes_and_reader_only_consistent_read(path: Path) -> None:
    w, r, probe = opened(path), opened(path), opened(path)
    try:
        lock_image(w, path, write=True)
        assert [b for b in range(100, 104) if held(probe, b)] == [100, 101, 103]
        assert [b for b in range(200, 204) if held(probe, b)] == [201, 203]
        unlock_image(w)
        lock_image(r, path, write=False)
        assert [b for b in (*range(100, 104), *range(200, 204)) if held(probe, b)] == [100]
    finally:
        for fd in (w, r, probe):
            os.close(fd)


def test_two_writers_exclude_each_other_and_a_reader_shares(path: Path) -> None:
    a, b, r = opened(path), opened(path), opened(path)
    try:
        lock_image(a, path, write=True)
        lock_image(r, path, write=False)
        with pytest.raises(ImageLocked) as info:
            lock_image(b, path, write=True)
        message = str(info.value)
        assert message.startswith(f"{path}: another program (")
        assert f"process {os.getpid()}" in message and "\n" not in message
        # The refused opener let go of every byte it had taken.
        assert not any(held(a, byte) for byte in (*range(100, 104), *range(200, 204)) if byte != 100)
        os.close(a)
        a = -1
        lock_image(b, path, write=True)
    finally:
        for fd in (a, b, r):
            if fd >= 0:
                os.close(fd)


def test_a_reader_is_let_in_beside_a_writer_and_a_writer_beside_readers(path: Path) -> None:
    r, w = opened(path), opened(path)
    try:
        lock_image(r, path, write=False)
        lock_image(w, path, write=True)
    finally:
        os.close(r)
        os.close(w)


def test_find_holder_names_this_process(path: Path) -> None:
    a, b = opened(path), opened(path)
    try:
        lock_image(a, path, write=True)
        holder = find_holder(b, 201)
        assert holder is not None and holder.pid == os.getpid()
        assert find_holder(b, 202) is None
    finally:
        os.close(a)
        os.close(b)


@pytest.mark.parametrize(
    ("argv", "prlnbd", "shown"),
    [
        (("/usr/bin/python3", "-m", "prlnbd", "serve", "d"), True, "a prlnbd server, process 7"),
        (("/usr/local/bin/prlnbd", "serve", "d"), True, "a prlnbd server, process 7"),
        (("qemu-nbd", "/tmp/test_prlnbd/x.hds"), False, "qemu-nbd, process 7"),
        (("/usr/bin/qemu-system-x86_64", "-name", "prlnbd"), False, "qemu-system-x86_64, process 7"),
    ],
)
def test_holder_tells_prlnbd_from_other_programs(argv: tuple[str, ...], prlnbd: bool, shown: str) -> None:
    h = Holder(7, argv)
    assert h.is_prlnbd is prlnbd
    assert str(h) == shown
