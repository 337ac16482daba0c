"""Benchmark prlnbd against `qemu-nbd -f parallels` on the same images, in one run.

Run from the repository root (pytest never collects this file):

    .venv/bin/python tests/bench/run.py [--quick] [--only NAME[,NAME...]] [--json PATH]

The machine is shared and noisy, so every figure is measured side by side in
the same run, alternating which server goes first, and the verdicts are on
ratios, never on absolute figures. See tests/bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import itertools
import json
import math
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support import (  # noqa: E402  (needs ROOT on sys.path first)
    PYTHON,
    Server,
    start_prlnbd,
    start_qemu_nbd,
    write_descriptor,
)

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
CLUSTER = MiB
SECTOR = 512

READ_SIZE = GiB  # the fully allocated image behind read-seq, read-rand, chain-read
CHAIN_LAYERS = 4
MAP_SIZE = TiB
MAP_CLUSTERS = 2000
MAP_LAYERS = 3
WRITE_SIZE = GiB
BITMAP_CHUNKS = 10_000
COLD_SIZE = 8 * GiB  # the fully allocated image behind cold-read-* and vm-backup-*
COLD_IMAGE = "cold-8g.v1.hds"  # its name in the cache directory; bump v1 when its recipe changes
VM_LEAD = 1.0  # seconds the backup (client B) runs before the VM's reads (client A) start
VM_TAIL = 1.0  # and after they end, so B covers A's whole window
LOG_MS = 100  # fio bandwidth log interval for the vm-backup windows
MERGE_SIZE = 2 * GiB  # the disk of merge-*: its root layer holds the first GiB, its top the second
MERGE_BUNDLE = "merge-2g.v1.hdd"  # its pristine chain in the cache directory; bump v1 with its recipe
MERGE_EXPORT = "disk"
MERGE_CAP = 600  # seconds: the longest a merge (and client A's fio beside it) may take
MERGE_MIN_READS = 200  # fewer of A's reads inside a merge make no p99

# Ratio a benchmark must reach to PASS (the targets of the project's issues):
# prlnbd / qemu-nbd for throughput, qemu-nbd time / prlnbd time for the maps,
# chain / single layer for chain-read. Override with --target NAME=RATIO.
TARGETS = {
    "tls-read-seq": 1.0,
    "tls-read-rand": 1.0,
    "tls-write-seq": 1.0,
    "read-seq": 2.0,
    "read-rand": 3.0,
    "map-1t": 1.0,
    "chain-read-seq": 0.9,
    "chain-read-rand": 0.9,
    "base-read-seq": 2.0,
    "write-seq": 1.5,
    "write-rand": 2.0,
    "bitmap-1t": 1.0,
    "bitmap-1t-cold": 1.0,
    # Issue 14: the scenes (see tests/bench/README.md). Rows not named here
    # (p50, p99.9, other references) are shown for information, with no verdict.
    "cold-read-rand": 2.5,
    "cold-read-rand/device": 0.6,
    "cold-read-rand/prlnbd-cache-none": 2.5,
    "cold-read-rand-qd1": 1.0,
    "cold-read-seq": 1.0,
    **{f"vm-backup-{mode}-{temp}{part}": 1.0 for mode in ("write", "copy")
       for temp in ("hot", "cold") for part in ("", "/B")},
    "newcomer": 1.0,
    "many-8x4": 1.5,
    "many-32x1": 1.5,
    "durable-write": 1.0,
}

COLD_READS = ("cold-read-rand", "cold-read-rand-qd1", "cold-read-seq")
VM_BACKUPS = ("vm-backup-write-hot", "vm-backup-write-cold", "vm-backup-copy-hot",
              "vm-backup-copy-cold")
MANY = ("many-8x4", "many-32x1")
SCENES = (*COLD_READS, *VM_BACKUPS, "newcomer", *MANY, "durable-write")
TLS_ROWS = ("tls-read-seq", "tls-read-rand", "tls-write-seq")
MERGES = ("merge-cold", "merge-hot")
BENCHMARKS = ("read-seq", "read-rand", "map-1t", "chain-read", "base-read-seq", "bitmap-1t", "write-seq", "write-rand",
              *SCENES, *TLS_ROWS, "space-reuse", *MERGES)
GROUPS = {
    "reads": ("read-seq", "read-rand", "map-1t", "chain-read", "base-read-seq", "bitmap-1t"),
    "writes": ("write-seq", "write-rand"),
    "space": ("space-reuse",),
    "cold-read": COLD_READS,
    "vm-backup": VM_BACKUPS,
    "many": MANY,
    "scenes": SCENES,
    "tls": TLS_ROWS,
    "merge": MERGES,
    "all": BENCHMARKS,
}
DEFAULT_GROUP = "reads"


class BenchError(Exception):
    """A benchmark could not produce a figure."""


class SkipBench(Exception):
    """A benchmark does not apply to this prlnbd (e.g. writes on a read-only version)."""


@dataclass
class Row:
    """One line of the final table: prlnbd's figures against a reference's."""

    name: str
    unit: str
    reference: str
    target: float | None  # None: a figure shown for information, with no verdict
    higher_is_better: bool = True
    prlnbd: list[float] = field(default_factory=list)
    ref: list[float] = field(default_factory=list)
    status: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def prlnbd_median(self) -> float | None:
        """Median of prlnbd's repetitions."""
        return statistics.median(self.prlnbd) if self.prlnbd else None

    @property
    def ref_median(self) -> float | None:
        """Median of the reference's repetitions."""
        return statistics.median(self.ref) if self.ref else None

    @property
    def ratio(self) -> float | None:
        """Above 1.0 means prlnbd did better than the reference."""
        p, r = self.prlnbd_median, self.ref_median
        if not p or not r:
            return None
        return p / r if self.higher_is_better else r / p

    @property
    def pair_ratios(self) -> list[float]:
        """The ratio of each repetition's adjacent pair: how much the noise moves it."""
        pairs = zip(self.prlnbd, self.ref, strict=False)
        if self.higher_is_better:
            return [p / r for p, r in pairs if p and r]
        return [r / p for p, r in pairs if p and r]

    def finish(self) -> None:
        """Decide PASS or FAIL unless a SKIP, ERROR or WRONG verdict is already set."""
        if self.status:
            return
        ratio = self.ratio
        if ratio is None:
            self.status = "ERROR"
        elif self.target is None:
            self.status = "info"
        else:
            self.status = "PASS" if ratio >= self.target else "FAIL"

    def as_json(self) -> dict[str, object]:
        """The row as a JSON-ready dict."""
        return {
            "name": self.name,
            "unit": self.unit,
            "reference": self.reference,
            "prlnbd": self.prlnbd_median,
            "ref": self.ref_median,
            "prlnbd_runs": self.prlnbd,
            "ref_runs": self.ref,
            "ratio": self.ratio,
            "pair_ratios": self.pair_ratios,
            "target": self.target,
            "higher_is_better": self.higher_is_better,
            "status": self.status,
            "notes": self.notes,
        }


@dataclass
class FioRun:
    """A fio process started in the background, and where its report goes."""

    proc: subprocess.Popen[str]
    out: Path
    rw: str
    what: str


def nbd_target(uri: str) -> list[str]:
    """fio options that point a job at an NBD export."""
    return ["--ioengine=nbd", f"--uri={uri}"]


def fio_side(job: dict[str, Any], rw: str) -> dict[str, Any]:
    """The part of a fio job report that counts RW's direction."""
    side: dict[str, Any] = job["write" if "write" in rw else "read"]
    return side


