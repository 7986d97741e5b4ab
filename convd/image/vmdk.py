"""VMDK metadata checks, as qemu 7.2 reads the format.

Sources: VMware's "Virtual Disk Format 5.0" (hosted sparse extents, stream-
optimized); block/vmdk.c vmdk_open_vmdk4, get_cluster_offset,
vmdk_read_extent.

:func:`check` is this format's entry in :data:`convd.image.integrity.CHECKS`:
it reads the header and allocation tables through an
:class:`~convd.image.reader.ImageFile` and returns the virtual size in bytes
as qemu-img 7.2 reads it (None when the format holds none of its own).
"""

from __future__ import annotations

import os
import struct

from convd.errors import Stopped, UnsafeImage
from convd.image.reader import SECTOR, ImageFile, u32_table
from convd.image.signatures import DELTA

__all__ = ["check", "descriptor"]

_VMDK_GD_AT_END = 0xFFFFFFFFFFFFFFFF
_VMDK_FLAG_ZERO_GRAIN = 1 << 2
_VMDK_FLAG_COMPRESSED = 1 << 16
_VMDK_FLAG_MARKERS = 1 << 17


def _vmdk_descriptor_field(text: str, key: str) -> str | None:
    for line in text.splitlines():
        k, sep, v = line.partition("=")
        if sep and k.strip().lower() == key.lower():
            return v.strip().strip('"')
    return None


def descriptor(fd: int, size: int) -> str:
    """The VMDK's descriptor text (embedded after a sparse header, or the whole small file)."""
    head = os.pread(fd, 64, 0)
    if head[:4] == b"KDMV":
        desc_sec, desc_num = struct.unpack("<QQ", head[28:44])
        length = min(desc_num * SECTOR, (1 << 20) - 1)
        raw = os.pread(fd, length, desc_sec * SECTOR) if desc_sec else b""
    else:
        raw = os.pread(fd, min(size, (1 << 20) - 1), 0)
    return raw.split(b"\0", 1)[0].decode("ascii", errors="replace")


def check(f: ImageFile) -> int | None:
    if os.pread(f.fd, 4, 0) != b"KDMV":
        return None  # a descriptor alone: its extents are in other files (the inspector's to refuse)
    h = f.read(0, 512, "VMDK header")
    (_m, version, flags, capacity, grain, _ds, _dn, gtes, _rgd, gd, overhead) = struct.unpack(
        "<4sIIQQQQIQQQ", h[:72])
    if gd == _VMDK_GD_AT_END:
        footer = f.read(f.size - 1024, 512, "VMDK footer")
        if footer[:4] != b"KDMV":
            raise f.corrupt("grain directory is in a footer, but there is no footer at the end")
        flags, capacity, grain = struct.unpack("<IQQ", footer[8:28])
        gtes, = struct.unpack("<I", footer[44:48])
        gd, = struct.unpack("<Q", footer[56:64])
    if version > 3:
        raise f.corrupt(f"unknown VMDK version {version}")
    if grain == 0 or grain & (grain - 1) or grain > 0x200000:
        raise f.corrupt(f"grain size of {grain} sectors is impossible")
    if gtes == 0 or gtes > 512:
        raise f.corrupt(f"{gtes} entries per grain table is impossible (qemu reads up to 512)")
    grain_bytes = grain * SECTOR
    vsize = capacity * SECTOR
    gd_entries = -(-capacity // (grain * gtes))
    if gd_entries * 4 > 512 << 20:
        raise f.corrupt(f"grain directory of {gd_entries} entries is over qemu's limit")
    desc = descriptor(f.fd, f.size)
    parent_cid = _vmdk_descriptor_field(desc, "parentCID")
    hint = _vmdk_descriptor_field(desc, "parentFileNameHint")
    if hint or (parent_cid is not None and parent_cid.lower() != "ffffffff"):
        raise UnsafeImage(f"VMDK is a delta disk, {DELTA} {hint or '(no name given)'} "
                          f"(parentCID {parent_cid}): upload the consolidated disk (vmware-vdiskmanager -r, "
                          "or delete the snapshots)", detected="vmdk")
    compressed = bool(flags & _VMDK_FLAG_COMPRESSED)
    markers = bool(flags & _VMDK_FLAG_MARKERS)
    zero_grain = bool(flags & _VMDK_FLAG_ZERO_GRAIN)
    directory = u32_table(f.read(gd * SECTOR, gd_entries * 4, "VMDK grain directory"), False)
    seen_gt: set[int] = set()  # each grain table read once (the file bounds how many there are)
    for i, gt_sec in enumerate(directory):
        if not gt_sec:
            continue
        table = u32_table(f.read(gt_sec * SECTOR, gtes * 4, f"VMDK grain directory entry {i}"), False)
        if gt_sec in seen_gt:
            raise f.corrupt(f"grain directory entry {i} points to a grain table another entry uses")
        seen_gt.add(gt_sec)
        if f.stop is not None and f.stop.is_set():
            raise Stopped("integrity check interrupted by shutdown")
        # Entry 1 means "zeroed" only with the zero-grain flag (vmdk.c
        # VMDK_GTE_ZEROED); without it, qemu reads sector 1: the metadata.
        low = 1 if zero_grain else 0
        if not compressed and max(table) * SECTOR + grain_bytes <= f.size and \
                min((sec for sec in table if sec > low), default=overhead) >= overhead:
            continue  # every grain of this table lies whole inside the file, after the metadata
        for j, sec in enumerate(table):
            if sec == 0 or (sec == 1 and zero_grain):
                continue
            guest = (i * gtes + j) * grain_bytes
            start = sec * SECTOR
            where = f"grain table {i} entry {j} (guest offset {guest:#x})"
            if sec < overhead:  # the guest would read the header, descriptor or tables
                raise f.corrupt(f"{where} points into the metadata at the start of the file "
                                f"(sector {sec}; grains start at {overhead})")
            if compressed and markers:
                if start + 12 > f.size:
                    f.data_past_end(f"{where}, a compressed grain,", start + 12)
                    continue
                lba, length = struct.unpack("<QI", f.read(start, 12, f"{where}, a grain marker,"))
                if lba != guest // SECTOR:
                    raise f.corrupt(f"{where} points to a grain marker for sector {lba}, "
                                    f"not {guest // SECTOR}")
                if length == 0 or length > 2 * grain_bytes + SECTOR:
                    raise f.corrupt(f"{where}: a compressed grain of {length} bytes is impossible")
                if start + 12 + length > f.size:
                    f.data_past_end(f"{where}, a compressed grain,", start + 12 + length)
            elif compressed:
                if start >= f.size:
                    f.data_past_end(f"{where}, a compressed grain,", start + 1)
            else:
                need = min(grain_bytes, max(1, vsize - guest))
                if start + need > f.size:
                    f.data_past_end(f"{where}, a grain at {start:#x},", start + need)
    return vsize
