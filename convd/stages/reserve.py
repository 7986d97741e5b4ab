"""Reserve: estimate what the output will take and wait for that much workspace."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import structlog

from convd.errors import TooLarge, UnsupportedFormat
from convd.image import targets
from convd.pipeline.item import Item, Stage
from convd.qemu import img as qemu

if TYPE_CHECKING:
    from convd.pipeline.context import Context

__all__ = ["MARGIN_BYTES", "estimate", "reserve", "settle"]

log = structlog.get_logger(__name__)

# Added to every estimate: a filesystem's metadata for the file, rounding.
MARGIN_BYTES = 1 << 20
MARGIN_FRACTION = 0.01
# Up to this virtual size, or while the upper bound takes at most half of
# what is available, the upper bound is reserved without spawning qemu-img
# to measure: a spawn costs more than the over-reservation.
CHEAP_BOUND = 64 << 20


# The largest block a target allocates at once, as qemu-img 7.2 creates it:
# vmdk 64 KiB grains, vdi 1 MiB blocks, vpc 2 MiB blocks, vhdx blocks of
# up to 64 MiB (block/vhdx.c picks 8-64 MiB by virtual size).
_ALLOCATION_UNIT = {"vmdk": 64 << 10, "vdi": 1 << 20, "vpc": 2 << 20, "vhdx": 64 << 20}


def _metadata_bound(vsize: int, data: int) -> int:
    """An upper bound, in bytes, on the tables of a vmdk/vdi/vpc/vhdx target.

    vmdk: 4-byte grain-table entries per 64 KiB, twice (redundant tables),
    under vsize/8192; vpc: 4-byte BAT entries per 2 MiB plus a 512-byte
    bitmap per allocated block, under vsize/4096 + data/1024; vdi and vhdx
    tables are smaller still; headers, descriptor, vhdx log and region
    alignment fit in 16 MiB.
    """
    return vsize // 4096 + data // 1024 + (16 << 20)


async def estimate(item: Item, ctx: Context) -> int:
    """Bytes the output will take on disk, as its ``[target.FMT]`` layout writes it.

    A preallocated raw (``falloc``, ``full``) and a fixed VHD take their
    whole virtual size (plus the VHD's 512-byte footer); a qcow2 is measured
    by ``qemu-img measure`` with the same creation options (a compressed one
    as if uncompressed: an upper bound); the rest by their data.
    """
    assert item.inspection is not None
    insp, target = item.inspection, item.target_format
    layout = item.cfg.target
    path = str(item.claim.source)
    vsize = insp.virtual_size
    # An upper bound for any target: every guest byte, plus generous metadata
    # (qcow2: an 8-byte L2 entry and a 2-byte refcount per cluster, doubled,
    # for the small clusters [target.qcow2] cluster_size may ask for).
    bound = vsize if target == "raw" else vsize + vsize // 64 + (1 << 20)
    if target == "qcow2":
        bound = max(bound, vsize + vsize * 20 // layout.qcow2.cluster_size + (1 << 20))
    limit = targets.limit_for_layout(target, layout)
    capped = limit is not None and limit.max_file_size is not None and bound > limit.max_file_size
    preallocated = ((target == "raw" and layout.raw.preallocation != "off")
                    or (target == "vpc" and layout.vpc.subformat == "fixed"))
    if preallocated:
        # Every block is allocated (falloc, full) or may be written (a fixed
        # VHD is the raw disk and its footer): the whole disk.
        need = vsize + (512 if target == "vpc" else 0)
    elif (vsize <= CHEAP_BOUND or 2 * bound <= ctx.ledger.available()) and not capped:
        need = bound
    elif target == "raw":
        need = await qemu.data_bytes(path, insp.qemu_format, ctx.block_size,
                                     limits=item.cfg.detect, name=item.label,
                                     options=insp.driver_options) if ctx.sparse else vsize
    elif target == "qcow2":  # the only other target qemu-img 7.2 can measure
        need = await qemu.measure(path, insp.qemu_format, target, limits=item.cfg.detect, name=item.label,
                                  options=insp.driver_options,
                                  target_options=qemu.layout_args(target, layout, compress=False))
    elif any(a.startswith("-S") for a in item.cfg.qemu_args_for(insp.format) or ()):
        need = bound  # an operator's -S changes which zeros qemu-img writes: no data-based estimate
    else:
        # qemu-img writes only the source's data into a new sparse-format
        # image (it starts all zeros): each data extent rounded out to the
        # target's largest allocation unit, plus a bound on its tables.
        data = await qemu.data_bytes(path, insp.qemu_format, _ALLOCATION_UNIT[target],
                                     limits=item.cfg.detect, name=item.label, options=insp.driver_options)
        need = min(bound, data + _metadata_bound(vsize, data))
    return need + int(need * MARGIN_FRACTION) + MARGIN_BYTES


async def reserve(item: Item, ctx: Context) -> Stage:
    assert item.inspection is not None
    if item.passthrough and not item.cfg.target.is_default(item.target_format):
        # The source is already this format, but not in the layout asked for
        # ([target.FMT]): it is converted like any other.
        item.passthrough = False
    if item.passthrough:
        return Stage.PUBLISH  # published by rename: no byte is written
    multiple = item.cfg.target.vpc.size_multiple
    vsize = item.inspection.virtual_size
    if item.target_format == "vpc" and multiple and vsize % multiple:
        raise UnsupportedFormat(
            f"its virtual size ({vsize} bytes) is not a whole multiple of {multiple} bytes, "
            "which the vpc target requires ([target.vpc] size_multiple)"
        )
    item.estimate = await estimate(item, ctx)
    log.debug("estimated", bytes=item.estimate, target_format=item.target_format,
              layout=item.cfg.target.layout(item.target_format))
    targets.check_file_size(item.target_format, item.estimate, layout=item.cfg.target)
    if not ctx.ledger.could_ever_fit(item.estimate):
        raise TooLarge(
            f"the {item.target_format} output needs about {item.estimate} bytes; the workspace "
            f"({ctx.ledger.workspace} bytes) or the filesystem could never hold it"
        )
    t0 = time.monotonic()
    item.reservation = await ctx.ledger.reserve(item.name, item.estimate, str(item.claim.output))
    item.timings["wait_space"] += time.monotonic() - t0
    return Stage.CONVERT


def settle(item: Item, ctx: Context) -> int | None:
    """Trim the item's reservation to what its finished output takes on disk; the bytes now held, or None.

    Called as soon as ``qemu-img convert`` has exited successfully: the
    output is complete and no later step writes to it (publish only
    flushes, inspects, hashes and renames it), so from here to its publish
    the ledger holds exactly its allocated size (``st_blocks`` × 512, as
    ``Reservation.written`` counts it), never less.  An estimate that was an
    upper bound (a compressed qcow2, measured as if uncompressed; a
    streamOptimized VMDK; a fixed VHD written sparse) gives its surplus back
    to waiting items at once instead of when the item ends.  A reservation
    is only ever shrunk here: an output larger than its estimate keeps the
    estimate (the ledger's "outstanding" bytes already count it as written).
    """
    r = item.reservation
    if r is None or not r.output:
        return None
    try:
        # The file is qemu-img's and finished; lstat: a name in the item's own work directory.
        on_disk = os.lstat(r.output).st_blocks * 512
    except OSError:
        return None
    if on_disk < r.size and ctx.ledger.resize(r.key, max(on_disk, 1)):
        log.debug("settled", bytes=r.size, estimated=item.estimate, target_format=item.target_format)
    return r.size
