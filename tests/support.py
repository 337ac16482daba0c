"""Shared helpers for tests: start prlnbd and qemu-nbd on Unix sockets, build images."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
FIXTURES = SHARED / "fixtures" / "qemu"
# The package's own interpreter: the venv python when the suite runs from tests/run.sh.
PYTHON = sys.executable


class Server:
    """A running NBD server process reachable on a Unix socket."""

    def __init__(self, proc: subprocess.Popen[bytes], sock: Path, log: Path) -> None:
        self.proc = proc
        self.sock = sock
        self.log = log

    def uri(self, export: str = "") -> str:
        """The nbd+unix URI of one export of this server."""
        return f"nbd+unix:///{export}?socket={self.sock}"

    def log_text(self) -> str:
        """Everything the server wrote to stderr so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 10.0) -> str:
        """The server's log once it holds TEXT (or once TIMEOUT seconds have passed)."""
        deadline = time.monotonic() + timeout
        while text not in (log := self.log_text()) and time.monotonic() < deadline:
            time.sleep(0.02)
        return log

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Stop the server with SIG and return its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def wait_for_socket(
    sock: Path, proc: subprocess.Popen[bytes], log: Path, timeout: float = 20.0
) -> None:
    """Wait until SOCK accepts connections, failing early if PROC died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = log.read_text(errors="replace")
            raise RuntimeError(f"server exited with {proc.returncode}: {text}")
        if sock.exists():
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
                s.connect(str(sock))
                return
        time.sleep(0.02)
    raise RuntimeError(f"server did not listen on {sock}: {log.read_text(errors='replace')}")


def start_prlnbd(
    tmp: Path, disks: Sequence[str], *extra: str, env: dict[str, str] | None = None
) -> Server:
    """Start `prlnbd serve --socket` on DISKS ([NAME=]PATH) with EXTRA options."""
    tmp.mkdir(parents=True, exist_ok=True)
    sock = tmp / f"prlnbd-{os.getpid()}-{time.monotonic_ns()}.sock"
    log = sock.with_suffix(".log")
    cmd = [PYTHON, "-m", "prlnbd", "serve", "--socket", str(sock), *extra, *disks]
    with log.open("wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    wait_for_socket(sock, proc, log)
    return Server(proc, sock, log)


def start_qemu_nbd(
    tmp: Path, image: Path | str, *extra: str, fmt: str | None = "parallels"
) -> Server:
    """Start the reference server `qemu-nbd` read-only on IMAGE (export name "")."""
    tmp.mkdir(parents=True, exist_ok=True)
    sock = tmp / f"qemu-nbd-{os.getpid()}-{time.monotonic_ns()}.sock"
    log = sock.with_suffix(".log")
    cmd = ["qemu-nbd", "--socket", str(sock), "--persistent", "--shared=16", *extra]
    image = str(image)
    if "-r" in extra:
        # A reference reader beside a prlnbd that writes the same files: QEMU readers of a format
        # image never share writing, so without force-share the image locks refuse them
        # (this qemu-nbd has no --force-share option; the block option does the same).
        if "--image-opts" in extra:
            image += ",force-share=on"
        elif fmt is not None:
            cmd.append("--image-opts")
            image = f"driver={fmt},file.filename={image},force-share=on"
            fmt = None
    if fmt is not None:
        cmd += ["-f", fmt]
    cmd.append(image)
    with log.open("wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)
    wait_for_socket(sock, proc, log)
    return Server(proc, sock, log)


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    """Stop SERVER when the block ends."""
    try:
        yield server
    finally:
        server.stop()


def run(
    *cmd: str | Path, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its text output, and fail with it on error."""
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def prlnbd_on_tty(*args: str | Path) -> tuple[subprocess.CompletedProcess[str], bytes]:
    """Run `prlnbd ARGS` with stderr on a pseudo-terminal, where progress bars are drawn: its result
    (stdout captured) and everything it wrote to the terminal."""
    import pty

    master, slave = pty.openpty()
    try:
        res = subprocess.run([PYTHON, "-m", "prlnbd", *map(str, args)], stdout=subprocess.PIPE, stderr=slave,
                             text=True, cwd=ROOT, timeout=120, check=False)
        os.close(slave)
        slave = -1
        out = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the writer side is closed
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    return res, out


