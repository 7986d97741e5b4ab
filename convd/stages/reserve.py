"""Reserve: estimate what the output will take and wait for that much workspace."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from convd import qemu
from convd.errors import TooLarge
from convd.pipeline.item import Item, Stage

if TYPE_CHECKING:
    from convd.pipeline.runner import Context

__all__ = ["MARGIN_BYTES", "estimate", "reserve"]

# Added to every estimate: a filesystem's metadata for the file, rounding.
MARGIN_BYTES = 1 << 20
MARGIN_FRACTION = 0.01
# Below this virtual size the virtual size itself (an upper bound for any
# target) is reserved without spawning qemu-img to measure.
CHEAP_BOUND = 64 << 20


async def estimate(item: Item, ctx: Context) -> int:
    assert item.inspection is not None
    insp, target = item.inspection, item.target_format
    path = str(item.claim.source)
    vsize = insp.virtual_size
    if vsize <= CHEAP_BOUND:
        need = vsize if target == "raw" else vsize + vsize // 64 + (1 << 20)
    elif target == "raw":
        need = await qemu.data_bytes(path, insp.qemu_format, ctx.block_size) if ctx.sparse else vsize
    else:
        need = await qemu.measure(path, insp.qemu_format, target)
    return need + int(need * MARGIN_FRACTION) + MARGIN_BYTES


async def reserve(item: Item, ctx: Context) -> Stage:
    if item.passthrough:
        return Stage.PUBLISH  # published by rename: no byte is written
    item.estimate = await estimate(item, ctx)
    if not ctx.ledger.could_ever_fit(item.estimate):
        raise TooLarge(
            f"the {item.target_format} output needs about {item.estimate} bytes; the workspace "
            f"({ctx.ledger.workspace} bytes) or the filesystem could never hold it"
        )
    t0 = time.monotonic()
    item.reservation = await ctx.ledger.reserve(item.name, item.estimate, str(item.claim.output))
    item.timings["wait_space"] += time.monotonic() - t0
    return Stage.CONVERT
