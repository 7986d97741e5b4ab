"""VHD (qemu's vpc) metadata checks, as qemu 7.2 reads the format.

Sources: Microsoft's "Virtual Hard Disk Image Format Specification";
block/vpc.c vpc_open.

:func:`check` is this format's entry in :data:`convd.image.integrity.CHECKS`:
it reads the header and allocation tables through an
:class:`~convd.image.reader.ImageFile` and returns the virtual size in bytes
as qemu-img 7.2 reads it (None when the format holds none of its own).
"""

from __future__ import annotations

import itertools
import os
import struct
from array import array

from convd.errors import CorruptImage, UnsafeImage
from convd.image.reader import SECTOR, ImageFile, round_up, u32_table
from convd.image.signatures import DELTA

__all__ = ["SIZE_RULE_CHS", "SIZE_RULE_CURRENT", "check", "footer", "size_rule", "virtual_size"]

_VHD_MAX_GEOMETRY = 65535 * 16 * 255
# Blocks whose overlap is checked (8 MiB of offsets: 2 TiB of 2 MiB blocks,
# all of what a VHD can hold); qemu checks none.
_OVERLAP_CAP = 1 << 20
_VHD_MAX_SECTORS = 0xFF000000
# The VHD specification's Current Size is the disk.  Only Virtual PC ("vpc ")
# and qemu before 2.6 ("qemu", whose current size is its geometry anyway)
# present the disk their CHS geometry covers.  qemu 7.2's block/vpc.c sizes
# every creator it does not list (VirtualBox "vbox", Azure "wa\0\0", ...) by
# geometry too, which cuts their tail; later qemu lists more creators.  convd
# decides by this rule and tells qemu-img (the vpc driver's
# ``force_size_calc``), so every qemu version reads the same disk.
_VHD_CHS_CREATORS = (b"vpc ", b"qemu")
# Guest bytes past a geometry-sized disk that convd reads to be sure they
# hold nothing (a geometry drops at most one cylinder, under 2 MiB).
_VHD_TAIL_CHECK = 64 << 20
SIZE_RULE_CHS = "chs"
SIZE_RULE_CURRENT = "current_size"
_VHD_LOCATOR_CODES = {b"W2ru": "utf-16-le", b"W2ku": "utf-16-le", b"Mac ": "utf-8", b"MacX": "utf-8"}


def size_rule(footer: bytes) -> str:
    """Which rule sizes the disk of a VHD footer: ``"chs"`` (cylinders × heads ×
    sectors × 512: Virtual PC, old qemu) or ``"current_size"`` (every other
    creator, and any VHD whose geometry is the maximal one, as block/vpc.c
    does even when told ``chs``).  The value is also the vpc driver's
    ``force_size_calc`` option that makes qemu-img read it so.
    """
    cyls, heads, secs = struct.unpack(">HBB", footer[56:60])
    if footer[28:32] in _VHD_CHS_CREATORS and cyls * heads * secs != _VHD_MAX_GEOMETRY:
        return SIZE_RULE_CHS
    return SIZE_RULE_CURRENT


def virtual_size(footer: bytes) -> int:
    """Virtual size in bytes of a VHD footer by :func:`size_rule`: the
    geometry's sectors, or ``current_size`` (block/vpc.c reads it in whole
    sectors, rounding down; :func:`convd.image.integrity.verify` refuses a size that is not)."""
    if size_rule(footer) == SIZE_RULE_CHS:
        cyls, heads, secs = struct.unpack(">HBB", footer[56:60])
        return cyls * heads * secs * SECTOR
    return struct.unpack(">Q", footer[48:56])[0] // SECTOR * SECTOR


def footer(fd: int, size: int) -> bytes:
    """A VHD's footer: the copy at the start of a dynamic disk, else the last 512 bytes."""
    head = os.pread(fd, SECTOR, 0)
    if head[:8] == b"conectix" or size < SECTOR:
        return head
    return os.pread(fd, SECTOR, size - SECTOR)


def _vhd_checksum_ok(block: bytes, at: int) -> bool:
    stored, = struct.unpack(">I", block[at:at + 4])
    return (~(sum(block[:at]) + sum(block[at + 4:]))) & 0xFFFFFFFF == stored


def _vhd_parent(f: ImageFile, dyn: bytes) -> str:
    """The parent's name as the differencing disk gives it (name field, then locators)."""
    names = []
    name = dyn[64:576].decode("utf-16-be", errors="replace").split("\0", 1)[0]
    if name:
        names.append(name)
    for k in range(8):
        code, _space, length, _res, offset = struct.unpack(">4sIIIQ", dyn[576 + 24 * k:600 + 24 * k])
        if code in _VHD_LOCATOR_CODES and 0 < length <= 1024 and offset + length <= f.size:
            text = os.pread(f.fd, length, offset).decode(_VHD_LOCATOR_CODES[code], errors="replace")
            text = text.split("\0", 1)[0]
            if text and text not in names:
                names.append(text)
    return ", ".join(repr(n) for n in names) or "(unnamed)"


