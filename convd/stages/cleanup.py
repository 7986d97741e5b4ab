"""Clean up: release the reservation and remove the item's work directory once
its result is durable; or, for a rejected item, quarantine the original in ``failed/``."""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from convd import custody, record
from convd.errors import ItemError, TransientError
from convd.pipeline.item import Item, Stage
from convd.pipeline.spool import PRIVATE, SOURCE, Claim, Spool

if TYPE_CHECKING:
    from convd.pipeline.context import Context

__all__ = ["cleanup", "quarantine", "reject"]

log = structlog.get_logger("convd.cleanup")


async def cleanup(item: Item, ctx: Context) -> Stage:
    ctx.release(item)
    # Shielded: the result is published; a shutdown now should not leave the
    # claim for recovery to tidy.
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(ctx.spool.remove_claim, item.claim)
    return Stage.DONE


def reject(spool: Spool, item: Item, error: ItemError) -> dict[str, Any]:
    """Move the item's original bytes to ``failed/`` with its record; returns the record (blocking)."""
    rec = record.build(item, "failed", error=error)
    spool.discard_output(item.claim)
    _own_the_bytes(item.claim)
    final = spool.free_failed_name(item.name)
    spool.stage_handoff(item.claim, "failed", final, SOURCE, rec)
    spool.complete_handoff(item.claim)
    spool.remove_claim(item.claim)
    return rec


def _own_the_bytes(claim: Claim) -> None:
    """Make the bytes ``failed/`` will keep convd's, where the dropped file is still its producer's.

    convd could not take the inode (no ``CAP_CHOWN``, a shared filesystem:
    ``copy`` custody) and read a private copy: that copy, the bytes convd
    judged, takes the dropped file's place; for a container (read as
    dropped) a copy is made now.  Otherwise the producer, still its owner,
    could rewrite ``failed/NAME`` after the fact.  Never for a file with
    another name (copying it would hand whatever that name is to convd's
    group) nor anything but a regular file; a copy that cannot be made
    (no space) leaves the dropped file, logged.
    """
    source = claim.dir / SOURCE
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return  # a link, or gone: detect's refusal already says what it is
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid == os.geteuid() or st.st_nlink != 1:
            return
        copy = claim.dir / PRIVATE
        if claim.private is None or not os.path.exists(copy):
            try:
                copy.unlink(missing_ok=True)
                custody.copy_private(fd, str(copy), st.st_size)
            except (OSError, TransientError) as exc:
                log.warning("failed/ keeps the producer's own file: no copy of it could be made", item=claim.name,
                            error=str(exc))
                return
        os.replace(copy, source)
        claim.private = None
    finally:
        os.close(fd)


async def quarantine(item: Item, ctx: Context, error: ItemError) -> None:
    """The original bytes, untouched, to ``failed/`` with a record saying why."""
    ctx.release(item)
    rec = await anyio.to_thread.run_sync(reject, ctx.spool, item, error)
    ctx.failed(item, rec)