def have(tool: str) -> bool:
    """Whether TOOL is on PATH."""
    return shutil.which(tool) is not None


# --- Images, descriptors and NBD reads (shared by the read-path and other tests) ---

SECTOR = 512
# The top snapshot's GUID when DiskDescriptor.xml has no TopGUID (prl-xml.txt).
PREDEFINED_TOP_GUID = "{5fbaabe3-6958-40ff-92a7-860e329aab41}"
ROOT_PARENT_GUID = "{00000000-0000-0000-0000-000000000000}"
PARALLELS_MAGICS = (b"WithoutFreeSpace", b"WithouFreSpacExt")
# (pattern byte, offset, length) as given to `qemu-io -c 'write -P pattern offset length'`.
Write = tuple[int, int, int]


def decompress_fixture(name: str, dest: Path) -> Path:
    """Decompress the QEMU sample FIXTURES/NAME.bz2 into DEST/NAME; the original stays as is."""
    import bz2

    dest.mkdir(parents=True, exist_ok=True)
    out = dest / name
    with bz2.open(FIXTURES / f"{name}.bz2") as src, out.open("wb") as dst:
        shutil.copyfileobj(src, dst)
    return out


def qemu_io_write(image: Path, writes: Sequence[Write], fmt: str = "parallels") -> None:
    """Apply WRITES to IMAGE with one qemu-io run."""
    if not writes:
        return
    cmds: list[str] = []
    for pattern, offset, length in writes:
        cmds += ["-c", f"write -P {pattern:#x} {offset} {length}"]
    run("qemu-io", "-f", fmt, *cmds, image)


def make_parallels(
    path: Path, size: int, cluster_size: int = 1 << 20, writes: Sequence[Write] = ()
) -> Path:
    """Create an expandable image with qemu-img and apply WRITES with qemu-io."""
    run("qemu-img", "create", "-q", "-f", "parallels", "-o", f"cluster_size={cluster_size}",
        path, str(size))
    qemu_io_write(path, writes)
    return path


def make_raw(path: Path, size: int, writes: Sequence[Write] = (), fill: int = 0) -> Path:
    """Write a fully allocated (non-sparse) raw image with WRITES applied over FILL."""
    buf = bytearray([fill]) * size
    apply_writes(buf, writes)
    path.write_bytes(buf)
    return path


def apply_writes(buf: bytearray, writes: Sequence[Write]) -> bytearray:
    """Apply WRITES to BUF in order, as qemu-io would, and return it."""
    for pattern, offset, length in writes:
        buf[offset:offset + length] = bytes([pattern]) * length
    return buf


def is_parallels(path: Path) -> bool:
    """Whether PATH starts with a Parallels expandable image magic."""
    with path.open("rb") as f:
        return f.read(16) in PARALLELS_MAGICS


def parallels_cluster_size(path: Path) -> int:
    """Cluster size in bytes from the image header (tracks * 512)."""
    with path.open("rb") as f:
        header = f.read(32)
    return int.from_bytes(header[28:32], "little") * SECTOR


def allocated_extents(image: Path, fmt: str = "parallels") -> list[tuple[int, int]]:
    """(offset, length) of the guest ranges IMAGE itself maps, from `qemu-img map`, merged."""
    import json

    out = run("qemu-img", "map", "-f", fmt, "--output=json", image).stdout
    data = [(e["start"], e["length"], 0) for e in json.loads(out) if e["data"]]
    return [(o, n) for o, n, _ in merge_extents(data)]


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class DescImage:
    """One Image + Shot of a DiskDescriptor.xml; PARENT overrides the chain order."""

    def __init__(
        self,
        file: Path | str,
        type: str | None = None,
        guid: str | None = None,
        parent: str | None = None,
    ) -> None:
        self.file = file
        self.type = type
        self.guid = guid
        self.parent = parent


def new_guid() -> str:
    """A fresh GUID in curly brackets, as DiskDescriptor.xml spells them."""
    import uuid

    return "{" + str(uuid.uuid4()) + "}"


