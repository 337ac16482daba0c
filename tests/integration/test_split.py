"""Split disks (several Storage pieces, each its own chain of images) served as one disk.

Each piece is built and read on its own by qemu (qemu-io writes, qemu-nbd reads the
piece's chain through backing links); prlnbd must serve their concatenation, and
requests crossing a piece boundary must land in both pieces.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests import support
from tests.support import Chain
from tests.unit.test_uring import UNAVAILABLE as URING_UNAVAILABLE

pytestmark = pytest.mark.skipif(
    not all(support.have(t) for t in ("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")),
    reason="qemu-utils and libnbd-bin are needed",
)

M1 = 1 << 20
SIZES = [8 * M1, 8 * M1, 8 * M1, 4 * M1]  # Parallels Desktop: pieces of 3989504 sectors, the last shorter
STARTS = [sum(SIZES[:k]) for k in range(len(SIZES))]
TOTAL = sum(SIZES)


def build(bundle: Path, layers: int, seed: int = 1) -> tuple[list[Chain], list[str]]:
    """One chain of LAYERS images per piece (1 MiB clusters), with writes at both edges of every piece."""
    guids = [support.new_guid() for _ in range(layers)]
    chains = []
    for k, size in enumerate(SIZES):
        spec = []
        for i in range(layers):
            writes = support.random_writes(seed * 1000 + k * 10 + i, size, M1, 3, 0x10 * (i + 1) + k)
            if i == 0:
                writes += [(0xA0 + k, 0, 5000), (0xB0 + k, size - 7000, 7000)]
            if i == layers - 1 and layers > 1:
                writes += [(0xC0 + k, size - M1 + 100, 300)]  # the top hides the root's last cluster
            spec.append((M1, writes))
        names = [f"vm.hdd.{k}.{guid}.hds" if i else f"vm.hdd.{k}.hds" for i, guid in enumerate(guids)]
        chains.append(support.build_chain(bundle, size, spec, names))
    # Storage elements out of disk order: they are sorted by Start.
    support.write_split_descriptor(bundle, [c.paths for c in chains], SIZES, guids, order=[2, 0, 3, 1])
    return chains, guids


def shifted(extents: list[tuple[int, int, int]], base: int) -> list[tuple[int, int, int]]:
    return [(o + base, n, t) for o, n, t in extents]


def reference(tmp: Path, chains: list[Chain]) -> tuple[bytes, list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """Each piece's chain read by qemu-nbd on its own, concatenated: (bytes, base:allocation, allocation depth)."""
    data = b""
    base: list[tuple[int, int, int]] = []
    depth: list[tuple[int, int, int]] = []
    for k, chain in enumerate(chains):
        srv = support.start_qemu_nbd(tmp / f"q{k}", chain.image_opts(), "-r", "-A", "--image-opts", fmt=None)
        with support.running(srv) as ref:
            piece = support.nbd_pread(ref.uri())
            assert len(piece) == SIZES[k]
            data += piece
            base += shifted(support.nbdinfo_map(ref.uri()), STARTS[k])
            depth += shifted(support.nbdinfo_map(ref.uri(), "qemu:allocation-depth"), STARTS[k])
    return data, support.merge_extents(base), support.merge_extents(depth)


def assert_serves(uri: str, want: tuple[bytes, list[tuple[int, int, int]], list[tuple[int, int, int]]]) -> None:
    data, base, depth = want
    assert support.nbd_size(uri) == TOTAL
    got = support.nbd_pread(uri, chunk=3 * M1)  # 3 MiB reads: several cross a piece boundary
    if got != data:
        first = next(i for i in range(TOTAL) if got[i] != data[i])
        raise AssertionError(f"first difference at {first} (piece boundaries {STARTS})")
    assert support.nbdinfo_map(uri) == base
    assert support.nbdinfo_map(uri, "qemu:allocation-depth") == depth


