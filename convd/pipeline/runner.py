"""The runner: drives one item through the stages, retries transient failures,
quarantines rejected and withdrawn inputs, and on shutdown leaves the source for recovery."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator

import anyio
import structlog

from convd.errors import Cancelled, ConvertFailed, ItemError, NameConflict, Stopped, TransientError
from convd.pipeline.context import Context
from convd.pipeline.item import CANCELLABLE, Item, Stage
from convd.pipeline.sidecars import apply_layout
from convd.pipeline.spool import ClaimLost
from convd.qemu import img as qemu
from convd.stages import cleanup, convert, detect, publish, quarantine, reserve, unpack
from convd.stages import rbd as rbd_stages

__all__ = ["finish_handoff", "run_item"]

log = structlog.get_logger(__name__)

STAGES: dict[Stage, Callable[[Item, Context], Awaitable[Stage]]] = {
    Stage.UNPACK: unpack,
    Stage.DETECT: detect,
    Stage.RESERVE: reserve,
    Stage.CONVERT: convert,
    Stage.PUBLISH: publish,
    Stage.CLEANUP: cleanup,
}
# [publish] to = "rbd": the output goes straight into a Ceph pool.
RBD_STAGES: dict[Stage, Callable[[Item, Context], Awaitable[Stage]]] = {
    Stage.RESERVE: rbd_stages.reserve,
    Stage.CONVERT: rbd_stages.convert,
    Stage.PUBLISH: rbd_stages.publish,
}


async def _discard(item: Item, ctx: Context) -> None:
    ctx.release(item)
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(ctx.spool.discard_output, item.claim)


@contextlib.contextmanager
def _cancellable(item: Item) -> Iterator[anyio.CancelScope]:
    """A scope ``Item.withdraw`` may cancel, while the item is in a stage that allows it."""
    with anyio.CancelScope() as scope:
        item.scope = scope if item.stage in CANCELLABLE else None
        try:
            yield scope
        finally:
            item.scope = None


async def run_item(item: Item, ctx: Context) -> None:
    """Drive ``item`` to ``outgoing/`` or ``failed/``; never loses its source.

    The caller registers the item in ``ctx.items`` for as long as it runs
    (``convd.pipeline.dispatch`` in the daemon, ``convd.convert`` for one file).
    """
    structlog.contextvars.bind_contextvars(item=item.name)
    qemu.phase_timings.set(item.timings)  # this task's qemu-img runs add their times
    try:
        apply_layout(item)  # the producer's [target.*] for this item, before anything reads it
        while item.stage is not Stage.DONE:
            stage = item.stage
            if item.withdrawn is not None and stage in CANCELLABLE:
                raise Cancelled(item.withdrawn)
            structlog.contextvars.bind_contextvars(stage=stage.value)
            t0 = time.monotonic()
            try:
                with _cancellable(item) as scope:
                    run = RBD_STAGES.get(stage, STAGES[stage]) if ctx.rbd is not None else STAGES[stage]
                    item.stage = await run(item, ctx)
                if scope.cancelled_caught:
                    raise Cancelled(item.withdrawn or "cancelled")
            except TransientError as exc:
                await _discard(item, ctx)
                # A failure on a node cut off past its lease: the item may be the adopter's now.
                await anyio.to_thread.run_sync(ctx.spool.fence, item.claim)
                attempts = item.claim.attempts
                if attempts >= item.cfg.convert.max_attempts:
                    raise ConvertFailed(f"{exc} (after {attempts} attempts)") from None
                delay = item.cfg.convert.retry_backoff * 2 ** (attempts - 1)
                log.warning("convert failed, retrying", error=str(exc), attempt=attempts,
                            retry_in=round(delay, 1))
                ctx.on_retry(item, str(exc))
                # The discard took an unpacked disk with it: unpack again (and
                # a failure before detect, e.g. no room for a private copy: from the start).
                item.stage = Stage.UNPACK if item.container or item.inspection is None else Stage.RESERVE
                with _cancellable(item):
                    await anyio.sleep(delay)
                continue
            log.debug("stage done", duration=round(time.monotonic() - t0, 6), next=item.stage.value)
    except ItemError as exc:
        await _discard(item, ctx)
        with anyio.CancelScope(shield=True):
            try:
                await quarantine(item, ctx, exc)
            except ClaimLost as lost:
                _abandoned(lost)
            except Exception:
                # A full or failing disk: the source stays in work/ and the
                # next start rejects it again; the daemon carries on.
                log.exception("cannot quarantine; the source stays in work/ for the next start",
                              code=exc.code)
    except ClaimLost as lost:
        await _discard(item, ctx)
        _abandoned(lost)
    except Stopped:
        await _discard(item, ctx)
        log.info("stopped; source left for the next start")
    except anyio.get_cancelled_exc_class():
        # Shutdown: the source stays in work/ and the next start resumes it.
        await _discard(item, ctx)
        log.info("stopped; source left for the next start")
        raise
    except Exception:
        await _discard(item, ctx)
        log.exception("internal error; the source stays in work/")
    finally:
        if item.custody is not None:
            item.custody.close()  # the read lease ends with the item
        structlog.contextvars.unbind_contextvars("item", "stage")


def _abandoned(lost: ClaimLost) -> None:
    log.warning("claim lost to another instance; abandoned without publishing, moving or removing anything",
                reason=str(lost))


async def finish_handoff(item: Item, ctx: Context) -> None:
    """Recovery of an item that crashed after its record was staged: finish the move."""
    structlog.contextvars.bind_contextvars(item=item.name, stage="publish")
    claim = item.claim
    if claim.pending and "rbd" in claim.pending:  # renamed in the Ceph pool, not moved
        try:
            await rbd_stages.finish_handoff(item, ctx)
        finally:
            structlog.contextvars.unbind_contextvars("item", "stage")
        return
    try:
        await anyio.to_thread.run_sync(ctx.spool.fence, claim)
        await anyio.to_thread.run_sync(ctx.spool.complete_handoff, claim)
    except ClaimLost as lost:
        _abandoned(lost)
        return
    except FileExistsError:
        # outgoing/NAME was taken between the crash and now: a conflict after all.
        item.source = (claim.pending or {}).get("record", {}).get("source", {})
        await anyio.to_thread.run_sync(ctx.spool.unstage_handoff, claim)
        await quarantine(item, ctx, NameConflict(f"outgoing/{item.name} already exists"))
        return
    finally:
        structlog.contextvars.unbind_contextvars("item", "stage")
    pending = claim.pending or {}
    await anyio.to_thread.run_sync(ctx.spool.remove_claim, claim)
    log.info("recovered handoff", item=item.name, dest=pending.get("dest"))
    rec = pending.get("record", {})
    (ctx.on_published if pending.get("dest") == "outgoing" else ctx.on_failed)(item, rec)

