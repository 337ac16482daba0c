"""The io_uring binding: reads of known bytes through a small ring, errors, and the export's use of it."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from prlnbd import uring
from prlnbd.disk.chain import open_disk
from prlnbd.errors import PrlNbdError, RequestError
from prlnbd.export import Export
from prlnbd.image.create import write_image
from prlnbd.nbd.constants import Errno

SIZE = 3 << 20


def _available() -> str | None:
    try:
        uring.Ring(1).close()
    except OSError as e:
        return uring.why_unavailable(e)
    return None


UNAVAILABLE = _available()
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"io_uring: {UNAVAILABLE}")


def run(body: Callable[[uring.UringIO], Coroutine[Any, Any, None]], entries: int = 4) -> uring.UringIO:
    """Run BODY with a reader of ENTRIES on a fresh loop; the reader must end idle."""

    async def main() -> uring.UringIO:
        reader = uring.UringIO(asyncio.get_running_loop(), entries)
        try:
            await body(reader)
            assert reader.busy == 0
        finally:
            reader.close()
        return reader

    return asyncio.run(main())


def read(reader: uring.UringIO, ios: list[uring.ReadIO]) -> asyncio.Future[BaseException | None]:
    fut: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
    reader.read_all(ios, fut.set_result)
    return fut


def opened(path: Path, data: bytes, flags: int) -> Iterator[int]:
    """PATH written with DATA and opened with FLAGS, for as long as the test runs."""
    path.write_bytes(data)
    fd = os.open(path, flags)
    try:
        yield fd
    finally:
        os.close(fd)


@pytest.fixture
def data_file(tmp_path: Path) -> Iterator[tuple[int, bytes]]:
    data = random.Random(7).randbytes(SIZE)
    for fd in opened(tmp_path / "data", data, os.O_RDONLY):
        yield fd, data


def test_reads_at_many_offsets_and_lengths_beyond_the_depth(data_file: tuple[int, bytes]) -> None:
    """300 reads (some of several runs, some past the end) through a ring of 4: each buffer holds the file's bytes."""
    fd, data = data_file
    rng = random.Random(1)
    seen: list[uring.UringIO] = []

    async def body(reader: uring.UringIO) -> None:
        seen.append(reader)
        assert reader.ring.sq_entries == 4
        jobs = []
        for i in range(300):
            runs = []
            for _ in range(1 + i % 3):
                offset = rng.choice([0, 1, 511, 4096, rng.randrange(SIZE), SIZE - 100, SIZE - 4096])
                length = rng.choice([1, 512, 4096, 4097, 65536, rng.randrange(1, 1 << 20)])
                runs.append((offset, bytearray(b"\xa5" * length)))
            jobs.append((runs, read(reader, [(fd, fd, memoryview(buf), off) for off, buf in runs])))
        for runs, fut in jobs:
            assert await fut is None
            for off, buf in runs:
                inside = data[off : off + len(buf)]
                # Past the end of the file the buffer keeps what it had.
                assert bytes(buf) == inside + b"\xa5" * (len(buf) - len(inside)), (off, len(buf))

    reader = run(body)
    assert reader.read_requests == 300
    # Reads that crossed the end were short and went on (and then met the end).
    assert reader.reads > sum(1 + i % 3 for i in range(300))


def test_no_reads_still_calls_back() -> None:
    async def body(reader: uring.UringIO) -> None:
        assert await read(reader, []) is None

    run(body)


def test_error_completion_is_an_oserror(data_file: tuple[int, bytes]) -> None:
    """EBADF from the kernel: the request's callback gets it, once, after its other reads ended; others go on."""
    fd, data = data_file
    bad = 1 << 20  # no process has this many descriptors open (and the number is not reused meanwhile)

    async def body(reader: uring.UringIO) -> None:
        good = bytearray(4096)
        fut = read(reader, [(fd, fd, memoryview(bytearray(10)), 0), (bad, bad, memoryview(bytearray(10)), 0),
                            (fd, fd, memoryview(good), 8192)])
        other = bytearray(100)
        fut2 = read(reader, [(fd, fd, memoryview(other), 5)])
        err = await fut
        assert isinstance(err, OSError) and err.errno == errno.EBADF
        assert await fut2 is None and bytes(other) == data[5:105]
        assert bytes(good) == data[8192 : 8192 + 4096]

    run(body)