def check(f: ImageFile) -> int:
    footer = f.read(0, 512, "VHD footer")
    fixed = footer[:8] != b"conectix"
    if fixed:
        footer = f.read(f.size - 512, 512, "VHD footer")
    if not _vhd_checksum_ok(footer, 64):
        raise f.corrupt("footer checksum is wrong")
    vsize = virtual_size(footer)
    rule = size_rule(footer)
    current, = struct.unpack(">Q", footer[48:56])
    creator = footer[28:32].decode("latin-1")
    disk_type, = struct.unpack(">I", footer[60:64])
    if vsize // SECTOR > _VHD_MAX_SECTORS:
        raise f.corrupt(f"virtual size {vsize} is over VHD's 2040 GiB")
    if vsize == 0:
        raise f.corrupt(f"footer gives no virtual size (creator {creator!r} is sized by "
                        f"{'CHS geometry' if rule == SIZE_RULE_CHS else 'current size'}, geometry "
                        f"{'/'.join(map(str, struct.unpack('>HBB', footer[56:60])))}, "
                        f"current size {current}): an empty disk")
    if rule == SIZE_RULE_CURRENT and current % SECTOR:
        # qemu-img reads whole sectors and cannot be told otherwise: it would drop the tail.
        raise f.corrupt(f"current size {current} is not a whole number of 512-byte sectors: qemu-img "
                        f"would drop its last {current % SECTOR} bytes")
    # A geometry-sized disk whose current size says more: the bytes between
    # must hold nothing, or the creator field does not tell which disk is meant.
    tail = (vsize, min(current, vsize + _VHD_TAIL_CHECK)) if rule == SIZE_RULE_CHS and current > vsize else None
    if fixed:
        if disk_type != 2:
            raise f.corrupt(f"footer at the end names disk type {disk_type}, not fixed (2)")
        if vsize > f.size - 512:
            raise f.past_end(f"the footer's disk of {vsize} bytes", vsize + 512)
        if tail is not None:
            lo, hi = tail[0], min(tail[1], f.size - 512)
            if lo < hi and f.read(lo, hi - lo, "VHD disk tail").strip(b"\0"):
                raise _vhd_tail_error(f, creator, vsize, current)
        return vsize
    if disk_type not in (3, 4):
        raise f.corrupt(f"footer at the start names disk type {disk_type}, not dynamic (3) or differencing (4)")
    dyn_off, = struct.unpack(">Q", footer[16:24])
    dyn = f.read(dyn_off, 1024, "VHD dynamic disk header")
    if dyn[:8] != b"cxsparse":
        raise f.corrupt(f"no dynamic disk header at {dyn_off:#x}")
    if not _vhd_checksum_ok(dyn, 36):
        raise f.corrupt("dynamic disk header checksum is wrong")
    if disk_type == 4:
        raise UnsafeImage(f"VHD is a differencing disk (Hyper-V .avhd, Virtual PC undo disk), {DELTA} "
                          f"{_vhd_parent(f, dyn)}: upload the merged disk (Merge-VHD, or qemu-img convert "
                          "with the parent beside it)", detected="vpc")
    bat_off, = struct.unpack(">Q", dyn[16:24])
    entries, block_size = struct.unpack(">II", dyn[28:36])
    if block_size < SECTOR or block_size & (block_size - 1):
        raise f.corrupt(f"block size {block_size} is not a power of two of at least 512")
    if entries * block_size < vsize:
        raise f.corrupt(f"block allocation table of {entries} entries cannot hold {vsize} bytes")
    bitmap = round_up(block_size // (8 * SECTOR), SECTOR)
    metadata = ((0, SECTOR, "footer copy"), (dyn_off, dyn_off + 1024, "dynamic disk header"),
                (bat_off, bat_off + entries * 4, "block allocation table"))
    # The spec ends every dynamic VHD with a footer (qemu reads the copy at
    # the start); where one is there, a block running into it reads it back.
    trailing = f.size >= 2 * SECTOR and f.read(f.size - SECTOR, 8, "VHD footer") == b"conectix"
    starts = array("Q")  # for the overlap check, up to _OVERLAP_CAP blocks (memory stays bounded)
    for first, data in f.slices(bat_off, entries * 4, "VHD block allocation table", 4):
        for i, sec in enumerate(u32_table(data, True)):
            if sec == 0xFFFFFFFF:
                continue
            block = first + i
            start = sec * SECTOR
            need = bitmap + min(block_size, max(1, vsize - block * block_size))
            for lo, hi, what in metadata:
                if start < hi and start + bitmap + block_size > lo:
                    raise f.corrupt(f"BAT entry {block} points a block at {start:#x} over the {what}")
            if start + need > f.size:
                f.data_past_end(f"BAT entry {block} (block at {start:#x})", start + need)
            elif trailing and start + need > f.size - SECTOR:  # the footer at the end is metadata too
                raise f.corrupt(f"BAT entry {block} points a block at {start:#x} over the footer at the end")
            elif len(starts) < _OVERLAP_CAP:
                starts.append(start)
    ordered = sorted(starts)
    for a, b in itertools.pairwise(ordered):
        if b < a + bitmap + block_size:
            raise f.corrupt(f"two BAT entries share the file's bytes at {b:#x} (blocks overlap)")
    if tail is not None:
        for block in range(tail[0] // block_size, min(entries, -(-tail[1] // block_size))):
            sec, = struct.unpack(">I", f.read(bat_off + 4 * block, 4, "VHD block allocation table"))
            if sec == 0xFFFFFFFF:
                continue
            lo = max(tail[0], block * block_size)
            hi = min(tail[1], (block + 1) * block_size)
            at = sec * SECTOR + bitmap + lo - block * block_size
            if lo < hi and at + hi - lo <= f.size and os.pread(f.fd, hi - lo, at).strip(b"\0"):
                raise _vhd_tail_error(f, creator, vsize, current)
    return vsize


def _vhd_tail_error(f: ImageFile, creator: str, vsize: int, current: int) -> CorruptImage:
    return f.corrupt(f"creator {creator!r} sizes the disk by its CHS geometry ({vsize} bytes), but data lies "
                     f"past it, inside the current size ({current} bytes): which disk is meant is unclear "
                     "(convd drops no tail)")
