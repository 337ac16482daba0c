"""Crash consistency: SIGKILL the server at random moments of a mixed write workload.

Each round serves one disk writable, runs unaligned writes (some FUA),
WRITE_ZEROES, TRIMs and a FLUSH every few requests with several requests in
flight, then kills the server with SIGKILL at a random moment. The image must
then show no corruption but the unclean in_use flag and leaked space;
`prlnbd check --repair` must leave it clean for both prlnbd and `qemu-img
check`; and served again it must hold everything acknowledged as durable.

The client keeps a model: `durable` is the disk as of the last acknowledged
FLUSH (or FUA write), built only from requests that were answered before that
FLUSH was sent. Requests not covered by an acknowledged FLUSH may hold old or
new data, so their ranges are not compared; TRIMmed ranges are unspecified
and not compared either. After each round the disk as read back becomes the
model for the next round on the same image: the state accumulates over the
rounds. Two disks take turns: one .hds made by qemu-img, and a 2-layer bundle
whose lower layer holds data (its bytes must never change).

Set PRLNBD_CRASH_SEED to replay a failing seed, PRLNBD_CRASH_ROUNDS to change
the number of rounds. The kill moment depends on timing, so a replay runs the
same workload but may kill at another point.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from prlnbd.disk.descriptor import build_descriptor, new_guid, save_descriptor
from prlnbd.image.create import write_image
from tests import support
from tests.support import Server

nbd = pytest.importorskip("nbd")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not support.have("qemu-img"), reason="qemu-utils is needed"),
]

ROUNDS = int(os.environ.get("PRLNBD_CRASH_ROUNDS", "50"))
MIB = 1 << 20
EXPORT = "d"
READ_CHUNK = 4 * MIB
MAX_WORKLOAD_SECONDS = 0.45  # a round's workload never runs longer than this
ACCEPTED_AFTER_CRASH = frozenset(("in_use", "leak"))

Interval = tuple[int, int]  # [start, end)


# ---------------------------------------------------------------- interval sets


def merge(intervals: list[Interval]) -> list[Interval]:
    """Sorted, disjoint union of INTERVALS (empty ones dropped)."""
    out: list[Interval] = []
    for a, b in sorted(i for i in intervals if i[0] < i[1]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def subtract(base: list[Interval], cuts: list[Interval]) -> list[Interval]:
    """BASE (sorted, disjoint) minus the union of CUTS."""
    cuts = merge(cuts)
    out: list[Interval] = []
    for a, b in base:
        pos = a
        i = bisect.bisect_right(cuts, (a, a)) - 1
        i = max(i, 0)
        while i < len(cuts) and cuts[i][0] < b:
            ca, cb = cuts[i]
            if cb > pos:
                if ca > pos:
                    out.append((pos, min(ca, b)))
                pos = max(pos, cb)
            i += 1
        if pos < b:
            out.append((pos, b))
    return out


# ---------------------------------------------------------------- the client model


@dataclass(eq=False)
class Op:
    """One NBD request of the workload."""

    seq: int
    kind: str  # "write", "zero", "trim", "flush"
    offset: int = 0
    length: int = 0
    data: bytes | None = None
    flags: int = 0
    cookie: int = 0
    acked: bool = False
    covered: bool = False  # durable: an acknowledged FLUSH (or its own FUA) covers it
    covers: list[Op] = field(default_factory=list)  # FLUSH: requests answered before it was sent

    @property
    def end(self) -> int:
        return self.offset + self.length

    def overlaps(self, other: Op) -> bool:
        return self.kind != "flush" and other.kind != "flush" and self.offset < other.end and other.offset < self.end

    def __str__(self) -> str:
        fua = "+FUA" if self.flags & nbd.CMD_FLAG_FUA else ""
        hole = "+NO_HOLE" if self.flags & nbd.CMD_FLAG_NO_HOLE else ""
        state = "durable" if self.covered else "answered" if self.acked else "in flight"
        where = "" if self.kind == "flush" else f" [{self.offset}, {self.end}) len {self.length}"
        return f"#{self.seq} {self.kind}{fua}{hole}{where}: {state}"


class Model:
    """What the disk must hold after a crash, from the requests the server acknowledged."""

    def __init__(self, content: bytearray) -> None:
        self.size = len(content)
        self.durable = content  # content as of the last acknowledged flush, where known
        self.unknown: list[Interval] = []  # durable TRIMs: content unspecified
        self.pending: list[Op] = []  # sent, not yet durable, in send order
        self.history: list[Op] = []  # every request of this round, for failure reports

    def sent(self, op: Op) -> None:
        self.history.append(op)
        if op.kind == "flush":
            op.covers = [o for o in self.pending if o.acked]
        else:
            self.pending.append(op)

    def answered(self, op: Op) -> None:
        op.acked = True
        if op.kind == "flush":
            self._cover(op.covers)
        elif op.flags & nbd.CMD_FLAG_FUA and not any(
            o.seq < op.seq and o.overlaps(op) for o in self.pending
        ):
            # A FUA write is durable when answered; if an older, not yet durable
            # request overlaps it, leave it to the next flush to keep the order.
            self._cover([op])

    def _cover(self, ops: list[Op]) -> None:
        for o in sorted(ops, key=lambda o: o.seq):
            if o.covered:
                continue
            o.covered = True
            if o.kind == "trim":
                self.unknown = merge([*self.unknown, (o.offset, o.end)])
                continue
            self.durable[o.offset : o.end] = o.data if o.kind == "write" else bytes(o.length)  # type: ignore[assignment]
            self.unknown = subtract(self.unknown, [(o.offset, o.end)])
        self.pending = [o for o in self.pending if not o.covered]

    def checked(self) -> list[Interval]:
        """The ranges whose content is known after a crash now."""
        return subtract([(0, self.size)], [*self.unknown, *((o.offset, o.end) for o in self.pending)])

    def touching(self, offset: int) -> list[Op]:
        return [o for o in self.history if o.kind != "flush" and o.offset <= offset < o.end]


# ---------------------------------------------------------------- disks


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_all(uri: str, size: int) -> bytearray:
    """The whole export, read in chunks over one connection."""
    h = nbd.NBD()
    h.connect_uri(uri)
    assert h.get_size() == size
    out = bytearray(size)
    for pos in range(0, size, READ_CHUNK):
        n = min(READ_CHUNK, size - pos)
        out[pos : pos + n] = h.pread(n, pos)
    h.shutdown()
    return out


@dataclass
class CrashDisk:
    """One disk that goes through the crash rounds: what to serve and what to check."""

    name: str
    path: Path  # what `serve` and `check` are given: a .hds file or a bundle directory
    top: Path  # the writable image file
    size: int
    cluster_size: int
    hot: int  # most requests land in [0, hot)
    lower: Path | None = None
    lower_sha: str = ""
    server: Server | None = None
    model: Model | None = None
    rounds: int = 0


def make_single(tmp: Path, rng: random.Random) -> tuple[CrashDisk, bytearray]:
    size, cs = 64 * MIB, 64 << 10
    path = tmp / "single.hds"
    support.run("qemu-img", "create", "-q", "-f", "parallels", "-o", f"cluster_size={cs}", path, str(size))
    return CrashDisk("single", path, path, size, cs, hot=8 * MIB), bytearray(size)


def make_bundle(tmp: Path, rng: random.Random) -> tuple[CrashDisk, bytearray]:
    size, cs = 96 * MIB, 256 << 10
    hot = 12 * MIB
    bundle = tmp / "crash.hdd"
    bundle.mkdir()
    low_guid, top_guid = new_guid(), new_guid()
    low_name, top_name = f"crash.hdd.0.{low_guid}.hds", f"crash.hdd.1.{top_guid}.hds"
    # Data in about half the hot clusters and a few far ones, so copy-on-write and
    # zeroing over a lower layer's data happen often.
    indices = [c for c in range(hot // cs) if rng.random() < 0.5]
    indices += rng.sample(range(hot // cs, size // cs), 8)
    clusters = {c: rng.randbytes(cs) for c in indices}
    write_image(bundle / low_name, size, cluster_size=cs, clusters=clusters)
    write_image(bundle / top_name, size, cluster_size=cs)
    tree = build_descriptor(size, cs, [(top_guid, "Compressed", top_name), (low_guid, "Compressed", low_name)])
    save_descriptor(tree, bundle / "DiskDescriptor.xml")
    content = bytearray(size)
    for c, data in clusters.items():
        content[c * cs : (c + 1) * cs] = data
    disk = CrashDisk("bundle", bundle, bundle / top_name, size, cs, hot=hot, lower=bundle / low_name)
    disk.lower_sha = sha256(bundle / low_name)
    return disk, content


# ---------------------------------------------------------------- the workload


class Workload:
    """Random requests for one round: unaligned writes, zeroes, trims, flushes."""

    def __init__(self, rng: random.Random, disk: CrashDisk) -> None:
        self.rng = rng
        self.size = disk.size
        self.cs = disk.cluster_size
        self.hot = disk.hot
        self.seq = 0
        self.since_flush = 0
        self.flush_every = rng.randint(2, 12)

    def _range(self, aligned: bool) -> tuple[int, int]:
        rng, cs = self.rng, self.cs
        limit = self.hot if rng.random() < 0.75 else self.size
        if aligned:
            n = rng.randint(1, 4) * cs
            start = rng.randrange(0, limit - n + 1, cs)
            return start, n
        r = rng.random()
        n = rng.randint(1, 4096) if r < 0.3 else rng.randint(1, cs) if r < 0.7 else rng.randint(cs // 2, 3 * cs)
        return rng.randrange(0, limit - n + 1), n

    def next(self) -> Op:
        rng = self.rng
        self.seq += 1
        if self.since_flush >= self.flush_every:
            self.since_flush = 0
            self.flush_every = rng.randint(2, 12)
            return Op(self.seq, "flush")
        self.since_flush += 1
        r = rng.random()
        if r < 0.62:
            off, n = self._range(aligned=r > 0.52)
            flags = nbd.CMD_FLAG_FUA if rng.random() < 0.08 else 0
            return Op(self.seq, "write", off, n, rng.randbytes(n), flags)
        if r < 0.82:
            off, n = self._range(aligned=rng.random() < 0.5)
            flags = nbd.CMD_FLAG_NO_HOLE if rng.random() < 0.25 else 0
            return Op(self.seq, "zero", off, n, flags=flags)
        off, n = self._range(aligned=rng.random() < 0.6)
        return Op(self.seq, "trim", off, n)


class ReuseWorkload(Workload):
    """Whole clusters written, TRIMmed and zeroed over and over in a small area.

    Released clusters are punched, and reused once a flush made the release durable,
    so a kill lands in every stage of that: released, punched, quarantined, reused.
    """

    def _range(self, aligned: bool) -> tuple[int, int]:
        n = self.rng.randint(1, 4) * self.cs
        return self.rng.randrange(0, self.hot - n + 1, self.cs), n

    def next(self) -> Op:
        op = super().next()
        if op.kind == "zero":
            op.flags = 0  # NO_HOLE would write zeros instead of releasing
        return op


def send(h: nbd.NBD, op: Op) -> int:
    if op.kind == "write":
        assert op.data is not None
        return int(h.aio_pwrite(op.data, op.offset, flags=op.flags))
    if op.kind == "zero":
        return int(h.aio_zero(op.length, op.offset, flags=op.flags))
    if op.kind == "trim":
        return int(h.aio_trim(op.length, op.offset))
    return int(h.aio_flush())


def run_until_kill(disk: CrashDisk, rng: random.Random, workload: type[Workload] = Workload) -> str:
    """Drive the workload on DISK's server and SIGKILL it at a random moment; describe the moment."""
    server, model = disk.server, disk.model
    assert server is not None and model is not None
    work = workload(rng, disk)
    depth = rng.randint(1, 12)
    by_time = rng.random() < 0.6
    delay = rng.uniform(0, 0.3)
    max_ops = rng.randint(0, 120) if not by_time else 1 << 30
    h = nbd.NBD()
    h.connect_uri(server.uri(EXPORT))
    inflight: dict[int, Op] = {}
    nxt = work.next()
    sent = 0
    start = time.monotonic()
    while True:
        now = time.monotonic() - start
        if (by_time and now >= delay) or sent >= max_ops or now >= MAX_WORKLOAD_SECONDS:
            break
        for cookie, op in list(inflight.items()):
            try:
                done = h.aio_command_completed(cookie)
            except nbd.Error as e:
                raise AssertionError(f"{op} failed: {e}\nserver log:\n{server.log_text()[-3000:]}") from e
            if done:
                del inflight[cookie]
                model.answered(op)
        if len(inflight) < depth and not any(o.overlaps(nxt) for o in inflight.values()):
            nxt.cookie = send(h, nxt)
            model.sent(nxt)
            inflight[nxt.cookie] = nxt
            sent += 1
            nxt = work.next()
            h.poll(0)
        else:
            h.poll(1)
    assert server.proc.poll() is None, f"server died during the workload:\n{server.log_text()[-3000:]}"
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    log = server.log_text()
    assert "Traceback" not in log and " ERROR" not in log, f"server errors before the kill:\n{log[-3000:]}"
    del h
    durable = sum(1 for o in model.history if o.covered)
    how = f"after {delay * 1000:.0f} ms" if by_time else f"after {max_ops} requests"
    return (
        f"killed {how} ({time.monotonic() - start:.3f} s, depth {depth}): {sent} requests sent,"
        f" {durable} durable, {len(model.pending)} not durable, {len(inflight)} in flight"
    )