@pytest.mark.parametrize("layers", [1, 2], ids=["no-snapshot", "one-snapshot"])
def test_split_reads_are_the_pieces_concatenated(tmp_path: Path, layers: int) -> None:
    bundle = tmp_path / "vm.hdd"
    chains, guids = build(bundle, layers)
    want = reference(tmp_path, chains)
    # The harness: the pieces' own reads agree with the merge model.
    assert want[0] == b"".join(c.expected_bytes() for c in chains)
    digests = [support.file_digest(p) for c in chains for p in c.paths]
    with support.running(support.start_prlnbd(tmp_path, [str(bundle)], "--read-only")) as prl:
        assert_serves(prl.uri(), want)
        info = support.run("nbdinfo", prl.uri()).stdout
        assert f"{layers} layer" in info
        if layers == 2:
            # What changed since the root snapshot: every cluster a top image holds, in each piece.
            since = "qemu:dirty-bitmap:since-" + guids[0].strip("{}")
            assert since in info
            dirty = [(o, n) for o, n, t in support.nbdinfo_map(prl.uri(), since) if t & 1]
            assert dirty == [(o, n) for o, n, d in want[2] if d == 1]
    assert [support.file_digest(p) for c in chains for p in c.paths] == digests
    assert "Traceback" not in prl.log_text()


def test_split_snapshot_option_reads_the_roots(tmp_path: Path) -> None:
    """--snapshot ROOT serves every piece's root image: the pieces' roots concatenated."""
    bundle = tmp_path / "vm.hdd"
    chains, guids = build(bundle, 2)
    want = b"".join(c.contents[0] for c in chains)
    with support.running(support.start_prlnbd(tmp_path, [str(bundle)], "--snapshot", guids[0])) as prl:
        assert support.nbd_pread(prl.uri()) == want


def ring_writes(log: str) -> int:
    """How many WRITEs a stopped server with --aio=io_uring ran through its ring (its closing line)."""
    found = re.search(r"(\d+) writes for (\d+) WRITEs", log)
    assert found, log[-2000:]
    return int(found.group(2))


@pytest.mark.parametrize(
    ("layers", "cache", "aio"),
    [(1, "writeback", "threads"), (2, "writeback", "threads"), (2, "none", "threads"), (2, "writeback", "io_uring")],
    ids=["no-snapshot", "one-snapshot", "one-snapshot-cache-none", "one-snapshot-io_uring"],
)
def test_split_writes_cross_piece_boundaries(tmp_path: Path, layers: int, cache: str, aio: str) -> None:
    import nbd

    if aio == "io_uring" and URING_UNAVAILABLE is not None:
        pytest.skip(f"io_uring: {URING_UNAVAILABLE}")
    bundle = tmp_path / "vm.hdd"
    chains, _ = build(bundle, layers, seed=2)
    model = bytearray(b"".join(c.expected_bytes() for c in chains))
    roots = [support.file_digest(p) for c in chains for p in c.paths[:-1]]
    with support.running(support.start_prlnbd(tmp_path, [str(bundle)], f"--cache={cache}", f"--aio={aio}")) as prl:
        h = nbd.NBD()
        h.connect_uri(prl.uri())
        # One WRITE across the boundary of pieces 0 and 1, unaligned on both sides; then again,
        # into the clusters the first one gave the tops (with io_uring: through the ring).
        at, data = STARTS[1] - 3000, bytes(range(256)) * 40
        h.pwrite(data, at)
        model[at : at + len(data)] = data
        assert h.pread(len(data), at) == data
        data = bytes(reversed(data))
        h.pwrite(data, at)
        model[at : at + len(data)] = data
        assert h.pread(len(data), at) == data
        # One WRITE of 3 pieces at once (piece 1 whole).
        at, data = STARTS[1] - 100, b"\x5a" * (SIZES[1] + 200)
        h.pwrite(data, at)
        model[at : at + len(data)] = data
        # WRITE_ZEROES across pieces 1 and 2: whole clusters on both sides and partial ones.
        at, n = STARTS[2] - 2 * M1 - 1000, 4 * M1 + 3000
        h.zero(n, at)
        model[at : at + n] = bytes(n)
        # TRIM across pieces 2 and 3: a hint, whole clusters only, whose bytes become unspecified.
        at, n = STARTS[3] - M1, 2 * M1
        h.trim(n, at)
        h.flush()
        got = h.pread(n, at)
        model[at : at + n] = got  # what a TRIM leaves is the server's choice: checked against qemu below
        got_all = b"".join(h.pread(M1, o) for o in range(0, TOTAL, M1))
        assert got_all == bytes(model)
        h.shutdown()
    assert "Traceback" not in prl.log_text()
    if aio == "io_uring":
        assert ring_writes(prl.log_text()) >= 1
    # The pieces' files, read by qemu on their own, hold exactly what was written.
    want = reference(tmp_path / "after", chains)
    assert want[0] == bytes(model)
    for c in chains:
        support.run("qemu-img", "check", "-f", "parallels", c.paths[-1])
    if layers == 2:
        assert [support.file_digest(p) for c in chains for p in c.paths[:-1]] == roots
    # Served again, the disk gives the same bytes and maps as the pieces read on their own.
    with support.running(support.start_prlnbd(tmp_path / "again", [str(bundle)], "--read-only")) as prl:
        assert_serves(prl.uri(), want)
        if layers == 1:
            # Zeroing whole clusters with nothing below released them: holes in base:allocation.
            base = want[1]
            hole = [(o, n) for o, n, t in base if t == 3 and o <= STARTS[2] - M1 < o + n]
            assert hole and hole[0][0] + hole[0][1] >= STARTS[2] + M1, base


