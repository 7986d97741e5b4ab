"""What each target format can hold, as qemu-img 7.2 computes it: checked at detect,
so a conversion that must fail is refused once, before a byte is written.

One table keyed by ``(target format, subformat)``; ``None`` is the
subformat convd writes today (vpc dynamic, vmdk monolithicSparse, qcow2
with 64 KiB clusters).  A subformat with other limits gets its own row.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

from convd.errors import TooLarge
from convd.units import format_size

__all__ = ["LIMITS", "Layout", "Limit", "check_file_size", "check_virtual_size", "limit_for", "limit_for_layout"]


@dataclass(frozen=True)
class Limit:
    """A target's limits in bytes (None: none short of the filesystem's) and where they come from."""

    max_virtual_size: int | None
    max_file_size: int | None
    name: str  # how the message names the limit
    source: str  # where qemu computes it


class _Qcow2Layout(Protocol):
    @property
    def cluster_size(self) -> int: ...


class Layout(Protocol):
    """A ``[target.FMT]`` layout as :class:`convd.config.TargetConfig` holds it (only what is read here)."""

    @property
    def qcow2(self) -> _Qcow2Layout: ...


LIMITS: dict[tuple[str, str | None], Limit] = {
    # vpc_create: total sectors over VHD_MAX_SECTORS (0xff000000) is refused.
    ("vpc", None): Limit(0xFF000000 * 512, None, "VHD's 2040 GiB", "block/vpc.c VHD_MAX_SECTORS"),
    ("vpc", "dynamic"): Limit(0xFF000000 * 512, None, "VHD's 2040 GiB", "block/vpc.c VHD_MAX_SECTORS"),
    ("vpc", "fixed"): Limit(0xFF000000 * 512, None, "VHD's 2040 GiB", "block/vpc.c VHD_MAX_SECTORS"),
    ("vhdx", None): Limit(64 << 40, None, "VHDX's 64 TiB", "block/vhdx.h VHDX_MAX_IMAGE_SIZE"),
    # VDI_DISK_SIZE_MAX: VDI_BLOCKS_IN_IMAGE_MAX (0x1fffff80) blocks of 1 MiB.
    ("vdi", None): Limit(0x1FFFFF80 << 20, None, "VDI's 0x1fffff80 blocks of 1 MiB (just under 512 TiB)",
                         "block/vdi.c VDI_DISK_SIZE_MAX"),
    # A 32 MiB L1 table (QCOW_MAX_L1_SIZE) of 8-byte entries, each an L2
    # table of 8192 entries of 64 KiB clusters: 2 PiB.
    ("qcow2", None): Limit(2 << 50, None, "qcow2's 2 PiB with 64 KiB clusters", "block/qcow2.h QCOW_MAX_L1_SIZE"),
    # Grain table entries are 32-bit sector numbers: no grain may start
    # 2 TiB or more into the file, whatever the virtual size.
    ("vmdk", None): Limit(None, 1 << 41, "VMDK sparse extents' 2 TiB file (32-bit grain offsets)",
                          "block/vmdk.c get_cluster_offset"),
    ("vmdk", "monolithicSparse"): Limit(None, 1 << 41, "VMDK sparse extents' 2 TiB file (32-bit grain offsets)",
                                        "block/vmdk.c get_cluster_offset"),
    ("vmdk", "streamOptimized"): Limit(None, 1 << 41, "VMDK sparse extents' 2 TiB file (32-bit grain offsets)",
                                       "block/vmdk.c get_cluster_offset"),
}


def limit_for(target: str, subformat: str | None = None) -> Limit | None:
    """The row for ``target`` (qemu-img's name) and ``subformat``, else its default row; None for raw."""
    return LIMITS.get((target, subformat)) or LIMITS.get((target, None))


def limit_for_layout(target: str, layout: Layout | None = None) -> Limit | None:
    """The limits of a ``target`` output made with ``layout`` (``[target.FMT]``; None: the defaults).

    A qcow2's limit follows its cluster size ``c``: at most QCOW_MAX_L1_SIZE
    (32 MiB) of 8-byte L1 entries, each an L2 table of ``c / 8`` entries of
    ``c`` bytes (block/qcow2.h), i.e. ``c * c * 512 KiB``; 2 PiB at 64 KiB.
    """
    if layout is None:
        return limit_for(target)
    if target == "qcow2":
        c = layout.qcow2.cluster_size
        base = LIMITS["qcow2", None]
        return replace(base, max_virtual_size=c * c * (512 << 10),
                       name=f"qcow2's {format_size(c * c * (512 << 10))} with {format_size(c)} clusters")
    sub = getattr(getattr(layout, target, None), "subformat", None)
    return limit_for(target, sub)


def check_virtual_size(target: str, virtual_size: int, subformat: str | None = None, *,
                       layout: Layout | None = None) -> None:
    """Raise ``TooLarge`` naming the limit when a ``target`` image cannot hold ``virtual_size`` bytes."""
    limit = limit_for_layout(target, layout) if layout is not None else limit_for(target, subformat)
    if limit is not None and limit.max_virtual_size is not None and virtual_size > limit.max_virtual_size:
        raise TooLarge(f"virtual size {format_size(virtual_size)} ({virtual_size} bytes) is over {limit.name} "
                       f"({limit.max_virtual_size} bytes), the most a {target} target can hold")


def check_file_size(target: str, estimate: int, subformat: str | None = None, *,
                    layout: Layout | None = None) -> None:
    """Raise ``TooLarge`` when a ``target`` output estimated at ``estimate`` bytes cannot be written."""
    limit = limit_for_layout(target, layout) if layout is not None else limit_for(target, subformat)
    if limit is not None and limit.max_file_size is not None and estimate > limit.max_file_size:
        raise TooLarge(f"the {target} output needs about {format_size(estimate)}, over {limit.name}")
