"""Clean up: release the reservation and remove the item's work directory once
its result is durable; or, for a rejected item, quarantine the original in ``failed/``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio

from convd import record
from convd.errors import ItemError
from convd.pipeline.item import Item, Stage
from convd.pipeline.layout import SOURCE
from convd.pipeline.spool import Spool
from convd.stages import verify

if TYPE_CHECKING:
    from convd.pipeline.context import Context

__all__ = ["cleanup", "quarantine", "reject"]


async def cleanup(item: Item, ctx: Context) -> Stage:
    ctx.release(item)
    # Shielded: the result is published; a shutdown now should not leave the
    # claim for recovery to tidy.
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(ctx.spool.remove_claim, item.claim)
    return Stage.DONE


def reject(spool: Spool, item: Item, error: ItemError) -> dict[str, Any]:
    """Move the item's original bytes to ``failed/`` with its record; returns the record (blocking)."""
    spool.fence(item.claim)  # adopted while this node was cut off: the adopter decides
    rec = record.build(item, "failed", error=error)
    spool.discard_output(item.claim)
    final = spool.free_failed_name(item.name)
    spool.stage_handoff(item.claim, "failed", final, SOURCE, rec)
    spool.complete_handoff(item.claim)
    spool.remove_claim(item.claim)
    return rec


async def quarantine(item: Item, ctx: Context, error: ItemError) -> None:
    """The original bytes, untouched, to ``failed/`` with a record saying why."""
    ctx.release(item)
    await verify.settle(item, ctx, failing=True)  # an item that failed before its digests were taken
    rec = await anyio.to_thread.run_sync(reject, ctx.spool, item, error)
    ctx.failed(item, rec)
