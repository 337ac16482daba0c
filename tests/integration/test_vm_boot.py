"""A real guest boots from a prlnbd export of a three-layer snapshot chain.

QEMU (TCG, SeaBIOS, virtio-blk) boots the bundle over NBD. The boot sector, which
lives in the root layer, reads sectors that come from each layer with int 13h
extended reads, checksums them, writes one sector back over data the top layer
does not hold (copy-on-write into the top), reads it back, and reports on COM1.
The test then checks the checksum against the Python view of the chain and the
image files themselves: the write landed in the top layer with the rest of its
cluster copied from below, and the lower layers did not change by one byte.
"""

from __future__ import annotations

import random
import re
import signal
import subprocess
import time
from contextlib import closing
from pathlib import Path

import pytest

from prlnbd.disk.descriptor import build_descriptor, new_guid, save_descriptor
from prlnbd.image.create import write_image
from prlnbd.image.parallels import ParallelsImage
from tests import support

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not support.have("qemu-system-x86_64"), reason="qemu-system-x86_64 is not installed"),
]

SECTOR = 512
SIZE = 8 << 20
K64, M1 = 64 << 10, 1 << 20
BOOT_TIMEOUT = 90.0

# Guest clusters each layer holds, root first. The root and the top use 1 MiB
# clusters, the middle layer 64 KiB ones, so reads and the copy-on-write mix both.
ROOT_CLUSTERS = (M1, (0, 1, 2, 4))  # boot sector, 1 MiB, 2 MiB, 4 MiB
MID_CLUSTERS = (K64, (32, 65))  # 2 MiB (over the root's cluster 2), 4 MiB + 64 KiB
TOP_CLUSTERS = (M1, (3,))  # 3 MiB

# (LBA, sectors) the boot sector reads and checksums, in this order.
READS = [
    (2048, 4),  # 1 MiB: root
    (4220, 8),  # 2 MiB + 62 KiB: 2 KiB from the middle layer, then 2 KiB from the root
    (6144, 4),  # 3 MiB: top
    (8336, 1),  # the write target, before the write: middle layer
    (12288, 2),  # 6 MiB: in no layer, zeros
]
# 4 MiB + 72 KiB: in the middle layer's cluster 65 and the top's unallocated cluster 4.
TARGET_LBA = 8336
TAG = b"PRLNBD-VM-WRITE!"

# The boot sector, assembled from BOOT_ASM below with
#   as --32 -o boot.o boot.S && ld -m elf_i386 -Ttext 0x7c00 --oformat binary -o boot.bin boot.o
# (the .set TARGET line and the reads table carry TARGET_LBA and READS).
BOOT_SECTOR = bytes.fromhex(
    "fa31c08ed88ec08ed0bc007cea117c0000fbfc8816787db441bbaa55cd13b045"
    "0f82ca0081fb55aa0f85c20031edbf547d8b4d04e32e668b0566a34c7d890e46"
    "7dc706487d00105751b442e88e00595fc1e109be001031c0acd1c501c5e2f983"
    "c706ebcdbf003031c988c8345aaa4181f9000272f4be797dbf0030b91000f3a4"
    "892e103066c7064c7d90200000c706467d0100c706487d0030b443e83e00c706"
    "467d0100c706487d0050b442e82d00be0030bf0050b90002f3a6b0527530be89"
    "7de8630089e8e84400bea07de85800b80020ba0406efba04b0efeb2db000be44"
    "7d8a16787dcd137201c389c5b04450be947de8320058e83900b020e8340089e8"
    "e80a00bea07de81e00faf4ebfcb9040089c3c1c30488d8240f04303c39760204"
    "27e80e00e2ecc3ac84c07405e80300ebf6c35250bafd03eca82074fb58baf803"
    "ee5ac390100000000000000000000000000000000008000004007c1000000800"
    "0018000004009020000001000030000002000000000000000050524c4e42442d"
    "564d2d57524954452150524c4e42442d4f4b200050524c4e42442d4552522000"
    "0d0a000000000000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000"
    "00000000000000000000000000000000000000000000000000000000000055aa"
)
READS_TABLE_OFFSET = 0x154  # `reads:` in the binary
TARGET_IMM_OFFSET = 0x89  # the immediate of `mov dword ptr [dap_lba], TARGET`

