"""Read path, snapshot chains from DiskDescriptor.xml: prlnbd against the Python merge and
against qemu-nbd reading the same chain through hand-spelled backing links."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import support
from tests.support import Chain, DescImage

pytestmark = pytest.mark.skipif(
    not all(support.have(t) for t in ("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")),
    reason="qemu-utils and libnbd-bin are needed",
)

SIZE = 12 * 16 * 63 * 512  # 6193152: 12 cylinders of 16 heads x 63 sectors
K64, M1, K252 = 64 << 10, 1 << 20, 258048
RAW = None

CHAINS = {
    "2-parallels": [M1, K64],
    "3-raw-root": [RAW, K252, K64],
    "4-mixed": [K64, M1, K252, K64],
    "5-raw-root": [RAW, K64, M1, K252, M1],
}


def build(directory: Path, clusters: list[int | None], seed: int = 1) -> Chain:
    """A chain with random unaligned writes per layer plus hand-picked ones on top.

    The top writes zeros over data the root holds, and one byte in the middle of
    what the root wrote: its whole cluster must hide the root's cluster.
    """
    layers = []
    for i, cluster in enumerate(clusters):
        step = cluster or M1
        count = 3 if step >= M1 else 6
        writes = support.random_writes(seed * 100 + i, SIZE, step, count, 0x10 * (i + 1))
        if i == 0:
            writes.append((0xEE, 100_000, 600_000))
        if i == len(clusters) - 1:
            writes += [(0x00, 300_000, 1000), (0x7F, 650_000, 1)]
        layers.append((cluster, writes))
    return support.build_chain(directory, SIZE, layers)


def reference(tmp: Path, chain: Chain) -> support.Server:
    """qemu-nbd on the chain as backing links, with qemu:allocation-depth."""
    return support.start_qemu_nbd(tmp / "q", chain.image_opts(), "-r", "-A", "--image-opts",
                                  fmt=None)


def assert_bytes(got: bytes, want: bytes, what: str) -> None:
    """Equal bytes, or the first differing offset."""
    assert len(got) == len(want), f"{what}: length {len(got)} != {len(want)}"
    if got != want:
        first = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
        raise AssertionError(f"{what}: first difference at {first}: "
                             f"{got[first:first + 8].hex()} != {want[first:first + 8].hex()}")


def assert_export(uri: str, chain: Chain) -> None:
    """URI gives the chain's merged bytes, base:allocation and allocation depth."""
    assert support.nbd_size(uri) == chain.size
    assert_bytes(support.nbd_pread(uri), chain.expected_bytes(), uri)
    assert support.nbdinfo_map(uri) == chain.expected_base()
    assert support.nbdinfo_map(uri, "qemu:allocation-depth") == chain.expected_depth()


@pytest.mark.parametrize("name", CHAINS)
@pytest.mark.parametrize("read_only", [False, True], ids=["rw", "ro"])
def test_chain_matches_merge_and_qemu(tmp_path: Path, name: str, read_only: bool) -> None:
    bundle = tmp_path / "vm.hdd"
    chain = build(bundle, CHAINS[name])
    support.write_descriptor(bundle, chain.paths, SIZE)
    digests = [support.file_digest(p) for p in chain.paths]
    extra = ("--read-only",) if read_only else ()
    with support.running(support.start_prlnbd(tmp_path, [str(bundle)], *extra)) as prl, \
            support.running(reference(tmp_path, chain)) as ref:
        # The harness first: qemu agrees with the merge computed here.
        assert_export(ref.uri(), chain)
        assert_export(prl.uri(), chain)
        assert_export(prl.uri("vm.hdd"), chain)
        assert support.qemu_img_map(prl.uri()) == support.qemu_img_map(ref.uri())
        res = support.run("qemu-img", "compare", "-f", "raw", "-F", "raw", prl.uri(), ref.uri(),
                          check=False)
        assert res.returncode == 0, res.stdout + res.stderr
        assert [support.file_digest(p) for p in chain.paths[:-1]] == digests[:-1]
    # Nothing was written: after a clean stop even a writable top is as it was (in_use clear).
    assert [support.file_digest(p) for p in chain.paths] == digests
    assert "Traceback" not in prl.log_text()


