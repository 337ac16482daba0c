"""DiskDescriptor.xml parsing (hardened lxml) and opening snapshot chains with open_disk."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from lxml import etree

from prlnbd.disk.chain import open_disk
from prlnbd.disk.descriptor import (
    DEFAULT_TOP_GUID,
    ZERO_GUID,
    build_descriptor,
    parse_descriptor,
    save_descriptor,
)
from prlnbd.errors import DescriptorError, ImageError, SnapshotChainError
from prlnbd.image.create import write_image

KIB = 1024
MIB = 1024 * KIB

ROOT = "{11111111-1111-1111-1111-111111111111}"
MID = "{22222222-2222-2222-2222-222222222222}"
TOP = "{33333333-3333-3333-3333-333333333333}"
SIDE = "{44444444-4444-4444-4444-444444444444}"
OTHER = "{55555555-5555-5555-5555-555555555555}"

Image = tuple[str, str, str]  # guid, type, file


def xml(
    *,
    root: str = "Parallels_disk_image",
    disk_size: str | None = "2048",
    params: str | None = None,
    padding: str | None = "0",
    storage: str | None = None,
    start: str | None = "0",
    end: str | None = None,
    blocksize: str | None = "2048",
    images: list[Image] | None = None,
    shots: list[tuple[str, str]] | None = None,
    top: str | None = None,
    snapshots: str | None = None,
    extra: str = "",
    prolog: str = '<?xml version="1.0" encoding="UTF-8"?>\n',
) -> str:
    """A descriptor; any part can be replaced or left out (None)."""
    if images is None:
        images = [(ROOT, "Compressed", "root.hds")]
    if shots is None:
        shots = [(ROOT, ZERO_GUID)]
    if params is None:
        params = "".join(
            f"<{tag}>{value}</{tag}>"
            for tag, value in (
                ("Disk_size", disk_size),
                ("Cylinders", "4"),
                ("Heads", "16"),
                ("Sectors", "32"),
                ("Padding", padding),
            )
            if value is not None
        )
        params = f"<Disk_Parameters>{params}</Disk_Parameters>"
    if storage is None:
        parts = []
        for tag, value in (("Start", start), ("End", end if end is not None else disk_size), ("Blocksize", blocksize)):
            if value is not None:
                parts.append(f"<{tag}>{value}</{tag}>")
        for guid, itype, file in images:
            parts.append(f"<Image><GUID>{guid}</GUID><Type>{itype}</Type><File>{file}</File></Image>")
        storage = f"<StorageData><Storage>{''.join(parts)}</Storage></StorageData>"
    if snapshots is None:
        body = f"<TopGUID>{top}</TopGUID>" if top is not None else ""
        body += "".join(f"<Shot><GUID>{g}</GUID><ParentGUID>{p}</ParentGUID></Shot>" for g, p in shots)
        snapshots = f"<Snapshots>{body}</Snapshots>"
    return f'{prolog}<{root} Version="1.0">{params}{storage}{snapshots}{extra}</{root}>\n'


def write(tmp_path: Path, text: str | bytes, name: str = "DiskDescriptor.xml") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


# ---- good descriptors


def chain_guids(desc, top: str | None = None) -> list[str]:
    return [e.guid for e in desc.chain(top)]


@pytest.mark.parametrize("root", ["Parallels_disk_image", "Virtuozzo_disk_image"])
def test_both_root_elements(tmp_path: Path, root: str) -> None:
    desc = parse_descriptor(write(tmp_path, xml(root=root, top=ROOT)))
    assert desc.disk_size == 2048
    assert desc.size == MIB
    assert desc.blocksize == 2048
    assert (desc.cylinders, desc.heads, desc.sectors) == (4, 16, 32)
    assert desc.top_guid == ROOT
    assert chain_guids(desc) == [ROOT]
    assert desc.path == tmp_path / "DiskDescriptor.xml"


def test_bundle_directory_is_accepted(tmp_path: Path) -> None:
    write(tmp_path, xml(top=ROOT))
    desc = parse_descriptor(tmp_path)
    assert desc.path == tmp_path / "DiskDescriptor.xml"


def test_three_layer_chain_with_top_guid(tmp_path: Path) -> None:
    images = [(ROOT, "Plain", "root.raw"), (MID, "Compressed", "mid.hds"), (TOP, "Compressed", "top.hds")]
    shots = [(ROOT, ZERO_GUID), (MID, ROOT), (TOP, MID)]
    desc = parse_descriptor(write(tmp_path, xml(images=images, shots=shots, top=TOP)))
    chain = desc.chain()
    assert [e.guid for e in chain] == [TOP, MID, ROOT]
    assert [e.type for e in chain] == ["Compressed", "Compressed", "Plain"]
    assert [e.file for e in chain] == [tmp_path / "top.hds", tmp_path / "mid.hds", tmp_path / "root.raw"]
    assert desc.parents == {ROOT: ZERO_GUID, MID: ROOT, TOP: MID}


def test_default_top_guid_without_top_guid_element(tmp_path: Path) -> None:
    images = [(ROOT, "Compressed", "root.hds"), (DEFAULT_TOP_GUID, "Compressed", "top.hds")]
    shots = [(ROOT, ZERO_GUID), (DEFAULT_TOP_GUID, ROOT)]
    desc = parse_descriptor(write(tmp_path, xml(images=images, shots=shots)))
    assert DEFAULT_TOP_GUID == "{5fbaabe3-6958-40ff-92a7-860e329aab41}"
    assert desc.top_guid == DEFAULT_TOP_GUID
    assert chain_guids(desc) == [DEFAULT_TOP_GUID, ROOT]


def test_top_guid_overrides_the_predefined_guid(tmp_path: Path) -> None:
    # With TopGUID, {5fbaabe3-...} is an ordinary snapshot, here the middle one.
    images = [(ROOT, "Compressed", "r.hds"), (DEFAULT_TOP_GUID, "Compressed", "d.hds"), (TOP, "Compressed", "t.hds")]
    shots = [(ROOT, ZERO_GUID), (DEFAULT_TOP_GUID, ROOT), (TOP, DEFAULT_TOP_GUID)]
    desc = parse_descriptor(write(tmp_path, xml(images=images, shots=shots, top=TOP)))
    assert chain_guids(desc) == [TOP, DEFAULT_TOP_GUID, ROOT]


def test_relative_and_absolute_files(tmp_path: Path) -> None:
    absolute = tmp_path / "elsewhere" / "root.hds"
    images = [(ROOT, "Compressed", str(absolute)), (TOP, "Compressed", "sub/top.hds")]
    shots = [(ROOT, ZERO_GUID), (TOP, ROOT)]
    desc = parse_descriptor(write(tmp_path, xml(images=images, shots=shots, top=TOP)))
    assert [e.file for e in desc.chain()] == [tmp_path / "sub" / "top.hds", absolute]


def test_branching_tree_only_the_top_chain_matters(tmp_path: Path) -> None:
    #        ROOT
    #       /    \
    #     MID    OTHER
    #    /   \
    #  TOP   SIDE
    images = [
        (ROOT, "Compressed", "root.hds"),
        (MID, "Compressed", "mid.hds"),
        (TOP, "Compressed", "top.hds"),
        (SIDE, "Compressed", "side.hds"),
        (OTHER, "Compressed", "other.hds"),
    ]
    shots = [(ROOT, ZERO_GUID), (MID, ROOT), (TOP, MID), (SIDE, MID), (OTHER, ROOT)]
    desc = parse_descriptor(write(tmp_path, xml(images=images, shots=shots, top=TOP)))
    assert chain_guids(desc) == [TOP, MID, ROOT]
    # An older snapshot's own chain.
    assert chain_guids(desc, SIDE) == [SIDE, MID, ROOT]
    assert chain_guids(desc, OTHER) == [OTHER, ROOT]
    assert chain_guids(desc, MID) == [MID, ROOT]
    assert chain_guids(desc, ROOT.upper().strip("{}")) == [ROOT]  # normalised
    with pytest.raises(SnapshotChainError, match="not in Snapshots"):
        desc.chain("{99999999-9999-9999-9999-999999999999}")


def test_a_broken_side_branch_does_not_matter(tmp_path: Path) -> None:
    # SIDE's image is missing from StorageData, but SIDE is not on the top chain.
    images = [(ROOT, "Compressed", "root.hds"), (TOP, "Compressed", "top.hds")]
    shots = [(ROOT, ZERO_GUID), (TOP, ROOT), (SIDE, ROOT)]
    desc = parse_descriptor(write(tmp_path, xml(images=images, shots=shots, top=TOP)))
    assert chain_guids(desc) == [TOP, ROOT]
    with pytest.raises(SnapshotChainError, match="no Image"):
        desc.chain(SIDE)


def test_guids_are_normalised(tmp_path: Path) -> None:
    up = TOP.upper()
    images = [(ROOT.strip("{}"), "Compressed", "root.hds"), (up, "Compressed", "top.hds")]
    shots = [(ROOT, ZERO_GUID.strip("{}")), (f"  {TOP}\n", ROOT.upper())]
    desc = parse_descriptor(write(tmp_path, xml(images=images, shots=shots, top=up)))
    assert chain_guids(desc) == [TOP, ROOT]


def test_no_snapshots_with_one_image(tmp_path: Path) -> None:
    desc = parse_descriptor(write(tmp_path, xml(snapshots="")))
    assert chain_guids(desc) == [ROOT]


def test_optional_elements_and_unknown_ones(tmp_path: Path) -> None:
    text = xml(
        params="<Disk_Parameters><Disk_size>4096</Disk_size><Miscellaneous>x</Miscellaneous></Disk_Parameters>",
        start=None,
        end=None,
        blocksize=None,
        disk_size="4096",
        top=ROOT,
        extra="<Unknown><Thing a='1'/></Unknown>",
    )
    desc = parse_descriptor(write(tmp_path, text))
    assert desc.disk_size == 4096
    assert desc.blocksize == 2048
    assert desc.warnings  # Cylinders*Heads*Sectors differs from Disk_size


def test_geometry_matching_disk_size_has_no_warning(tmp_path: Path) -> None:
    desc = parse_descriptor(write(tmp_path, xml(disk_size="2048", top=ROOT)))
    assert desc.warnings == []


# ---- errors: DescriptorError / SnapshotChainError naming the file and the problem


ERRORS: dict[str, tuple[str | bytes, type[DescriptorError], list[str]]] = {
    "malformed": ('<Parallels_disk_image Version="1.0"><Disk_Parameters>', DescriptorError, ["malformed XML"]),
    "not-xml": (b"\x00\x01\x02WithoutFreeSpace", DescriptorError, ["malformed XML"]),
    "empty": (b"", DescriptorError, ["malformed XML"]),
    "undefined-entity": (xml(extra="&nope;"), DescriptorError, ["nope"]),
    "doctype": (xml(prolog="<!DOCTYPE Parallels_disk_image>\n"), DescriptorError, ["DOCTYPE"]),
    "internal-dtd": (
        xml(prolog="<!DOCTYPE Parallels_disk_image [<!ELEMENT Parallels_disk_image ANY>]>\n"),
        DescriptorError,
        ["DOCTYPE"],
    ),
    "entity": (
        xml(
            prolog='<!DOCTYPE Parallels_disk_image [<!ENTITY g "{11111111-1111-1111-1111-111111111111}">]>\n', top="&g;"
        ),
        DescriptorError,
        [],
    ),
    "wrong-root": (xml(root="Foo"), DescriptorError, ["root element", "<Foo>"]),
    "namespaced-root": (
        xml(root='p:Parallels_disk_image xmlns:p="urn:x"').replace(
            '</p:Parallels_disk_image xmlns:p="urn:x">', "</p:Parallels_disk_image>"
        ),
        DescriptorError,
        ["root element"],
    ),
    "no-disk-parameters": (xml(params=""), DescriptorError, ["Disk_Parameters is missing"]),
    "no-disk-size": (xml(disk_size=None, end="2048"), DescriptorError, ["Disk_Parameters/Disk_size", "missing"]),
    "empty-disk-size": (
        xml(disk_size=" ", end="2048"),
        DescriptorError,
        ["Disk_Parameters/Disk_size", "missing or empty"],
    ),
    "text-disk-size": (xml(disk_size="big", end="2048"), DescriptorError, ["Disk_size", "'big'"]),
    "float-disk-size": (xml(disk_size="1.5", end="2048"), DescriptorError, ["Disk_size", "'1.5'"]),
    "hex-disk-size": (xml(disk_size="0x800", end="2048"), DescriptorError, ["Disk_size", "'0x800'"]),
    "negative-disk-size": (xml(disk_size="-2048", end="2048"), DescriptorError, ["Disk_size", "-2048"]),
    "zero-disk-size": (xml(disk_size="0"), DescriptorError, ["Disk_size is 0"]),
    "text-heads": (
        xml(params="<Disk_Parameters><Disk_size>2048</Disk_size><Heads>many</Heads></Disk_Parameters>"),
        DescriptorError,
        ["Disk_Parameters/Heads", "'many'"],
    ),
    "padding-1": (xml(padding="1"), DescriptorError, ["Padding is 1"]),
    "no-storage-data": (xml(storage=""), DescriptorError, ["StorageData is missing"]),
    "no-storage": (xml(storage="<StorageData/>"), DescriptorError, ["has no Storage"]),
    "two-storages": (
        xml(
            storage="<StorageData>" + "<Storage><Start>0</Start><End>2048</End>"
            f"<Image><GUID>{ROOT}</GUID><Type>Compressed</Type><File>a.hds</File></Image></Storage>"
            * 2
            + "</StorageData>"
        ),
        DescriptorError,
        ["Storage 1 (sectors 0..2048) overlaps Storage 0 (sectors 0..2048)"],
    ),
    "start-not-0": (xml(start="8"), DescriptorError, ["8..2048", "0..2048"]),
    "end-short": (xml(end="1024"), DescriptorError, ["0..1024", "0..2048"]),
    "end-long": (xml(end="4096"), DescriptorError, ["0..4096"]),
    "text-end": (xml(end="all"), DescriptorError, ["Storage/End", "'all'"]),
    "blocksize-0": (xml(blocksize="0"), DescriptorError, ["Blocksize is 0"]),
    "unknown-type": (xml(images=[(ROOT, "Ploop", "root.hds")]), DescriptorError, [ROOT, "'Ploop'"]),
    "lowercase-type": (xml(images=[(ROOT, "compressed", "root.hds")]), DescriptorError, ["'compressed'"]),
    "image-without-file": (
        xml(
            storage=f"<StorageData><Storage><Image><GUID>{ROOT}</GUID><Type>Plain</Type></Image></Storage></StorageData>"
        ),
        DescriptorError,
        ["Image/File", "missing"],
    ),
    "image-without-guid": (
        xml(storage="<StorageData><Storage><Image><Type>Plain</Type><File>x</File></Image></Storage></StorageData>"),
        DescriptorError,
        ["Image/GUID"],
    ),
    "empty-storage": (xml(images=[]), DescriptorError, ["no Image"]),
    "duplicate-image-guid": (
        xml(images=[(ROOT, "Compressed", "a.hds"), (ROOT.upper(), "Compressed", "b.hds")]),
        DescriptorError,
        [ROOT, "twice"],
    ),
    "duplicate-shot-guid": (
        xml(
            images=[(ROOT, "Compressed", "a.hds"), (TOP, "Compressed", "b.hds")],
            shots=[(ROOT, ZERO_GUID), (TOP, ROOT), (TOP, ROOT)],
            top=TOP,
        ),
        SnapshotChainError,
        [TOP, "twice"],
    ),
    "shot-without-parent": (
        xml(snapshots=f"<Snapshots><Shot><GUID>{ROOT}</GUID></Shot></Snapshots>"),
        DescriptorError,
        ["Snapshots/Shot/ParentGUID", "missing"],
    ),
    "cycle": (
        xml(
            images=[(ROOT, "Compressed", "r.hds"), (MID, "Compressed", "m.hds"), (TOP, "Compressed", "t.hds")],
            shots=[(ROOT, ZERO_GUID), (MID, TOP), (TOP, MID)],
            top=TOP,
        ),
        SnapshotChainError,
        ["cycle", f"{TOP} -> {MID} -> {TOP}"],
    ),
    "self-parent": (
        xml(
            images=[(ROOT, "Compressed", "r.hds"), (TOP, "Compressed", "t.hds")],
            shots=[(ROOT, ZERO_GUID), (TOP, TOP)],
            top=TOP,
        ),
        SnapshotChainError,
        ["cycle"],
    ),
    "missing-parent": (
        xml(
            images=[(ROOT, "Compressed", "r.hds"), (TOP, "Compressed", "t.hds")],
            shots=[(ROOT, ZERO_GUID), (TOP, MID)],
            top=TOP,
        ),
        SnapshotChainError,
        [TOP, f"ParentGUID {MID}", "not a Shot"],
    ),
    "two-roots": (
        xml(
            images=[(ROOT, "Compressed", "r.hds"), (TOP, "Compressed", "t.hds")],
            shots=[(ROOT, ZERO_GUID), (TOP, ZERO_GUID)],
            top=TOP,
        ),
        SnapshotChainError,
        ["2 roots", ROOT, TOP],
    ),
    "no-root": (
        xml(
            images=[(ROOT, "Compressed", "r.hds"), (TOP, "Compressed", "t.hds")],
            shots=[(ROOT, TOP), (TOP, ROOT)],
            top=TOP,
        ),
        SnapshotChainError,
        ["0 roots"],
    ),
    "top-guid-not-a-shot": (
        xml(images=[(ROOT, "Compressed", "r.hds"), (TOP, "Compressed", "t.hds")], shots=[(ROOT, ZERO_GUID)], top=TOP),
        SnapshotChainError,
        [f"top snapshot {TOP}", "not a Shot"],
    ),
    "default-top-missing": (
        xml(images=[(ROOT, "Compressed", "r.hds")], shots=[(ROOT, ZERO_GUID)]),
        SnapshotChainError,
        [DEFAULT_TOP_GUID],
    ),
    "plain-overlay": (
        xml(
            images=[(ROOT, "Compressed", "r.hds"), (TOP, "Plain", "t.raw")],
            shots=[(ROOT, ZERO_GUID), (TOP, ROOT)],
            top=TOP,
        ),
        DescriptorError,
        [TOP, "Plain", "overlays must be Compressed"],
    ),
    "shot-without-image": (
        xml(images=[(ROOT, "Compressed", "r.hds")], shots=[(ROOT, ZERO_GUID), (TOP, ROOT)], top=TOP),
        SnapshotChainError,
        [TOP, "no Image"],
    ),
    "two-images-no-snapshots": (
        xml(images=[(ROOT, "Compressed", "r.hds"), (TOP, "Compressed", "t.hds")], snapshots=""),
        SnapshotChainError,
        ["2 images"],
    ),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_descriptor_errors(tmp_path: Path, case: str) -> None:
    text, exc, words = ERRORS[case]
    path = write(tmp_path, text)
    with pytest.raises(DescriptorError) as info:
        parse_descriptor(path)
    assert isinstance(info.value, exc), info.value
    msg = str(info.value)
    assert str(path) in msg, msg
    for w in words:
        assert w in msg, (w, msg)


@pytest.mark.parametrize("value", ["2_048", "\u0662\u0660\u0664\u0668"])
def test_lax_integer_spellings_are_rejected(tmp_path: Path, value: str) -> None:
    with pytest.raises(DescriptorError):
        parse_descriptor(write(tmp_path, xml(disk_size=value, end="2048", top=ROOT)))


def test_missing_descriptor(tmp_path: Path) -> None:
    path = tmp_path / "DiskDescriptor.xml"
    with pytest.raises(DescriptorError) as info:
        parse_descriptor(path)
    assert str(path) in str(info.value) and "cannot read" in str(info.value)


def test_bundle_directory_without_descriptor(tmp_path: Path) -> None:
    with pytest.raises(DescriptorError, match="cannot read"):
        parse_descriptor(tmp_path)


def test_oversized_descriptor(tmp_path: Path) -> None:
    path = write(tmp_path, xml(extra="<!--" + "x" * (16 * MIB) + "-->"))
    with pytest.raises(DescriptorError, match="larger than"):
        parse_descriptor(path)


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE Parallels_disk_image [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<Parallels_disk_image Version="1.0"><Disk_Parameters><Disk_size>&lol9;</Disk_size></Disk_Parameters>
</Parallels_disk_image>
"""


