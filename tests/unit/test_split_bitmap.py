"""SplitBitmap: one dirty bitmap of a split disk, made of the same bitmap in every piece.

Every test compares it with one plain DirtyBitmap over the whole disk given the
same changes: the two must agree on bits, runs, the change index and counts,
and each piece's part must hold exactly its slice.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prlnbd.errors import ExtensionError
from prlnbd.image import extension as extension_mod
from prlnbd.image.extension import DirtyBitmap, SplitBitmap, new_bitmap

G = 4096
NAME = "e4f2eed0-37fe-4539-b50b-85d2e7fd235f"
# The last piece is not a whole number of granules: its last one is clipped.
SIZES = [16 * G, 8 * G, 16 * G, 5 * G + 1024]
STARTS = [sum(SIZES[:k]) for k in range(len(SIZES))]
TOTAL = sum(SIZES)


def pair() -> tuple[SplitBitmap, DirtyBitmap]:
    """A split bitmap over SIZES (chunks of 1 byte: many chunks per part) and its whole-disk model."""
    parts = [new_bitmap(size, G, NAME, chunk=1) for size in SIZES]
    return SplitBitmap(parts, STARTS), new_bitmap(TOTAL, G, NAME, chunk=1)


def assert_same(bm: SplitBitmap, model: DirtyBitmap) -> None:
    assert bm.nbits == model.nbits and bm.disk_size == model.disk_size == TOTAL
    assert bm.bits == model.bits
    assert list(bm.set_runs(0, bm.nbits)) == list(model.set_runs(0, model.nbits))
    assert bm.dirty_bytes() == model.dirty_bytes()
    index, want = bm.index(), model.index()
    assert (None if index is None else index.tolist()) == (None if want is None else want.tolist())
    for offset, length in [(0, TOTAL), (STARTS[1] - 100, 2 * G), (STARTS[3] - G, 3 * G), (TOTAL - 10, 10)]:
        assert list(bm.extents(offset, length)) == list(model.extents(offset, length))
    for offset in [0, STARTS[1] - 1, STARTS[1], STARTS[2] + 5, TOTAL - 1]:
        for limit in (1, 3, 1000):
            got = bm.changes(offset, min(TOTAL, offset + 3 * G) - 1, TOTAL, limit)
            exp = model.changes(offset, min(TOTAL, offset + 3 * G) - 1, TOTAL, limit)
            assert (got[0], got[1].tolist()) == (exp[0], exp[1].tolist())
    # Each part holds its slice of the disk's bits.
    for part, start in zip(bm.parts, STARTS, strict=True):
        first = start // G
        assert [part.is_set(i) for i in range(part.nbits)] == [model.is_set(first + i) for i in range(part.nbits)]


def test_changes_across_boundaries_mark_both_pieces() -> None:
    bm, model = pair()
    bm.index()
    model.index()
    for offset, length in [(STARTS[1] - 10, 20), (STARTS[2] - G, 2 * G), (0, 1), (STARTS[3] + 4 * G, 2 * G)]:
        bm.set_range(offset, length)
        model.set_range(offset, length)
        assert_same(bm, model)
    assert bm.parts[0].is_set(SIZES[0] // G - 1) and bm.parts[1].is_set(0)
    # A run over the boundary of pieces 1 and 2 is one run of the disk, one pair of changes in its index.
    assert (STARTS[2] - G, STARTS[2] + G) in [(a * G, b * G) for a, b in bm.set_runs(0, bm.nbits)]
    index = bm.index()
    assert index is not None and STARTS[2] not in index.tolist()
    # The last granule is clipped to the disk's end.
    assert bm.index()[-1] == TOTAL  # type: ignore[index]


def test_random_changes_agree_with_one_bitmap() -> None:
    rnd = random.Random(7)
    bm, model = pair()
    for step in range(200):
        if step % 50 == 49:
            bm.clear()
            model.clear()
        offset = rnd.randrange(TOTAL)
        length = rnd.randrange(1, 3 * G)
        bm.set_range(offset, length)
        model.set_range(offset, length)
        if step % 7 == 0:
            assert_same(bm, model)
    assert_same(bm, model)


def test_a_dense_bitmap_is_scanned_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_FLIPS changes there is no index: changes() scans the parts' runs."""
    monkeypatch.setattr(extension_mod, "MAX_FLIPS", 6)
    bm, model = pair()
    for k in range(0, TOTAL // G, 3):
        bm.set_range(k * G, G)
        model.set_range(k * G, G)
    assert bm.index() is None and model.index() is None
    assert_same(bm, model)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, TOTAL - 1), st.integers(1, 4 * G)), max_size=12), st.booleans())
def test_any_changes_agree_with_one_bitmap(changes: list[tuple[int, int]], indexed_first: bool) -> None:
    bm, model = pair()
    if indexed_first:  # the index built before the changes and kept true, or built after them
        bm.index()
        model.index()
    for offset, length in changes:
        bm.set_range(offset, length)
        model.set_range(offset, length)
    assert_same(bm, model)


def test_clear_copy_and_name() -> None:
    bm, _ = pair()
    bm.set_range(STARTS[1] - 1, 2)
    other = bm.copy()
    assert isinstance(other, SplitBitmap) and other.name == bm.name == NAME and other.granularity == G
    bm.clear()
    assert bm.dirty_bytes() == 0 and all(p.dirty_bytes() == 0 for p in bm.parts)
    assert bm.index() is not None and not bm.index()
    assert other.dirty_bytes() == 2 * G and [p.dirty_bytes() for p in other.parts] == [G, G, 0, 0]
    assert other.parts[0] is not bm.parts[0]


def test_granularity_must_divide_the_piece_boundaries() -> None:
    parts = [new_bitmap(size, 16 * G, NAME) for size in SIZES]
    msg = rf"granularity {16 * G} does not divide the piece boundary at byte {STARTS[2]}"
    with pytest.raises(ExtensionError, match=msg):
        SplitBitmap(parts, STARTS)


def test_parts_must_be_one_bitmap() -> None:
    parts = [new_bitmap(size, G, NAME) for size in SIZES]
    parts[2] = new_bitmap(SIZES[2], 2 * G, NAME)
    with pytest.raises(ExtensionError, match="granularity 8192 differs from 4096"):
        SplitBitmap(parts, STARTS)
