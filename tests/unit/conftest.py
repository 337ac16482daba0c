"""Fixtures shared by the unit tests."""

from __future__ import annotations

import bz2
from collections.abc import Callable
from pathlib import Path

import pytest

QEMU_FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "qemu"


@pytest.fixture(scope="session")
def qemu_image(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Decompress one of the QEMU sample images (shared/fixtures/qemu/NAME.bz2) once per session."""
    out = tmp_path_factory.mktemp("qemu-fixtures")

    def get(name: str) -> Path:
        src = QEMU_FIXTURES / f"{name}.bz2"
        if not src.exists():
            pytest.skip(f"sample image {src} is not available")
        dst = out / name
        if not dst.exists():
            with bz2.open(src, "rb") as f:
                dst.write_bytes(f.read())
        return dst

    return get