BOOT_ASM = r"""
        .intel_syntax noprefix
        .set TARGET, 8336
        .code16
        .globl _start
_start:
        cli
        xor ax, ax                  # flat segments, stack below the boot sector
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov sp, 0x7c00
        .att_syntax
        ljmp $0, $start2            # CS:IP = 0000:7Cxx whatever the BIOS used
        .intel_syntax noprefix
start2:
        sti
        cld
        mov [drive], dl             # boot drive from the BIOS
        mov ah, 0x41                # int 13h extensions present?
        mov bx, 0x55aa
        int 0x13
        mov al, 'E'
        jc fail
        cmp bx, 0xaa55
        jne fail
        xor bp, bp                  # BP = checksum
        mov di, offset reads
next_read:
        mov cx, [di+4]              # sectors; 0 ends the table
        jcxz reads_done
        mov eax, [di]
        mov [dap_lba], eax
        mov [dap_count], cx
        mov word ptr [dap_buf], 0x1000
        push di
        push cx
        mov ah, 0x42                # extended read into 0000:1000
        call disk
        pop cx
        pop di
        shl cx, 9
        mov si, 0x1000
        xor ax, ax
ck_loop:                            # ck = rol(ck, 1) + byte, 16 bits
        lodsb
        rol bp, 1
        add bp, ax
        loop ck_loop
        add di, 6
        jmp next_read
reads_done:
        mov di, 0x3000              # sector to write: byte i = i ^ 0x5a ...
        xor cx, cx
fill:
        mov al, cl
        xor al, 0x5a
        stosb
        inc cx
        cmp cx, 512
        jb fill
        mov si, offset tag          # ... then the 16-byte tag and the checksum
        mov di, 0x3000
        mov cx, 16
        rep movsb
        mov [0x3010], bp
        mov dword ptr [dap_lba], TARGET
        mov word ptr [dap_count], 1
        mov word ptr [dap_buf], 0x3000
        mov ah, 0x43                # extended write, AL = 0: no verify
        call disk
        mov word ptr [dap_count], 1
        mov word ptr [dap_buf], 0x5000
        mov ah, 0x42                # read it back into 0000:5000
        call disk
        mov si, 0x3000
        mov di, 0x5000
        mov cx, 512
        repe cmpsb
        mov al, 'R'
        jne fail
        mov si, offset ok           # "PRLNBD-OK xxxx\r\n"
        call puts
        mov ax, bp
        call hex16
        mov si, offset crlf
        call puts
        mov ax, 0x2000              # ACPI S5 (SLP_EN) on the PM1a control port
        mov dx, 0x604               # of q35 ...
        out dx, ax
        mov dx, 0xb004              # ... and of i440fx/PIIX4
        out dx, ax
        jmp halt

disk:                               # int 13h AH=function with DS:SI = DAP
        mov al, 0
        mov si, offset dap
        mov dl, [drive]
        int 0x13
        jc disk_err
        ret
disk_err:
        mov bp, ax                  # "PRLNBD-ERR D <AX>"
        mov al, 'D'
fail:                               # "PRLNBD-ERR <AL> <BP>", then halt
        push ax
        mov si, offset err
        call puts
        pop ax
        call putc
        mov al, ' '
        call putc
        mov ax, bp
        call hex16
        mov si, offset crlf
        call puts
halt:
        cli
        hlt
        jmp halt

hex16:                              # AX as 4 lowercase hex digits
        mov cx, 4
        mov bx, ax
hex_loop:
        rol bx, 4
        mov al, bl
        and al, 0x0f
        add al, '0'
        cmp al, '9'
        jbe hex_out
        add al, 'a' - '0' - 10
hex_out:
        call putc
        loop hex_loop
        ret

puts:                               # NUL-terminated string at DS:SI
        lodsb
        test al, al
        jz puts_done
        call putc
        jmp puts
puts_done:
        ret

putc:                               # AL to COM1, polling THRE
        push dx
        push ax
        mov dx, 0x3fd
putc_wait:
        in al, dx
        test al, 0x20
        jz putc_wait
        pop ax
        mov dx, 0x3f8
        out dx, al
        pop dx
        ret

        .p2align 2
dap:    .byte 16, 0
dap_count: .word 0
dap_buf:   .word 0, 0
dap_lba:   .long 0, 0
reads:                              # (LBA dword, sectors word), ends with 0 sectors
        .long 2048
        .word 4
        .long 4220
        .word 8
        .long 6144
        .word 4
        .long TARGET
        .word 1
        .long 12288
        .word 2
        .long 0
        .word 0
drive:  .byte 0
tag:    .ascii "PRLNBD-VM-WRITE!"
ok:     .asciz "PRLNBD-OK "
err:    .asciz "PRLNBD-ERR "
crlf:   .asciz "\r\n"
        .org 510
        .byte 0x55, 0xaa
"""