def write_descriptor(
    bundle_dir: Path,
    layers: Sequence[Path | str | DescImage],
    size: int,
    *,
    top_guid: bool = True,
    absolute: bool | Sequence[bool] = False,
    root_element: str = "Parallels_disk_image",
    version: str = "1.0",
    blocksize: int | None = None,
    padding: int = 0,
    geometry: tuple[int, int, int] | None = None,
    name: str = "DiskDescriptor.xml",
) -> Path:
    """Write BUNDLE_DIR/DiskDescriptor.xml for LAYERS (root first, top last) of SIZE bytes.

    Each layer is an image path (type Compressed if it has a Parallels magic, else
    Plain) or a DescImage. Paths are written relative to BUNDLE_DIR unless ABSOLUTE
    (one flag, or one per layer); a str File is written verbatim. With TOP_GUID the
    Snapshots element names the top in TopGUID; without it the top gets the
    predefined GUID. BLOCKSIZE (sectors) defaults to the top expandable image's
    cluster size. GEOMETRY is (cylinders, heads, sectors).
    """
    from xml.sax.saxutils import escape

    bundle_dir.mkdir(parents=True, exist_ok=True)
    images = [x if isinstance(x, DescImage) else DescImage(x) for x in layers]
    flags = [absolute] * len(images) if isinstance(absolute, bool) else list(absolute)
    for i, img in enumerate(images):
        if img.guid is None:
            top = i == len(images) - 1
            img.guid = PREDEFINED_TOP_GUID if top and not top_guid else new_guid()
    entries = []
    for i, (img, absolute_path) in enumerate(zip(images, flags, strict=True)):
        path = img.file if isinstance(img.file, Path) else bundle_dir / img.file
        kind = img.type or ("Compressed" if path.exists() and is_parallels(path) else "Plain")
        if isinstance(img.file, str):
            text = img.file
        elif absolute_path:
            text = str(img.file.resolve())
        else:
            text = os.path.relpath(img.file.resolve(), bundle_dir.resolve())
        parent = img.parent or (images[i - 1].guid if i else ROOT_PARENT_GUID)
        entries.append((img.guid, kind, text, parent, path))
    if blocksize is None:
        compressed = [e[4] for e in entries if e[1] == "Compressed" and e[4].exists()]
        blocksize = parallels_cluster_size(compressed[-1]) // SECTOR if compressed else 2048
    sectors = size // SECTOR
    if geometry is None:
        geometry = (sectors // (16 * 63), 16, 63) if sectors % (16 * 63) == 0 else (sectors, 1, 1)
    cylinders, heads, track = geometry
    xml = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<{root_element} Version="{version}">',
        "  <Disk_Parameters>",
        f"    <Disk_size>{sectors}</Disk_size>",
        f"    <Cylinders>{cylinders}</Cylinders>",
        f"    <Heads>{heads}</Heads>",
        f"    <Sectors>{track}</Sectors>",
        f"    <Padding>{padding}</Padding>",
        "  </Disk_Parameters>",
        "  <StorageData>",
        "    <Storage>",
        "      <Start>0</Start>",
        f"      <End>{sectors}</End>",
        f"      <Blocksize>{blocksize}</Blocksize>",
    ]
    for guid, kind, text, _, _ in entries:
        xml += [
            "      <Image>",
            f"        <GUID>{guid}</GUID>",
            f"        <Type>{kind}</Type>",
            f"        <File>{escape(text)}</File>",
            "      </Image>",
        ]
    xml += ["    </Storage>", "  </StorageData>", "  <Snapshots>"]
    if top_guid:
        xml.append(f"    <TopGUID>{entries[-1][0]}</TopGUID>")
    for guid, _, _, parent, _ in entries:
        xml += ["    <Shot>", f"      <GUID>{guid}</GUID>",
                f"      <ParentGUID>{parent}</ParentGUID>", "    </Shot>"]
    xml += ["  </Snapshots>", f"</{root_element}>", ""]
    out = bundle_dir / name
    out.write_text("\n".join(xml))
    return out