# ---------------------------------------------------------------- checks


def prlnbd_check(path: Path, *args: str) -> tuple[int, dict[str, object]]:
    """`prlnbd check PATH --json ARGS`: (exit status, report)."""
    res = subprocess.run(
        [support.PYTHON, "-m", "prlnbd", "check", str(path), "--json", *args],
        capture_output=True,
        text=True,
        cwd=support.ROOT,
        timeout=60,
    )
    try:
        report = json.loads(res.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"prlnbd check {path} {args}: exit {res.returncode}, not JSON:\n"
                             f"{res.stdout}\n{res.stderr}") from None
    return res.returncode, report


def check_after_crash(disk: CrashDisk, tmp: Path) -> str:
    """The killed server's image: only in_use and leaks; repair; then clean for prlnbd and qemu-img."""
    rc, report = prlnbd_check(disk.path)
    problems = report["problems"]
    assert isinstance(problems, list)
    kinds = {p["kind"] for p in problems}
    bad = [p for p in problems if p["kind"] not in ACCEPTED_AFTER_CRASH]
    assert not bad, f"corruption after SIGKILL (beyond in_use and leaks), exit {rc}:\n{json.dumps(report, indent=1)}"
    assert "in_use" in kinds, f"a killed writer must leave in_use set:\n{json.dumps(report, indent=1)}"
    assert rc == 2, f"in_use set is a corruption: exit must be 2, got {rc}:\n{json.dumps(report, indent=1)}"
    assert report["corruptions"] == sum(1 for p in problems if p["kind"] == "in_use"), report
    assert report["leaks"] == sum(1 for p in problems if p["kind"] == "leak"), report
    found = (f"check found {', '.join(sorted(kinds))}, {report['leaked-bytes']} bytes leaked,"
             f" {report['free-bytes']} free")

    # Keep the image as the crash left it, for a post-mortem if a later step fails.
    shutil.copyfile(disk.top, tmp / f"{disk.name}-before-repair.hds")

    rc, report = prlnbd_check(disk.path, "--repair")
    assert rc == 0, f"check --repair left problems (exit {rc}):\n{json.dumps(report, indent=1)}"
    assert report["repaired"] is True, report
    fixed = report["problems"]
    assert isinstance(fixed, list) and all(p["fixed"] for p in fixed), report
    rc, report = prlnbd_check(disk.path)
    assert rc == 0 and not report["problems"], f"second check after repair, exit {rc}:\n{json.dumps(report, indent=1)}"
    res = support.run("qemu-img", "check", "-f", "parallels", disk.top, check=False)
    assert res.returncode == 0, f"qemu-img check after repair, exit {res.returncode}:\n{res.stdout}{res.stderr}"
    if disk.lower is not None:
        assert sha256(disk.lower) == disk.lower_sha, f"{disk.lower}: the lower layer changed"
    return found