def prl(*args: str | Path) -> str:
    return support.run(support.PYTHON, "-m", "prlnbd", *args).stdout


def test_create_split_info_snapshot_and_serve(tmp_path: Path) -> None:
    """`create --split` lays a disk out as Parallels Desktop does; `snapshot` adds one image per piece."""
    import json

    import nbd

    bundle = tmp_path / "big.hdd"
    size = 4000 * M1  # two pieces of 3989504 sectors (1948 MiB) and one of 104 MiB
    prl("create", bundle, "--size", f"{size}", "--split")
    piece = 3989504 * 512
    info = json.loads(prl("info", "--json", bundle))
    pieces = info["pieces"]
    assert [(p["start-sector"], p["end-sector"]) for p in pieces] == [
        (0, 3989504),
        (3989504, 2 * 3989504),
        (2 * 3989504, size // 512),
    ]
    root = info["top-guid"]
    for k, p in enumerate(pieces):
        assert p["layers"][0]["file"] == str(bundle / f"big.hdd.{k}.{root}.hds")
        assert p["layers"][0]["size"] == p["size"] and p["layers"][0]["cluster-size"] == M1
        support.run("qemu-img", "check", "-f", "parallels", p["layers"][0]["file"])
    assert "No errors were found" in prl("check", bundle)
    assert support.run("qemu-img", "info", "-f", "parallels", pieces[2]["layers"][0]["file"]).stdout.count("104 MiB")
    text = prl("info", bundle)
    assert "split into 3 pieces" in text and "piece 2: sectors 7979008..8192000 (104 MiB" in text
    at = piece - 1000
    with support.running(support.start_prlnbd(tmp_path, [str(bundle)])) as prl_srv:
        h = nbd.NBD()
        h.connect_uri(prl_srv.uri())
        assert h.get_size() == size
        h.pwrite(b"\x11" * 3000, at)
        h.flush()
        h.shutdown()
    out = prl("snapshot", bundle)
    assert f"snapshot {root}" in out
    top = out.split("new top ", 1)[1].strip()
    assert all((bundle / f"big.hdd.{k}.{top}.hds").exists() for k in range(3))
    info = json.loads(prl("info", "--json", bundle))
    assert [[x["guid"] for x in p["layers"]] for p in info["pieces"]] == [[top, root]] * 3
    with support.running(support.start_prlnbd(tmp_path / "again", [str(bundle)])) as prl_srv:
        h = nbd.NBD()
        h.connect_uri(prl_srv.uri())
        assert h.pread(3000, at) == b"\x11" * 3000
        h.pwrite(b"\x22" * 10, piece * 2 - 5)
        h.flush()
        assert h.pread(12, piece * 2 - 6) == b"\x00" + b"\x22" * 10 + b"\x00"
        h.shutdown()
    # Each piece's chain, read by qemu through backing links: the write landed in both tops.
    for k, (offset, want) in enumerate([(piece - 1024, bytes(24) + b"\x11" * 1000), (0, b"\x11" * 2000 + bytes(48))]):
        chain = Chain([bundle / f"big.hdd.{k}.{g}.hds" for g in (root, top)], piece, [], [])
        srv = support.start_qemu_nbd(tmp_path / f"q{k}", chain.image_opts(), "-r", "--image-opts", fmt=None)
        with support.running(srv) as ref:
            assert support.nbd_pread(ref.uri(), offset, len(want)) == want
    assert "Traceback" not in prl_srv.log_text()


# ---- dirty bitmaps of split disks: one bitmap, a part in every piece's top image

PREFIX = "qemu:dirty-bitmap:"
BM = "5b3c8d2e-1f0a-4c6b-9e7d-2a1b3c4d5e6f"
G = 64 * 1024


def block_status(h: object, ctx: str, offset: int, length: int) -> list[tuple[int, int, int]]:
    """Every extent of CTX over [offset, offset+length), asking again as a client must, merged."""
    import nbd

    assert isinstance(h, nbd.NBD)
    out: list[tuple[int, int, int]] = []
    pos, end = offset, offset + length
    while pos < end:
        got: list[int] = []

        def cb(meta: str, off: int, entries: list[int], err: int, got: list[int] = got) -> int:
            if meta == ctx:
                got.extend(entries)
            return 0

        h.block_status(end - pos, pos, cb)
        assert got, f"no extents for {ctx} at {pos}"
        for i in range(0, len(got), 2):
            n = min(got[i], end - pos)
            out.append((pos, n, got[i + 1]))
            pos += n
            if pos >= end:
                break
    return support.merge_extents(out)


def granule_runs(granules: set[int], size: int, base: int = 0) -> list[tuple[int, int, int]]:
    """Merged (offset, length, dirty) extents over [base, base+size) for a set of dirty disk granules."""
    ext = []
    for i in range(base // G, -(-(base + size) // G)):
        lo = max(i * G, base)
        ext.append((lo, min((i + 1) * G, base + size) - lo, 1 if i in granules else 0))
    return support.merge_extents(ext)


def touched(offset: int, length: int) -> set[int]:
    return set(range(offset // G, (offset + length - 1) // G + 1))


def listed(path: Path) -> list[dict[str, object]]:
    import json

    out = json.loads(prl("bitmap", path, "list", "--json"))
    assert isinstance(out, list)
    return out


def stored_piece_runs(tmp: Path, image: Path, base: int) -> list[tuple[int, int, int]]:
    """The bitmap BM one piece's image stores, as QEMU reads it (qemu-nbd --bitmap), shifted to disk offsets."""
    with support.running(support.start_qemu_nbd(tmp, image, "-r", f"--bitmap={BM}")) as ref:
        return shifted(support.nbdinfo_map(ref.uri(), PREFIX + BM), base)


def test_split_bitmap_contexts_cross_piece_boundaries_and_persist_per_piece(tmp_path: Path) -> None:
    import json

    import nbd

    bundle = tmp_path / "vm.hdd"
    chains, _ = build(bundle, 1, seed=4)
    assert BM in prl("bitmap", bundle, "add", BM, "--granularity", str(G))
    assert listed(bundle) == [{"name": BM, "granularity": G, "dirty-bytes": 0}]
    model = bytearray(b"".join(c.expected_bytes() for c in chains))
    dirty: set[int] = set()
    ctx = PREFIX + BM
    with support.running(support.start_prlnbd(tmp_path, [str(bundle)])) as srv:
        h = nbd.NBD()
        h.add_meta_context(ctx)
        h.connect_uri(srv.uri())
        assert ctx in support.run("nbdinfo", "--list", srv.uri()).stdout
        assert block_status(h, ctx, 0, TOTAL) == [(0, TOTAL, 0)]
        # A write over the boundary of pieces 0 and 1: the last granule of 0 and the first of 1.
        for at, data in [
            (STARTS[1] - 3000, b"\x77" * 6000),
            (STARTS[2] - 5 * G - 10, b"\x78" * (6 * G)),  # 5 granules + 10 bytes before piece 2, 1 after
            (STARTS[3] - 1, b"\x79\x7a"),
            (TOTAL - 100, b"\x7b" * 100),
        ]:
            h.pwrite(data, at)
            model[at : at + len(data)] = data
            dirty |= touched(at, len(data))
        h.zero(2 * G, STARTS[3] - G)  # WRITE_ZEROES across pieces 2 and 3
        model[STARTS[3] - G : STARTS[3] + G] = bytes(2 * G)
        dirty |= touched(STARTS[3] - G, 2 * G)
        want = granule_runs(dirty, TOTAL)
        assert block_status(h, ctx, 0, TOTAL) == want
        # Asked piece by piece and from inside a granule, the answer is the same.
        for k in range(len(SIZES)):
            assert block_status(h, ctx, STARTS[k], SIZES[k]) == granule_runs(dirty, SIZES[k], STARTS[k])
        assert block_status(h, ctx, STARTS[1] - 10, 20) == [(STARTS[1] - 10, 20, 1)]
        h.flush()
        h.shutdown()
        assert support.nbdinfo_map(srv.uri(), ctx) == want
    assert srv.proc.returncode == 0 and "Traceback" not in srv.log_text()
    # Stored at the clean stop, each piece's part in its own image: QEMU reads each, on its own.
    stored: list[tuple[int, int, int]] = []
    for k, chain in enumerate(chains):
        stored += stored_piece_runs(tmp_path / f"q{k}", chain.paths[-1], STARTS[k])
    assert support.merge_extents(stored) == want
    assert listed(bundle) == [{"name": BM, "granularity": G, "dirty-bytes": len(dirty) * G - (-TOTAL % G)}]
    for k, chain in enumerate(chains):
        piece = [g for g in dirty if STARTS[k] <= g * G < STARTS[k] + SIZES[k]]
        assert listed(chain.paths[-1])[0]["dirty-bytes"] == len(piece) * G
    assert reference(tmp_path / "data", chains)[0] == bytes(model)
    info = json.loads(prl("info", "--json", bundle))
    assert info["bitmaps"] == [{"name": BM, "granularity": G, "dirty-bytes": len(dirty) * G}]

    # An offline snapshot copies every piece's part to its new top: the bitmap goes on as it was.
    top = prl("snapshot", bundle).split("new top ", 1)[1].strip()
    for k in range(len(SIZES)):
        new = bundle / f"vm.hdd.{k}.{top}.hds"
        assert listed(new) == listed(chains[k].paths[-1])
        assert stored_piece_runs(tmp_path / f"s{k}", new, STARTS[k]) == stored_piece_runs(
            tmp_path / f"o{k}", chains[k].paths[-1], STARTS[k]
        )
    with support.running(support.start_prlnbd(tmp_path / "again", [str(bundle)])) as srv:
        h = nbd.NBD()
        h.add_meta_context(ctx)
        h.connect_uri(srv.uri())
        assert block_status(h, ctx, 0, TOTAL) == want
        h.pwrite(b"\x01" * 3, STARTS[2] - 1)
        dirty |= touched(STARTS[2] - 1, 3)
        assert block_status(h, ctx, 0, TOTAL) == granule_runs(dirty, TOTAL)
        assert h.pread(TOTAL - STARTS[2] + 1, STARTS[2] - 1)[3:] == bytes(model[STARTS[2] + 2 :])
        h.shutdown()


def test_split_bitmap_in_one_piece_only_is_refused_naming_the_file(tmp_path: Path) -> None:
    bundle = tmp_path / "vm.hdd"
    chains, _ = build(bundle, 1, seed=5)
    one = chains[2].paths[-1]
    prl("bitmap", one, "add", BM)
    res = support.run(support.PYTHON, "-m", "prlnbd", "bitmap", bundle, "list", check=False)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert f"top image {chains[0].paths[-1]}: has no dirty bitmap {BM}" in res.stderr, res.stderr
    res = support.run(support.PYTHON, "-m", "prlnbd", "serve", "--socket", tmp_path / "s.sock", bundle, check=False)
    assert res.returncode != 0 and f"{chains[0].paths[-1]}: has no dirty bitmap {BM}" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert "remove" in prl("bitmap", bundle, "remove", BM)
    assert listed(bundle) == [] and listed(one) == []


def test_split_bitmap_online_through_the_control_socket(tmp_path: Path) -> None:
    import json

    import nbd

    bundle = tmp_path / "vm.hdd"
    chains, _ = build(bundle, 1, seed=6)
    control = tmp_path / "control.sock"
    ctx = PREFIX + BM
    with support.running(support.start_prlnbd(tmp_path, [f"d={bundle}"], "--control", str(control))) as srv:
        reply = json.loads(prl("ctl", control, "bitmap", "d", "add", BM, "--granularity", "64K", "--json"))
        assert reply["return"]["name"] == BM, reply
        h = nbd.NBD()
        h.add_meta_context(ctx)
        h.set_export_name("d")
        h.connect_uri(srv.uri("d"))
        h.pwrite(b"\x55" * 100, STARTS[3] - 50)
        assert block_status(h, ctx, 0, TOTAL) == granule_runs(touched(STARTS[3] - 50, 100), TOTAL)
        h.shutdown()
        other = "0b3c8d2e-1f0a-4c6b-9e7d-2a1b3c4d5e6f"
        prl("ctl", control, "bitmap", "d", "add", other)
        prl("ctl", control, "bitmap", "d", "remove", other)
    assert srv.proc.returncode == 0 and "Traceback" not in srv.log_text()
    assert listed(bundle) == [{"name": BM, "granularity": G, "dirty-bytes": 2 * G}]
    for k, chain in enumerate(chains):
        assert [b["dirty-bytes"] for b in listed(chain.paths[-1])] == [G if k in (2, 3) else 0]


def test_split_compact_compacts_every_piece(tmp_path: Path) -> None:
    import json
    import os

    import nbd

    bundle = tmp_path / "vm.hdd"
    chains, _ = build(bundle, 1, seed=8)
    prl("bitmap", bundle, "add", BM)
    with support.running(support.start_prlnbd(tmp_path, [str(bundle)])) as srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri())
        # Every cluster but the first and the last of each piece zeroed: holes below the last one's slot.
        for k, size in enumerate(SIZES):
            h.zero(size - 2 * M1, STARTS[k] + M1)
        h.flush()
        h.shutdown()
    assert srv.proc.returncode == 0
    tops = [c.paths[-1] for c in chains]
    want = reference(tmp_path / "before", chains)
    marks = listed(bundle)
    sizes0 = [os.stat(p).st_size for p in tops]
    blocks0 = [os.stat(p).st_blocks * 512 for p in tops]
    out = json.loads(prl("compact", bundle, "--json"))
    sizes1 = [os.stat(p).st_size for p in tops]
    blocks1 = [os.stat(p).st_blocks * 512 for p in tops]
    assert [p["path"] for p in out["pieces"]] == [str(p) for p in tops]
    assert [p["size-before"] for p in out["pieces"]] == sizes0 and [p["size-after"] for p in out["pieces"]] == sizes1
    assert out["moved-clusters"] == sum(p["moved-clusters"] for p in out["pieces"]) > 0
    assert out["size-before"] == sum(sizes0) and out["size-after"] == sum(sizes1) < sum(sizes0) - 2 * M1, out
    assert out["given-back"] == max(0, sum(blocks0) - sum(blocks1)), out
    assert sum(blocks1) <= sum(blocks0)
    # The same bytes and maps, each piece read by qemu on its own; the bitmaps kept; qemu-img check clean.
    assert reference(tmp_path / "after", chains) == want
    assert listed(bundle) == marks
    for p in tops:
        # QEMU 7.2 counts the bitmap's extension cluster as leaked when no data cluster lies above it.
        res = support.run("qemu-img", "check", "-f", "parallels", p, check=False)
        assert res.returncode in (0, 3) and "corrupt" not in res.stdout.lower(), res.stdout
    text = prl("compact", bundle)
    assert text.count("moved 0 clusters") == len(SIZES) + 1 and text.splitlines()[-1].startswith(f"{bundle}:"), text


# ---- Plain (raw) pieces


def build_plain(bundle: Path, variant: str) -> list[Chain]:
    """A split bundle with raw pieces: "all-raw", one raw image per piece; "raw-root", two layers per piece
    with piece 1's root raw (the others expandable) and expandable tops everywhere."""
    layers = 1 if variant == "all-raw" else 2
    guids = [support.new_guid() for _ in range(layers)]
    chains = []
    for k, size in enumerate(SIZES):
        spec: list[tuple[int | None, list[tuple[int, int, int]]]] = []
        for i in range(layers):
            writes = support.random_writes(900 + k * 10 + i, size, M1, 3, 0x30 * (i + 1) + k)
            if i == 0:
                writes += [(0xA0 + k, 0, 5000), (0xB0 + k, size - 7000, 7000)]
            raw = variant == "all-raw" or (i == 0 and k == 1)
            spec.append((None if raw else M1, writes))
        names = [f"vm.hdd.{k}.{guid}.hds" if i else f"vm.hdd.{k}.hds" for i, guid in enumerate(guids)]
        chains.append(support.build_chain(bundle, size, spec, names))
    support.write_split_descriptor(bundle, [c.paths for c in chains], SIZES, guids)
    descriptor = (bundle / "DiskDescriptor.xml").read_text()
    assert descriptor.count("<Type>Plain</Type>") == (len(SIZES) if variant == "all-raw" else 1)
    return chains


@pytest.mark.parametrize(("variant", "aio"), [("all-raw", "threads"), ("raw-root", "threads"), ("all-raw", "io_uring")])
def test_split_plain_pieces_read_and_write_across_boundaries(tmp_path: Path, variant: str, aio: str) -> None:
    import nbd

    if aio == "io_uring" and URING_UNAVAILABLE is not None:
        pytest.skip(f"io_uring: {URING_UNAVAILABLE}")
    bundle = tmp_path / "vm.hdd"
    chains = build_plain(bundle, variant)
    want = reference(tmp_path / "ref", chains)
    assert want[0] == b"".join(c.expected_bytes() for c in chains)
    with support.running(support.start_prlnbd(tmp_path / "ro", [str(bundle)], "--read-only")) as srv:
        assert_serves(srv.uri(), want)
    model = bytearray(want[0])
    roots = [support.file_digest(c.paths[0]) for c in chains]
    with support.running(support.start_prlnbd(tmp_path, [str(bundle)], f"--aio={aio}")) as srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri())
        # Unaligned writes over the boundaries of pieces 0|1 and 1|2 (into piece 1's raw root, or its top).
        for at, data in [(STARTS[1] - 3000, bytes(range(256)) * 40), (STARTS[2] - 777, b"\xe1" * 5000)]:
            h.pwrite(data, at)
            model[at : at + len(data)] = data
        at, n = STARTS[1] - M1 - 100, 2 * M1 + 300  # WRITE_ZEROES over 0|1
        h.zero(n, at)
        model[at : at + n] = bytes(n)
        h.flush()
        assert h.pread(TOTAL, 0) == bytes(model)
        h.shutdown()
    assert srv.proc.returncode == 0 and "Traceback" not in srv.log_text()
    if aio == "io_uring":
        assert ring_writes(srv.log_text()) == 2  # raw pieces hold every byte: both WRITEs took the ring
    # Read independently: each piece's chain by qemu; a raw piece's file byte for byte.
    after = reference(tmp_path / "after", chains)
    assert after[0] == bytes(model)
    if variant == "all-raw":
        assert b"".join(c.paths[0].read_bytes() for c in chains) == bytes(model)
    else:
        # Writes go to the tops: the roots (piece 1's raw one too) are as they were.
        assert [support.file_digest(c.paths[0]) for c in chains] == roots
    with support.running(support.start_prlnbd(tmp_path / "again", [str(bundle)], "--read-only")) as srv:
        assert_serves(srv.uri(), after)
