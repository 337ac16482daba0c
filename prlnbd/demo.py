"""The demo disk: a bundle with a 3-layer snapshot chain that shows where each byte comes from."""

from __future__ import annotations

from pathlib import Path

from prlnbd.disk.descriptor import build_descriptor, new_guid, save_descriptor
from prlnbd.image.create import write_image

DEMO_SIZE = 64 * 1024 * 1024
CLUSTER = 1024 * 1024
# Which guest clusters each layer holds, root first; upper layers hide lower ones.
LAYOUT = {"root": range(0, 16), "snapshot-1": range(4, 8), "top": (6, 7, 20)}


def _cluster(layer: str, index: int) -> bytes:
    line = f"prlnbd demo: cluster {index:3d} comes from the {layer} layer\n".encode()
    return (line * (CLUSTER // len(line) + 1))[:CLUSTER]


def build_demo(bundle: Path) -> list[Path]:
    """Create BUNDLE with DiskDescriptor.xml and three expandable images; return the image files."""
    bundle.mkdir(parents=True, exist_ok=True)
    chain: list[tuple[str, str, str]] = []
    files = []
    for i, (layer, clusters) in enumerate(LAYOUT.items()):
        guid = new_guid()
        name = f"{bundle.name}.{i}.{guid}.hds"
        write_image(bundle / name, DEMO_SIZE, cluster_size=CLUSTER, clusters={c: _cluster(layer, c) for c in clusters})
        chain.insert(0, (guid, "Compressed", name))
        files.append(bundle / name)
    save_descriptor(build_descriptor(DEMO_SIZE, CLUSTER, chain), bundle / "DiskDescriptor.xml")
    return files
