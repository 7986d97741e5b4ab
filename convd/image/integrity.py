"""Per-format metadata checks the inspector leaves to its callers.

oslo's ``format_inspector`` reads a header and answers "which format, how
big, anything dangerous in the header".  Before a conversion may be called
faithful convd must also know that qemu-img will read the disk that was
uploaded: every allocation-table entry points inside the file (a truncated
upload reads back as zeros otherwise), the format does not flag itself as
broken, no parent disk holds part of the data, and the virtual size is the
one qemu-img will convert.  Everything here reads metadata only (headers,
tables, grain markers), with bounded reads, never guest data.

Sources of the rules are qemu 7.2's block drivers (``block/qcow2*.c``,
``block/vmdk.c``, ``block/vdi.c``, ``block/vpc.c``, ``block/vhdx*.c``) and
the format specifications they implement.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable

from convd.image import qcow2, vdi, vhdx, vmdk, vpc
from convd.image.reader import ImageFile

__all__ = ["CHECKS", "MAGICS", "cut_short_header", "verify"]


# The registry the gate walks: qemu-img's format name -> its module's check.
CHECKS: dict[str, Callable[[ImageFile], int | None]] = {
    "qcow2": qcow2.check, "vmdk": vmdk.check, "vdi": vdi.check, "vpc": vpc.check, "vhdx": vhdx.check,
}
# Signatures of image formats whose header the inspector only recognises
# once 512 bytes are there: a shorter file carrying one is a header cut
# short, not a tiny raw disk.
MAGICS = ((0, b"QFI\xfb", "qcow2"), (0x40, b"\x7f\x10\xda\xbe", "vdi"), (0, b"QED\0", "qed"),
           (0, b"KDMV", "vmdk"), (0, b"conectix", "vpc"), (0, b"vhdxfile", "vhdx"))


def cut_short_header(fd: int, size: int) -> str | None:
    """The format whose signature starts a file too short for that format's header, or None."""
    if size >= 512:
        return None
    head = os.pread(fd, 512, 0)
    for offset, magic, fmt in MAGICS:
        if head[offset:offset + len(magic)] == magic:
            return fmt
    return None


def verify(fd: int, fmt: str, size: int, *, stop: threading.Event | None = None) -> int | None:
    """Check an image's own metadata; return its virtual size in bytes as qemu-img 7.2 reads it.

    ``fmt`` is qemu-img's name of the format the inspector found.  Returns
    None for formats without allocation metadata of their own (raw, gpt,
    iso, a VMDK descriptor file).  Raises
    ``CorruptImage`` (a table points past the end of the file, the format
    marks itself broken, a header field is impossible), ``UnsafeImage`` (a
    parent disk holds part of the data), ``UnsupportedFormat`` (encrypted)
    or ``Stopped``.  Reads metadata only: a few KiB of headers plus the
    allocation tables.
    """
    check = CHECKS.get(fmt)
    if check is None:
        return None
    f = ImageFile(fd, size, fmt, stop)
    try:
        vsize = check(f)
        f.raise_missing()
        return vsize
    except (struct.error, ValueError, IndexError, OverflowError) as exc:
        raise f.corrupt(f"metadata cannot be parsed: {exc}") from None