def log(msg: str) -> None:
    """Progress to stderr, so stdout keeps only the table."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_cmd(cmd: Sequence[str | Path], timeout: float = 600,
            preexec_fn: Callable[[], object] | None = None,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run CMD (INPUT on its stdin), raising BenchError with its output if it fails."""
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                         preexec_fn=preexec_fn, input=input)
    if res.returncode != 0:
        raise BenchError(f"{' '.join(map(str, cmd))[:200]} failed ({res.returncode}):\n"
                         f"{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return res


def pattern(cluster: int) -> int:
    """The byte filling guest cluster CLUSTER, so every layout of the data matches."""
    return (cluster * 37) % 255 + 1


def create_image(path: Path, size: int) -> Path:
    """An empty expandable Parallels image with 1 MiB clusters."""
    run_cmd(["qemu-img", "create", "-q", "-f", "parallels",
             "-o", f"cluster_size={CLUSTER}", path, str(size)])
    return path


def qemu_io_write(path: Path, writes: Sequence[tuple[int, int, int]], timeout: float = 600) -> None:
    """Apply (offset, length, pattern byte) writes in one qemu-io process."""
    if not writes:
        return
    cmd: list[str | Path] = ["qemu-io", "-f", "parallels"]
    for offset, length, byte in writes:
        cmd += ["-c", f"write -q -P {byte} {offset} {length}"]
    cmd.append(path)
    run_cmd(cmd, timeout=timeout)


def build_chain(bundle: Path, size: int, layers: Sequence[Sequence[tuple[int, int, int]]]) -> Path:
    """A bundle whose layer i (0 = root) receives the writes layers[i]."""
    bundle.mkdir(parents=True, exist_ok=True)
    files = []
    for i, writes in enumerate(layers):
        name = f"{bundle.name}.{i}.{{{uuid.uuid4()}}}.hds"
        qemu_io_write(create_image(bundle / name, size), writes)
        files.append(name)
    sectors = size // SECTOR
    write_descriptor(bundle, files, size, geometry=(sectors // (16 * 32), 16, 32),
                     blocksize=CLUSTER // SECTOR)
    return bundle


def warm(path: Path) -> None:
    """Pull PATH (a file, or every image of a bundle) into the page cache."""
    buf = bytearray(8 * MiB)
    for p in image_files(path):
        with p.open("rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def image_files(path: Path) -> list[Path]:
    """PATH itself, or every image of a bundle."""
    return sorted(path.glob("*.hds")) if path.is_dir() else [path]


def evict(path: Path) -> None:
    """Write PATH's dirty pages out and drop all its pages from the page cache.

    /proc/sys/vm/drop_caches is not writable here; POSIX_FADV_DONTNEED drops
    a file's clean, unmapped pages, whoever else has the file open.
    """
    fsync_file(path, drop=True)


def fsync_file(path: Path, drop: bool = False) -> None:
    """Write PATH's dirty pages out (so their writeback lands in no later run); DROP: evict them."""
    for p in image_files(path):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            if drop:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident(path: Path) -> str:
    """How much of PATH is in the page cache, as fincore(1) says (or "?")."""
    if shutil.which("fincore") is None:
        return "?"
    res = subprocess.run(["fincore", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, timeout=60)
    return res.stdout.strip() or "?"


def read_bw_log(path: Path) -> list[tuple[float, float]]:
    """(unix time in ms, KiB/s) entries of a fio bandwidth log written with log_unix_epoch."""
    entries = []
    for line in path.read_text().splitlines():
        fields = line.split(",")
        if len(fields) >= 2:
            entries.append((float(fields[0]), float(fields[1])))
    if not entries:
        raise BenchError(f"{path.name}: empty fio bandwidth log")
    return entries


def window_bytes(entries: Sequence[tuple[float, float]], w0: float, w1: float,
                 what: str) -> tuple[float, float]:
    """Bytes a fio bandwidth log says moved between unix ms W0 and W1, and the longest stall.

    Entry i covers the LOG_MS (or so) before its time stamp. Raises BenchError
    unless the log covers the whole window.
    """
    starts = [entries[0][0] - LOG_MS, *(t for t, _ in entries[:-1])]
    if starts[0] > w0 or entries[-1][0] < w1:
        raise BenchError(f"{what} ran from {starts[0]:.0f} to {entries[-1][0]:.0f} (unix ms), "
                         f"not over the whole window {w0:.0f}-{w1:.0f}")
    total = 0.0
    stall = longest = 0.0
    for start, (end, kib_s) in zip(starts, entries, strict=True):
        overlap = min(end, w1) - max(start, w0)
        if overlap <= 0:
            continue
        total += kib_s * KiB * overlap / 1000
        stall = stall + overlap if kib_s == 0 else 0.0
        longest = max(longest, stall)
    return total, longest


class CopyLoop:
    """Client B of vm-backup-copy-*: nbdcopy pulling the whole disk to null:, again and again.

    Each pass reports its progress through a pipe (`--progress=FD`: one
    `PERCENT/100` line as the percentage moves); samples holds (unix ms,
    bytes moved since the first pass started).
    """

    def __init__(self, uri: str, size: int, log_path: Path) -> None:
        self.uri = uri
        self.size = size
        self.log_path = log_path
        self.samples: list[tuple[float, float]] = []
        self.error: str | None = None
        self.passes = 0
        self._stop = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CopyLoop:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
        self._thread.join(30)

    def _run(self) -> None:
        done = 0
        while not self._stop.is_set():
            r, w = os.pipe()
            with self.log_path.open("ab") as errf:
                self._proc = proc = subprocess.Popen(
                    ["nbdcopy", f"--progress={w}", self.uri, "null:"], pass_fds=(w,),
                    stdout=subprocess.DEVNULL, stderr=errf)
            os.close(w)
            if self._stop.is_set():  # stopped while this pass was starting
                proc.terminate()
            with os.fdopen(r) as progress:
                for line in progress:
                    percent = int(line.split("/")[0])
                    self.samples.append((time.time() * 1000, done + self.size * percent / 100))
            proc.wait()
            if self._stop.is_set():
                return
            if proc.returncode != 0:
                self.error = (f"nbdcopy exited with {proc.returncode}: "
                              f"{self.log_path.read_text(errors='replace')[-500:]}")
                return
            done += self.size
            self.passes += 1

    def wait_until(self, ready: Callable[[], bool], what: str, timeout: float) -> None:
        """Wait until READY() holds; BenchError if nbdcopy failed or TIMEOUT seconds pass."""
        deadline = time.monotonic() + timeout
        while not ready():
            if self.error:
                raise BenchError(self.error)
            if time.monotonic() > deadline:
                raise BenchError(f"nbdcopy: {what} within {timeout:.0f} s")
            time.sleep(0.01)

    def moved_at(self, t: float) -> float:
        """Bytes moved by unix ms T, interpolated between progress samples."""
        samples = self.samples
        for (t0, b0), (t1, b1) in itertools.pairwise(samples):
            if t0 <= t <= t1:
                return b0 + (b1 - b0) * ((t - t0) / (t1 - t0) if t1 > t0 else 1.0)
        raise BenchError(f"nbdcopy progress does not cover unix ms {t:.0f}")


# Client of `newcomer` that walks base:allocation over the whole disk, again and
# again, on one connection, the way nbdinfo --map does (requests of 4 GiB less a
# byte, or less a minimum block). It prints "walking" after its first map, and
# "MAPS SECONDS" once its stdin is closed (checked after each map: a signal
# could interrupt libnbd in the middle of a request).
WALKER = r"""
import select, sys, time, nbd
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(sys.argv[1])
size = h.get_size()
align = max(1, h.get_block_size(nbd.SIZE_MINIMUM))
step = 0xFFFFFFFF // align * align
got = [0]
def extents(context, offset, entries, err):
    if context == "base:allocation":
        got[0] = sum(entries[0::2])
    return 0
maps = 0
t0 = time.perf_counter()
while not select.select([sys.stdin], [], [], 0)[0]:
    offset = 0
    while offset < size:
        h.block_status(min(size - offset, step), offset, extents)
        offset += got[0]
    maps += 1
    if maps == 1:
        print("walking", flush=True)
print(maps, time.perf_counter() - t0, flush=True)
h.shutdown()
"""

# The new clients of `newcomer`: each connects, reads 4 KiB of data, and
# disconnects; prints the connect + first read times (s) as a JSON list.
# argv: URI, count, seed; stdin: JSON list of offsets that hold data.
NEWCOMER = r"""
import json, random, sys, time, nbd
uri, count, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
offsets = json.load(sys.stdin)
rng = random.Random(seed)
times = []
for _ in range(count):
    offset = rng.choice(offsets)
    t0 = time.perf_counter()
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pread(4096, offset)
    times.append(time.perf_counter() - t0)
    h.shutdown()
    del h
    time.sleep(rng.uniform(0.002, 0.010))
print(json.dumps(times))
"""


# Data check of merge-*: reads 4 KiB at each (offset, byte) of the JSON list on
# stdin and prints how many did not hold that byte throughout, and the first few offsets.
PATTERN_CHECK = r"""
import json, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
bad = [o for o, byte in json.load(sys.stdin) if h.pread(4096, o) != bytes([byte]) * 4096]
h.shutdown()
print(json.dumps({"bad": len(bad), "first": bad[:5]}))
"""


class Bench:
    """Builds the images once, starts servers, and runs the selected benchmarks."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.socks = work / "sock"
        self.write_dir = work
        self.quick: bool = args.quick
        self.self_test: bool = args.self_test
        self.runtime = 5 if self.quick else 10
        self.warmup = 1 if self.quick else 2
        self.reps: int = args.reps
        # A map takes ~20 ms and its time is bimodal (whether the scheduler keeps client and
        # server on one CPU): a median needs many of them to settle. Cheap, so take plenty.
        self.map_reps = max(self.reps, 15 if self.quick else 41)
        self.servers: list[Server] = []
        self._full: Path | None = None
        self._map1: Path | None = None
        self._cold: Path | None = None
        self._merge_copy: Path | None = None  # a copy of merge_bundle() no merge has consumed yet
        # Built images too dear to build every run (the 8 GiB cold image) live here.
        self.cache_dir: Path = args.cache_dir or (args.workdir or Path("/tmp")) / "prlnbd-bench-cache"
        self.rows: list[Row] = []
        self.subject = "qemu-nbd (self-test)" if self.self_test else "prlnbd"

    # ---- servers --------------------------------------------------------------

    def start_subject(self, disk: Path, read_only: bool, stand_in: Path | None = None,
                      extra: Sequence[str] = ()) -> Server:
        """prlnbd on DISK with EXTRA options; with --self-test, qemu-nbd on STAND_IN (or DISK)."""
        if self.self_test:
            return self.start_qemu(stand_in or disk, read_only)
        server = start_prlnbd(self.socks, [str(disk)], *(["--read-only"] if read_only else []),
                              *extra)
        self.servers.append(server)
        return server

    def start_qemu(self, image: Path, read_only: bool, *extra: str) -> Server:
        """The reference: qemu-nbd -f parallels on IMAGE, with EXTRA options."""
        server = start_qemu_nbd(self.socks, image, *(["-r"] if read_only else []), *extra)
        self.servers.append(server)
        return server

    def stop(self, server: Server) -> None:
        """Stop SERVER and forget it; complain if it did not exit cleanly."""
        rc = server.stop()
        with contextlib.suppress(ValueError):
            self.servers.remove(server)
        if rc not in (0, -signal.SIGTERM):
            log(f"warning: server on {server.sock.name} exited with {rc}: "
                f"{server.log_text()[-500:]}")

    def stop_all(self) -> None:
        """Stop every server still running."""
        for server in list(self.servers):
            self.stop(server)

    @contextlib.contextmanager
    def pair(self, subject: Server, ref: Server) -> Iterator[tuple[Server, Server]]:
        """Stop both servers when the block ends."""
        try:
            yield subject, ref
        finally:
            self.stop(subject)
            self.stop(ref)

    # ---- images -----------------------------------------------------------------

    def full_image(self) -> Path:
        """1 GiB, every 1 MiB cluster allocated, cluster c filled with pattern(c)."""
        if self._full is None:
            log(f"building a fully allocated {READ_SIZE // GiB} GiB image")
            path = create_image(self.work / "full.hds", READ_SIZE)
            qemu_io_write(path, [(c * CLUSTER, CLUSTER, pattern(c))
                                 for c in range(READ_SIZE // CLUSTER)])
            self._full = path
        return self._full

    def chain4(self) -> Path:
        """The same data as full_image(), its clusters spread over a 4-layer chain."""
        log(f"building a {CHAIN_LAYERS}-layer chain holding the same {READ_SIZE // GiB} GiB")
        rng = random.Random(4)
        layers: list[list[tuple[int, int, int]]] = [[] for _ in range(CHAIN_LAYERS)]
        for c in range(READ_SIZE // CLUSTER):
            layers[rng.randrange(CHAIN_LAYERS)].append((c * CLUSTER, CLUSTER, pattern(c)))
        return build_chain(self.work / "chain4.hdd", READ_SIZE, layers)

    def base_bundle(self) -> Path:
        """A VM's disk after a snapshot: full_image()'s data in a frozen base, an empty writable top."""
        log(f"building a 2-layer bundle: {READ_SIZE // GiB} GiB in the base, an empty top")
        return build_chain(self.work / "base2.hdd", READ_SIZE,
                           [[(c * CLUSTER, CLUSTER, pattern(c)) for c in range(READ_SIZE // CLUSTER)], []])

    def map_single(self) -> Path:
        """1 TiB, one layer, the first 4 KiB of MAP_CLUSTERS clusters (map_clusters()) written."""
        if self._map1 is None:
            self._map1 = create_image(self.work / "map1.hds", MAP_SIZE)
            qemu_io_write(self._map1, [(c * CLUSTER, 4 * KiB, pattern(c)) for c in map_clusters()])
        return self._map1

    def cold_image(self) -> Path:
        """COLD_SIZE, every cluster allocated and filled with pattern(c); built once, kept.

        It lives in the cache directory, not the run's work directory, so later
        runs reuse it (building it writes 8 GiB: about a minute here).
        """
        if self._cold is None:
            path = self.cache_dir / COLD_IMAGE
            if path.exists() and path.stat().st_size > COLD_SIZE:
                log(f"reusing {path}")
            else:
                log(f"building a fully allocated {COLD_SIZE // GiB} GiB image in {path}")
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                part = path.with_name(path.name + ".part")
                part.unlink(missing_ok=True)
                create_image(part, COLD_SIZE)
                qemu_io_write(part, [(c * CLUSTER, CLUSTER, pattern(c))
                                     for c in range(COLD_SIZE // CLUSTER)], timeout=3600)
                evict(part)
                part.rename(path)
            self._cold = path
        return self._cold

    def cold_copy(self) -> Path:
        """A writable copy of cold_image() for vm-backup-write-*, kept beside it.

        Client B overwrites it with fio's data, so it is no longer the pattern;
        both servers serve it in turn. A copy that qemu-img check does not find
        clean (a server killed while writing) is made again.
        """
        src = self.cold_image()
        path = src.with_name(src.stem + ".rw.hds")
        if path.exists():
            res = subprocess.run(["qemu-img", "check", "-q", "-f", "parallels", path],
                                 capture_output=True, text=True, timeout=600)
            if res.returncode == 0:
                return path
            log(f"{path.name} is not clean ({(res.stdout + res.stderr).strip()[:200]}); copying again")
        log(f"copying {src.name} to {path.name}")
        part = path.with_name(path.name + ".part")
        shutil.copyfile(src, part)
        evict(part)
        part.rename(path)
        return path

    def merge_bundle(self) -> Path:
        """The pristine chain of merge-*, built once into the cache directory and kept.

        A MERGE_SIZE bundle of two layers, every cluster allocated once: the
        root holds the first half (cluster c filled with pattern(c)), the top
        the second. The whole disk reads pattern(c), and merging the root down
        into the top moves the root's 1 GiB, none of it hidden by the top.
        Never served itself: each measurement serves a copy (merge_copy()).
        """
        path = self.cache_dir / MERGE_BUNDLE
        if (path / "DiskDescriptor.xml").exists():
            return path
        log(f"building a {MERGE_SIZE // GiB} GiB two-layer bundle in {path}")
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        part = path.with_name(path.name + ".part")
        shutil.rmtree(part, ignore_errors=True)
        half = MERGE_SIZE // CLUSTER // 2
        build_chain(part, MERGE_SIZE, [
            [(c * CLUSTER, CLUSTER, pattern(c)) for c in range(half)],
            [(c * CLUSTER, CLUSTER, pattern(c)) for c in range(half, 2 * half)],
        ])
        evict(part)
        part.rename(path)
        return path

    def merge_copy(self) -> Path:
        """A copy of merge_bundle() that no merge has consumed, beside it (not on tmpfs: it must be evictable).

        A merge deletes the root and rewrites the descriptor, so after one the
        copy is made again; a measurement without a merge leaves it for the next.
        """
        if self._merge_copy is not None:
            return self._merge_copy
        src = self.merge_bundle()
        dst = src.with_name(src.stem + ".work.hdd")
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
        fsync_file(dst)  # the copy's writeback lands here, in no measurement
        self._merge_copy = dst
        return dst

    def map_images(self) -> tuple[Path, Path]:
        """A 1 TiB 3-layer chain with 2000 allocated clusters, and one layer holding them all.

        Some clusters are also written in a lower layer (hidden by the upper
        one), as snapshots do; the merged map is the same 2000 clusters.
        """
        log(f"building 1 TiB images with {MAP_CLUSTERS} allocated clusters")
        rng = random.Random(2000)
        clusters = sorted(rng.sample(range(MAP_SIZE // CLUSTER), MAP_CLUSTERS))
        single = self.map_single()
        layers: list[list[tuple[int, int, int]]] = [[] for _ in range(MAP_LAYERS)]
        for c in clusters:
            depth = rng.randrange(MAP_LAYERS)
            layers[depth].append((c * CLUSTER, 4 * KiB, pattern(c)))
            if depth and rng.random() < 0.2:
                layers[rng.randrange(depth)].append((c * CLUSTER, 4 * KiB, 0xEE))
        chain = build_chain(self.work / "map3.hdd", MAP_SIZE, layers)
        return chain, single

    # ---- measuring --------------------------------------------------------------

    def fio(self, uri: str, rw: str, bs: str, iodepth: int,
            runtime: float | None = None, size: int | None = None,
            extra: Sequence[str] = (), jobs: int = 1) -> tuple[float, float]:
        """Run one fio job over NBD; return (MiB/s, IOPS)."""
        side = fio_side(self.fio_job(nbd_target(uri), rw, bs, iodepth, runtime, size, extra, jobs),
                        rw)
        return side["bw_bytes"] / MiB, float(side["iops"])

    def fio_job(self, target: Sequence[str], rw: str, bs: str, iodepth: int,
                runtime: float | None = None, size: int | None = None,
                extra: Sequence[str] = (), jobs: int = 1, tag: str = "fio",
                env: dict[str, str] | None = None) -> dict[str, Any]:
        """Run one fio job (TARGET: its engine and file options) and return its JSON report."""
        return self.fio_finish(self.fio_start(target, rw, bs, iodepth, runtime, size, extra,
                                              jobs, tag, env))

    def fio_start(self, target: Sequence[str], rw: str, bs: str, iodepth: int,
                  runtime: float | None = None, size: int | None = None,
                  extra: Sequence[str] = (), jobs: int = 1,
                  tag: str = "fio", env: dict[str, str] | None = None) -> FioRun:
        """Start fio in the background; fio_finish() waits for it and reads its report."""
        out = self.work / f"{tag}.json"
        out.unlink(missing_ok=True)
        cmd = ["fio", "--name=bench", *target, f"--rw={rw}",
               f"--bs={bs}", f"--iodepth={iodepth}", f"--numjobs={jobs}",
               "--output-format=json", f"--output={out}", *extra]
        if jobs > 1:
            cmd.append("--group_reporting")
        if runtime is not None:
            cmd += ["--time_based", f"--runtime={runtime}"]
        else:
            cmd += [f"--size={size}", "--runtime=300"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        return FioRun(proc, out, rw, f"fio {rw} on {' '.join(target)}")

    def fio_finish(self, run: FioRun) -> dict[str, Any]:
        """Wait for a fio started by fio_start() and return its job's JSON report."""
        proc, out, what = run.proc, run.out, run.what
        try:
            stdout, stderr = proc.communicate(timeout=360)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise BenchError(f"{what} ran for more than 360 s") from None
        text = f"{stdout}\n{stderr}"
        try:
            job: dict[str, Any] | None = json.loads(out.read_text())["jobs"][0]
        except (OSError, ValueError, KeyError, IndexError):
            job = None
        err = job["error"] if job else None
        if proc.returncode != 0 or err:
            if err == errno.EPERM or "Operation not permitted" in text:
                raise SkipBench("the server answered EPERM (read-only export)")
            raise BenchError(f"{what} failed (rc {proc.returncode}, "
                             f"error {err}):\n{text[-2000:]}")
        if job is None:
            raise BenchError(f"fio wrote no JSON report:\n{text[-2000:]}")
        if not fio_side(job, run.rw)["io_bytes"]:
            raise BenchError(f"{what} moved no data:\n{text[-2000:]}")
        return job

    def alternate(self, row: Row, subject: Callable[[int], float], ref: Callable[[int], float],
                  reps: int | None = None) -> None:
        """Measure both sides REPS times, swapping which goes first every time."""
        self.rotate(row.name, row.unit, [(self.subject, subject, row.prlnbd),
                                         (row.reference, ref, row.ref)], reps)

    def rotate(self, label: str, unit: str,
               sides: Sequence[tuple[str, Callable[[int], float], list[float]]],
               reps: int | None = None) -> None:
        """Measure every side REPS times, each repetition starting one side further on.

        A side is (name, measure, list its figures are appended to). With two
        sides this is A then B, then B then A, ...
        """
        reps = reps or self.reps
        for i in range(reps):
            k = i % len(sides)
            for _name, measure, figures in [*sides[k:], *sides[:k]]:
                figures.append(measure(i))
            log(f"  {label} rep {i + 1}/{reps}: "
                + ", ".join(f"{name} {fmt(figures[-1], unit)}" for name, _m, figures in sides)
                + f" {unit}")

    def compare(self, row: Row, a: Server, b: Server) -> None:
        """Check both servers return the same bytes (qemu-img compare over NBD)."""
        if self.args.no_verify:
            return
        res = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw",
                              a.uri(), b.uri()], capture_output=True, text=True, timeout=300)
        if res.returncode == 0:
            row.notes.append("data verified identical")
        elif res.returncode == 1:
            row.status = "WRONG"
            row.notes.append("DATA DIFFERS between the two exports (qemu-img compare)")
        else:
            row.notes.append(f"qemu-img compare failed: {res.stderr.strip()[-300:]}")

    def fio_rows(self, specs: Sequence[tuple[str, str, str, int, str] | tuple[str, str, str, int, str, int]],
                 subject: Server, ref: Server, reference: str) -> list[Row]:
        """Run fio specs (name, rw, bs, iodepth, unit[, jobs]) against both servers.

        With jobs > 1, each job is its own connection and the figure is their sum.
        """
        rows = []
        for name, rw, bs, qd, unit, *more in specs:
            jobs = more[0] if more else 1
            row = self.new_row(name, unit, reference)
            rows.append(row)
            try:
                for server in (subject, ref):
                    self.fio(server.uri(), rw, bs, qd, runtime=self.warmup, jobs=jobs)
                pick = 0 if unit == "MiB/s" else 1
                self.alternate(
                    row,
                    lambda _i, rw=rw, bs=bs, qd=qd, p=pick, j=jobs: self.fio(
                        subject.uri(), rw, bs, qd, runtime=self.runtime, jobs=j)[p],
                    lambda _i, rw=rw, bs=bs, qd=qd, p=pick, j=jobs: self.fio(
                        ref.uri(), rw, bs, qd, runtime=self.runtime, jobs=j)[p],
                )
            except (BenchError, SkipBench) as exc:
                row.status = "SKIP" if isinstance(exc, SkipBench) else "ERROR"
                row.notes.append(str(exc))
                log(f"  {name}: {row.status}: {exc}")
        return rows

    def new_row(self, name: str, unit: str, reference: str, higher: bool = True) -> Row:
        """Register a row for NAME with its target."""
        row = Row(name, unit, reference, self.args.targets.get(name, TARGETS.get(name)), higher)
        self.rows.append(row)
        return row

    # ---- benchmarks -------------------------------------------------------------

    def bench_reads(self, names: set[str]) -> None:
        """read-seq and read-rand: prlnbd --read-only vs qemu-nbd -r on one image."""
        image = self.full_image()
        warm(image)
        specs = [s for s in (("read-seq", "read", "1M", 8, "MiB/s"),
                             ("read-rand", "randread", "4k", 32, "IOPS")) if s[0] in names]
        with self.pair(self.start_subject(image, True), self.start_qemu(image, True)) as (s, q):
            rows = self.fio_rows(specs, s, q, "qemu-nbd")
            if rows[0].status != "ERROR":
                self.compare(rows[0], s, q)

    def bench_map(self) -> None:
        """map-1t: nbdinfo --map of prlnbd's 3-layer chain vs qemu-nbd -r on one layer."""
        chain, single = self.map_images()
        row = self.new_row("map-1t", "s", "qemu-nbd 1 layer", higher=False)
        with self.pair(self.start_subject(chain, True, stand_in=single),
                       self.start_qemu(single, True)) as (s, q):
            self.time_maps(row, s, q, "--map")

    def bench_bitmap(self) -> None:
        """bitmap-1t: nbdinfo --map of a stored dirty bitmap (10 000 dirty chunks) on a 1 TiB image."""
        image, name = self.bitmap_image()
        row = self.new_row("bitmap-1t", "s", "qemu-nbd --bitmap", higher=False)
        with self.pair(self.start_subject(image, True), self.start_qemu(image, True, f"--bitmap={name}")) as (s, q):
            self.time_maps(row, s, q, f"--map=qemu:dirty-bitmap:{name}")
        self.cold_maps(image, name)

    def cold_maps(self, image: Path, name: str) -> None:
        """bitmap-1t-cold: the first map from a server just started, as a backup run gets it.

        Each repetition starts both servers afresh; only their first map is
        timed (not the start-up), so nothing a previous map computed helps.
        """
        row = self.new_row("bitmap-1t-cold", "s", "qemu-nbd --bitmap", higher=False)
        option = f"--map=qemu:dirty-bitmap:{name}"

        def first_map(subject: bool) -> float:
            server = self.start_subject(image, True) if subject else self.start_qemu(image, True, f"--bitmap={name}")
            try:
                t0 = time.perf_counter()
                run_cmd(["nbdinfo", option, server.uri()], timeout=600)
                return time.perf_counter() - t0
            finally:
                self.stop(server)

        try:
            self.alternate(row, lambda _i: first_map(True), lambda _i: first_map(False),
                           reps=max(self.reps, 7 if self.quick else 15))
        except BenchError as exc:
            row.status = "ERROR"
            row.notes.append(str(exc))

    def bitmap_image(self) -> tuple[Path, str]:
        """A 1 TiB image whose stored bitmap (64 KiB granularity) has BITMAP_CHUNKS dirty chunks."""
        from prlnbd.image.extension import Extension, new_bitmap
        from prlnbd.image.parallels import ParallelsImage

        log(f"building a 1 TiB image with a {BITMAP_CHUNKS}-chunk dirty bitmap")
        path = create_image(self.work / "bitmap.hds", MAP_SIZE)
        gran = 64 * KiB
        rng = random.Random(10000)
        img = ParallelsImage.open(path, writable=True)
        try:
            bm = new_bitmap(img.size, gran)
            for chunk in rng.sample(range(MAP_SIZE // gran), BITMAP_CHUNKS):
                bm.set_range(chunk * gran, gran)
            img.extension = Extension(offset=0, bitmaps=[bm])
        finally:
            img.close()
        return path, bm.name

    def time_maps(self, row: Row, s: Server, q: Server, option: str) -> None:
        """Time `nbdinfo OPTION` on both servers, alternating; the maps must be identical.

        Then again with client and servers pinned, on one CPU and on two, as extra
        rows: each map is a few hundred round trips, and unpinned its time mostly
        says whether the scheduler happened to keep client and server together.
        """
        self._time_maps(row, s, q, option, None)
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2 or row.status:
            return
        for label, client_cpu in (("1cpu", cpus[0]), ("2cpu", cpus[1])):
            pinned = Row(f"{row.name}@{label}", row.unit, row.reference, row.target, row.higher_is_better)
            self.rows.append(pinned)
            for server in (s, q):
                pin(server.proc.pid, {cpus[0]})
            try:
                self._time_maps(pinned, s, q, option, client_cpu)
            finally:
                for server in (s, q):
                    pin(server.proc.pid, set(cpus))

    def _time_maps(self, row: Row, s: Server, q: Server, option: str, client_cpu: int | None) -> None:
        try:
            outputs: dict[str, str] = {}
            # CPU time each server spent per map: unlike the wall time, not at the mercy of
            # where the scheduler puts client and server.
            cpu: dict[str, list[float]] = {"subject": [], "ref": []}
            place = None if client_cpu is None else (lambda: os.sched_setaffinity(0, {client_cpu}))

            def timed(server: Server, key: str) -> float:
                c0 = cpu_seconds(server.proc.pid)
                t0 = time.perf_counter()
                res = run_cmd(["nbdinfo", option, server.uri()], timeout=600, preexec_fn=place)
                elapsed = time.perf_counter() - t0
                cpu[key].append(cpu_seconds(server.proc.pid) - c0)
                outputs.setdefault(key, res.stdout)
                return elapsed

            timed(s, "subject")
            timed(q, "ref")
            self.alternate(row, lambda _i: timed(s, "subject"), lambda _i: timed(q, "ref"),
                           reps=self.map_reps)
            lines = len(outputs["ref"].splitlines())
            if all(cpu.values()):
                row.notes.append(
                    f"server CPU per map (median): {self.subject} {statistics.median(cpu['subject']) * 1e3:.2f} ms,"
                    f" {row.reference} {statistics.median(cpu['ref']) * 1e3:.2f} ms")
            if outputs["subject"] == outputs["ref"]:
                row.notes.append(f"maps identical ({lines} extents)")
            else:
                row.status = "WRONG"
                row.notes.append(
                    f"MAPS DIFFER: {self.subject} {len(outputs['subject'].splitlines())} "
                    f"lines, qemu-nbd {lines} lines; first difference: "
                    f"{first_difference(outputs['subject'], outputs['ref'])}")
        except BenchError as exc:
            row.status = "ERROR"
            row.notes.append(str(exc))

    def bench_chain(self) -> None:
        """chain-read: prlnbd on a 4-layer chain vs prlnbd on one layer, same data."""
        single = self.full_image()
        chain = self.chain4()
        warm(single)
        warm(chain)
        specs = [("chain-read-seq", "read", "1M", 8, "MiB/s"),
                 ("chain-read-rand", "randread", "4k", 32, "IOPS")]
        with self.pair(self.start_subject(chain, True, stand_in=single),
                       self.start_subject(single, True)) as (c, s):
            rows = self.fio_rows(specs, c, s, f"{self.subject} 1 layer")
            if rows[0].status != "ERROR":
                self.compare(rows[0], c, s)

    def bench_base(self) -> None:
        """base-read-seq: a VM reading its base image: prlnbd serving a 2-layer bundle writable (its
        data in the frozen base) vs qemu-nbd on the same two files as a backing chain.

        qemu-nbd gets the chain read-only (with force-share): the two servers may not
        both hold the top for writing, and QEMU reads a chain the same way either way.
        """
        bundle = self.base_bundle()
        base, top = image_files(bundle)
        warm(bundle)
        opts = (f"driver=parallels,file.filename={top},"
                f"backing.driver=parallels,backing.file.filename={base}")
        ref = start_qemu_nbd(self.socks, opts, "-r", "--image-opts", fmt=None)
        self.servers.append(ref)
        with self.pair(self.start_subject(bundle, False, stand_in=self.full_image()), ref) as (s, q):
            rows = self.fio_rows([("base-read-seq", "read", "1M", 8, "MiB/s")], s, q,
                                 "qemu-nbd -r, same chain")
            if rows[0].status != "ERROR":
                self.compare(rows[0], s, q)

    def bench_write(self, name: str) -> None:
        """write-seq / write-rand / durable-write: each measurement on a fresh image per server.

        durable-write sends a FLUSH every 32 writes (fio fsync=32), so its
        images go on the work directory's disk: on tmpfs a flush costs nothing.
        """
        rw, bs, qd, unit = {"write-seq": ("write", "1M", 8, "MiB/s"),
                            "write-rand": ("randwrite", "4k", 32, "IOPS"),
                            "durable-write": ("randwrite", "4k", 16, "IOPS")}[name]
        durable = name == "durable-write"
        extra = ["--fsync=32"] if durable else []
        where = self.work if durable else self.write_dir
        flushes: dict[bool, list[int]] = {True: [], False: []}
        row = self.new_row(name, unit, "qemu-nbd")
        pick = 0 if unit == "MiB/s" else 1
        # Sequential writes fill the fresh image once (every write allocates);
        # random writes run for the usual time.
        runtime = None if rw == "write" else self.runtime
        check_failures: list[str] = []

        # Sides by key: "s" prlnbd, "q" qemu-nbd, "s-MODE" prlnbd --aio=MODE (same rotation).
        modes = self.aio_modes()
        figures: dict[str, list[float]] = {"s": row.prlnbd, "q": row.ref, **{f"s-{m}": [] for m in modes}}

        def measure(i: int, key: str) -> float:
            subject = key != "q"
            image = create_image(where / f"w-{key}{i}.hds", WRITE_SIZE)
            if not subject:
                server = self.start_qemu(image, False)
            else:
                server = self.start_subject(image, False, extra=[f"--aio={key[2:]}"] if key != "s" else [])
            try:
                if subject and is_read_only(server):
                    raise SkipBench(f"{self.subject} exports the image read-only "
                                    "without --read-only (this version does not write yet)")
                job = self.fio_job(nbd_target(server.uri()), rw, bs, qd, runtime=runtime,
                                   size=WRITE_SIZE, extra=extra)
                if key in ("s", "q"):
                    flushes[subject].append(job["sync"]["total_ios"])
                side = fio_side(job, rw)
                return float(side["iops"]) if pick else side["bw_bytes"] / MiB
            finally:
                self.stop(server)
                # Only prlnbd's images: this project promises qemu-img check stays clean.
                if subject:
                    res = subprocess.run(["qemu-img", "check", "-q", "-f", "parallels", image],
                                         capture_output=True, text=True)
                    if res.returncode != 0:
                        check_failures.append(f"{image.name}: {(res.stdout + res.stderr).strip()}")
                image.unlink(missing_ok=True)

        labels = {"s": self.subject, "q": "qemu-nbd", **{f"s-{m}": f"{self.subject} --aio={m}" for m in modes}}
        try:
            self.rotate(name, unit, [(labels[k], lambda i, k=k: measure(i, k), figures[k]) for k in figures])
        except SkipBench as exc:
            row.status = "SKIP"
            row.notes.append(f"{exc}")
            log(f"  {name}: SKIP: {exc}")
        except BenchError as exc:
            row.status = "ERROR"
            row.notes.append(str(exc))
            log(f"  {name}: ERROR: {exc}")
        for m in modes:
            for suffix, other in (("", "q"), (":default", "s")):
                variant = self.new_row(f"{name}/aio-{m}{suffix}", unit, labels[other])
                variant.target = self.args.targets.get(name, TARGETS.get(name)) if other == "q" else None
                variant.prlnbd, variant.ref = figures[f"s-{m}"], figures[other]
                variant.status = row.status
        if row.prlnbd and not row.status and not self.args.no_verify:
            self.verify_writes(row, rw, bs, qd)
        if check_failures:
            row.status = "WRONG"
            row.notes.append("qemu-img check failed: " + "; ".join(check_failures)[:500])
        elif row.prlnbd:
            row.notes.append("qemu-img check clean on every written image")
        if durable and flushes[True]:
            row.notes.append(f"flushes sent per run (median): {self.subject} "
                             f"{statistics.median(flushes[True]):.0f}, qemu-nbd "
                             f"{statistics.median(flushes[False] or [0]):.0f}; images on {where}")

    def bench_space(self) -> None:
        """space-reuse: write 1 GiB, TRIM it all and flush, write 1 GiB elsewhere; the file's st_blocks.

        Each side on a fresh 2 GiB image; the figure is what the image's allocated size grew by
        (st_blocks after the server stopped, less the empty image's header and BAT). The verdict
        is absolute: prlnbd within one cluster of 1 GiB.
        qemu-nbd runs with --discard=unmap (without it, it ignores TRIM).
        """
        row = self.new_row("space-reuse", "MiB", "qemu-nbd --discard=unmap", higher=False)
        sizes: dict[bool, list[int]] = {True: [], False: []}
        headers: dict[bool, int] = {}

        def measure(i: int, subject: bool) -> float:
            image = create_image(self.write_dir / f"sp-{'s' if subject else 'q'}{i}.hds", 2 * GiB)
            empty = image.stat().st_blocks  # header and BAT, as qemu-img wrote them
            server = (self.start_subject(image, False) if subject
                      else self.start_qemu(image, False, "--discard=unmap"))
            try:
                if subject and is_read_only(server):
                    raise SkipBench(f"{self.subject} exports the image read-only")
                self.fio_job(nbd_target(server.uri()), "write", "1M", 8, size=GiB)
                run_cmd([PYTHON, "-c", "import nbd, sys\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\n"
                         f"h.trim({GiB}, 0)\nh.flush()\nh.shutdown()", server.uri()])
                self.fio_job(nbd_target(server.uri()), "write", "1M", 8, size=GiB,
                             extra=[f"--offset={GiB}"])
            finally:
                self.stop(server)
            try:
                st = image.stat()
                sizes[subject].append(st.st_size)
                headers[subject] = empty * SECTOR
                return (st.st_blocks - empty) * SECTOR / MiB
            finally:
                image.unlink(missing_ok=True)

        try:
            self.alternate(row, lambda i: measure(i, True), lambda i: measure(i, False))
        except SkipBench as exc:
            row.status = "SKIP"
            row.notes.append(f"{exc}")
            return
        except BenchError as exc:
            row.status = "ERROR"
            row.notes.append(str(exc))
            return
        limit = (GiB + CLUSTER) / MiB
        worst = max(row.prlnbd)
        row.status = "PASS" if worst <= limit else "FAIL"
        row.notes.append(f"{self.subject} allocated at most {worst:.3f} MiB (limit {limit:.0f} MiB ="
                         f" 1 GiB + one cluster) over the empty image's {headers.get(True, 0)} bytes;"
                         f" file sizes {self.subject} {max(sizes[True]) / MiB:.0f} MiB,"
                         f" qemu-nbd {max(sizes[False] or [0]) / MiB:.0f} MiB; images on {self.write_dir}")

    def verify_writes(self, row: Row, rw: str, bs: str, iodepth: int) -> None:
        """Write 256 MiB with checksummed blocks through prlnbd, then read them back."""
        image = create_image(self.write_dir / "verify.hds", WRITE_SIZE)
        server = self.start_subject(image, False)
        try:
            self.fio(server.uri(), rw, bs, iodepth, size=256 * MiB,
                     extra=["--verify=crc32c", "--do_verify=1", "--verify_fatal=1"])
            row.notes.append("fio verify (crc32c) read back 256 MiB written the same way: ok")
        except (BenchError, SkipBench) as exc:
            row.status = "WRONG"
            row.notes.append(f"fio verify FAILED: {str(exc)[-300:]}")
        finally:
            self.stop(server)
            image.unlink(missing_ok=True)

    # ---- TLS ------------------------------------------------------------------------

    def tls_setup(self) -> tuple[Path, dict[str, str]]:
        """Certificates for the TLS rows: the servers' directory, and fio's environment.

        fio's nbd engine connects with a URI and libnbd refuses tls-certificates=
        there (local file access); without it libnbd reads $HOME/.pki/libnbd, so
        fio runs with HOME pointing at a directory holding the client's files.
        """
        from tests.tlspki import make_test_pki

        pki = make_test_pki(self.work / "pki")
        home = self.work / "tls-home"
        (home / ".pki").mkdir(parents=True)
        shutil.copytree(pki.client1, home / ".pki" / "libnbd")
        return pki.server, {**os.environ, "HOME": str(home)}

    def bench_tls(self, names: Sequence[str]) -> None:
        """tls-*: prlnbd --tls=require against qemu-nbd --tls-creds (x509, no client verification).

        Reads on one pair of servers over the full image; sequential writes each
        on a fresh image. Each row also notes the server's CPU time per GiB moved.
        """
        certs, env = self.tls_setup()
        prl_tls = ["--tls=require", f"--tls-certificates={certs}"]
        qemu_tls = ["--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={certs},verify-peer=off",
                    "--tls-creds=tls0"]

        def uri(server: Server) -> str:
            return server.uri().replace("nbd+unix://", "nbds+unix://", 1)

        def subject(image: Path, read_only: bool) -> Server:
            if self.self_test:
                return self.start_qemu(image, read_only, *qemu_tls)
            return self.start_subject(image, read_only, extra=prl_tls)

        def run_fio(server: Server, cpu: list[float], rw: str, bs: str, qd: int, unit: str,
                    runtime: float | None, size: int | None = None) -> float:
            c0 = cpu_seconds(server.proc.pid)
            job = self.fio_job(nbd_target(uri(server)), rw, bs, qd, runtime=runtime, size=size, env=env)
            used = cpu_seconds(server.proc.pid) - c0
            side = fio_side(job, rw)
            moved = side["io_bytes"] or 1
            cpu.append(used / (moved / GiB))
            return side["bw_bytes"] / MiB if unit == "MiB/s" else float(side["iops"])

        def cpu_note(row: Row, cpu: dict[bool, list[float]]) -> None:
            if cpu[True] and cpu[False]:
                row.notes.append(f"server CPU per GiB (median): {self.subject} {statistics.median(cpu[True]):.2f} s,"
                                 f" qemu-nbd {statistics.median(cpu[False]):.2f} s")

        reads = [(n, rw, bs, qd, unit) for n, rw, bs, qd, unit in (
            ("tls-read-seq", "read", "1M", 8, "MiB/s"), ("tls-read-rand", "randread", "4k", 32, "IOPS"))
            if n in names]
        if reads:
            image = self.full_image()
            warm(image)
            with self.pair(subject(image, True), self.start_qemu(image, True, *qemu_tls)) as (s, q):
                for name, rw, bs, qd, unit in reads:
                    row = self.new_row(name, unit, "qemu-nbd TLS")
                    cpu: dict[bool, list[float]] = {True: [], False: []}
                    try:
                        for server in (s, q):
                            run_fio(server, [], rw, bs, qd, unit, self.warmup)
                        self.alternate(
                            row,
                            lambda _i, rw=rw, bs=bs, qd=qd, unit=unit, c=cpu: run_fio(
                                s, c[True], rw, bs, qd, unit, self.runtime),
                            lambda _i, rw=rw, bs=bs, qd=qd, unit=unit, c=cpu: run_fio(
                                q, c[False], rw, bs, qd, unit, self.runtime))
                    except BenchError as exc:
                        row.status = "ERROR"
                        row.notes.append(str(exc))
                    cpu_note(row, cpu)
        if "tls-write-seq" in names:
            row = self.new_row("tls-write-seq", "MiB/s", "qemu-nbd TLS")
            cpu = {True: [], False: []}

            def measure(i: int, is_subject: bool) -> float:
                image = create_image(self.write_dir / f"tw-{'s' if is_subject else 'q'}{i}.hds", WRITE_SIZE)
                server = subject(image, False) if is_subject else self.start_qemu(image, False, *qemu_tls)
                try:
                    return run_fio(server, cpu[is_subject], "write", "1M", 8, "MiB/s", None, WRITE_SIZE)
                finally:
                    self.stop(server)
                    image.unlink(missing_ok=True)

            try:
                self.alternate(row, lambda i: measure(i, True), lambda i: measure(i, False))
            except BenchError as exc:
                row.status = "ERROR"
                row.notes.append(str(exc))
            cpu_note(row, cpu)

    # ---- scenes (issue 14) ----------------------------------------------------------

    def prlnbd_serve_help(self) -> str:
        """`prlnbd serve --help`, to see which options this version has."""
        res = subprocess.run([PYTHON, "-m", "prlnbd", "serve", "--help"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        return res.stdout

    def aio_modes(self) -> list[str]:
        """The --aio modes to measure beside prlnbd's default (none with --self-test)."""
        return [] if self.self_test else [m for m in self.args.aio if m != "auto"]

    def direct_engine(self, image: Path) -> str:
        """The fio engine for O_DIRECT reads of a file: io_uring when it works here, else libaio."""
        for engine in ("io_uring", "libaio"):
            try:
                self.fio_job([f"--filename={image}", "--direct=1", f"--ioengine={engine}",
                              "--readonly"], "randread", "4k", 1, runtime=1)
                return engine
            except BenchError:
                continue
        raise BenchError("fio can read the image with neither io_uring nor libaio")

    def bench_cold(self, names: Sequence[str]) -> None:
        """cold-read-*: reads from an 8 GiB image evicted from the page cache before every run.

        Each repetition measures, in rotating order: prlnbd, qemu-nbd, qemu-nbd
        --cache=none --aio=native, for cold-read-rand also fio with direct=1 on
        the file itself (the device limit) and, when prlnbd has it, prlnbd
        --cache=none. The row's reference is whichever qemu-nbd did better.
        """
        specs = {"cold-read-rand": ("randread", "4k", 32, "IOPS"),
                 "cold-read-rand-qd1": ("randread", "4k", 1, "IOPS"),
                 "cold-read-seq": ("read", "1M", 8, "MiB/s")}
        image = self.cold_image()
        evict(image)
        fincore_note = f"page cache after eviction: {resident(image)} of {COLD_SIZE // GiB}G resident"
        has_cache = not self.self_test and "--cache" in self.prlnbd_serve_help()
        engine = self.direct_engine(image)
        s = self.start_subject(image, True)
        q = self.start_qemu(image, True)
        qn = self.start_qemu(image, True, "--cache=none", "--aio=native")
        sn = self.start_subject(image, True, extra=["--cache=none"]) if has_cache else None
        # --aio MODE: the same prlnbd sides again with --aio=MODE, in the same rotation.
        aio = {mode: (self.start_subject(image, True, extra=[f"--aio={mode}"]),
                      self.start_subject(image, True, extra=["--cache=none", f"--aio={mode}"])
                      if has_cache else None)
               for mode in self.aio_modes()}
        try:
            for name in names:
                rw, bs, qd, unit = specs[name]
                pick = 0 if unit == "MiB/s" else 1
                # Sequential reads run through the image once (the device here reads it
                # in about 6 s: a time-based run would wrap round onto cached data).
                runtime = None if rw == "read" else self.runtime
                size = COLD_SIZE // 2 if self.quick else COLD_SIZE

                def cold_nbd(server: Server, rw: str = rw, bs: str = bs, qd: int = qd,
                             pick: int = pick, runtime: float | None = runtime,
                             size: int = size) -> Callable[[int], float]:
                    def measure(_i: int) -> float:
                        evict(image)
                        return self.fio(server.uri(), rw, bs, qd, runtime=runtime, size=size)[pick]
                    return measure

                def device(_i: int, rw: str = rw, bs: str = bs, qd: int = qd) -> float:
                    evict(image)
                    job = self.fio_job([f"--filename={image}", "--direct=1", f"--ioengine={engine}",
                                        "--readonly"], rw, bs, qd, runtime=self.runtime)
                    return float(fio_side(job, rw)["iops"])

                figures: dict[str, list[float]] = {k: [] for k in ("s", "q", "qn", "dev", "sn")}
                sides = [(self.subject, cold_nbd(s), figures["s"]),
                         ("qemu-nbd", cold_nbd(q), figures["q"]),
                         ("qemu-nbd none/native", cold_nbd(qn), figures["qn"])]
                for mode, (sa, _) in aio.items():
                    figures[f"s-{mode}"] = []
                    sides.append((f"{self.subject} --aio={mode}", cold_nbd(sa), figures[f"s-{mode}"]))
                if name == "cold-read-rand":
                    sides.append((f"fio direct=1 {engine}", device, figures["dev"]))
                    if sn is not None:
                        sides.append((f"{self.subject} --cache=none", cold_nbd(sn), figures["sn"]))
                    for mode, (_, sna) in aio.items():
                        if sna is not None:
                            figures[f"sn-{mode}"] = []
                            sides.append((f"{self.subject} --cache=none --aio={mode}", cold_nbd(sna),
                                          figures[f"sn-{mode}"]))
                error = None
                try:
                    self.rotate(name, unit, sides)
                except (BenchError, SkipBench) as exc:
                    error = str(exc)
                    log(f"  {name}: ERROR: {exc}")
                qemu_label = {"q": "qemu-nbd", "qn": "qemu-nbd --cache=none --aio=native"}
                med = {k: statistics.median(v) if v else 0.0 for k, v in figures.items()}
                best = "qn" if med["qn"] > med["q"] else "q"
                row = self.new_row(name, unit, qemu_label[best])
                row.prlnbd, row.ref = figures["s"], figures[best]
                rows = [row]
                other = "q" if best == "qn" else "qn"
                row.notes.append(f"{qemu_label[other]}: {fmt(med[other], unit)} {unit} (median)")
                if name == "cold-read-rand":
                    row.notes.append(fincore_note)
                    dev = self.new_row(f"{name}/device", unit, f"fio direct=1 {engine} on the file")
                    dev.prlnbd, dev.ref = figures["s"], figures["dev"]
                    rows.append(dev)
                    if sn is None:
                        row.notes.append(f"{self.subject} serve has no --cache option: "
                                         "no --cache=none row")
                    else:
                        none = self.new_row(f"{name}/prlnbd-cache-none", unit, qemu_label[best])
                        none.prlnbd, none.ref = figures["sn"], figures[best]
                        rows.append(none)
                for mode in aio:
                    variants = [("s", "", row)]
                    if f"sn-{mode}" in figures:
                        variants.append(("sn", "-cache-none", rows[-1]))
                    for key, label, base in variants:
                        vs_qemu = self.new_row(f"{name}/prlnbd{label}-aio-{mode}", unit, qemu_label[best])
                        vs_qemu.target = self.args.targets.get(base.name, TARGETS.get(base.name))
                        vs_qemu.prlnbd, vs_qemu.ref = figures[f"{key}-{mode}"], figures[best]
                        vs_default = self.new_row(f"{name}/prlnbd{label}-aio-{mode}:default", unit,
                                                  f"{self.subject}{label.replace('-cache-none', ' --cache=none')}"
                                                  " (default --aio)")
                        vs_default.prlnbd, vs_default.ref = figures[f"{key}-{mode}"], figures[key]
                        rows += [vs_qemu, vs_default]
                if runtime is None:
                    row.notes.append(f"each run reads {size // GiB} GiB once, from the start")
                if error is not None:
                    for r in rows:
                        r.status = "ERROR"
                        r.notes.append(error)
        finally:
            for server in (s, q, qn, sn, *(x for pair in aio.values() for x in pair)):
                if server is not None:
                    self.stop(server)

    def bench_vm_backup(self, name: str) -> None:
        """vm-backup-{write,copy}-{hot,cold}: a VM's small reads while a backup runs.

        Client A: fio 4 KiB random reads at QD1 (its completion latency
        percentiles). Client B, on its own connection(s) to the same server
        process: fio 1 MiB sequential writes at QD8 (write) or nbdcopy pulling
        the whole disk to null: (copy). B starts first and runs until after A
        ends; B's throughput is counted over A's window only.
        """
        _, _, mode, temp = name.split("-")
        writable = mode == "write"
        image = self.cold_copy() if writable else self.cold_image()
        ref = "qemu-nbd"
        p99 = self.new_row(name, "µs", ref, higher=False)
        p50 = self.new_row(f"{name}/p50", "µs", ref, higher=False)
        p999 = self.new_row(f"{name}/p99.9", "µs", ref, higher=False)
        bput = self.new_row(f"{name}/B", "MiB/s", ref)
        rows = [p99, p50, p999, bput]
        stalls: dict[bool, list[float]] = {True: [], False: []}
        worst: dict[bool, list[float]] = {True: [], False: []}
        # Every side's figures by key: "s" prlnbd, "q" qemu-nbd, "s-MODE" prlnbd --aio=MODE.
        modes = self.aio_modes()
        keys = ["s", "q", *(f"s-{m}" for m in modes)]
        figs: dict[str, dict[str, list[float]]] = {k: {"p99": [], "p50": [], "p99.9": [], "B": []}
                                                   for k in keys}

        def start(key: str, read_only: bool) -> Server:
            if key == "q":
                return self.start_qemu(image, read_only)
            extra = [f"--aio={key[2:]}"] if key.startswith("s-") else []
            return self.start_subject(image, read_only, extra=extra)

        def measure(key: str, server: Server | None) -> float:
            # Two writable servers may not hold one image at once (each marks it in
            # use): for the write scenes, each measurement starts its own server.
            own = server is None
            if server is None:
                server = start(key, False)
            try:
                if temp == "cold":
                    evict(image)
                else:
                    fsync_file(image)
                    warm(image)
                fig = self.vm_and_backup(server, mode)
            finally:
                if own:
                    self.stop(server)
            for part in ("p50", "p99.9", "B"):
                figs[key][part].append(fig[part])
            if key in ("s", "q"):
                stalls[key == "s"].append(fig["B stall"])
                worst[key == "s"].append(fig["max"])
            return fig["p99"]

        labels = {"s": self.subject, "q": ref, **{f"s-{m}": f"{self.subject} --aio={m}" for m in modes}}
        servers: dict[str, Server | None] = dict.fromkeys(keys)
        try:
            if not writable:
                for key in keys:
                    servers[key] = start(key, True)
            self.rotate(name, "µs", [(labels[k], lambda _i, k=k: measure(k, servers[k]), figs[k]["p99"])
                                     for k in keys])
        except (BenchError, SkipBench, RuntimeError) as exc:
            for row in rows:
                row.status = "SKIP" if isinstance(exc, SkipBench) else "ERROR"
            p99.notes.append(str(exc))
            log(f"  {name}: {p99.status}: {exc}")
        finally:
            for server in servers.values():
                if server is not None:
                    self.stop(server)
        for row, part in ((p99, "p99"), (p50, "p50"), (p999, "p99.9"), (bput, "B")):
            row.prlnbd, row.ref = figs["s"][part], figs["q"][part]
        for m in modes:
            for suffix, part, other, higher in (("", "p99", "q", False), ("/B", "B", "q", True),
                                                (":default", "p99", "s", False)):
                variant = self.new_row(f"{name}/aio-{m}{suffix}", "MiB/s" if part == "B" else "µs",
                                       labels[other], higher=higher)
                base = f"{name}{suffix}" if other == "q" else None
                variant.target = self.args.targets.get(base, TARGETS.get(base)) if base else None
                variant.prlnbd, variant.ref = figs[f"s-{m}"][part], figs[other][part]
                variant.status = p99.status
        if stalls[True]:
            gap = ("B's longest stretch with nothing written (fio's 100 ms bandwidth log)"
                   if writable else "the longest gap between nbdcopy's progress lines "
                   "(about 80 MiB each, so not necessarily a stall)")
            p99.notes.append(
                f"A's slowest read (median over runs): {self.subject} "
                f"{statistics.median(worst[True]) / 1e3:.1f} ms, qemu-nbd "
                f"{statistics.median(worst[False] or [0]) / 1e3:.1f} ms; {gap}: {self.subject} "
                f"{max(stalls[True]):.0f} ms, qemu-nbd {max(stalls[False] or [0]):.0f} ms")
        client_b = ("fio write 1M QD8, writable export of a copy" if writable
                    else "nbdcopy to null:, read-only exports")
        p99.notes.append(f"B: {client_b}; A: fio randread 4k QD1, {self.runtime} s; image {temp}")

    def vm_and_backup(self, server: Server, mode: str) -> dict[str, float]:
        """One vm-backup run on SERVER: A's latency percentiles (µs) and B's MiB/s over A's window."""
        uri = server.uri()
        for old in self.work.glob("vm?_bw*.log"):
            old.unlink()
        logging_opts = [f"--log_avg_msec={LOG_MS}", "--log_unix_epoch=1"]
        a_log = self.work / "vmA"

        def run_a() -> tuple[dict[str, Any], float, float]:
            job = self.fio_job(nbd_target(uri), "randread", "4k", 1, runtime=self.runtime,
                               extra=[f"--write_bw_log={a_log}", *logging_opts], tag="vmA")
            entries = read_bw_log(self.work / "vmA_bw.1.log")
            return job, entries[0][0], entries[-1][0]

        if mode == "write":
            b_log = self.work / "vmB"
            b = self.fio_start(nbd_target(uri), "write", "1M", 8,
                               runtime=VM_LEAD + self.runtime + VM_TAIL,
                               extra=[f"--write_bw_log={b_log}", *logging_opts], tag="vmB")
            try:
                time.sleep(VM_LEAD)
                job, w0, w1 = run_a()
            finally:
                self.fio_finish(b)
            moved, stall = window_bytes(read_bw_log(self.work / "vmB_bw.1.log"), w0, w1, "B (fio)")
        else:
            size = COLD_SIZE
            with CopyLoop(uri, size, self.work / "nbdcopy.log") as copy:
                time.sleep(VM_LEAD)
                copy.wait_until(lambda: any(b > 0 for _t, b in copy.samples),
                                "no data moved", 60)
                job, w0, w1 = run_a()
                copy.wait_until(lambda: bool(copy.samples) and copy.samples[-1][0] >= w1,
                                "no progress after A ended", 60)
                moved = copy.moved_at(w1) - copy.moved_at(w0)
                times = [t for t, _b in copy.samples if w0 <= t <= w1]
                gaps = [b - a for a, b in itertools.pairwise([w0, *times, w1])]
                stall = max(gaps)  # longest time without a progress line, an upper bound
        return {"p50": percentile_us(job, "randread", "50.000000"),
                "p99": percentile_us(job, "randread", "99.000000"),
                "p99.9": percentile_us(job, "randread", "99.900000"),
                "max": float(job["read"]["clat_ns"]["max"]) / 1e3,
                "B": moved / MiB / ((w1 - w0) / 1000), "B stall": stall}

    def bench_newcomer(self) -> None:
        """newcomer: connect + first 4 KiB read of new clients while another walks block status."""
        image = self.map_single()
        offsets = json.dumps([c * CLUSTER for c in map_clusters()])
        count = 200 if self.quick else 500
        p99 = self.new_row("newcomer", "ms", "qemu-nbd", higher=False)
        p50 = self.new_row("newcomer/p50", "ms", "qemu-nbd", higher=False)
        walks: dict[bool, list[float]] = {True: [], False: []}

        def measure(server: Server, subject: bool, i: int) -> float:
            walker = subprocess.Popen([PYTHON, "-c", WALKER, server.uri()], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                assert walker.stdout is not None and walker.stdin is not None
                if walker.stdout.readline().strip() != "walking":
                    raise BenchError(f"the block status walker failed: {walker.communicate()[1][-1000:]}")
                res = subprocess.run([PYTHON, "-c", NEWCOMER, server.uri(), str(count), str(i)],
                                     input=offsets, capture_output=True, text=True, timeout=600)
                if res.returncode != 0:
                    raise BenchError(f"newcomer clients failed: {res.stderr[-1000:]}")
                times = [t * 1e3 for t in json.loads(res.stdout)]
            finally:
                try:
                    out, err = walker.communicate(timeout=60)  # closes its stdin: stop
                except subprocess.TimeoutExpired:
                    walker.kill()
                    out, err = walker.communicate()
            try:
                maps, elapsed = out.split()
                walks[subject].append(int(maps) / float(elapsed))
            except ValueError:
                raise BenchError(f"the walker stopped badly: {out!r} {err[-500:]}") from None
            (p50.prlnbd if subject else p50.ref).append(statistics.median(times))
            return quantile(times, 0.99)

        with self.pair(self.start_subject(image, True), self.start_qemu(image, True)) as (s, q):
            try:
                self.alternate(p99, lambda i: measure(s, True, i), lambda i: measure(q, False, i))
            except BenchError as exc:
                p99.status = p50.status = "ERROR"
                p99.notes.append(str(exc))
        if walks[True] and walks[False]:
            p99.notes.append(f"{count} new clients per run; the walker's whole-disk maps per second "
                             f"(median): {self.subject} {statistics.median(walks[True]):.1f}, "
                             f"qemu-nbd {statistics.median(walks[False]):.1f}")

    def bench_many(self, names: Sequence[str]) -> None:
        """many-8x4 / many-32x1: random 4 KiB reads from 8 connections x QD4, 32 x QD1 (hot)."""
        image = self.full_image()
        warm(image)
        specs = [s for s in (("many-8x4", "randread", "4k", 4, "IOPS", 8),
                             ("many-32x1", "randread", "4k", 1, "IOPS", 32)) if s[0] in names]
        with self.pair(self.start_subject(image, True),
                       self.start_qemu(image, True, "--shared=32")) as (s, q):
            self.fio_rows(specs, s, q, "qemu-nbd -e 32")

    # ---- online merge (issue 12) ----------------------------------------------------

    def bench_merge(self, name: str) -> None:
        """merge-{cold,hot}: how much a VM's 4 KiB random reads slow down while a snapshot is merged online.

        Client A: fio randread 4k QD1 over the whole MERGE_SIZE disk, a writable
        export of a copy of merge_bundle()'s chain served with --control. The
        merge: `ctl merge` of the root, which its child, the served top, takes
        in ("down": 1 GiB moved into the top the VM writes). Each repetition
        measures, in rotating order: A during the merge, A without a merge, and
        the merge without A. Every measurement starts its own server; a merge
        consumes its copy of the chain. Rows: A's p99, p50, p99.9 (during /
        without) and the merge's duration and throughput (with A / without A).
        No qemu-nbd reference (it cannot merge a Parallels snapshot) and no
        targets: the issue asks for a measurement.
        """
        temp = name.split("-")[1]
        p99 = self.new_row(name, "µs", "no merge")
        p50 = self.new_row(f"{name}/p50", "µs", "no merge")
        p999 = self.new_row(f"{name}/p99.9", "µs", "no merge")
        duration = self.new_row(f"{name}/duration", "s", "merge without A")
        bput = self.new_row(f"{name}/MiB/s", "MiB/s", "merge without A")
        rows = (p99, p50, p999, duration, bput)
        if self.self_test or "--control" not in self.prlnbd_serve_help():
            for row in rows:
                row.status = "SKIP"
            p99.notes.append("qemu-nbd has no online merge of a Parallels snapshot: nothing to self-test"
                             if self.self_test else "prlnbd serve has no --control option (no online merge)")
            return
        extra: dict[str, dict[str, list[float]]] = {"during": {}, "without": {}, "alone": {}}
        wrong: list[str] = []

        def measure(side: str) -> float:
            bundle = self.merge_copy()
            ctl = self.socks / f"ctl-{time.monotonic_ns()}.sock"
            server = start_prlnbd(self.socks, [f"{MERGE_EXPORT}={bundle}"], "--control", str(ctl))
            self.servers.append(server)
            merges = side != "without"
            try:
                if temp == "cold":
                    evict(bundle)
                else:
                    fsync_file(bundle)
                    warm(bundle)
                if merges:
                    self._merge_copy = None  # consumed, whatever happens next
                fig = {"during": self.a_during_merge, "without": self.a_alone,
                       "alone": self.merge_alone}[side](server, ctl)
                if merges:
                    wrong.extend(self.check_merged(server, ctl))
            finally:
                self.stop(server)
            if merges:
                wrong.extend(check_bundle(bundle))
            for key, value in fig.items():
                extra[side].setdefault(key, []).append(value)
            if side == "alone":
                bput.ref.append(fig["MiB/s"])
                return fig["duration"]
            for row, key in ((p50, "p50"), (p999, "p99.9")):
                (row.prlnbd if side == "during" else row.ref).append(fig[key])
            if side == "during":
                duration.prlnbd.append(fig["duration"])
                bput.prlnbd.append(fig["MiB/s"])
            return fig["p99"]

        alone_ms: list[float] = []  # the merge's duration without A, in ms for rotate()'s progress line
        try:
            self.rotate(name, "", [
                ("A during merge: p99 µs", lambda _i: measure("during"), p99.prlnbd),
                ("A without: p99 µs", lambda _i: measure("without"), p99.ref),
                ("merge without A: ms", lambda _i: measure("alone") * 1e3, alone_ms)])
        except (BenchError, SkipBench, RuntimeError, OSError, subprocess.SubprocessError) as exc:
            for row in rows:
                row.status = "ERROR"
            p99.notes.append(str(exc))
            log(f"  {name}: ERROR: {exc}")
        duration.ref = [ms / 1e3 for ms in alone_ms]
        if wrong:
            for row in rows:
                row.status = "WRONG"
            p99.notes.append("AFTER A MERGE: " + "; ".join(wrong)[:600])
        elif duration.prlnbd:
            p99.notes.append("after every merge: one image left, prlnbd check and qemu-img check clean, "
                             "and 4 KiB of each 1 MiB cluster read over NBD held its pattern")
        self.merge_notes(p99, p999, duration, extra, temp)

    def merge_notes(self, p99: Row, p999: Row, duration: Row, extra: dict[str, dict[str, list[float]]],
                    temp: str) -> None:
        """The notes of the merge rows: A's read counts, IOPS, slowest read, and p99 by phase of the merge."""
        med = {side: {k: statistics.median(v) for k, v in figs.items()} for side, figs in extra.items()}
        during, without = med["during"], med["without"]
        if during and without:
            p99.notes.append(
                f"A (medians): reads counted during {during['reads']:.0f} over {during['window']:.1f} s, "
                f"without {without['reads']:.0f} over {without['window']:.1f} s; IOPS during "
                f"{during['IOPS']:.0f}, without {without['IOPS']:.0f}; slowest read during "
                f"{during['max'] / 1e3:.1f} ms (completed {during['max before reply']:.0f} ms before the "
                f"merge's reply), "
                f"without {without['max'] / 1e3:.1f} ms")
            p99.notes.append(
                f"A's p99 during the merge by phase (medians): while copying {during['p99 copy']:,.0f} µs "
                f"({during['reads copy']:.0f} reads), from the last step copied to the reply (flush, "
                f"descriptor, delete) {during['p99 end']:,.0f} µs ({during['reads end']:.0f} reads, "
                f"{during['end s']:.2f} s)")
            if min(extra["during"]["reads"]) < 1000:
                p999.notes.append("fewer than 1000 of A's reads in some merge window: p99.9 is "
                                  "then about A's slowest read")
        p99.notes.append(
            f"A: fio randread 4k QD1 over the whole {MERGE_SIZE // GiB} GiB disk, image {temp}; during = "
            f"A's reads completed between the merge seen copying (query) and its reply; without = a "
            f"{self.runtime} s run on the same chain, no merge; ratio = during / without "
            "(above 1: slower during the merge)")
        alone = med["alone"]
        if during and alone:
            duration.notes.append(
                f"phases (medians): request to the last step copied {during['copy s']:.2f} s with A, "
                f"{alone['copy s']:.2f} s without; then to the reply (flush, descriptor, delete) "
                f"{during['end s']:.2f} s with A, {alone['end s']:.2f} s without (polled every 100 ms)")
        duration.notes.append(
            "`ctl merge` of the root (1 GiB) down into the served top, request to reply; ratio = with A "
            "/ without A (above 1: A slows the merge); runs with A: "
            f"{', '.join(f'{d:.1f}' for d in duration.prlnbd) or '-'} s, without: "
            f"{', '.join(f'{d:.1f}' for d in duration.ref) or '-'} s")

    def a_alone(self, server: Server, _ctl: Path) -> dict[str, float]:
        """Client A for self.runtime seconds with no merge: its latency figures (µs) and IOPS."""
        prefix = self.work / "mergeA"
        job = self.fio_job(nbd_target(server.uri()), "randread", "4k", 1, runtime=self.runtime,
                           extra=per_io_log(prefix), tag="mergeA")
        lats = [lat for _t, lat in read_lat_log(prefix)]
        window = float(job["job_runtime"]) / 1e3
        return {**latency_figures(lats), "window": window, "IOPS": len(lats) / window}

    def a_during_merge(self, server: Server, ctl: Path) -> dict[str, float]:
        """Client A while `ctl merge` removes the root: A's figures over the merge, the merge's duration and MiB/s.

        A starts first (a VM already running); once the server has counted
        requests on A's connection, the merge is asked for (run_merge()). A's
        window opens when `query` shows the merge copying and closes when its
        reply arrives; then A is stopped. Only A's reads completed inside the
        window count.
        """
        prefix = self.work / "mergeA"
        a = self.fio_start(nbd_target(server.uri()), "randread", "4k", 1, runtime=MERGE_CAP,
                           extra=per_io_log(prefix), tag="mergeA")
        try:
            wait_for(lambda: any(c["requests"] > 0 for c in control(ctl, "query")["connections"]),
                     "client A's first requests", 60, a.proc)
            fig = self.run_merge(ctl, a.proc)
        finally:
            if a.proc.poll() is None:
                a.proc.send_signal(signal.SIGINT)  # fio stops its job and writes its report and log
            try:
                _out, err = a.proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                a.proc.kill()
                _out, err = a.proc.communicate()
        report = fio_report(a.out)
        if report is None or report["error"]:
            raise BenchError(f"client A (fio) failed: {err[-1000:]}")
        t_run, t_copied, t_end = fig["t run"], fig["t copied"], fig["t end"]
        log_entries = read_lat_log(prefix)
        inside = [(t, lat) for t, lat in log_entries if t_run <= t <= t_end]
        if len(inside) < MERGE_MIN_READS:
            raise BenchError(f"only {len(inside)} of A's reads completed during the merge "
                             f"({(t_end - t_run) / 1e3:.2f} s)")
        lats = [lat for _t, lat in inside]
        slowest = max(inside, key=lambda e: e[1])[0]
        copy = [lat for t, lat in inside if t <= t_copied] or [0.0]
        end = [lat for t, lat in inside if t > t_copied] or [0.0]
        window = (t_end - t_run) / 1e3
        return {**latency_figures(lats), "window": window, "IOPS": len(lats) / window,
                "duration": fig["duration"], "MiB/s": fig["MiB/s"], "copy s": fig["copy s"],
                "end s": fig["end s"],
                "max before reply": t_end - slowest,
                "p99 copy": quantile(copy, 0.99), "reads copy": float(len(copy)),
                "p99 end": quantile(end, 0.99), "reads end": float(len(end))}

    def merge_alone(self, _server: Server, ctl: Path) -> dict[str, float]:
        """The merge with no client: its duration and MiB/s."""
        fig = self.run_merge(ctl, None)
        return {k: fig[k] for k in ("duration", "MiB/s", "copy s", "end s")}

    def run_merge(self, ctl: Path, client: subprocess.Popen[str] | None) -> dict[str, float]:
        """`ctl merge` of the served chain's root; when (Unix ms) it was seen copying, done copying, answered.

        The request goes on its own control connection from a thread; `query`
        on others polls its progress: every 10 ms until it shows done > 0 (t
        run), then every 100 ms until done reaches total (t copied: the flush and
        the descriptor's commit follow) or the reply comes (t end). Also gives
        the duration (request to reply, s) and MiB/s (bytes moved over it).
        """
        layers = control(ctl, "query")["exports"][0]["layers"]
        if len(layers) != 2:
            raise BenchError(f"the merge chain has {len(layers)} layers, not 2: {layers}")
        root = layers[-1]["guid"]
        reply: dict[str, Any] = {}

        def merge() -> None:
            try:
                reply["return"] = control(ctl, "merge", export=MERGE_EXPORT, guid=root)
            except BenchError as exc:
                reply["error"] = str(exc)
            reply["t"] = time.time() * 1000

        def progress() -> tuple[int, int] | None:
            for op in control(ctl, "query")["operations"]:
                if op["operation"] == "merge":
                    return int(op["done"]), int(op["total"])
            return None

        thread = threading.Thread(target=merge, daemon=True)
        t_sent = time.time() * 1000
        thread.start()
        wait_for(lambda: "t" in reply or (progress() or (0, 0))[0] > 0, "merge copying", 60, client)
        t_run = time.time() * 1000
        if "t" in reply:
            raise BenchError(f"the merge ended before query saw it copying: {reply}")
        t_copied: float | None = None
        deadline = time.monotonic() + MERGE_CAP
        while thread.is_alive():
            thread.join(0.1)
            if t_copied is None and thread.is_alive():
                now = progress()
                if now is not None and now[0] >= now[1]:
                    t_copied = time.time() * 1000
            if time.monotonic() > deadline:
                raise BenchError(f"the merge took more than {MERGE_CAP} s")
        if "error" in reply:
            raise BenchError(f"ctl merge failed: {reply['error']}")
        result = reply["return"]
        if result.get("direction") != "down":
            raise BenchError(f"the merge went {result.get('direction')!r}, not down into the top: {result}")
        t_end = float(reply["t"])
        seconds = (t_end - t_sent) / 1e3
        t_copied = t_copied or t_end
        return {"t run": t_run, "t copied": t_copied, "t end": t_end, "duration": seconds,
                "MiB/s": float(result["bytes-moved"]) / MiB / seconds,
                "copy s": (t_copied - t_sent) / 1e3, "end s": (t_end - t_copied) / 1e3}

    def check_merged(self, server: Server, ctl: Path) -> list[str]:
        """What is wrong with the disk served after a merge: one layer left, 4 KiB of each cluster = pattern(c)."""
        problems = []
        layers = control(ctl, "query")["exports"][0]["layers"]
        if len(layers) != 1:
            problems.append(f"the served chain has {len(layers)} layers after the merge, not 1")
        if self.args.no_verify:
            return problems
        # A different 4 KiB block of each cluster, so every part of a cluster is read somewhere.
        offsets = [(c * CLUSTER + (c * 7) % (CLUSTER // (4 * KiB)) * 4 * KiB, pattern(c))
                   for c in range(MERGE_SIZE // CLUSTER)]
        res = run_cmd([PYTHON, "-c", PATTERN_CHECK, server.uri()], timeout=600,
                      input=json.dumps(offsets))
        found = json.loads(res.stdout)
        if found["bad"]:
            problems.append(f"{found['bad']} of {len(offsets)} blocks read wrong, first at {found['first']}")
        return problems

    def run(self, selected: Sequence[str]) -> None:
        """Run the SELECTED benchmarks in a fixed order."""
        wanted = set(selected)
        steps: list[tuple[str, Callable[[], None]]] = []
        reads = wanted & {"read-seq", "read-rand"}
        if reads:
            steps.append((" + ".join(sorted(reads, reverse=True)), lambda: self.bench_reads(reads)))
        if "map-1t" in wanted:
            steps.append(("map-1t", self.bench_map))
        if "chain-read" in wanted:
            steps.append(("chain-read", self.bench_chain))
        if "base-read-seq" in wanted:
            steps.append(("base-read-seq", self.bench_base))
        if "bitmap-1t" in wanted:
            steps.append(("bitmap-1t", self.bench_bitmap))
        for name in ("write-seq", "write-rand"):
            if name in wanted:
                steps.append((name, lambda n=name: self.bench_write(n)))
        cold = [n for n in COLD_READS if n in wanted]
        if cold:
            steps.append((" + ".join(cold), lambda: self.bench_cold(cold)))
        for name in VM_BACKUPS:
            if name in wanted:
                steps.append((name, lambda n=name: self.bench_vm_backup(n)))
        if "newcomer" in wanted:
            steps.append(("newcomer", self.bench_newcomer))
        many = [n for n in MANY if n in wanted]
        if many:
            steps.append((" + ".join(many), lambda: self.bench_many(many)))
        if "durable-write" in wanted:
            steps.append(("durable-write", lambda: self.bench_write("durable-write")))
        tls = [n for n in TLS_ROWS if n in wanted]
        if tls:
            steps.append((" + ".join(tls), lambda: self.bench_tls(tls)))
        if "space-reuse" in wanted:
            steps.append(("space-reuse", self.bench_space))
        for name in MERGES:
            if name in wanted:
                steps.append((name, lambda n=name: self.bench_merge(n)))
        for label, step in steps:
            t0 = time.monotonic()
            log(f"== {label}")
            try:
                step()
            except (BenchError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
                log(f"{label}: ERROR: {exc}")
                self.rows.append(Row(label, "", "", 0.0, status="ERROR", notes=[str(exc)]))
            log(f"== {label} took {time.monotonic() - t0:.0f} s")
        for row in self.rows:
            row.finish()


def map_clusters() -> list[int]:
    """The MAP_CLUSTERS clusters the 1 TiB map images hold (the first draw of map_images' rng)."""
    return sorted(random.Random(2000).sample(range(MAP_SIZE // CLUSTER), MAP_CLUSTERS))


def percentile_us(job: dict[str, Any], rw: str, pct: str) -> float:
    """A completion latency percentile (fio's key, e.g. "99.000000") of a fio job, in µs."""
    return float(fio_side(job, rw)["clat_ns"]["percentile"][pct]) / 1e3


def per_io_log(prefix: Path) -> list[str]:
    """fio options logging every I/O's completion latency (ns) with its Unix time (ms) to PREFIX_clat.1.log."""
    for old in prefix.parent.glob(f"{prefix.name}_*.log"):
        old.unlink()
    return [f"--write_lat_log={prefix}", "--log_avg_msec=0", "--log_unix_epoch=1"]


def read_lat_log(prefix: Path) -> list[tuple[float, float]]:
    """(Unix time in ms, completion latency in µs) of every I/O in the log per_io_log(PREFIX) asked for."""
    path = prefix.with_name(f"{prefix.name}_clat.1.log")
    entries = []
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            fields = line.split(",")
            if len(fields) >= 2:
                entries.append((float(fields[0]), float(fields[1]) / 1e3))
    if not entries:
        raise BenchError(f"{path.name}: no latency log")
    return entries


def latency_figures(lats: Sequence[float]) -> dict[str, float]:
    """p50, p99, p99.9 and max of LATS (µs, nearest rank), and how many there are."""
    return {"p50": quantile(lats, 0.5), "p99": quantile(lats, 0.99), "p99.9": quantile(lats, 0.999),
            "max": max(lats), "reads": float(len(lats))}


def fio_report(out: Path) -> dict[str, Any] | None:
    """The job report of a fio run stopped by SIGINT (its JSON comes after a "terminating" line), or None."""
    with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
        text = out.read_text()
        job: dict[str, Any] = json.loads(text[text.index("{"):])["jobs"][0]
        return job
    return None


def control(path: Path, command: str, **arguments: object) -> dict[str, Any]:
    """One request to a prlnbd control socket (as `prlnbd ctl`); its "return", or BenchError."""
    from prlnbd.cli import control_request
    from prlnbd.errors import PrlNbdError

    try:
        reply = control_request(str(path), command, arguments)
    except PrlNbdError as exc:
        raise BenchError(str(exc)) from None
    if "error" in reply:
        raise BenchError(f"ctl {command}: {reply['error']}")
    result: dict[str, Any] = reply["return"]  # type: ignore[assignment]
    return result


def wait_for(ready: Callable[[], bool], what: str, timeout: float,
             client: subprocess.Popen[str] | None = None) -> None:
    """Poll READY() every 10 ms until it holds; BenchError after TIMEOUT s, or if CLIENT exits first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if client is not None and client.poll() is not None:
            raise BenchError(f"the client exited ({client.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise BenchError(f"no {what} within {timeout:.0f} s")
        time.sleep(0.01)


def check_bundle(bundle: Path) -> list[str]:
    """What `prlnbd check` and `qemu-img check` find wrong in BUNDLE after a merge (one image left)."""
    problems = []
    images = image_files(bundle)
    if len(images) != 1:
        problems.append(f"{len(images)} images left in {bundle.name}, not 1")
    res = subprocess.run([PYTHON, "-m", "prlnbd", "check", str(bundle)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        problems.append(f"prlnbd check exited {res.returncode}: {(res.stdout + res.stderr).strip()[-200:]}")
    for image in images:
        res = subprocess.run(["qemu-img", "check", "-q", "-f", "parallels", image],
                             capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            problems.append(f"qemu-img check {image.name}: {(res.stdout + res.stderr).strip()[:200]}")
    return problems


def quantile(values: Sequence[float], q: float) -> float:
    """The Q quantile of VALUES (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def is_read_only(server: Server) -> bool:
    """Whether SERVER's export "" advertises NBD_FLAG_READ_ONLY."""
    res = run_cmd(["nbdinfo", "--json", server.uri()], timeout=60)
    exports = json.loads(res.stdout)["exports"]
    return bool(exports and exports[0].get("is_read_only"))


def pin(pid: int, cpus: set[int]) -> None:
    """Let every thread of process PID run only on CPUS."""
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(task), cpus)


def cpu_seconds(pid: int) -> float:
    """CPU time (user and system) all threads of process PID have used, from /proc schedstat."""
    total = 0
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
    return total / 1e9


def first_difference(a: str, b: str) -> str:
    """The first line where two texts differ."""
    for i, (x, y) in enumerate(zip(a.splitlines(), b.splitlines(), strict=False)):
        if x != y:
            return f"line {i + 1}: {x.strip()!r} vs {y.strip()!r}"
    return "one is a prefix of the other"


def fmt(value: float | None, unit: str) -> str:
    """A figure at a precision that suits its unit."""
    if value is None:
        return "-"
    if unit == "s":
        return f"{value:.3f}"
    if unit in ("ms", "µs") and value < 100:
        return f"{value:.2f}"
    return f"{value:,.0f}"


def table(rows: Sequence[Row], subject: str) -> str:
    """The final table as text."""
    head = ("benchmark", "unit", subject, "reference", "ref is", "ratio", "pairs",
            "target", "result")
    lines = [head]
    for r in rows:
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else "-"
        pairs = r.pair_ratios
        spread = f"{min(pairs):.2f}-{max(pairs):.2f}" if pairs else "-"
        lines.append((r.name, r.unit, fmt(r.prlnbd_median, r.unit), fmt(r.ref_median, r.unit),
                      r.reference, ratio, spread,
                      "-" if r.target is None else f">= {r.target:.2f}", r.status))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
           for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {r.name}: {n}" for r in rows for n in r.notes]
    if notes:
        out += ["", "notes:", *notes]
    return "\n".join(out)


def parse_selection(values: Sequence[str] | None) -> list[str]:
    """Expand --only values (names, groups, comma lists) into benchmark names."""
    names: list[str] = []
    for value in values or [DEFAULT_GROUP]:
        for item in filter(None, (v.strip() for v in value.split(","))):
            expanded = GROUPS.get(item, (item,))
            for name in expanded:
                if name not in BENCHMARKS:
                    raise SystemExit(f"unknown benchmark {item!r}; choose from "
                                     f"{', '.join([*BENCHMARKS, *GROUPS])}")
                if name not in names:
                    names.append(name)
    return [n for n in BENCHMARKS if n in names]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description="Benchmark prlnbd against qemu-nbd -f parallels (ratios, same run).")
    p.add_argument("--quick", action="store_true", help="5 s per fio run instead of 10 s")
    p.add_argument("--only", action="append", metavar="NAME[,NAME]",
                   help=f"benchmarks or groups to run: {', '.join(BENCHMARKS)}; groups "
                        f"{', '.join(f'{k}' for k in GROUPS)} (default: {DEFAULT_GROUP})")
    p.add_argument("--reps", type=int, default=3, help="repetitions per side (median taken)")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument("--workdir", type=Path, help="where to build images (default: /tmp)")
    p.add_argument("--write-dir", type=Path,
                   help="where the write benchmarks put their fresh images (default: "
                        "/dev/shm when it has room, else the workdir)")
    p.add_argument("--keep", action="store_true", help="keep the images afterwards")
    p.add_argument("--cache-dir", type=Path,
                   help="where images too dear to build every run are kept (the 8 GiB cold "
                        "image; default: WORKDIR/prlnbd-bench-cache)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip comparing the data and maps the two sides serve")
    p.add_argument("--aio", action="append", default=[], metavar="MODE",
                   help="also measure prlnbd serve --aio=MODE (e.g. io_uring) in the cold-read, "
                        "vm-backup and write rows, beside the default, in the same rotation")
    p.add_argument("--target", action="append", default=[], metavar="NAME=RATIO",
                   help="override a target ratio, e.g. read-rand=0.6")
    p.add_argument("--check", action="store_true",
                   help="exit 1 when a benchmark misses its target (not only on errors)")
    # Proves the harness before prlnbd exists: qemu-nbd stands on both sides,
    # so every ratio should come out near 1.0.
    p.add_argument("--self-test", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.reps < 1:
        p.error("--reps must be at least 1")
    args.targets = {}
    for item in args.target:
        name, _, value = item.partition("=")
        if name not in TARGETS:
            p.error(f"--target: unknown name {name!r}; choose from {', '.join(TARGETS)}")
        try:
            args.targets[name] = float(value)
        except ValueError:
            p.error(f"--target {item!r}: ratio must be a number")
    args.selected = parse_selection(args.only)
    return args


def preflight(args: argparse.Namespace) -> None:
    """Fail early and clearly when a tool or prlnbd itself is missing."""
    missing = [t for t in ("fio", "qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")
               if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"missing tools: {', '.join(missing)}")
    if "nbd" not in subprocess.run(["fio", "--enghelp"], capture_output=True,
                                   text=True).stdout.split():
        raise SystemExit("this fio has no nbd ioengine (fio --enghelp)")
    if not args.self_test:
        res = subprocess.run([PYTHON, "-m", "prlnbd", "serve", "--help"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise SystemExit("`python -m prlnbd serve --help` fails; is the server there yet? "
                             f"(--self-test runs qemu-nbd on both sides)\n{res.stderr[-1000:]}")


def default_write_dir() -> Path | None:
    """/dev/shm when it can hold two write images.

    On a disk file system (ext4 mounted with discard here) deleting a freshly
    written 1 GiB image can take 20 s and its writeback disturbs the next
    measurement; on tmpfs both servers meet only the page cache.
    """
    shm = Path("/dev/shm")
    try:
        st = os.statvfs(shm)
    except OSError:
        return None
    return shm if st.f_bavail * st.f_frsize >= 4 * WRITE_SIZE else None


def versions() -> dict[str, str]:
    """Tool versions for the JSON record."""
    def first_line(*cmd: str) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
        except OSError:
            return "?"
        return out.splitlines()[0] if out else "?"

    return {"fio": first_line("fio", "--version"), "qemu": first_line("qemu-nbd", "--version"),
            "nbdinfo": first_line("nbdinfo", "--version"), "python": platform.python_version()}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; the exit status is 1 on errors or wrong data (and misses, with --check)."""
    args = parse_args(argv)
    preflight(args)

    def on_signal(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    base = args.workdir or Path("/tmp")
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="prlnbd-bench-", dir=base))
    bench = Bench(args, work)
    write_base = args.write_dir or default_write_dir()
    if write_base is not None and set(args.selected) & set(GROUPS["writes"]):
        write_base.mkdir(parents=True, exist_ok=True)
        bench.write_dir = Path(tempfile.mkdtemp(prefix="prlnbd-bench-w-", dir=write_base))
    started = datetime.datetime.now(datetime.UTC)
    t0 = time.monotonic()
    mode = "quick" if args.quick else "full"
    log(f"{mode} run of {', '.join(args.selected)} in {work}"
        f"{' (SELF-TEST: qemu-nbd on both sides)' if args.self_test else ''}")
    try:
        bench.run(args.selected)
    finally:
        bench.stop_all()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        if bench.write_dir != work:
            shutil.rmtree(bench.write_dir, ignore_errors=True)
    elapsed = time.monotonic() - t0

    print()
    if args.self_test:
        print("SELF-TEST: qemu-nbd on both sides; every ratio should be close to 1.0")
    print(f"{mode} run, {bench.reps} reps per side (map-1t: {bench.map_reps}), "
          f"fio runtime {bench.runtime} s, {elapsed:.0f} s in all, {os.cpu_count()} CPUs")
    print(table(bench.rows, bench.subject))

    if args.json:
        record = {
            "started": started.isoformat(timespec="seconds"),
            "elapsed_s": round(elapsed, 1),
            "mode": mode,
            "self_test": args.self_test,
            "reps": bench.reps,
            "map_reps": bench.map_reps,
            "fio_runtime_s": bench.runtime,
            "cpus": os.cpu_count(),
            "write_dir": str(bench.write_dir),
            "versions": versions(),
            "results": [r.as_json() for r in bench.rows],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        log(f"wrote {args.json}")

    bad = {"ERROR", "WRONG"} | ({"FAIL"} if args.check else set())
    return 1 if any(r.status in bad for r in bench.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