def nbd_pread(uri: str, offset: int = 0, length: int | None = None, chunk: int = 4 << 20) -> bytes:
    """Read LENGTH bytes (default: to the end) at OFFSET from an NBD export with libnbd."""
    import nbd

    h = nbd.NBD()  # libnbd closes the handle when it is garbage-collected
    h.connect_uri(uri)
    if length is None:
        length = h.get_size() - offset
    parts = []
    pos = offset
    while pos < offset + length:
        n = min(chunk, offset + length - pos)
        parts.append(h.pread(n, pos))
        pos += n
    h.shutdown()
    return b"".join(parts)


def nbd_size(uri: str) -> int:
    """The export size an NBD server announces for URI."""
    import nbd

    h = nbd.NBD()
    h.connect_uri(uri)
    size: int = h.get_size()
    h.shutdown()
    return size


def merge_extents(extents: Sequence[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Join adjacent (offset, length, type) extents of the same type."""
    out: list[tuple[int, int, int]] = []
    for off, length, kind in extents:
        if length == 0:
            continue
        if out and out[-1][2] == kind and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + length, kind)
        else:
            out.append((off, length, kind))
    return out


def nbdinfo_map(uri: str, context: str = "base:allocation") -> list[tuple[int, int, int]]:
    """`nbdinfo --map=CONTEXT --json URI` as merged (offset, length, type) extents."""
    import json

    out = run("nbdinfo", f"--map={context}", "--json", uri, timeout=60).stdout
    return merge_extents([(e["offset"], e["length"], e["type"]) for e in json.loads(out)])


def qemu_img_map(uri: str) -> list[dict[str, object]]:
    """`qemu-img map --output=json` of an NBD export read as raw."""
    import json

    out = run("qemu-img", "map", "-f", "raw", "--output=json", uri, timeout=60).stdout
    return list(json.loads(out))


class Chain:
    """A snapshot chain built on disk (root first) with the guest view it must give."""

    def __init__(self, paths: list[Path], size: int, contents: list[bytes],
                 extents: list[list[tuple[int, int]]]) -> None:
        self.paths = paths
        self.size = size
        self.contents = contents
        self.extents = extents

    def expected_bytes(self) -> bytes:
        """The merged guest bytes: each layer's allocated ranges hide everything below."""
        out = bytearray(self.size)
        for content, extents in zip(self.contents, self.extents, strict=True):
            for off, length in extents:
                out[off:off + length] = content[off:off + length]
        return bytes(out)

    def expected_depth(self) -> list[tuple[int, int, int]]:
        """qemu:allocation-depth extents: 1 = top, len(paths) = root, 0 = nowhere."""
        cuts = {0, self.size}
        for extents in self.extents:
            for off, length in extents:
                cuts |= {off, off + length}
        points = sorted(c for c in cuts if 0 <= c <= self.size)
        n = len(self.paths)
        out = []
        for a, b in itertools.pairwise(points):
            depth = 0
            for i in range(n - 1, -1, -1):
                if any(off <= a < off + length for off, length in self.extents[i]):
                    depth = n - i
                    break
            out.append((a, b - a, depth))
        return merge_extents(out)

    def expected_base(self) -> list[tuple[int, int, int]]:
        """base:allocation extents: 0 = data in some layer, 3 = HOLE|ZERO."""
        return merge_extents([(o, n, 0 if d else 3) for o, n, d in self.expected_depth()])

    def image_opts(self) -> str:
        """qemu `--image-opts` spelling the chain top first as backing links."""
        opts = []
        prefix = ""
        for path in reversed(self.paths):
            driver = "parallels" if is_parallels(path) else "raw"
            opts += [f"{prefix}driver={driver}", f"{prefix}file.filename={path.resolve()}"]
            prefix += "backing."
        return ",".join(opts)


def build_chain(
    directory: Path,
    size: int,
    layers: Sequence[tuple[int | None, Sequence[Write]]],
    names: Sequence[str] | None = None,
) -> Chain:
    """Create one image per (cluster_size, writes) in LAYERS, root first; None = raw root.

    Files are DIRECTORY/NAMES[i] (default `disk.hdd.<i>.hds`, `.raw` for a raw root).
    A raw root is fully allocated; an expandable layer maps what `qemu-img map` says,
    which must be exactly the clusters its writes touched.
    """
    directory.mkdir(parents=True, exist_ok=True)
    paths, contents, extents = [], [], []
    for i, (cluster, writes) in enumerate(layers):
        suffix = ".raw" if cluster is None else ".hds"
        path = directory / (names[i] if names else f"disk.hdd.{i}{suffix}")
        content = bytes(apply_writes(bytearray(size), writes))
        if cluster is None:
            make_raw(path, size, writes)
            mapped = [(0, size)]
        else:
            make_parallels(path, size, cluster, writes)
            mapped = allocated_extents(path)
            touched = sorted({c for _, off, n in writes
                              for c in range(off // cluster, (off + n - 1) // cluster + 1)})
            want = merge_extents([(c * cluster, min(cluster, size - c * cluster), 0)
                                  for c in touched])
            if [(o, n) for o, n, _ in want] != mapped:
                raise AssertionError(f"{path}: qemu-img map {mapped} != written clusters {want}")
        paths.append(path)
        contents.append(content)
        extents.append(mapped)
    return Chain(paths, size, contents, extents)


def random_writes(seed: int, size: int, cluster: int, count: int, base: int) -> list[Write]:
    """COUNT reproducible unaligned writes with patterns BASE, BASE+1, ... and one of zeros."""
    import random

    rng = random.Random(seed)
    out: list[Write] = []
    for j in range(count):
        length = rng.randint(1, cluster // 2 + 1000)
        offset = rng.randrange(0, size - length)
        out.append(((base + j) & 0xFF if j != count // 2 else 0, offset, length))
    return out


def write_split_descriptor(
    bundle_dir: Path,
    pieces: Sequence[Sequence[Path]],
    sizes: Sequence[int],
    guids: Sequence[str],
    *,
    order: Sequence[int] | None = None,
    blocksize: int = 2048,
) -> Path:
    """Write BUNDLE_DIR/DiskDescriptor.xml for a split disk, as Parallels Desktop lays one out.

    PIECES[k] is piece k's chain of images, root first, SIZES[k] its size in
    bytes; GUIDS are the snapshots, root first, the same for every piece (image
    i of each piece is snapshot GUIDS[i]). ORDER is the order the Storage
    elements are written in (default: disk order). Files are relative.
    """
    from xml.sax.saxutils import escape

    sectors = sum(sizes) // SECTOR
    starts = list(itertools.accumulate((s // SECTOR for s in sizes), initial=0))
    xml = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<Parallels_disk_image Version="1.0">',
        "  <Disk_Parameters>",
        f"    <Disk_size>{sectors}</Disk_size>",
        f"    <Cylinders>{sectors}</Cylinders>",
        "    <Heads>1</Heads>",
        "    <Sectors>1</Sectors>",
        "    <Padding>0</Padding>",
        "  </Disk_Parameters>",
        "  <StorageData>",
    ]
    for k in order if order is not None else range(len(pieces)):
        xml += [
            "    <Storage>",
            f"      <Start>{starts[k]}</Start>",
            f"      <End>{starts[k + 1]}</End>",
            f"      <Blocksize>{blocksize}</Blocksize>",
        ]
        for guid, path in zip(guids, pieces[k], strict=True):
            kind = "Compressed" if is_parallels(path) else "Plain"
            text = os.path.relpath(path.resolve(), bundle_dir.resolve())
            xml += ["      <Image>", f"        <GUID>{guid}</GUID>", f"        <Type>{kind}</Type>",
                    f"        <File>{escape(text)}</File>", "      </Image>"]
        xml.append("    </Storage>")
    xml += ["  </StorageData>", "  <Snapshots>", f"    <TopGUID>{guids[-1]}</TopGUID>"]
    for i, guid in enumerate(guids):
        parent = guids[i - 1] if i else ROOT_PARENT_GUID
        xml += ["    <Shot>", f"      <GUID>{guid}</GUID>", f"      <ParentGUID>{parent}</ParentGUID>", "    </Shot>"]
    xml += ["  </Snapshots>", "</Parallels_disk_image>", ""]
    out = bundle_dir / "DiskDescriptor.xml"
    out.write_text("\n".join(xml))
    return out