def test_boot_sector_matches_constants() -> None:
    """The embedded binary reads READS and writes TARGET_LBA, as the Python side assumes."""
    assert len(BOOT_SECTOR) == SECTOR and BOOT_SECTOR[-2:] == b"\x55\xaa"
    table = []
    pos = READS_TABLE_OFFSET
    while True:
        lba = int.from_bytes(BOOT_SECTOR[pos:pos + 4], "little")
        count = int.from_bytes(BOOT_SECTOR[pos + 4:pos + 6], "little")
        pos += 6
        if count == 0:
            break
        table.append((lba, count))
    assert table == READS
    assert int.from_bytes(BOOT_SECTOR[TARGET_IMM_OFFSET:TARGET_IMM_OFFSET + 4], "little") == TARGET_LBA
    assert TAG in BOOT_SECTOR


@pytest.mark.skipif(not (support.have("as") and support.have("ld")), reason="GNU as and ld are not installed")
def test_boot_sector_matches_source(tmp_path: Path) -> None:
    """BOOT_ASM assembles to exactly BOOT_SECTOR, so the comments say what runs."""
    src = tmp_path / "boot.S"
    src.write_text(BOOT_ASM)
    support.run("as", "--32", "-o", tmp_path / "boot.o", src)
    support.run("ld", "-m", "elf_i386", "-Ttext", "0x7c00", "--oformat", "binary",
                "-o", tmp_path / "boot.bin", tmp_path / "boot.o")
    assert (tmp_path / "boot.bin").read_bytes() == BOOT_SECTOR


def checksum(data: bytes) -> int:
    """The guest's checksum: for each byte, ck = rol16(ck, 1) + byte."""
    ck = 0
    for b in data:
        ck = (((ck << 1) | (ck >> 15)) + b) & 0xFFFF
    return ck


def written_sector(ck: int) -> bytes:
    """The sector the guest writes at TARGET_LBA."""
    buf = bytearray((i & 0xFF) ^ 0x5A for i in range(SECTOR))
    buf[: len(TAG)] = TAG
    buf[16:18] = ck.to_bytes(2, "little")
    return bytes(buf)


def layer_clusters(seed: int, cluster_size: int, indices: tuple[int, ...]) -> dict[int, bytes]:
    """Reproducible random contents for INDICES of one layer."""
    rng = random.Random(seed)
    return {i: rng.randbytes(cluster_size) for i in indices}


