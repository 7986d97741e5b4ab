"""VHDX metadata checks, as qemu 7.2 reads the format.

Sources: Microsoft's [MS-VHDX]; block/vhdx.c vhdx_open, vhdx_parse_metadata.

:func:`check` is this format's entry in :data:`convd.image.integrity.CHECKS`:
it reads the header and allocation tables through an
:class:`~convd.image.reader.ImageFile` and returns the virtual size in bytes
as qemu-img 7.2 reads it (None when the format holds none of its own).
"""

from __future__ import annotations

import struct
import uuid

from convd.errors import CorruptImage, UnsafeImage, UnsupportedFormat
from convd.image.reader import ImageFile, u64_table
from convd.image.signatures import DELTA

__all__ = ["check"]

def _guid(text: str) -> bytes:
    return uuid.UUID(text).bytes_le


_VHDX_BAT = _guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
_VHDX_METADATA = _guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
_VHDX_FILE_PARAMS = _guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
_VHDX_DISK_SIZE = _guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
_VHDX_LOGICAL_SECTOR = _guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
_VHDX_PARENT_LOCATOR = _guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
_VHDX_HAS_PARENT = 2
_VHDX_PRESENT = (6, 7)  # PAYLOAD_BLOCK_FULLY_PRESENT, _PARTIALLY_PRESENT


def _vhdx_parent(f: ImageFile, offset: int, length: int) -> str:
    """Paths from a VHDX parent locator (relative_path, absolute_win32_path, …)."""
    try:
        loc = f.read(offset, min(length, 64 << 10), "VHDX parent locator")
        count, = struct.unpack("<H", loc[18:20])
        found = []
        for k in range(min(count, 64)):
            ko, vo, kl, vl = struct.unpack("<IIHH", loc[20 + 12 * k:32 + 12 * k])
            key = loc[ko:ko + kl].decode("utf-16-le", errors="replace")
            value = loc[vo:vo + vl].decode("utf-16-le", errors="replace")
            if key != "parent_linkage":
                found.append(f"{key} {value!r}")
        return ", ".join(found) or "(unnamed)"
    except (struct.error, CorruptImage):
        return "(unreadable locator)"


def check(f: ImageFile) -> int:
    regions = f.read(0x30000, 64 << 10, "VHDX region table")
    if regions[:4] != b"regi":
        raise f.corrupt("no region table at 192 KiB")
    count, = struct.unpack("<I", regions[8:12])
    if count > 2047:
        raise f.corrupt(f"region table of {count} entries is over VHDX's 2047")
    bat = meta = None
    for k in range(count):
        guid, off, length, _req = struct.unpack("<16sQII", regions[16 + 32 * k:48 + 32 * k])
        if off + length > f.size:
            raise f.past_end(f"region {k}", off + length)
        if off % (1 << 20):
            raise f.corrupt(f"region {k} at {off:#x} is not 1 MiB-aligned")
        if guid == _VHDX_BAT:
            bat = (off, length)
        elif guid == _VHDX_METADATA:
            meta = (off, length)
    if bat is None or meta is None:
        raise f.corrupt("region table lacks the BAT or the metadata region")
    table = f.read(meta[0], min(meta[1], 64 << 10), "VHDX metadata table")
    if table[:8] != b"metadata":
        raise f.corrupt("no metadata table at the metadata region")
    n, = struct.unpack("<H", table[10:12])
    items: dict[bytes, tuple[int, int]] = {}
    for k in range(min(n, 2047)):
        guid, off, length = struct.unpack("<16sII", table[32 + 32 * k:56 + 32 * k])
        items[guid] = (meta[0] + off, length)
    try:
        params = f.read(items[_VHDX_FILE_PARAMS][0], 8, "VHDX file parameters")
        vsize, = struct.unpack("<Q", f.read(items[_VHDX_DISK_SIZE][0], 8, "VHDX virtual disk size"))
        lss, = struct.unpack("<I", f.read(items[_VHDX_LOGICAL_SECTOR][0], 4, "VHDX logical sector size"))
    except KeyError:
        raise f.corrupt("metadata lacks file parameters, virtual disk size or sector size") from None
    block_size, pflags = struct.unpack("<II", params)
    if lss not in (512, 4096):
        raise f.corrupt(f"logical sector size {lss} is not 512 or 4096")
    if lss == 4096:
        # MS-VHDX allows it; qemu's vhdx driver opens 512-byte sectors only (ENOTSUP).
        raise UnsupportedFormat("a VHDX with 4096-byte logical sectors, which qemu-img cannot read: convert it "
                                "on Windows (Convert-VHD) to one with 512-byte sectors, or export it as raw, "
                                "and upload that", detected="vhdx")
    if block_size < 1 << 20 or block_size > 256 << 20 or block_size & (block_size - 1):
        raise f.corrupt(f"block size {block_size} is not a power of two between 1 MiB and 256 MiB")
    if vsize == 0 or vsize > 64 << 40:
        raise f.corrupt(f"virtual disk size {vsize} is impossible")
    if pflags & _VHDX_HAS_PARENT or _VHDX_PARENT_LOCATOR in items:
        where = items.get(_VHDX_PARENT_LOCATOR)
        parent = _vhdx_parent(f, *where) if where else "(no locator)"
        raise UnsafeImage(f"VHDX is a differencing disk (Hyper-V .avhdx checkpoint), {DELTA} {parent}: "
                          "upload the merged disk (Merge-VHD, or delete the checkpoints)", detected="vhdx")
    chunk_ratio = (1 << 23) * lss // block_size
    data_blocks = -(-vsize // block_size)
    total = data_blocks + (data_blocks - 1) // chunk_ratio
    if total * 8 > bat[1]:
        raise f.corrupt(f"BAT region of {bat[1]} bytes cannot hold {total} entries")
    seen = bytearray((f.size >> 20) // 8 + 1)  # payload blocks start on MiB boundaries inside the file
    for first, data in f.slices(bat[0], total * 8, "VHDX BAT", 8):
        for i, entry in enumerate(u64_table(data, False)):
            index = first + i
            if (index + 1) % (chunk_ratio + 1) == 0:
                continue  # a sector bitmap entry (only used by differencing disks)
            if entry & 7 not in _VHDX_PRESENT:
                continue
            block = index - index // (chunk_ratio + 1)
            start = (entry >> 20) << 20
            need = min(block_size, max(1, vsize - block * block_size))
            if start + need > f.size:
                f.data_past_end(f"BAT entry {index} (payload block {block} at {start:#x})", start + need)
                continue
            mib = start >> 20
            if seen[mib >> 3] & (1 << (mib & 7)):
                raise f.corrupt(f"BAT entry {index} reuses the payload block at {start:#x}")
            seen[mib >> 3] |= 1 << (mib & 7)
    if vsize % lss:
        raise f.corrupt(f"virtual disk size {vsize} is not a whole number of {lss}-byte sectors "
                        "(MS-VHDX 2.6.2.4); qemu-img would drop its tail")
    return vsize
