"""Clean up: release the reservation and remove the item's work directory once
its result is durable; or, for a rejected item, quarantine the original in ``failed/``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

from convd import record
from convd.errors import ItemError
from convd.pipeline.item import Item, Stage
from convd.pipeline.spool import SOURCE

if TYPE_CHECKING:
    from convd.pipeline.context import Context

__all__ = ["cleanup", "quarantine"]


async def cleanup(item: Item, ctx: Context) -> Stage:
    ctx.release(item)
    # Shielded: the result is published; a shutdown now should not leave the
    # claim for recovery to tidy.
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(ctx.spool.remove_claim, item.claim)
    return Stage.DONE


async def quarantine(item: Item, ctx: Context, error: ItemError) -> None:
    """The original bytes, untouched, to ``failed/`` with a record saying why."""
    ctx.release(item)
    rec = record.build(item, "failed", error=error)

    def handoff() -> None:
        ctx.spool.discard_output(item.claim)
        final = ctx.spool.free_failed_name(item.name)
        ctx.spool.stage_handoff(item.claim, "failed", final, SOURCE, rec)
        ctx.spool.complete_handoff(item.claim)
        ctx.spool.remove_claim(item.claim)

    await anyio.to_thread.run_sync(handoff)
    ctx.failed(item, rec)
