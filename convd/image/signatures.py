"""Formats convd recognises but does not convert, told by a signature at the start or the end.

qemu-img can read some of these (Parallels, QED, bochs, cloop, dmg, qcow
version 1, LUKS with a key), oslo's ``format_inspector`` knows some (QED,
LUKS), archivers the rest (LHA, a zip whose directory is at the end).  None
is in convd's ``allowed_formats``, and none is a raw disk: each is named as
what it is, with what the uploader should do, before any size, emptiness
or hidden-header heuristic looks at the bytes (docs/operations.md,
"Formats convd recognises and refuses").  Snapshot deltas (a VMware
SEsparse or VMFSsparse redo log) are recognised here too: they are never a
disk on their own.

Every check reads at most a few hundred bytes at fixed offsets.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass

__all__ = ["DELTA", "Recognised", "recognise", "recognise_head"]

# The words every refusal of a snapshot delta carries, whatever its hypervisor.
DELTA = "a snapshot delta, needs its parent"
# (used as: "a VMware SEsparse extent is a snapshot delta, needs its parent ...")

_SECTOR = 512
_CLOOP = b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
_LHA_METHOD = re.compile(rb"-(lh[0-7d]|lz[s45])-")
_SESPARSE_MAGIC = struct.pack("<Q", 0xCAFEBABE)
_SESPARSE_VERSION = struct.pack("<Q", 0x0000000200000001)


@dataclass(frozen=True)
class Recognised:
    """A format convd will not convert: qemu-img's name where it has one, what it is, what to do."""

    format: str
    what: str
    advice: str
    delta: bool = False  # a snapshot delta: unsafe_image, not unsupported_format

    @property
    def message(self) -> str:
        return f"{self.what}: {self.advice}"


def _cowd(head: bytes) -> Recognised:
    # VMware's COWDisk header: magic, version, flags, sectors, grain, GD offset,
    # GD entries, free sector, then the parent's file name (a redo log) or the
    # root disk's geometry.
    name = head[32:32 + 1024].split(b"\0", 1)[0]
    if len(name) >= 3 and all(32 <= c < 127 for c in name):
        return Recognised("vmdk", f"a VMware VMFSsparse (COWD) extent is {DELTA} {name.decode()!r}",
                          "upload the consolidated disk (vmkfstools -i, or delete the snapshots "
                          "in ESXi first)", delta=True)
    return Recognised("vmdk", "a VMware VMFSsparse (COWD) extent without its descriptor",
                      "export the disk as a monolithicSparse or streamOptimized VMDK (ovftool, vmkfstools -i "
                      "-d thin) and upload that")


def _start(h: bytes) -> Recognised | None:
    if h[:16] in (b"WithoutFreeSpace", b"WithouFreSpacExt"):
        return Recognised("parallels", "a Parallels Desktop/Virtuozzo disk (.hdd/.hds)",
                          "convert it first (qemu-img convert -f parallels -O qcow2, or prl_disk_tool) "
                          "and upload the result")
    if h[:6] == b"LUKS\xba\xbe":
        return Recognised("luks", "a LUKS-encrypted volume", "convd holds no keys; upload the decrypted disk")
    if h[:4] == b"QED\0":
        return Recognised("qed", "a QED image (qemu's retired enhanced disk format)",
                          "convert it first (qemu-img convert -f qed -O qcow2) and upload the result")
    if h[:4] == b"QFI\xfb" and h[4:8] == b"\0\0\0\1":
        return Recognised("qcow", "a qcow version 1 image (qemu's first qcow format)",
                          "convert it first (qemu-img convert -f qcow -O qcow2) and upload the result")
    if h[:32].split(b"\0", 1)[0] == b"Bochs Virtual HD Image":
        return Recognised("bochs", "a Bochs disk image",
                          "convert it first (qemu-img convert -f bochs -O raw) and upload the result")
    if h.startswith(_CLOOP[:36]):  # through "modprobe cloop": V2.0, the version qemu reads
        return Recognised("cloop", "a compressed loop (cloop) image",
                          "convert it first (qemu-img convert -f cloop -O raw) and upload the result")
    if h[:4] == b"COWD" and h[4:8] == b"\1\0\0\0":
        return _cowd(h)
    if h[:8] == _SESPARSE_MAGIC and h[8:16] == _SESPARSE_VERSION:
        return Recognised("vmdk", f"a VMware SEsparse extent is {DELTA} (its descriptor names it)",
                          "upload the consolidated disk (delete the snapshots in ESXi, or vmkfstools -i)",
                          delta=True)
    if _LHA_METHOD.fullmatch(h[2:7]) and h[20] <= 3 and h[0] >= 21:
        return Recognised("lha", "an LHA (.lzh) archive", "unpack it and upload the disk inside, or an "
                          "uncompressed one or gzip/xz/zstd/bzip2-compressed (convd unpacks those)")
    return None


# A zip's end-of-central-directory record (22 bytes) may be followed by a
# comment of up to 65535 bytes: unzip looks that far back (APPNOTE 4.3.16).
_ZIP_TAIL = 22 + 0xFFFF


def _end(tail: bytes, size: int) -> Recognised | None:
    """``tail``: the file's last ``_ZIP_TAIL`` bytes (or all of a smaller file)."""
    koly = tail[-_SECTOR:]
    if len(koly) == _SECTOR and koly[:4] == b"koly" and koly[4:12] == b"\0\0\0\4\0\0\2\0":
        # UDIF's trailer: "koly", version 4, header size 512.
        return Recognised("dmg", "a macOS disk image (UDIF .dmg, its koly trailer at the end)",
                          "convert it to raw first (hdiutil convert -format UDTO, or qemu-img convert "
                          "-f dmg -O raw) and upload the result")
    at = len(tail)
    while (at := tail.rfind(b"PK\5\6", 0, at)) >= 0:
        eocd = tail[at:at + 22]
        if len(eocd) == 22 and struct.unpack("<H", eocd[20:22])[0] == len(tail) - at - 22:
            # The comment length reaches exactly to the end of the file.
            cd_size, cd_off = struct.unpack("<II", eocd[12:20])
            if cd_off + cd_size <= size - (len(tail) - at):
                return Recognised("zip", "a zip archive (its directory at the end)",
                                  "unpack it and upload the disk inside (convd unpacks gzip, xz, zstd, bzip2, "
                                  "tar and OVA)")
    return None


def recognise_head(head: bytes) -> Recognised | None:
    """What a file is by its first bytes alone (for an archive member read as a stream)."""
    return _start(head[:_SECTOR] + bytes(64))


def recognise(fd: int, size: int) -> Recognised | None:
    """What a file is, if its first or last bytes say it is a format convd refuses; else None."""
    found = _start(os.pread(fd, _SECTOR, 0) + bytes(64))  # padded: a tiny file still compares
    if found is None and size > 0:
        found = _end(os.pread(fd, _ZIP_TAIL, max(0, size - _ZIP_TAIL)), size)
    return found