def first_difference(a: bytes | bytearray, b: bytes | bytearray, start: int, end: int) -> int:
    """The first offset in [start, end) where A and B differ (they do somewhere)."""
    step = 4096
    pos = start
    while pos < end:
        stop = min(end, pos + step)
        if a[pos:stop] != b[pos:stop]:
            return next(i for i in range(pos, stop) if a[i] != b[i])
        pos = stop
    raise AssertionError("no difference")


def reserve_and_verify(disk: CrashDisk, tmp: Path, moment: str) -> None:
    """Serve the repaired disk again (writable) and compare it with the model; adopt what it holds."""
    model = disk.model
    assert model is not None
    disk.server = support.start_prlnbd(tmp, [f"{EXPORT}={disk.path}"])
    actual = read_all(disk.server.uri(EXPORT), disk.size)
    for a, b in model.checked():
        if actual[a:b] == model.durable[a:b]:
            continue
        at = first_difference(actual, model.durable, a, b)
        end = at
        while end < b and actual[end] != model.durable[end]:
            end += 1
        cs = disk.cluster_size
        ops = "\n  ".join(str(o) for o in model.touching(at)) or "(none this round: written in an earlier round)"
        raise AssertionError(
            f"durable data lost: {disk.name} byte {at} (cluster {at // cs}, +{at % cs}) differs for"
            f" {end - at} bytes: expected {bytes(model.durable[at:at + 16]).hex()},"
            f" read {bytes(actual[at:at + 16]).hex()}\n{moment}\nrequests of this round over byte {at}:\n  {ops}"
        )
    disk.model = Model(actual)


