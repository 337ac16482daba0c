"""Parallels VM directories (NAME.pvm): config.pvs and one NAME.hdd bundle per disk.

config.pvs is not read: the disks are the *.hdd directories inside that hold a
DiskDescriptor.xml, which is where Parallels Desktop keeps a VM's disks.
"""

from __future__ import annotations

import os
from pathlib import Path

from prlnbd.disk.descriptor import DESCRIPTOR_NAME
from prlnbd.errors import DescriptorError

VM_CONFIG = "config.pvs"
VM_SUFFIX = ".pvm"
BUNDLE_SUFFIX = ".hdd"


def is_vm_directory(path: Path) -> bool:
    """Whether PATH is a VM directory: no DiskDescriptor.xml of its own, and a .pvm name or a config.pvs."""
    return (
        path.is_dir()
        and not os.path.lexists(path / DESCRIPTOR_NAME)
        and (path.name.lower().endswith(VM_SUFFIX) or (path / VM_CONFIG).is_file())
    )


def vm_disks(path: Path, *, allow_outside: bool = False) -> list[tuple[str, Path]]:
    """(name, bundle directory) of every disk in the VM directory PATH, by name.

    The name is the bundle directory's own name (harddisk.hdd), as when the bundle
    is given alone. A bundle that is a symlink out of the VM directory is refused
    unless ALLOW_OUTSIDE: a copied VM must not expose other disks of this host.
    """
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except OSError as e:
        raise DescriptorError(f"{path}: cannot list the VM directory: {e.strerror}") from None
    home = path.resolve()
    disks: list[tuple[str, Path]] = []
    for entry in entries:
        if not entry.name.lower().endswith(BUNDLE_SUFFIX) or not entry.is_dir():
            continue
        bundle = Path(entry.path)
        if not os.path.lexists(bundle / DESCRIPTOR_NAME):
            continue
        real = bundle.resolve()
        if not allow_outside and home not in real.parents:
            raise DescriptorError(
                f"{path}: disk bundle {entry.name} is a symlink to {real}, outside the VM directory;"
                " refused (--allow-outside-bundle allows it)"
            )
        disks.append((entry.name, bundle))
    if not disks:
        raise DescriptorError(
            f"{path}: the VM directory holds no disk (no *{BUNDLE_SUFFIX} directory with {DESCRIPTOR_NAME})"
        )
    return disks
