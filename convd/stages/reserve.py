"""Reserve: estimate what the output will take and wait for that much workspace."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from convd import qemu, targets
from convd.errors import TooLarge
from convd.pipeline.item import Item, Stage

if TYPE_CHECKING:
    from convd.pipeline.context import Context

__all__ = ["MARGIN_BYTES", "estimate", "reserve"]

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
    assert item.inspection is not None
    insp, target = item.inspection, item.target_format
    path = str(item.claim.source)
    vsize = insp.virtual_size
    # An upper bound for any target: every guest byte, plus generous metadata.
    bound = vsize if target == "raw" else vsize + vsize // 64 + (1 << 20)
    limit = targets.limit_for(target)
    capped = limit is not None and limit.max_file_size is not None and bound > limit.max_file_size
    if (vsize <= CHEAP_BOUND or 2 * bound <= ctx.ledger.available()) and not capped:
        need = bound
    elif target == "raw":
        need = await qemu.data_bytes(path, insp.qemu_format, ctx.block_size,
                                     limits=item.cfg.detect, name=item.label,
                                     options=insp.driver_options) if ctx.sparse else vsize
    elif target == "qcow2":  # the only other target qemu-img 7.2 can measure
        need = await qemu.measure(path, insp.qemu_format, target, limits=item.cfg.detect, name=item.label,
                                  options=insp.driver_options)
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
    if item.passthrough:
        return Stage.PUBLISH  # published by rename: no byte is written
    item.estimate = await estimate(item, ctx)
    targets.check_file_size(item.target_format, item.estimate)
    if not ctx.ledger.could_ever_fit(item.estimate):
        raise TooLarge(
            f"the {item.target_format} output needs about {item.estimate} bytes; the workspace "
            f"({ctx.ledger.workspace} bytes) or the filesystem could never hold it"
        )
    t0 = time.monotonic()
    item.reservation = await ctx.ledger.reserve(item.name, item.estimate, str(item.claim.output))
    item.timings["wait_space"] += time.monotonic() - t0
    return Stage.CONVERT