def test_billion_laughs_is_refused_fast(tmp_path: Path) -> None:
    path = write(tmp_path, BILLION_LAUGHS)
    t0 = time.monotonic()
    with pytest.raises(DescriptorError) as info:
        parse_descriptor(path)
    assert time.monotonic() - t0 < 2
    msg = str(info.value)
    assert str(path) in msg
    assert "lollol" not in msg
    assert len(msg) < 2000


def _parse_in_thread(path: Path, fifo: Path) -> BaseException | None:
    """Parse PATH in a thread; fail if the parser opens FIFO (it would block there)."""
    result: list[BaseException | None] = []

    def run() -> None:
        try:
            parse_descriptor(path)
            result.append(None)
        except BaseException as e:
            result.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(5)
    if t.is_alive():
        # Unblock the parser: it opened the FIFO, so the external resource was fetched.
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.write(fd, b"LEAKED")
        os.close(fd)
        t.join(5)
        pytest.fail(f"the parser opened {fifo}")
    return result[0]


@pytest.mark.parametrize(
    "doctype",
    [
        '<!DOCTYPE Parallels_disk_image [<!ENTITY e SYSTEM "file://{fifo}">]>',
        '<!DOCTYPE Parallels_disk_image SYSTEM "file://{fifo}">',
        '<!DOCTYPE Parallels_disk_image [<!ENTITY % p SYSTEM "file://{fifo}"> %p;]>',
    ],
    ids=["external-entity", "external-dtd", "parameter-entity"],
)
def test_external_resources_are_never_read(tmp_path: Path, doctype: str) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    text = xml(
        prolog='<?xml version="1.0"?>\n' + doctype.format(fifo=fifo) + "\n",
        top="&e;" if "ENTITY e" in doctype else ROOT,
    )
    path = write(tmp_path, text)
    err = _parse_in_thread(path, fifo)
    assert isinstance(err, DescriptorError), err
    assert str(path) in str(err)