def build_bundle(bundle: Path) -> tuple[list[Path], bytes]:
    """The 3-layer bundle (files root first) and the guest view it must give."""
    bundle.mkdir(parents=True)
    layers = []
    for seed, (cluster_size, indices) in enumerate((ROOT_CLUSTERS, MID_CLUSTERS, TOP_CLUSTERS), start=1):
        clusters = layer_clusters(seed, cluster_size, indices)
        if seed == 1:
            clusters[0] = BOOT_SECTOR + clusters[0][SECTOR:]
        layers.append((cluster_size, clusters))
    view = bytearray(SIZE)
    files: list[Path] = []
    chain: list[tuple[str, str, str]] = []
    for i, (cluster_size, clusters) in enumerate(layers):
        guid = new_guid()
        name = f"vm.hdd.{i}.{guid}.hds"
        write_image(bundle / name, SIZE, cluster_size=cluster_size, clusters=clusters)
        for index, data in clusters.items():
            view[index * cluster_size:(index + 1) * cluster_size] = data
        chain.insert(0, (guid, "Compressed", name))
        files.append(bundle / name)
    save_descriptor(build_descriptor(SIZE, TOP_CLUSTERS[0], chain), bundle / "DiskDescriptor.xml")
    return files, bytes(view)


# SeaBIOS mirrors its own screen to COM1 too, and the end of it ("Booting from Hard Disk...", its
# dots and line break, terminal escapes) can reach the port in the middle of the guest's report.
_BIOS_NOISE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1bc|[.\r\n]")
_REPORT = re.compile(r"PRLNBD-(?:OK|ERR \S) ([0-9a-f]{4})")


def guest_report(text: str) -> re.Match[str] | None:
    """The guest's whole report in the serial output ("PRLNBD-OK hhhh" or "PRLNBD-ERR c hhhh"), or None."""
    return _REPORT.search(_BIOS_NOISE.sub("", text))


def reported_ok(out: str) -> bool:
    """Whether the guest reported success."""
    report = guest_report(out)
    return report is not None and report.group(0).startswith("PRLNBD-OK ")


def reported_checksum(out: str) -> int:
    """The checksum of a "PRLNBD-OK hhhh" report."""
    report = guest_report(out)
    assert report is not None and reported_ok(out), repr(out)
    return int(report.group(1), 16)


def boot(tmp: Path, uri: str, serial: Path, drive: str | None = None, extra: tuple[str, ...] = ()) -> str:
    """Boot QEMU from URI (or the -drive DRIVE, with EXTRA options) until the guest reports on COM1.

    Returns the serial output.
    """
    cmd = [
        "qemu-system-x86_64", "-accel", "tcg", "-nographic", "-no-reboot", "-m", "64",
        "-nodefaults", "-nic", "none", "-display", "none", "-monitor", "none", *extra,
        "-drive", drive or f"file={uri},format=raw,if=virtio",
        "-serial", f"file:{serial}",
    ]
    qlog = tmp / "qemu.log"
    with qlog.open("wb") as logf:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT
        text = ""
        while time.monotonic() < deadline:
            text = serial.read_text(errors="replace") if serial.exists() else ""
            if guest_report(text) is not None:
                break
            if proc.poll() is not None:
                # The guest powers itself off after the report: one last look at the file.
                text = serial.read_text(errors="replace") if serial.exists() else ""
                break
            time.sleep(0.2)
        return text
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # QEMU flushes and closes the NBD connection
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if not reported_ok(text):
            print(f"qemu log:\n{qlog.read_text(errors='replace')}")


