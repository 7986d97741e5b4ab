"""VDI metadata checks, as qemu 7.2 reads the format.

Sources: block/vdi.c vdi_open, vdi_check (the VirtualBox 1.1 header).

:func:`check` is this format's entry in :data:`convd.image.integrity.CHECKS`:
it reads the header and allocation tables through an
:class:`~convd.image.reader.ImageFile` and returns the virtual size in bytes
as qemu-img 7.2 reads it (None when the format holds none of its own).
"""

from __future__ import annotations

import struct

from convd.errors import UnsafeImage
from convd.image.reader import SECTOR, ImageFile, round_up, u32_table
from convd.image.signatures import DELTA

__all__ = ["check"]

_VDI_UNALLOCATED = 0xFFFFFFFE  # and 0xffffffff: entries at or above are not in the file
_VDI_TYPES = {1: "dynamic", 2: "static", 3: "undo", 4: "differencing"}
_VDI_HEADER_END = 0x200  # pre-header (64 bytes) + the 1.1 header, padded to a sector


def _uuid(raw: bytes) -> str:
    """A VirtualBox (little-endian) UUID as text."""
    a, b, c = struct.unpack("<IHH", raw[:8])
    return f"{a:08x}-{b:04x}-{c:04x}-{raw[8:10].hex()}-{raw[10:16].hex()}"


def check(f: ImageFile) -> int:
    h = f.read(0, 512, "VDI header")
    version, _hsize, itype = struct.unpack("<III", h[0x44:0x50])
    off_bmap, off_data = struct.unpack("<II", h[0x154:0x15C])
    sector_size, = struct.unpack("<I", h[0x168:0x16C])
    disk_size, block_size, _extra, blocks, allocated = struct.unpack("<QIIII", h[0x170:0x188])
    link, parent = h[0x1A8:0x1B8], h[0x1B8:0x1C8]
    # A header that is no valid VDI is corrupt before any reference is read out of it.
    if version != 0x00010001:
        raise f.corrupt(f"unknown VDI version {version >> 16}.{version & 0xFFFF} (qemu-img reads 1.1)")
    if itype not in _VDI_TYPES:
        raise f.corrupt(f"unknown VDI image type {itype}")
    if off_bmap % SECTOR or off_data % SECTOR or sector_size != SECTOR or block_size != 1 << 20:
        raise f.corrupt("block map, data offset, sector or block size is impossible")
    if blocks > 0x3FFFFFFF or disk_size > blocks * block_size:
        raise f.corrupt(f"disk size {disk_size} does not fit its {blocks} blocks")
    if any(parent) or itype in (3, 4):  # undo and differencing images hold changes to another
        raise UnsafeImage(f"VDI is a differencing image (image type {_VDI_TYPES[itype]}), {DELTA} "
                          f"{_uuid(parent)}: upload the merged disk (VBoxManage clonemedium of the "
                          "snapshot's state)", detected="vdi")
    if any(link):
        raise UnsafeImage(f"VDI is linked to image {_uuid(link)}", detected="vdi")
    if off_bmap + blocks * 4 > f.size:  # before sizing anything by a header's word
        raise f.past_end("VDI block map", off_bmap + blocks * 4)
    # Data blocks over the header or the block map would read back metadata
    # as guest data (qemu checks neither).
    metadata = ((0, _VDI_HEADER_END, "header"), (off_bmap, off_bmap + blocks * 4, "block map"))
    if off_bmap < _VDI_HEADER_END:
        raise f.corrupt(f"block map at {off_bmap:#x} lies over the header")
    seen = bytearray(-(-blocks // 8))
    counted = 0
    for first, data in f.slices(off_bmap, blocks * 4, "VDI block map", 4):
        for i, entry in enumerate(u32_table(data, False)):
            if entry >= _VDI_UNALLOCATED:
                continue
            block = first + i
            if entry >= blocks:
                raise f.corrupt(f"block map entry {block} names block {entry}; the image has {blocks}")
            if seen[entry >> 3] & (1 << (entry & 7)):
                raise f.corrupt(f"block map entry {block} reuses data block {entry}, already mapped")
            seen[entry >> 3] |= 1 << (entry & 7)
            counted += 1
            start = off_data + entry * block_size
            need = min(block_size, max(1, disk_size - block * block_size))
            for lo, hi, what in metadata:
                if start < hi and start + need > lo:
                    raise f.corrupt(f"block map entry {block} places data block {entry} at {start:#x}, "
                                    f"over the {what}")
            if start + need > f.size:
                f.data_past_end(f"block map entry {block} (data block {entry} at {start:#x})", start + need)
    if counted != allocated:
        raise f.corrupt(f"header counts {allocated} allocated blocks, the block map {counted}")
    return round_up(disk_size, SECTOR)  # vdi.c: odd sizes (VBoxManage convertfromraw) round up