def test_chain_harness_detects_difference(tmp_path: Path) -> None:
    """The merge model fails on a chain that differs by one byte in the top layer."""
    chain = build(tmp_path / "a", CHAINS["3-raw-root"])
    other = build(tmp_path / "b", CHAINS["3-raw-root"])
    support.qemu_io_write(other.paths[-1], [(0x5A, 5 << 20, 1)])
    with support.running(reference(tmp_path / "b", other)) as ref:
        assert support.nbd_pread(ref.uri()) != chain.expected_bytes()
        with pytest.raises(AssertionError):
            assert_export(ref.uri(), chain)


def variant_layers(bundle: Path, chain: Chain, variant: str) -> tuple[list, dict]:
    """Descriptor layers and write_descriptor options for one spelling of the same chain."""
    layers: list = list(chain.paths)
    opts: dict = {}
    if variant == "absolute":
        opts["absolute"] = True
    elif variant == "mixed-paths":
        opts["absolute"] = [True, False, True]
    elif variant == "no-top-guid":
        opts["top_guid"] = False
    elif variant == "virtuozzo-root":
        opts["root_element"] = "Virtuozzo_disk_image"
    elif variant == "predefined-guid-not-top":
        # With TopGUID present the predefined GUID is an ordinary one (here: the root).
        layers[0] = DescImage(chain.paths[0], guid=support.PREDEFINED_TOP_GUID)
    elif variant == "files-outside-bundle":
        pass  # the images were built in a sibling directory: File is ../images/...
    elif variant == "dot-slash":
        layers = [DescImage("./" + p.name) for p in chain.paths]
    elif variant == "side-branch":
        # A sibling snapshot of the middle layer, listed before it: not part of the disk.
        root_guid = support.new_guid()
        side = support.make_parallels(bundle / "side.hds", SIZE, K64, [(0xCC, 0, SIZE)])
        layers = [DescImage(chain.paths[0], guid=root_guid),
                  DescImage(side, parent=root_guid),
                  DescImage(chain.paths[1], parent=root_guid), chain.paths[2]]
    elif variant == "backup-guid":
        layers[1] = DescImage(chain.paths[1], guid="{704718e1-2314-44c8-9087-d78ed36b0f4e}")
    return layers, opts