def test_external_entity_file_contents_do_not_leak(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("{11111111-1111-1111-1111-111111111111}\nTOPSECRET\n")
    for target in (secret, Path("/etc/passwd")):
        text = xml(
            prolog=f'<?xml version="1.0"?>\n<!DOCTYPE Parallels_disk_image [<!ENTITY e SYSTEM "file://{target}">]>\n',
            top="&e;",
        )
        path = write(tmp_path, text)
        with pytest.raises(DescriptorError) as info:
            parse_descriptor(path)
        assert "TOPSECRET" not in str(info.value) and "root:" not in str(info.value)


# ---- build_descriptor + save_descriptor


def test_build_save_parse_round_trip(tmp_path: Path) -> None:
    chain = [(TOP, "Compressed", "d.hdd.1.hds"), (MID, "Compressed", "d.hdd.0.hds"), (ROOT, "Plain", "root.raw")]
    tree = build_descriptor(3 * MIB, 64 * KIB, chain)
    path = tmp_path / "DiskDescriptor.xml"
    save_descriptor(tree, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["DiskDescriptor.xml"]  # no temporary left behind
    desc = parse_descriptor(path)
    assert desc.disk_size == 3 * 2048
    assert desc.blocksize == 128
    assert desc.top_guid == TOP
    assert [(e.guid, e.type, e.file) for e in desc.chain()] == [(g, t, tmp_path / f) for g, t, f in chain]
    text = path.read_text()
    assert text.startswith("<?xml")
    assert "<Padding>0</Padding>" in text
    # Saving again over an existing file replaces it.
    save_descriptor(build_descriptor(MIB, 64 * KIB, [(ROOT, "Compressed", "x.hds")]), path)
    assert parse_descriptor(path).disk_size == 2048


def test_save_keeps_unknown_elements(tmp_path: Path) -> None:
    path = write(tmp_path, xml(top=ROOT, extra='<Vendor a="b"><Keep>me</Keep></Vendor><!-- note -->'))
    desc = parse_descriptor(path)
    save_descriptor(desc.tree, path)
    again = parse_descriptor(path)
    root = again.tree.getroot()
    assert root.find("Vendor/Keep").text == "me"
    assert root.find("Vendor").get("a") == "b"
    assert any(isinstance(el, etree._Comment) and "note" in el.text for el in root)
    assert root.get("Version") == "1.0"


# ---- open_disk: images behind the descriptor


def bundle(tmp_path: Path, size: int, layers: list[tuple[str, str, str]], *, disk_size: int | None = None) -> Path:
    """Write a descriptor for LAYERS (guid, type, file) top first; return its path."""
    tree = build_descriptor(size if disk_size is None else disk_size, 64 * KIB, layers)
    path = tmp_path / "DiskDescriptor.xml"
    save_descriptor(tree, path)
    return path


def test_open_disk_size_mismatch(tmp_path: Path) -> None:
    write_image(tmp_path / "root.hds", MIB, cluster_size=64 * KIB)
    path = bundle(tmp_path, MIB, [(ROOT, "Compressed", "root.hds")], disk_size=2 * MIB)
    with pytest.raises(DescriptorError) as info:
        open_disk(path)
    msg = str(info.value)
    assert str(path) in msg and "root.hds" in msg and str(MIB) in msg and str(2 * MIB) in msg


def test_open_disk_raw_root_size_mismatch(tmp_path: Path) -> None:
    (tmp_path / "root.raw").write_bytes(bytes(1000))
    path = bundle(tmp_path, MIB, [(ROOT, "Plain", "root.raw")])
    with pytest.raises(DescriptorError, match=r"root\.raw"):
        open_disk(tmp_path)
    assert path.exists()


def test_open_disk_missing_image_file(tmp_path: Path) -> None:
    write_image(tmp_path / "root.hds", MIB, cluster_size=64 * KIB)
    bundle(tmp_path, MIB, [(TOP, "Compressed", "gone.hds"), (ROOT, "Compressed", "root.hds")])
    with pytest.raises(ImageError) as info:
        open_disk(tmp_path)
    assert str(tmp_path / "gone.hds") in str(info.value)


def test_open_disk_closes_layers_on_error(tmp_path: Path) -> None:
    write_image(tmp_path / "root.hds", MIB, cluster_size=64 * KIB)
    write_image(tmp_path / "top.hds", 2 * MIB, cluster_size=64 * KIB)
    bundle(tmp_path, MIB, [(TOP, "Compressed", "top.hds"), (ROOT, "Compressed", "root.hds")])
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(10):
        with pytest.raises(DescriptorError):
            open_disk(tmp_path)
    assert len(os.listdir("/proc/self/fd")) == before


def test_open_disk_missing_path_and_directory_without_descriptor(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such file"):
        open_disk(tmp_path / "nothing")
    with pytest.raises(DescriptorError, match=r"DiskDescriptor\.xml"):
        open_disk(tmp_path)


CS = 64 * KIB


def fill(byte: int, n: int = CS) -> bytes:
    return bytes([byte]) * n


@pytest.fixture
def three_layers(tmp_path: Path) -> Path:
    """ROOT <- MID <- TOP, 16 clusters of 64 KiB; see the expected map in the test below."""
    write_image(
        tmp_path / "root.hds",
        16 * CS,
        cluster_size=CS,
        clusters={0: fill(0xA0), 1: fill(0xA1), 2: fill(0xA2), 5: fill(0xA5)},
    )
    write_image(tmp_path / "mid.hds", 16 * CS, cluster_size=CS, clusters={1: fill(0xB1), 3: fill(0xB3)})
    # The top's cluster 2 holds only 1000 bytes of data: the rest reads as zeros, hiding ROOT's 0xA2.
    write_image(tmp_path / "top.hds", 16 * CS, cluster_size=CS, clusters={2: fill(0xC2, 1000), 3: fill(0xC3)})
    return bundle(
        tmp_path,
        16 * CS,
        [(TOP, "Compressed", "top.hds"), (MID, "Compressed", "mid.hds"), (ROOT, "Compressed", "root.hds")],
    )


def test_chain_read_and_map(three_layers: Path) -> None:
    disk = open_disk(three_layers)
    try:
        assert disk.size == 16 * CS
        assert disk.guids == [TOP, MID, ROOT]
        assert not disk.writable
        expected = (
            fill(0xA0)
            + fill(0xB1)
            + fill(0xC2, 1000)
            + bytes(CS - 1000)
            + fill(0xC3)
            + bytes(CS)
            + fill(0xA5)
            + bytes(10 * CS)
        )
        data, runs = disk.read(0, disk.size)
        assert bytes(data) == expected
        got = [(r.offset // CS, r.length // CS, r.depth, r.zero) for r in disk.map(0, disk.size)]
        assert got == [
            (0, 1, 3, False),
            (1, 1, 2, False),
            (2, 2, 1, False),  # clusters 2 and 3 of the top are host-contiguous: one run
            (4, 1, 0, True),
            (5, 1, 3, False),
            (6, 10, 0, True),
        ]
        assert [(r.offset, r.length) for r in runs] == [(r.offset, r.length) for r in disk.map(0, disk.size)]
        # Unaligned ranges across layers.
        for off, n in [(CS - 10, 20), (2 * CS + 999, 2), (3 * CS - 5, 3 * CS), (5, 16 * CS - 10)]:
            data, _ = disk.read(off, n)
            assert bytes(data) == expected[off : off + n], (off, n)
        assert [(r.depth, r.length) for r in disk.map(CS - 10, 20)] == [(3, 10), (2, 10)]
    finally:
        disk.close()


def test_open_disk_older_snapshot(three_layers: Path) -> None:
    disk = open_disk(three_layers, snapshot=MID)
    try:
        assert disk.guids == [MID, ROOT]
        data, _ = disk.read(2 * CS, 2 * CS)
        assert bytes(data) == fill(0xA2) + fill(0xB3)
    finally:
        disk.close()


def test_open_disk_single_image_and_snapshot_refused(tmp_path: Path) -> None:
    write_image(tmp_path / "one.hds", MIB, cluster_size=CS, clusters={1: fill(0x11)})
    disk = open_disk(tmp_path / "one.hds")
    try:
        assert disk.size == MIB and disk.descriptor is None
        assert bytes(disk.read(CS, CS)[0]) == fill(0x11)
    finally:
        disk.close()
    with pytest.raises(DescriptorError, match="no snapshots"):
        open_disk(tmp_path / "one.hds", snapshot=ROOT)


def test_blocksize_mismatch_is_a_warning(tmp_path: Path) -> None:
    write_image(tmp_path / "root.hds", MIB, cluster_size=32 * KIB)
    bundle(tmp_path, MIB, [(ROOT, "Compressed", "root.hds")])  # Blocksize 128 = 64 KiB
    disk = open_disk(tmp_path)
    try:
        assert any("32768" in w and "65536" in w for w in disk.warnings)
    finally:
        disk.close()


def test_raw_plain_root_holes_read_as_zero(tmp_path: Path) -> None:
    raw = tmp_path / "root.raw"
    with raw.open("wb") as f:
        f.truncate(16 * CS)
        f.seek(CS)
        f.write(fill(0x5A))
        f.seek(8 * CS)
        f.write(fill(0x5B, 2 * CS))
    write_image(tmp_path / "top.hds", 16 * CS, cluster_size=CS, clusters={0: fill(0x70), 8: fill(0x78)})
    bundle(tmp_path, 16 * CS, [(TOP, "Compressed", "top.hds"), (ROOT, "Plain", "root.raw")])
    disk = open_disk(tmp_path)
    try:
        fd = os.open(raw, os.O_RDONLY)
        try:
            if os.lseek(fd, 0, os.SEEK_DATA) != CS:
                pytest.skip("this file system does not report holes")
        finally:
            os.close(fd)
        got = [(r.offset // CS, r.length // CS, r.depth, r.zero) for r in disk.map(0, disk.size)]
        assert got == [
            (0, 1, 1, False),
            (1, 1, 2, False),
            (2, 6, 2, True),
            (8, 1, 1, False),
            (9, 1, 2, False),
            (10, 6, 2, True),
        ]
        data, _ = disk.read(0, disk.size)
        expected = fill(0x70) + fill(0x5A) + bytes(6 * CS) + fill(0x78) + fill(0x5B) + bytes(6 * CS)
        assert bytes(data) == expected
    finally:
        disk.close()


# ---- split disks: several Storage elements, each a piece with one image per snapshot


def split_xml(
    pieces: list[tuple[int, int, list[str]]],
    *,
    disk_size: int = 4096,
    shots: list[tuple[str, str]] | None = None,
    top: str = ROOT,
) -> str:
    """A split descriptor: one Storage per (start, end, GUIDs of its images), in the order given."""
    storages = []
    for n, (start, end, guids) in enumerate(pieces):
        images = "".join(
            f"<Image><GUID>{g}</GUID><Type>Compressed</Type><File>d.hdd.{n}.{g}.hds</File></Image>" for g in guids
        )
        storages.append(
            f"<Storage><Start>{start}</Start><End>{end}</End><Blocksize>2048</Blocksize>{images}</Storage>"
        )
    return xml(
        disk_size=str(disk_size),
        storage=f"<StorageData>{''.join(storages)}</StorageData>",
        shots=shots,
        top=top,
    )


def test_split_descriptor_pieces_sorted_by_start(tmp_path: Path) -> None:
    text = split_xml(
        [(2048, 3072, [ROOT, TOP]), (0, 2048, [ROOT, TOP]), (3072, 4096, [TOP, ROOT])],
        shots=[(ROOT, ZERO_GUID), (TOP, ROOT)],
        top=TOP,
    )
    desc = parse_descriptor(write(tmp_path, text))
    assert desc.split
    assert [(pc.index, pc.start, pc.end) for pc in desc.pieces] == [(1, 0, 2048), (0, 2048, 3072), (2, 3072, 4096)]
    assert [pc.offset for pc in desc.pieces] == [0, 2048 * 512, 3072 * 512]
    chains = desc.piece_chains()
    assert [[e.guid for e in chain] for chain in chains] == [[TOP, ROOT]] * 3
    assert [chains[k][0].file.name for k in range(3)] == [f"d.hdd.{n}.{TOP}.hds" for n in (1, 0, 2)]
    assert desc.images is desc.pieces[0].images  # the first piece, as for a disk that is not split
    assert [[e.guid for e in chain] for chain in desc.piece_chains(ROOT)] == [[ROOT]] * 3


def test_single_storage_is_not_split(tmp_path: Path) -> None:
    desc = parse_descriptor(write(tmp_path, xml(top=ROOT)))
    assert not desc.split
    assert len(desc.pieces) == 1 and desc.pieces[0].size == desc.size


SPLIT_ERRORS: dict[str, tuple[str, type[Exception], list[str]]] = {
    "overlap": (
        split_xml([(0, 2048, [ROOT]), (2000, 4096, [ROOT])]),
        DescriptorError,
        ["Storage 1 (sectors 2000..4096) overlaps Storage 0 (sectors 0..2048)"],
    ),
    "gap": (
        split_xml([(0, 1024, [ROOT]), (2048, 4096, [ROOT])]),
        DescriptorError,
        ["sectors 1024..2048 are in no Storage", "after Storage 0 (sectors 0..1024)", "Storage 1 (sectors 2048..4096)"],
    ),
    "missing-first": (
        split_xml([(1024, 2048, [ROOT]), (2048, 4096, [ROOT])]),
        DescriptorError,
        ["sectors 0..1024 are in no Storage", "at the start"],
    ),
    "missing-last": (
        split_xml([(0, 2048, [ROOT]), (2048, 3072, [ROOT])]),
        DescriptorError,
        ["Storage 1 (sectors 2048..3072)", "ends at sector 3072", "Disk_size is 4096"],
    ),
    "past-disk-size": (
        split_xml([(0, 2048, [ROOT]), (2048, 8192, [ROOT])]),
        DescriptorError,
        ["ends at sector 8192", "Disk_size is 4096"],
    ),
    "end-before-start": (
        split_xml([(0, 2048, [ROOT]), (3072, 2048, [ROOT]), (3072, 4096, [ROOT])]),
        DescriptorError,
        ["Storage 1 has Start 3072 and End 2048"],
    ),
    "empty-piece": (
        split_xml([(0, 2048, [ROOT]), (2048, 2048, [ROOT]), (2048, 4096, [ROOT])]),
        DescriptorError,
        ["Storage 1 has Start 2048 and End 2048"],
    ),
    "image-missing-for-one-snapshot": (
        split_xml([(0, 2048, [ROOT, TOP]), (2048, 4096, [ROOT])], shots=[(ROOT, ZERO_GUID), (TOP, ROOT)], top=TOP),
        SnapshotChainError,
        ["Storage 1 (sectors 2048..4096) has no Image for snapshot " + TOP],
    ),
    "text-end-of-second": (
        split_xml([(0, 2048, [ROOT]), (2048, 4096, [ROOT])]).replace("<End>4096</End>", "<End>all</End>"),
        DescriptorError,
        ["StorageData/Storage 1/End is 'all'"],
    ),
    "piece-without-image": (
        split_xml([(0, 2048, [ROOT]), (2048, 4096, [])]),
        DescriptorError,
        ["Storage 1 has no Image"],
    ),
    "same-file-twice": (
        xml(
            disk_size="4096",
            storage="<StorageData>"
            + "".join(
                f"<Storage><Start>{a}</Start><End>{b}</End>"
                f"<Image><GUID>{ROOT}</GUID><Type>Compressed</Type><File>same.hds</File></Image></Storage>"
                for a, b in ((0, 2048), (2048, 4096))
            )
            + "</StorageData>",
        ),
        DescriptorError,
        ["same.hds is named by Storage 0 and Storage 1"],
    ),
}


@pytest.mark.parametrize("case", sorted(SPLIT_ERRORS))
def test_split_descriptor_errors(tmp_path: Path, case: str) -> None:
    text, exc, words = SPLIT_ERRORS[case]
    path = write(tmp_path, text)
    with pytest.raises(DescriptorError) as info:
        parse_descriptor(path)
    assert isinstance(info.value, exc), info.value
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)