def test_vm_boots_from_chain_and_writes_cow(tmp_path: Path) -> None:
    bundle = tmp_path / "vm.pvm" / "harddisk.hdd"
    files, view = build_bundle(bundle)
    root, mid, top = files
    before = {p: support.file_digest(p) for p in (root, mid)}

    # The layout the guest depends on: each read comes from the layer its comment names.
    with closing(ParallelsImage.open(top)) as t, closing(ParallelsImage.open(mid)) as m, \
            closing(ParallelsImage.open(root)) as r:
        target = TARGET_LBA * SECTOR
        assert t.host_offset(target // M1) == 0
        assert m.host_offset(target // K64) != 0
        assert r.host_offset(target // M1) != 0
        assert t.host_offset(6144 * SECTOR // M1) != 0
        assert m.host_offset(4220 * SECTOR // K64) != 0
        assert m.host_offset((4220 + 4) * SECTOR // K64) == 0

    want_ck = checksum(b"".join(view[lba * SECTOR:(lba + n) * SECTOR] for lba, n in READS))

    server = support.start_prlnbd(tmp_path, [f"vm={bundle}"])
    try:
        serial = tmp_path / "serial.txt"
        started = time.monotonic()
        out = boot(tmp_path, server.uri("vm"), serial)
        elapsed = time.monotonic() - started
        assert reported_ok(out), f"no report from the guest in {elapsed:.0f}s: {out!r}\n{server.log_text()}"
    finally:
        status = server.stop(signal.SIGTERM)
    assert status == 0, f"server exited with {status}: {server.log_text()}"
    assert "stopped cleanly" in server.log_text() and "Traceback" not in server.log_text(), server.log_text()

    got_ck = reported_checksum(out)
    assert got_ck == want_ck, f"guest checksum {got_ck:04x}, expected {want_ck:04x}"

    # The lower layers are untouched.
    assert {p: support.file_digest(p) for p in (root, mid)} == before

    # The written sector is in the top layer, in a cluster copied up from below.
    new = written_sector(want_ck)
    target = TARGET_LBA * SECTOR
    cluster = target // M1
    with closing(ParallelsImage.open(top)) as t:
        assert not t.in_use, "the top image was not closed cleanly"
        assert t.host_offset(3) != 0
        host = t.host_offset(cluster)
        assert host != 0, "the write did not allocate its cluster in the top layer"
        allocated = [c for c in range(SIZE // M1) if t.host_offset(c)]
        assert allocated == [3, cluster]
    with top.open("rb") as f:
        f.seek(host)
        data = f.read(M1)
    expect = bytearray(view[cluster * M1:(cluster + 1) * M1])
    within = target - cluster * M1
    expect[within:within + SECTOR] = new
    assert data[within:within + SECTOR] == new
    # The rest of the cluster: the root's bytes with the middle layer's 64 KiB over them.
    assert data == bytes(expect)

    # And a fresh server over the bundle gives the whole guest view with the write in it.
    view_after = bytearray(view)
    view_after[target:target + SECTOR] = new
    server = support.start_prlnbd(tmp_path, [f"vm={bundle}"])
    try:
        assert support.nbd_pread(server.uri("vm")) == bytes(view_after)
    finally:
        assert server.stop() == 0
    assert {p: support.file_digest(p) for p in (root, mid)} == before


@pytest.mark.skipif(not support.have("certtool"), reason="certtool (gnutls-bin) is needed")
def test_vm_boots_over_tls(tmp_path: Path) -> None:
    """The same guest boots from an export served with --tls=require and client certificates."""
    from tests.tlspki import make_test_pki

    pki = make_test_pki(tmp_path / "pki")
    bundle = tmp_path / "vm.pvm" / "harddisk.hdd"
    _, view = build_bundle(bundle)
    want_ck = checksum(b"".join(view[lba * SECTOR:(lba + n) * SECTOR] for lba, n in READS))
    server = support.start_prlnbd(tmp_path, [f"vm={bundle}"], "--tls=require",
                                  f"--tls-certificates={pki.server}", "--tls-verify-peer")
    try:
        drive = (f"file.driver=nbd,file.server.type=unix,file.server.path={server.sock},file.export=vm,"
                 "file.tls-creds=tls0,file.tls-hostname=localhost,format=raw,if=virtio")
        extra = ("-object", f"tls-creds-x509,id=tls0,endpoint=client,dir={pki.client1}")
        out = boot(tmp_path, "", tmp_path / "serial.txt", drive, extra)
        assert reported_ok(out), f"no report from the guest: {out!r}\n{server.log_text()}"
    finally:
        status = server.stop(signal.SIGTERM)
    assert status == 0, server.log_text()
    assert reported_checksum(out) == want_ck
    log = server.log_text()
    assert re.search(r"connection unix socket \(TLSv1\.[23], CN=client1,O=Example\) export 'vm'", log), log