# ---------------------------------------------------------------- the test


def test_sigkill_rounds(tmp_path: Path) -> None:
    crash_rounds(tmp_path, (make_single, make_bundle), Workload, ROUNDS)


def make_reuse(tmp: Path, rng: random.Random) -> tuple[CrashDisk, bytearray]:
    size, cs = 16 * MIB, 64 << 10
    path = tmp / "reuse.hds"
    support.run("qemu-img", "create", "-q", "-f", "parallels", "-o", f"cluster_size={cs}", path, str(size))
    return CrashDisk("reuse", path, path, size, cs, hot=2 * MIB), bytearray(size)


# Clusters a round may hold beyond the hot area's: releases not yet durable (up to 12
# requests of 4 clusters between two flushes, for the flush in flight and the next one).
REUSE_SLACK = 2 * 12 * 4


def test_sigkill_rounds_trim_and_reuse(tmp_path: Path) -> None:
    """Whole-cluster writes, TRIMs and zeroes in 2 MiB, killed at random: released clusters are
    punched and reused, never both free and mapped (the data checks), and the file stays small."""
    disks = crash_rounds(tmp_path, (make_reuse,), ReuseWorkload, max(20, ROUNDS // 2))
    disk = disks[0]
    limit = MIB + (disk.hot // disk.cluster_size + REUSE_SLACK) * disk.cluster_size
    size = os.stat(disk.top).st_size
    print(f"file size {size}, limit {limit}")  # without reuse after a crash: 0.6 MiB more a round
    assert size <= limit, f"{disk.top} grew to {size} bytes, more than {limit}: released clusters not reused"


def crash_rounds(tmp_path: Path, makers: tuple[object, ...], workload: type[Workload], rounds: int) -> list[CrashDisk]:
    seed = int(os.environ.get("PRLNBD_CRASH_SEED", str(random.randrange(1 << 32))))
    print(f"crash test seed {seed} (replay: PRLNBD_CRASH_SEED={seed})")
    rng = random.Random(seed)
    disks: list[CrashDisk] = []
    for make in makers:
        disk, content = make(tmp_path, rng)  # type: ignore[operator]
        disk.server = support.start_prlnbd(tmp_path / f"{disk.name}-srv", [f"{EXPORT}={disk.path}"])
        assert read_all(disk.server.uri(EXPORT), disk.size) == content, f"{disk.name}: initial content"
        disk.model = Model(content)
        disks.append(disk)
    started = time.monotonic()
    moment = ""
    try:
        for rnd in range(rounds):
            disk = disks[rnd % len(disks)]
            disk.rounds += 1
            rrng = random.Random(f"{seed}/{rnd}")
            moment = f"round {rnd} ({disk.name} round {disk.rounds}): "
            moment += run_until_kill(disk, rrng, workload)
            srv_tmp = tmp_path / f"{disk.name}-srv"
            moment += "; " + check_after_crash(disk, srv_tmp)
            print(moment)
            reserve_and_verify(disk, srv_tmp, moment)
        for disk in disks:
            assert disk.server is not None
            assert disk.server.stop() == 0, disk.server.log_text()[-3000:]
            rc, report = prlnbd_check(disk.path)
            assert rc == 0, f"{disk.name}: after a clean stop, check exit {rc}:\n{json.dumps(report, indent=1)}"
            support.run("qemu-img", "check", "-f", "parallels", disk.top)
    except AssertionError as e:
        pytest.fail(f"seed {seed} (replay: PRLNBD_CRASH_SEED={seed}), {moment}\n{e}", pytrace=False)
    finally:
        for disk in disks:
            if disk.server is not None:
                disk.server.stop(signal.SIGKILL)
    elapsed = time.monotonic() - started
    print(f"{rounds} rounds in {elapsed:.1f} s")
    return disks
