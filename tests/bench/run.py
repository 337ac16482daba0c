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
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

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

# Ratio a benchmark must reach to PASS (the targets of the project's issues):
# prlnbd / qemu-nbd for throughput, qemu-nbd time / prlnbd time for the maps,
# chain / single layer for chain-read. Override with --target NAME=RATIO.
TARGETS = {
    "read-seq": 2.0,
    "read-rand": 3.0,
    "map-1t": 1.0,
    "chain-read-seq": 0.9,
    "chain-read-rand": 0.9,
    "write-seq": 1.5,
    "write-rand": 2.0,
    "bitmap-1t": 1.0,
    "bitmap-1t-cold": 1.0,
}

BENCHMARKS = ("read-seq", "read-rand", "map-1t", "chain-read", "bitmap-1t", "write-seq", "write-rand")
GROUPS = {
    "reads": ("read-seq", "read-rand", "map-1t", "chain-read", "bitmap-1t"),
    "writes": ("write-seq", "write-rand"),
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
    target: float
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


def log(msg: str) -> None:
    """Progress to stderr, so stdout keeps only the table."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_cmd(cmd: Sequence[str | Path], timeout: float = 600,
            preexec_fn: Callable[[], object] | None = None) -> subprocess.CompletedProcess[str]:
    """Run CMD, raising BenchError with its output if it fails."""
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                         preexec_fn=preexec_fn)
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


def qemu_io_write(path: Path, writes: Sequence[tuple[int, int, int]]) -> None:
    """Apply (offset, length, pattern byte) writes in one qemu-io process."""
    if not writes:
        return
    cmd: list[str | Path] = ["qemu-io", "-f", "parallels"]
    for offset, length, byte in writes:
        cmd += ["-c", f"write -q -P {byte} {offset} {length}"]
    cmd.append(path)
    run_cmd(cmd)


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
    paths = sorted(path.glob("*.hds")) if path.is_dir() else [path]
    buf = bytearray(8 * MiB)
    for p in paths:
        with p.open("rb", buffering=0) as f:
            while f.readinto(buf):
                pass


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
        self.rows: list[Row] = []
        self.subject = "qemu-nbd (self-test)" if self.self_test else "prlnbd"

    # ---- servers --------------------------------------------------------------

    def start_subject(self, disk: Path, read_only: bool, stand_in: Path | None = None) -> Server:
        """prlnbd on DISK; with --self-test, qemu-nbd on STAND_IN (or DISK) instead."""
        if self.self_test:
            return self.start_qemu(stand_in or disk, read_only)
        server = start_prlnbd(self.socks, [str(disk)], *(["--read-only"] if read_only else []))
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

    def map_images(self) -> tuple[Path, Path]:
        """A 1 TiB 3-layer chain with 2000 allocated clusters, and one layer holding them all.

        Some clusters are also written in a lower layer (hidden by the upper
        one), as snapshots do; the merged map is the same 2000 clusters.
        """
        log(f"building 1 TiB images with {MAP_CLUSTERS} allocated clusters")
        rng = random.Random(2000)
        clusters = sorted(rng.sample(range(MAP_SIZE // CLUSTER), MAP_CLUSTERS))
        single = create_image(self.work / "map1.hds", MAP_SIZE)
        qemu_io_write(single, [(c * CLUSTER, 4 * KiB, pattern(c)) for c in clusters])
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
            extra: Sequence[str] = ()) -> tuple[float, float]:
        """Run one fio job over NBD; return (MiB/s, IOPS)."""
        out = self.work / "fio.json"
        out.unlink(missing_ok=True)
        cmd = ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}",
               f"--bs={bs}", f"--iodepth={iodepth}", "--numjobs=1",
               "--output-format=json", f"--output={out}", *extra]
        if runtime is not None:
            cmd += ["--time_based", f"--runtime={runtime}"]
        else:
            cmd += [f"--size={size}", "--runtime=300"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=360)
        text = f"{res.stdout}\n{res.stderr}"
        try:
            job = json.loads(out.read_text())["jobs"][0]
        except (OSError, ValueError, KeyError, IndexError):
            job = None
        err = job["error"] if job else None
        if res.returncode != 0 or err:
            if err == errno.EPERM or "Operation not permitted" in text:
                raise SkipBench("the server answered EPERM (read-only export)")
            raise BenchError(f"fio {rw} on {uri} failed (rc {res.returncode}, "
                             f"error {err}):\n{text[-2000:]}")
        if job is None:
            raise BenchError(f"fio wrote no JSON report:\n{text[-2000:]}")
        side = job["write" if "write" in rw else "read"]
        if not side["io_bytes"]:
            raise BenchError(f"fio {rw} on {uri} moved no data:\n{text[-2000:]}")
        return side["bw_bytes"] / MiB, float(side["iops"])

    def alternate(self, row: Row, subject: Callable[[int], float], ref: Callable[[int], float],
                  reps: int | None = None) -> None:
        """Measure both sides REPS times, swapping which goes first every time."""
        reps = reps or self.reps
        for i in range(reps):
            sides = [("subject", subject), ("ref", ref)]
            if i % 2:
                sides.reverse()
            for which, measure in sides:
                value = measure(i)
                (row.prlnbd if which == "subject" else row.ref).append(value)
            log(f"  {row.name} rep {i + 1}/{reps}: {self.subject} {fmt(row.prlnbd[-1], row.unit)}"
                f", {row.reference} {fmt(row.ref[-1], row.unit)} {row.unit}")

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

    def fio_rows(self, specs: Sequence[tuple[str, str, str, int, str]],
                 subject: Server, ref: Server, reference: str) -> list[Row]:
        """Run fio specs (name, rw, bs, iodepth, unit) against both servers."""
        rows = []
        for name, rw, bs, qd, unit in specs:
            row = self.new_row(name, unit, reference)
            rows.append(row)
            try:
                for server in (subject, ref):
                    self.fio(server.uri(), rw, bs, qd, runtime=self.warmup)
                pick = 0 if unit == "MiB/s" else 1
                self.alternate(
                    row,
                    lambda _i, rw=rw, bs=bs, qd=qd, p=pick: self.fio(
                        subject.uri(), rw, bs, qd, runtime=self.runtime)[p],
                    lambda _i, rw=rw, bs=bs, qd=qd, p=pick: self.fio(
                        ref.uri(), rw, bs, qd, runtime=self.runtime)[p],
                )
            except (BenchError, SkipBench) as exc:
                row.status = "SKIP" if isinstance(exc, SkipBench) else "ERROR"
                row.notes.append(str(exc))
                log(f"  {name}: {row.status}: {exc}")
        return rows

    def new_row(self, name: str, unit: str, reference: str, higher: bool = True) -> Row:
        """Register a row for NAME with its target."""
        row = Row(name, unit, reference, self.args.targets.get(name, TARGETS[name]), higher)
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

    def bench_write(self, name: str) -> None:
        """write-seq / write-rand: each measurement on a fresh image per server."""
        rw, bs, qd, unit = {"write-seq": ("write", "1M", 8, "MiB/s"),
                            "write-rand": ("randwrite", "4k", 32, "IOPS")}[name]
        row = self.new_row(name, unit, "qemu-nbd")
        pick = 0 if unit == "MiB/s" else 1
        # Sequential writes fill the fresh image once (every write allocates);
        # random writes run for the usual time.
        runtime = None if rw == "write" else self.runtime
        check_failures: list[str] = []

        def measure(i: int, subject: bool) -> float:
            image = create_image(self.write_dir / f"w-{'s' if subject else 'q'}{i}.hds",
                                 WRITE_SIZE)
            server = self.start_subject(image, False) if subject else self.start_qemu(image, False)
            try:
                if subject and is_read_only(server):
                    raise SkipBench(f"{self.subject} exports the image read-only "
                                    "without --read-only (this version does not write yet)")
                return self.fio(server.uri(), rw, bs, qd, runtime=runtime, size=WRITE_SIZE)[pick]
            finally:
                self.stop(server)
                # Only prlnbd's images: this project promises qemu-img check stays clean.
                if subject:
                    res = subprocess.run(["qemu-img", "check", "-q", "-f", "parallels", image],
                                         capture_output=True, text=True)
                    if res.returncode != 0:
                        check_failures.append(f"{image.name}: {(res.stdout + res.stderr).strip()}")
                image.unlink(missing_ok=True)

        try:
            self.alternate(row, lambda i: measure(i, True), lambda i: measure(i, False))
        except SkipBench as exc:
            row.status = "SKIP"
            row.notes.append(f"{exc}")
            log(f"  {name}: SKIP: {exc}")
        except BenchError as exc:
            row.status = "ERROR"
            row.notes.append(str(exc))
            log(f"  {name}: ERROR: {exc}")
        if row.prlnbd and not row.status and not self.args.no_verify:
            self.verify_writes(row, rw, bs, qd)
        if check_failures:
            row.status = "WRONG"
            row.notes.append("qemu-img check failed: " + "; ".join(check_failures)[:500])
        elif row.prlnbd:
            row.notes.append("qemu-img check clean on every written image")

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
        if "bitmap-1t" in wanted:
            steps.append(("bitmap-1t", self.bench_bitmap))
        for name in ("write-seq", "write-rand"):
            if name in wanted:
                steps.append((name, lambda n=name: self.bench_write(n)))
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
                      r.reference, ratio, spread, f">= {r.target:.2f}", r.status))
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
    p.add_argument("--no-verify", action="store_true",
                   help="skip comparing the data and maps the two sides serve")
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