def test_a_submission_the_kernel_refuses_ends_its_reads_with_the_error(
    data_file: tuple[int, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """io_uring_enter failing with an error a retry will not mend: the reads queued for it end with
    that error (no request waits for ever), those already in flight end as they do, and the ring
    goes on serving; ENOMEM, like EAGAIN, is retried."""
    fd, data = data_file

    async def body(reader: uring.UringIO) -> None:
        real = reader.ring._enter
        refusals = [errno.ENOMEM, errno.EINVAL]

        def enter(to_submit: int, min_complete: int, flags: int) -> int:
            if to_submit and refusals:
                raise OSError(refusals[0], os.strerror(refusals.pop(0)))
            return real(to_submit, min_complete, flags)

        first = bytearray(100)
        done_first = read(reader, [(fd, fd, memoryview(first), 0)])
        await asyncio.sleep(0)  # the turn that submits it, through the real io_uring_enter
        monkeypatch.setattr(reader.ring, "_enter", enter)
        assert await done_first is None and bytes(first) == data[:100]
        bufs = [bytearray(10) for _ in range(3)]
        futs = [read(reader, [(fd, fd, memoryview(b), 10 * i)]) for i, b in enumerate(bufs)]
        errs = await asyncio.gather(*futs)
        assert all(isinstance(e, OSError) and e.errno == errno.EINVAL for e in errs), errs
        assert reader.ring.unsubmitted == 0 and not refusals
        after = bytearray(10)
        assert await read(reader, [(fd, fd, memoryview(after), 50)]) is None and bytes(after) == data[50:60]

    run(body)


def test_direct_reads_and_an_unaligned_rest(tmp_path: Path) -> None:
    """An O_DIRECT read that meets the end of a file not a multiple of 4 KiB goes on through the buffered fd."""
    import mmap

    data = random.Random(3).randbytes(3 * 4096 + 700)
    path = tmp_path / "odd"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        os.close(fd)
        pytest.skip("no O_DIRECT on this file system")

    async def body(reader: uring.UringIO) -> None:
        buf = memoryview(mmap.mmap(-1, 4 * 4096))
        assert await read(reader, [(dfd, fd, buf, 0)]) is None
        assert bytes(buf) == data + bytes(4096 - 700)

    try:
        run(body)
    finally:
        os.close(fd)
        os.close(dfd)


def test_export_read_via_the_ring_and_an_error_as_eio(tmp_path: Path) -> None:
    """Export.read_via(): the bytes read() gives; a failed read is an EIO RequestError; the epoch is left."""
    path = tmp_path / "d.hds"
    write_image(path, SIZE)
    disk = open_disk(path, writable=True)
    exp = Export("d", disk, read_only=False)
    payload = random.Random(5).randbytes(1 << 20)
    exp.write(1 << 20, memoryview(payload))
    exp.changed(1 << 20, len(payload))

    def via(reader: uring.UringIO, offset: int, length: int) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        exp.read_via(reader, offset, length, lambda res, exc: fut.set_result(exc if exc is not None else res))
        return fut

    async def body(reader: uring.UringIO) -> None:
        for offset, length in [(0, 4096), ((1 << 20) - 512, 8192), ((1 << 20) + 12345, 54321), (0, SIZE)]:
            fut = via(reader, offset, length)
            # In flight, the read holds its epoch: nothing it looked up can be reused yet.
            assert sum(disk._active.values()) == 1
            got = await fut
            buf, holes = got
            assert bytes(buf) == bytes(exp.read(offset, length)[0])
            assert holes == exp.read(offset, length)[1]
        assert not disk._active  # every read left its epoch
        real = disk.read_begin

        def broken(offset: int, length: int) -> Any:
            plan = real(offset, length)
            plan.ios = [(-1, -1, view, host) for _, _, view, host in plan.ios]
            return plan

        disk.read_begin = broken  # type: ignore[method-assign]
        err = await via(reader, 1 << 20, 4096)
        assert isinstance(err, RequestError) and err.errno == Errno.EIO
        assert not disk._active

    try:
        run(body)
    finally:
        exp.close()


def test_server_refuses_to_start_without_io_uring(monkeypatch: pytest.MonkeyPatch) -> None:
    """--aio=io_uring never falls back: a ring that cannot be set up is a one-line error naming why."""
    import prlnbd.server as server_mod

    def refuse(*_: object) -> None:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(server_mod, "UringIO", refuse)

    async def main() -> None:
        server_mod.NbdServer({}, aio="io_uring")

    with pytest.raises(PrlNbdError) as info:
        asyncio.run(main())
    message = str(info.value)
    assert "--aio=io_uring" in message and "Operation not permitted" in message and "\n" not in message


def test_auto_goes_on_with_the_pool_and_says_why(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """--aio=auto (the default) where no ring can be set up: the server starts, runs no ring, and
    one log line names the reason and what it does instead."""
    import prlnbd.server as server_mod

    def refuse(*_: object) -> None:
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(server_mod, "UringIO", refuse)

    async def main() -> server_mod.NbdServer:
        server = server_mod.NbdServer({})
        server.pool.shutdown()
        return server

    with caplog.at_level(logging.INFO, logger="prlnbd.server"):
        server = asyncio.run(main())
    assert server.ring is None
    lines = [r.getMessage() for r in caplog.records if "io_uring" in r.getMessage()]
    assert len(lines) == 1 and "Operation not permitted" in lines[0] and "thread pool" in lines[0], lines


def test_auto_runs_a_ring_where_one_can_be_set_up() -> None:
    """The default --aio sets up the ring when the system allows it."""
    import prlnbd.server as server_mod

    async def main() -> bool:
        server = server_mod.NbdServer({})
        try:
            return server.ring is not None
        finally:
            server.pool.shutdown()
            if server.ring is not None:
                server.ring.close()

    assert asyncio.run(main())


@pytest.mark.parametrize("direct", [False, True], ids=["writeback", "none"])
def test_split_disk_read_via_the_ring_across_pieces(tmp_path: Path, direct: bool) -> None:
    """A split disk: reads within a piece and across piece boundaries, buffered and O_DIRECT, give read()'s bytes."""
    from tests.unit.test_split import STARTS, bundle, expected

    disk = open_disk(bundle(tmp_path, 2))
    if direct:
        disk.open_direct()
    want = expected(2)
    rng = random.Random(9)
    spans = [(0, len(want)), (STARTS[1] - 100, 300), (STARTS[1] - 4096, 8192), (STARTS[2] - 65536, 131072)]
    spans += [(o, rng.randrange(1, len(want) - o)) for o in (rng.randrange(len(want) - 1) for _ in range(30))]

    async def body(reader: uring.UringIO) -> None:
        for offset, length in spans:
            plan = disk.read_begin(offset, length)
            assert sum(sum(p._active.values()) for p in disk.pieces) >= 1
            assert await read(reader, plan.ios) is None
            plan.release()
            assert bytes(plan.buf) == want[offset : offset + length], (offset, length)
            assert [(r.offset, r.length, r.zero) for r in plan.runs] == [
                (r.offset, r.length, r.zero) for r in disk.read(offset, length)[1]
            ]
        assert not any(p._active for p in disk.pieces)

    try:
        run(body)
    finally:
        disk.close()


def write(reader: uring.UringIO, ios: list[uring.WriteIO]) -> asyncio.Future[BaseException | None]:
    fut: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
    reader.write_all(ios, fut.set_result)
    return fut


@pytest.fixture
def blank_file(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    path = tmp_path / "blank"
    for fd in opened(path, bytes(SIZE), os.O_RDWR):
        yield fd, path


def test_writes_at_many_offsets_beyond_the_depth(blank_file: tuple[int, Path]) -> None:
    """300 requests of 1-3 writes each (some from read-only bytes) through a ring of 4: the file holds them all."""
    fd, path = blank_file
    rng = random.Random(2)
    model = bytearray(SIZE)
    slot = SIZE // 300
    pieces = 0

    async def body(reader: uring.UringIO) -> None:
        nonlocal pieces
        jobs = []
        for i in range(300):
            ios: list[uring.WriteIO] = []
            at = i * slot
            for _ in range(1 + i % 3):
                length = rng.randrange(1, slot // 3)
                data = rng.randbytes(length)
                model[at : at + length] = data
                ios.append((fd, memoryview(data if i % 2 else bytearray(data)), at))
                at += length
            pieces += len(ios)
            jobs.append(write(reader, ios))
        for fut in jobs:
            assert await fut is None

    reader = run(body)
    assert reader.write_requests == 300 and reader.writes == pieces
    assert path.read_bytes() == bytes(model)


def test_short_writes_go_on_and_a_write_of_nothing_is_an_error(blank_file: tuple[int, Path]) -> None:
    """A completion that says fewer bytes were written has the rest written again; one that says none is EIO."""
    fd, path = blank_file
    data = random.Random(4).randbytes(100_000)

    def first_half(reader: uring.UringIO, zero: bool) -> None:
        # Report each write SQE's first completion as short (or as nothing written).
        real = reader.ring.reap
        seen: set[int] = set()

        def reap() -> list[tuple[int, int]]:
            out = []
            for key, res in real():
                op = reader._ops[key]
                if op.write and id(op) not in seen and res > 1:
                    seen.add(id(op))
                    res = 0 if zero else res // 2
                out.append((key, res))
            return out

        reader.ring.reap = reap  # type: ignore[method-assign]

    async def short(reader: uring.UringIO) -> None:
        first_half(reader, zero=False)
        assert await write(reader, [(fd, memoryview(data), 5000), (fd, memoryview(data[:10]), 0)]) is None

    reader = run(short)
    assert reader.writes > 2  # the rests went in again
    got = path.read_bytes()
    assert got[5000:105000] == data and got[:10] == data[:10]

    async def nothing(reader: uring.UringIO) -> None:
        first_half(reader, zero=True)
        err = await write(reader, [(fd, memoryview(data[:4096]), 0)])
        assert isinstance(err, OSError) and err.errno == errno.EIO and "wrote nothing" in str(err)

    run(nothing)


def test_export_write_via_the_ring_only_into_clusters_the_top_holds(tmp_path: Path) -> None:
    """Export.write_via(): into held clusters the ring writes (holding the epoch until then); a write that
    must allocate is left to the pool, holding nothing; with --cache=none aligned writes go O_DIRECT; a
    failed write is an EIO RequestError."""
    path = tmp_path / "d.hds"
    write_image(path, SIZE)  # 1 MiB clusters
    disk = open_disk(path, writable=True)
    exp = Export("d", disk, read_only=False)
    exp.write(1 << 20, memoryview(bytes(1 << 20)))
    exp.changed(1 << 20, 1 << 20)
    rng = random.Random(6)

    def via(reader: uring.UringIO, offset: int, data: bytes) -> tuple[bool, asyncio.Future[Any]]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        taken = exp.write_via(reader, offset, memoryview(bytearray(data)), lambda _res, exc: fut.set_result(exc))
        return taken, fut

    async def body(reader: uring.UringIO) -> None:
        for offset, length in [((1 << 20) + 100, 5000), (1 << 20, 1 << 20), ((2 << 20) - 4096, 4096)]:
            data = rng.randbytes(length)
            taken, fut = via(reader, offset, data)
            assert taken
            assert sum(disk._active.values()) == 1  # in flight: nothing it looked up is reused
            assert await fut is None
            assert not disk._active
            assert bytes(exp.read(offset, length)[0]) == data
        for offset, length in [(0, 4096), ((2 << 20) - 10, 20), (2 << 20, 1)]:
            taken, _ = via(reader, offset, b"x" * length)
            assert not taken and not disk._active, (offset, length)
        assert exp.read(0, 4096)[1] == [(0, 4096)]  # still a hole: nothing was written there

        disk.open_direct()
        dfd = disk._direct[disk.top.fd]
        plan = disk.write_begin((1 << 20) + 8192, memoryview(bytearray(8192)))
        assert plan is not None and [io[0] for io in plan.ios] == [dfd]
        plan.release()
        data = rng.randbytes(8192)
        taken, fut = via(reader, (1 << 20) + 8192, data)
        assert taken and await fut is None
        assert bytes(exp.read((1 << 20) + 8192, 8192)[0]) == data

        real = disk.write_begin

        def broken(offset: int, data: memoryview) -> Any:
            plan = real(offset, data)
            assert plan is not None
            plan.ios = [(-1, view, host) for _, view, host in plan.ios]
            return plan

        disk.write_begin = broken  # type: ignore[method-assign]
        taken, fut = via(reader, 1 << 20, b"y" * 4096)
        err = await fut
        assert taken and isinstance(err, RequestError) and err.errno == Errno.EIO
        assert not disk._active

    try:
        run(body)
    finally:
        exp.close()


def test_split_disk_write_begin_across_pieces(tmp_path: Path) -> None:
    """A split disk: a write held by both pieces' tops is one plan with a write per piece; one that meets an
    unallocated cluster in the second piece is None, with the first piece's epoch given back."""
    from tests.unit.test_split import CS, STARTS, bundle

    # Each piece's top holds its first and last clusters.
    disk = open_disk(bundle(tmp_path, 1), writable=True)
    try:
        edge = STARTS[1]
        plan = disk.write_begin(edge - 4096, memoryview(bytearray(8192)))
        assert plan is not None and len(plan.ios) == 2
        assert [len(view) for _, view, _ in plan.ios] == [4096, 4096]
        assert all(p._active for p in disk.pieces[:2])
        plan.release()
        assert not any(p._active for p in disk.pieces)
        assert disk.write_begin(edge - 100, memoryview(bytearray(CS + 200))) is None
        assert not any(p._active for p in disk.pieces)
    finally:
        disk.close()


def test_a_ring_moves_completions_out_of_the_kernels_overflow_list(data_file: tuple[int, bytes]) -> None:
    """More completions than the CQ holds: the rest wait in the kernel's list, the ring says so, and a
    flush brings them in (a real overflow, 16 reads through a CQ of 8)."""
    import ctypes

    fd, data = data_file
    ring = uring.Ring(4)
    bufs = [ctypes.create_string_buffer(512) for _ in range(16)]
    try:
        assert ring.cq_entries == 8
        for i, buf in enumerate(bufs):
            ring.queue_read(fd, ctypes.addressof(buf), 512, 512 * i, i)
            if ring.space() == 0 or i == len(bufs) - 1:
                ring.submit(wait=ring.unsubmitted)
        assert ring.overflowed
        got = ring.reap()
        assert len(got) == 8
        ring.flush_overflow()
        got += ring.reap()
        assert not ring.overflowed
        assert sorted(got) == [(i, 512) for i in range(16)]
        assert all(buf.raw == data[512 * i : 512 * (i + 1)] for i, buf in enumerate(bufs))
    finally:
        ring.close()


def test_completions_that_come_without_a_signal_are_reaped(
    data_file: tuple[int, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    """No eventfd signal (as for completions the kernel put in its overflow list): the look the
    ring takes while I/O is in flight reaps them, and brings in what waits in the overflow list."""
    fd, data = data_file

    async def body(reader: uring.UringIO) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(reader._efd)  # the signal is never seen
        bufs = [bytearray(4096) for _ in range(12)]
        futs = [read(reader, [(fd, fd, memoryview(buf), 4096 * i)]) for i, buf in enumerate(bufs)]
        assert [await fut for fut in futs] == [None] * 12
        assert all(bytes(buf) == data[4096 * i : 4096 * (i + 1)] for i, buf in enumerate(bufs))
        # Now a real overflow behind the loop's back: 12 reads into a CQ of 8, none reaped.
        ring = reader.ring
        reader._limit = 64  # past the CQ's 8, which the ring never allows itself
        bufs = [bytearray(512) for _ in range(12)]
        futs = [read(reader, [(fd, fd, memoryview(buf), 512 * i)]) for i, buf in enumerate(bufs)]
        while reader._waiting or ring.unsubmitted:
            reader._fill()
            ring.submit(wait=ring.unsubmitted)
        assert ring.overflowed
        assert [await fut for fut in futs] == [None] * 12
        assert all(bytes(buf) == data[512 * i : 512 * (i + 1)] for i, buf in enumerate(bufs))
        loop.add_reader(reader._efd, reader._complete)  # for close()

    reader = run(body)
    assert reader.overflows >= 1
    assert "overflow list" in caplog.text