VARIANTS = ["relative", "absolute", "mixed-paths", "no-top-guid", "virtuozzo-root",
            "predefined-guid-not-top", "files-outside-bundle", "dot-slash", "side-branch",
            "backup-guid"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("target", ["dir", "xml"])
def test_descriptor_variants(tmp_path: Path, variant: str, target: str) -> None:
    bundle = tmp_path / "disk.hdd"
    images = tmp_path / "images" if variant == "files-outside-bundle" else bundle
    chain = build(images, CHAINS["3-raw-root"], seed=2)
    layers, opts = variant_layers(bundle, chain, variant)
    xml = support.write_descriptor(bundle, layers, SIZE, **opts)
    text = xml.read_text()
    if variant == "no-top-guid":
        assert "TopGUID" not in text and support.PREDEFINED_TOP_GUID in text
    if variant == "files-outside-bundle":
        assert "<File>../images/" in text
    disk = str(bundle) if target == "dir" else str(xml)
    extra = ["--allow-outside-bundle"] if variant == "files-outside-bundle" else []
    with support.running(support.start_prlnbd(tmp_path, [disk], "--read-only", *extra)) as prl:
        assert_export(prl.uri(), chain)


def test_top_only_chain_and_raw_only_disk(tmp_path: Path) -> None:
    """One-layer descriptors: an expandable root alone, and a Plain root alone."""
    one = build(tmp_path / "one.hdd", [K252])
    support.write_descriptor(tmp_path / "one.hdd", one.paths, SIZE)
    raw = build(tmp_path / "raw.hdd", [RAW])
    support.write_descriptor(tmp_path / "raw.hdd", raw.paths, SIZE)
    disks = [f"one={tmp_path / 'one.hdd'}", f"raw={tmp_path / 'raw.hdd'}"]
    with support.running(support.start_prlnbd(tmp_path, disks)) as prl:
        assert_export(prl.uri("one"), one)
        assert_export(prl.uri("raw"), raw)
        assert support.nbdinfo_map(prl.uri("raw"), "qemu:allocation-depth") == [(0, SIZE, 1)]


def check_block_status(uri: str, chain: Chain, starts: list[int], req_one: bool) -> None:
    """BLOCK_STATUS from arbitrary offsets: every extent starts there and holds one value."""
    import nbd

    want = {"base:allocation": chain.expected_base(),
            "qemu:allocation-depth": chain.expected_depth()}

    def value_at(ctx: str, off: int) -> int:
        return next(t for o, n, t in want[ctx] if o <= off < o + n)

    h = nbd.NBD()
    for ctx in want:
        h.add_meta_context(ctx)
    h.connect_uri(uri)
    flags = nbd.CMD_FLAG_REQ_ONE if req_one else 0
    for start in starts:
        count = min(3 << 20, chain.size - start)
        seen: dict[str, list[int]] = {}

        # libnbd only prints exceptions raised in a callback: collect, check afterwards.
        def collect(ctx: str, off: int, entries: list[int], err: object,
                    seen: dict[str, list[int]] = seen) -> int:
            seen[ctx] = [off, *entries]
            return 0

        h.block_status(count, start, collect, flags)
        assert {ctx: e[0] for ctx, e in seen.items()} == dict.fromkeys(seen, start)
        seen = {ctx: e[1:] for ctx, e in seen.items()}
        assert set(seen) == set(want), seen
        for ctx, entries in seen.items():
            pos = start
            pairs = list(zip(entries[::2], entries[1::2], strict=True))
            assert pairs, (ctx, start)
            if req_one:
                assert len(pairs) == 1 and pairs[0][0] <= count, (ctx, start, pairs)
            for length, value in pairs:
                assert length > 0, (ctx, start, pairs)
                assert pos + length <= chain.size
                # the extent must not claim more than the model's run from pos
                assert value == value_at(ctx, pos), (ctx, pos, value)
                assert value_at(ctx, pos + length - 1) == value, (ctx, pos, length, value)
                if not req_one:
                    assert all(value_at(ctx, x) == value for x, _, _ in
                               [(o, n, t) for o, n, t in want[ctx] if pos <= o < pos + length])
                pos += length
    h.shutdown()


@pytest.mark.parametrize("req_one", [False, True], ids=["all", "req-one"])
def test_block_status_anywhere(tmp_path: Path, req_one: bool) -> None:
    import random

    bundle = tmp_path / "vm.hdd"
    chain = build(bundle, [*CHAINS["5-raw-root"][1:], K64], seed=5)
    support.write_descriptor(bundle, chain.paths, SIZE)
    rng = random.Random(11)
    cuts = [o for o, _, _ in chain.expected_depth()]
    starts = [max(0, min(SIZE - 1, rng.choice(cuts) + rng.randint(-3000, 3000)))
              for _ in range(150)] + [0, SIZE - 1, SIZE - 512]
    with support.running(support.start_prlnbd(tmp_path, [str(bundle)])) as prl:
        check_block_status(prl.uri(), chain, starts, req_one)
        # one READ spanning every layer and hole
        assert support.nbd_pread(prl.uri(), 0, SIZE, chunk=SIZE) == chain.expected_bytes()


def test_v1_fixture_as_root(tmp_path: Path) -> None:
    """QEMU's v1 sample (sector-offset BAT) as the root under a new 64 KiB-cluster top."""
    bundle = tmp_path / "old.hdd"
    root = support.decompress_fixture("parallels-v1", bundle)
    size = 2 << 20
    writes = [(0x99, 60000, 10000), (0x00, 200000, 1), (0x77, size - 100, 100)]
    top = support.make_parallels(bundle / "top.hds", size, K64, writes)
    v1 = b"".join(bytes([p]) * 65536 for p in (0x11, 0x22, 0x33, 0x44)).ljust(size, b"\0")
    chain = Chain([root, top], size, [v1, bytes(support.apply_writes(bytearray(size), writes))],
                  [support.allocated_extents(root), support.allocated_extents(top)])
    support.write_descriptor(bundle, chain.paths, size, geometry=(4, 16, 64))
    digest = support.file_digest(root)
    with support.running(support.start_prlnbd(tmp_path, [str(bundle)])) as prl, \
            support.running(reference(tmp_path, chain)) as ref:
        assert_export(ref.uri(), chain)
        assert_export(prl.uri(), chain)
    assert support.file_digest(root) == digest
