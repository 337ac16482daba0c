"""The command line's human-readable sizes."""

from __future__ import annotations

import pytest

from prlnbd.cli import _human

KIB, MIB, GIB, TIB, PIB = (1024**i for i in range(1, 6))


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 bytes"),
        (1023, "1023 bytes"),
        (KIB, "1 KiB"),
        (64 * KIB, "64 KiB"),
        (1000 * MIB, "1000 MiB"),  # a whole number of MiB, not 0.98 GiB
        (TIB, "1 TiB"),
        (1536, "1.50 KiB"),
        (TIB + 5, "1.00 TiB"),  # just past a whole unit: the largest unit, not "1.07e+09 KiB"
        (3 * GIB + 1, "3.00 GiB"),
        (10**9, "953.67 MiB"),
        (2048 * PIB, "2048 PiB"),
        (5 * 1024 * PIB + 1, "5120.00 PiB"),
    ],
)
def test_human_sizes(n: int, text: str) -> None:
    assert _human(n) == text
