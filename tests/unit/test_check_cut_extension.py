"""check --repair of an image whose bitmap clusters were cut off (as `qemu-img check -r leaks` cuts them)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from prlnbd.disk.chain import open_disk
from prlnbd.disk.tools import manage_bitmaps
from prlnbd.errors import ExtensionError
from prlnbd.image.check import check_image
from prlnbd.image.create import write_image
from prlnbd.image.parallels import ParallelsImage

CS = 64 * 1024
A = "11111111-2222-3333-4444-555555555555"
B = "66666666-7777-8888-9999-aaaaaaaaaaaa"


def test_only_the_bitmap_cut_off_is_dropped(tmp_path: Path) -> None:
    img = tmp_path / "d.hds"
    write_image(img, 64 * CS, cluster_size=CS, clusters={0: b"\x01" * CS})
    manage_bitmaps(img, "add", A, 4096)
    manage_bitmaps(img, "add", B, 4096)
    disk = open_disk(img, writable=True)
    try:
        for bm in disk.bitmaps():
            bm.set_range(0, 4096)  # partly dirty: each stored in a bitmap cluster of its own, B's last
    finally:
        disk.close()
    probe = ParallelsImage.open(img)
    try:
        ext = probe.extension
        assert ext is not None
        last = max(e * 512 for bm in ext.bitmaps for e in bm.l1 if e > 1)
        b_cluster = next(e * 512 for bm in ext.bitmaps if bm.name == B for e in bm.l1 if e > 1)
    finally:
        probe.close()
    assert b_cluster == last and os.stat(img).st_size == last + CS
    os.truncate(img, last)  # what qemu-img check -r leaks does to the space past the last data cluster
    msg = rf"dirty bitmap {B}: .*past the end.*`prlnbd check --repair {img}` drops it"
    with pytest.raises(ExtensionError, match=msg):
        ParallelsImage.open(img)
    found = check_image(img)
    assert [(f.kind, f.fixed) for f in found] == [("extension", False)] and B in found[0].message
    found = check_image(img, repair=True)
    assert found[0].fixed and B in found[0].message and "bitmap dropped" in found[0].message
    assert all(f.fixed or f.kind == "free" for f in found)
    assert manage_bitmaps(img, "list", None, 0) == [{"name": A, "granularity": 4096, "dirty-bytes": 4096}]
    assert not [f for f in check_image(img) if f.kind != "free"]
