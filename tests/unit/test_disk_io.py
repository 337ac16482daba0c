"""The disk layer under concurrent I/O: writes from many threads, releases, reuse, cached reads."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from prlnbd.disk.chain import Disk, open_disk
from prlnbd.image.create import write_image
from prlnbd.image.parallels import ParallelsImage

CS = 64 * 1024
SIZE = 64 * CS


@pytest.fixture
def disk(tmp_path: Path) -> Disk:
    path = tmp_path / "d.hds"
    write_image(path, SIZE, cluster_size=CS)
    return open_disk(path, writable=True)


def top(disk: Disk) -> ParallelsImage:
    layer = disk.layers[0]
    assert isinstance(layer, ParallelsImage)
    return layer


def read(disk: Disk, offset: int, length: int) -> bytes:
    buf, _ = disk.read(offset, length)
    return bytes(buf)


def test_threads_writing_one_new_cluster_allocate_it_once(disk: Disk) -> None:
    """Sixteen threads write their own 4 KiB of the same unallocated clusters at once: nothing is lost."""
    pieces = CS // 4096
    start = threading.Barrier(pieces)

    def writer(i: int) -> None:
        start.wait()
        for cluster in range(8):
            disk.write(cluster * CS + i * 4096, bytes([i + 1]) * 4096)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(pieces)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = b"".join(bytes([i + 1]) * 4096 for i in range(pieces))
    for cluster in range(8):
        assert read(disk, cluster * CS, CS) == expected
    img = top(disk)
    assert img.allocated == list(range(8))
    hosts = {int(img.bat[c]) for c in range(8)}
    assert len(hosts) == 8  # one host cluster each, none shared, none leaked past them
    assert img._state().data_end == img.data_off + 8 * CS
    disk.close()


def flush(disk: Disk) -> None:
    token = disk.begin_flush()
    disk.flush_io(token)
    disk.end_flush(token, True)


def test_a_released_cluster_is_not_reused_while_io_that_saw_it_runs(disk: Disk) -> None:
    """TRIM, FLUSH, then a new cluster: not the released one while a read that looked it up still runs."""
    disk.write(0, b"a" * CS)
    img = top(disk)
    released = int(img.bat[0])
    reader = disk._enter()  # a read that looked cluster 0 up and has not read it yet
    disk.zero(0, CS, trim=True)
    flush(disk)
    disk.write(5 * CS, b"b" * CS)
    assert int(img.bat[5]) != released
    disk._leave(reader)
    disk.write(9 * CS, b"c" * CS)
    assert int(img.bat[9]) == released  # reused once nothing could still read it
    assert read(disk, 0, CS) == bytes(CS)
    assert read(disk, 9 * CS, CS) == b"c" * CS
    disk.close()


def test_a_released_cluster_is_reused_after_a_flush_when_nothing_runs(disk: Disk) -> None:
    disk.write(0, b"a" * CS)
    released = int(top(disk).bat[0])
    disk.zero(0, CS, trim=True)
    disk.write(3 * CS, b"b" * CS)
    assert int(top(disk).bat[3]) != released  # not durable yet: not reusable
    flush(disk)
    disk.write(4 * CS, b"c" * CS)
    assert int(top(disk).bat[4]) == released
    disk.close()


def test_read_nowait_answers_cached_data_and_holes(disk: Disk) -> None:
    disk.write(CS, b"x" * 4096)
    got = disk.read_nowait(CS, 8192)
    # Just written, so cached (or a file system that cannot say: then None, and a worker reads).
    if got is not None:
        buf, _ = got
        assert bytes(buf) == b"x" * 4096 + bytes(4096)
    hole = disk.read_nowait(20 * CS, CS)
    assert hole is not None and bytes(hole[0]) == bytes(CS) and all(r.zero for r in hole[1])
    disk.close()


def test_concurrent_writes_and_trims_keep_the_image_consistent(disk: Disk) -> None:
    """Threads writing, zeroing and trimming overlapping clusters, with flushes: a map without sharing."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        import random

        rng = random.Random(seed)
        try:
            for _ in range(300):
                c = rng.randrange(16)
                op = rng.random()
                if op < 0.6:
                    disk.write(c * CS + rng.randrange(CS - 512), bytes([seed]) * 512)
                elif op < 0.9:
                    disk.zero(c * CS, CS, trim=rng.random() < 0.5)
                else:
                    flush(disk)
        except BaseException as e:
            errors.append(e)
            stop.set()

    threads = [threading.Thread(target=work, args=(s,)) for s in range(1, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    flush(disk)
    img = top(disk)
    hosts = [int(img.bat[c]) for c in img.allocated]
    assert len(hosts) == len(set(hosts))
    assert sorted(c for c in range(len(img.bat)) if img.bat[c]) == img.allocated
    assert not set(hosts) & set(img._state().free)
    disk.close()


def test_released_clusters_are_punched_and_reused(disk: Disk, tmp_path: Path) -> None:
    """A TRIM punches the released cluster; reused by a partial write, it reads zeros around it."""
    import os

    disk.write(0, b"a" * (4 * CS))
    img = top(disk)
    flush(disk)
    before = os.fstat(img.fd).st_blocks
    disk.zero(CS, 2 * CS, trim=True)
    assert os.fstat(img.fd).st_blocks * 512 <= before * 512 - 2 * CS
    flush(disk)
    disk.write(40 * CS + 10, b"b" * 10)
    assert read(disk, 40 * CS, 30) == bytes(10) + b"b" * 10 + bytes(10)
    assert img._state().data_end == img.data_off + 4 * CS  # reused, the file did not grow
    disk.close()


def test_a_file_system_without_punch_hole_keeps_the_cluster(
    disk: Disk, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """EOPNOTSUPP from PUNCH_HOLE: the TRIM still succeeds, logged once, and the cluster is reused."""
    import errno

    from prlnbd.image import parallels

    calls = []

    def refuse(fd: int, offset: int, length: int) -> None:
        calls.append(offset)
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(parallels, "punch_hole", refuse)
    disk.write(0, b"a" * (4 * CS))
    disk.zero(0, CS, trim=True)
    disk.zero(2 * CS, CS)
    assert len(calls) == 1
    assert sum("cannot punch holes" in r.getMessage() for r in caplog.records) == 1
    assert read(disk, 0, 3 * CS) == bytes(CS) + b"a" * CS + bytes(CS)
    flush(disk)
    disk.write(50 * CS, b"c" * CS)
    assert top(disk)._state().data_end == top(disk).data_off + 4 * CS
    disk.close()


def test_a_reopened_image_reuses_clusters_nothing_references(tmp_path: Path) -> None:
    """Freed clusters in the middle of the file are reused by the next writer before the file grows."""
    path = tmp_path / "r.hds"
    write_image(path, SIZE, cluster_size=CS)
    d = open_disk(path, writable=True)
    d.write(0, b"a" * (4 * CS))
    d.zero(CS, CS, trim=True)
    d.close()
    d = open_disk(path, writable=True)
    d.write(20 * CS, b"b" * CS)
    img = top(d)
    assert int(img.bat[20]) == img.data_off + CS
    assert read(d, 0, 4 * CS) == b"a" * CS + bytes(CS) + b"a" * (2 * CS)
    d.close()


@pytest.mark.parametrize("punch", [True, False])
def test_a_partial_write_into_a_reused_stale_cluster_reads_zeros_around_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, punch: bool
) -> None:
    """A slot nothing references but that holds old bytes (a crash's leftover) is reused: the new
    cluster reads zeros around the write, whether it is punched first or written whole."""
    import errno
    import struct

    from prlnbd.image import format as fmt
    from prlnbd.image import parallels

    path = tmp_path / "s.hds"
    write_image(path, SIZE, cluster_size=CS)
    d = open_disk(path, writable=True)
    d.write(0, b"a" * (4 * CS))
    d.close()
    with path.open("r+b") as f:  # unmap cluster 1: its slot keeps its bytes
        f.seek(fmt.HEADER_SIZE + 4)
        f.write(struct.pack("<I", 0))
    if not punch:
        def refuse(fd: int, offset: int, length: int) -> None:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")

        monkeypatch.setattr(parallels, "punch_hole", refuse)
    d = open_disk(path, writable=True)
    img = top(d)
    stale = img.data_off + CS
    assert img._state().free == [stale]
    d.write(20 * CS + 100, b"b" * 50)
    assert int(img.bat[20]) == stale
    assert read(d, 20 * CS, CS) == bytes(100) + b"b" * 50 + bytes(CS - 150)
    d.close()


def test_layers_taken_out_are_closed_only_after_io_that_may_use_them(tmp_path: Path) -> None:
    """replace_layers() swaps at once; close_retired() closes the old layers once the I/O of older epochs ended."""
    base = tmp_path / "base.hds"
    write_image(base, 4 << 20, cluster_size=1 << 20, clusters={0: b"b" * (1 << 20)})
    d = open_disk(base)
    other = ParallelsImage.open(base)
    old = d.layers[0]
    running = d._enter()  # a read in flight that resolved its runs through the old layer
    d.replace_layers(0, 1, [other], [""])
    assert d.layers == [other]
    closer = threading.Thread(target=d.close_retired)
    closer.start()
    # Wait until it waits (an event, not a time): the I/O of the old epoch still runs.
    while not d._epoch_ended._waiters:  # type: ignore[attr-defined]
        closer.join(0.001)
        assert closer.is_alive(), "close_retired() returned while I/O of the old layer ran"
    assert old.fd >= 0
    d._leave(running)
    closer.join()
    assert old.fd == -1
    assert bytes(d.read(0, 4)[0]) == b"bbbb"
    d.close()


def record_syncs(monkeypatch: pytest.MonkeyPatch, img: ParallelsImage) -> list[str]:
    """From now on, list IMG's fdatasyncs ("sync") and BAT writes ("bat") in the order they happen."""
    import os

    calls: list[str] = []
    real_sync, real_pwrite = os.fdatasync, os.pwrite

    def sync(fd: int) -> None:
        if fd == img.fd:
            calls.append("sync")
        real_sync(fd)

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        if fd == img.fd and offset < img.data_off:
            calls.append("bat")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "fdatasync", sync)
    monkeypatch.setattr(os, "pwrite", pwrite)
    return calls


def flushed(disk: Disk, calls: list[str]) -> list[str]:
    """What one flush of DISK did, from record_syncs()'s list (BAT writes of one flush as one "bat")."""
    calls.clear()
    flush(disk)
    return [c for i, c in enumerate(calls) if c != "bat" or calls[i - 1 : i] != ["bat"]]


def test_the_file_grows_ahead_and_fresh_clusters_map_in_one_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """New clusters come from space grown ahead; once its size is durable, a flush that maps fresh
    clusters syncs once, entries written before the sync; reused clusters still sync data first."""
    import os

    from prlnbd.image import parallels

    monkeypatch.setattr(parallels, "PREALLOC", 8 * CS)
    path = tmp_path / "g.hds"
    write_image(path, SIZE, cluster_size=CS)
    disk = open_disk(path, writable=True)
    img = top(disk)
    base = img._align_host(img.data_off)
    calls = record_syncs(monkeypatch, img)

    disk.write(0, b"a" * 4096)
    assert os.fstat(img.fd).st_size == base + 8 * CS  # one step ahead, not one cluster
    # The grown size is not durable yet: data first, then the entry.
    assert flushed(disk, calls) == ["sync", "bat", "sync"]
    disk.write(5 * CS, b"b" * 4096)
    disk.write(9 * CS + 7, b"c" * 100)
    assert flushed(disk, calls) == ["bat", "sync"]
    assert flushed(disk, calls) == ["sync"]  # nothing to map: data only
    disk.write(100, b"d" * 10)  # into a held cluster
    assert flushed(disk, calls) == ["sync"]

    # Past the first step: the next one is grown, and its size is durable only after a sync.
    for c in range(20, 27):
        disk.write(c * CS, b"e")
    assert os.fstat(img.fd).st_size == base + 16 * CS
    assert flushed(disk, calls) == ["sync", "bat", "sync"]

    # A released cluster, reused: it held the guest's old bytes, so its data is synced first.
    disk.zero(5 * CS, CS, trim=True)
    assert flushed(disk, calls) == ["bat", "sync"]
    disk.write(40 * CS + 10, b"f" * 10)
    assert img.host_offset(40) == base + CS  # the released one
    assert flushed(disk, calls) == ["sync", "bat", "sync"]

    assert read(disk, 0, 4096) == b"a" * 100 + b"d" * 10 + b"a" * 3986
    assert read(disk, 9 * CS, 200) == bytes(7) + b"c" * 100 + bytes(93)
    assert read(disk, 40 * CS, 30) == bytes(10) + b"f" * 10 + bytes(10)
    end = img._state().data_end
    disk.close()
    assert os.stat(path).st_size == end  # the unused tail is cut off at a clean stop
    again = open_disk(path, writable=False)
    assert read(again, 9 * CS, 200) == bytes(7) + b"c" * 100 + bytes(93)
    again.close()


def test_a_cluster_copied_from_below_syncs_its_data_before_its_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fresh space under a snapshot: where the layer below shows through, the copy must land first."""
    from tests.unit.test_chain import chain_descriptor

    desc = chain_descriptor(tmp_path, 2, files=True)
    base = open_disk(tmp_path / "d.hdd.0.hds", writable=True)
    base.write(0, b"p" * (64 << 10))
    base.close()
    disk = open_disk(desc, writable=True)
    img = top(disk)
    calls = record_syncs(monkeypatch, img)
    disk.write(200 << 10, b"x")  # a cluster nothing is below: fresh
    flush(disk)  # the grown size is durable now
    disk.write(300 << 10, b"y")
    assert flushed(disk, calls) == ["bat", "sync"]
    disk.write(10, b"q")  # copy-on-write from the layer below
    assert flushed(disk, calls) == ["sync", "bat", "sync"]
    assert read(disk, 0, 12) == b"p" * 10 + b"q" + b"p"
    disk.close()


def test_without_fallocate_the_file_grows_by_the_cluster(
    disk: Disk, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system that refuses fallocate: the file grows sparsely by what each cluster needs."""
    import errno
    import os

    from prlnbd.image import parallels

    def refuse(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(parallels, "reserve", refuse)
    img = top(disk)
    disk.write(3 * CS + 5, b"z" * 5)
    assert os.fstat(img.fd).st_size == img._align_host(img.data_off) + CS
    calls = record_syncs(monkeypatch, img)
    assert flushed(disk, calls) == ["sync", "bat", "sync"]
    assert read(disk, 3 * CS, 12) == bytes(5) + b"z" * 5 + bytes(2)
    disk.close()


def test_fill_cache_brings_one_run_into_the_page_cache_and_nothing_else(disk: Disk, tmp_path: Path) -> None:
    """fill_cache(): the bytes of one data run end up cached, read by nobody; a range of a hole, or
    across a hole and data, is left for read()."""
    from prlnbd.disk.pagecache import Residency

    disk.write(0, b"\x11" * (2 * CS))
    flush(disk)
    img = top(disk)
    os.fsync(img.fd)
    os.posix_fadvise(img.fd, 0, 0, os.POSIX_FADV_DONTNEED)
    residency = Residency(img.fd)
    try:
        host = int(img.bat[1])
        if residency.cached(host, CS):
            pytest.skip(f"{tmp_path} keeps files in memory: nothing to evict")
        assert disk.fill_cache(CS, CS)
        assert residency.cached(host, CS)
        assert not disk.fill_cache(4 * CS, CS)  # a hole: nothing to bring in
        assert not disk.fill_cache(CS, 2 * CS)  # data, then a hole
    finally:
        residency.close()
        disk.close()
