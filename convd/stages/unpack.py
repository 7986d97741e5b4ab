"""Unpack: a dropped container (gzip, xz, zstd, bzip2, tar, OVA) becomes the disk inside it,
written to the item's work directory under the ledger; anything else goes straight to detect."""

from __future__ import annotations

import contextlib
import functools
import os
import time
from typing import TYPE_CHECKING

import anyio
import anyio.from_thread
import structlog

from convd import custody
from convd.bandwidth import Throttle
from convd.config import format_size
from convd.errors import (
    Cancelled,
    ItemError,
    TooLarge,
    TransientError,
    UnsafeImage,
    UnsupportedFormat,
)
from convd.image import containers
from convd.image.inspection import open_regular
from convd.pipeline.item import Item, Stage
from convd.pipeline.layout import PRIVATE, UNPACKED
from convd.stages import verify

if TYPE_CHECKING:
    from convd.pipeline.context import Context

__all__ = ["MAX_UNFINISHED_READS", "unpack", "unpack_limit"]

log = structlog.get_logger(__name__)

# A stream of unknown size starts with this much reserved (or its own size
# times _RATIO, if more), and grows by doubling.
_FIRST_GUESS = 64 << 20
_RATIO = 4
_DEFLATE_MAX_RATIO = 1032  # deflate's most output per input byte
# Times the daemon may die while unpacking one input before that input is quarantined
# (never a crash loop: systemd restarts the daemon, recovery would unpack it again).
MAX_UNFINISHED_READS = 3


class _NoRoomNow(TooLarge):
    """A growth denied for now: a TooLarge to :class:`containers.Budget` (which then
    looks less far ahead), a TransientError once it leaves the unpack."""


def unpack_limit(max_virtual_size: int) -> int:
    """Most bytes an unpacked disk may have: ``max_virtual_size`` plus room for a
    format's metadata (the reserve stage's bound for any target)."""
    return max_virtual_size + max_virtual_size // 64 + (1 << 20)


async def unpack(item: Item, ctx: Context) -> Stage:
    # Custody first: the expectation's checks and digests read bytes no
    # producer can change, as everything after them does.
    await anyio.to_thread.run_sync(_take_custody, item, ctx)
    # The producer's expectation and the dropped file's digests, before anything
    # is converted; for a container, taken while it is unpacked.
    verifier = await verify.begin(item, ctx)
    try:
        stage = await _unpack(item, ctx, verifier)
    except ItemError:
        if verifier is not None and item.source_checksums is None:
            # The record's digests; and bytes that are not what was stated are
            # why the container would not unpack (a cut-short upload).
            await verifier.finish()
        raise
    if verifier is not None:
        await verifier.finish()
    return stage


async def _unpack(item: Item, ctx: Context, verifier: verify.Verifier | None) -> Stage:
    claim, cfg = item.claim, item.cfg
    dest = claim.dir / UNPACKED
    claim.unpacked = None

    def look() -> tuple[int, containers.Plan | None]:
        # One thread hop for all of it: most items are no container at all.
        _remove(str(dest))  # a retry's leftovers
        fd = open_regular(claim.dropped)
        try:
            plan = containers.plan(fd)
            if plan is None and item.custody is not None and item.custody.how == "copy" \
                    and claim.private is None:
                # (A container needs no copy: what it unpacks to is convd's own file.)
                private = claim.dir / PRIVATE
                _remove(str(private))
                custody.copy_private(fd, str(private), os.fstat(fd).st_size)
                claim.private = private
            return fd, plan
        except BaseException as exc:
            if isinstance(exc, ItemError):  # a container whose very start is damaged
                size = os.fstat(fd).st_size
                item.source = {"format": None, "size": size}
                item.container = {"container": [exc.detected], "size": size}
            os.close(fd)
            raise

    t0 = time.monotonic()
    fd, plan = await anyio.to_thread.run_sync(look)
    if plan is None:
        os.close(fd)
        return Stage.DETECT
    try:
        item.source = {"format": None, "size": plan.size}
        item.container = {"container": list(plan.kinds), "size": plan.size}
        off = [k for k in plan.kinds if k not in cfg.convert.containers]
        if off:
            raise UnsupportedFormat(f"{plan.description}: unpacking {', '.join(off)} is turned off "
                                    "([convert] containers)", detected=plan.kinds[0])
        cap = unpack_limit(cfg.limits.max_virtual_size)
        if plan.exact and plan.stated is not None and plan.stated > cap and len(plan.kinds) == 1:
            raise TooLarge(f"{plan.description} states it unpacks to {format_size(plan.stated)}, over "
                           f"max_virtual_size {format_size(cfg.limits.max_virtual_size)}")
        first = plan.stated if plan.stated is not None else max(_FIRST_GUESS, _RATIO * plan.size)
        if not plan.exact:  # a hint (gzip's ISIZE) may be anything: no more than deflate can give
            first = min(first, _DEFLATE_MAX_RATIO * plan.size)
        first = min(cap, max(first, 1 << 20))
        if plan.stated is None and not ctx.ledger.could_ever_fit(first):
            # Only a guess (a stream that states no size): start from the
            # dropped file's own size and grow; refuse only bytes really written.
            first = min(first, max(plan.size, 1 << 20))
        if plan.stated is None and item.unpack_floor:
            # An earlier attempt was denied growing to unpack_floor: ask for it
            # up front, in the queue like any item, holding nothing meanwhile.
            first = max(first, min(item.unpack_floor, cap, ctx.ledger.largest()))
        if not ctx.ledger.could_ever_fit(first):
            raise TooLarge(f"{plan.description} needs about {format_size(first)} unpacked; the workspace "
                           f"({format_size(ctx.ledger.workspace)}) or the filesystem could never hold it")
        key = f"{item.name}\0unpack"  # NUL: no item name can collide with it
        t1 = time.monotonic()
        item.unpack_reservation = await ctx.ledger.reserve(key, first, str(dest))
        item.timings["wait_space"] += time.monotonic() - t1

        def grow(total: int) -> None:  # from the unpacking thread
            if not anyio.from_thread.run_sync(ctx.ledger.could_ever_fit, total):
                raise TooLarge(f"{plan.description} unpacks to more than {format_size(total)}; the "
                               "workspace or the filesystem could never hold it")
            if not anyio.from_thread.run_sync(ctx.ledger.resize, key, total):
                # Other items hold the space.  Never wait for it while holding
                # ours: two streams that never end (bombs) would hold the
                # workspace between them, and every other item with it.  The
                # budget first looks less far ahead (as for TooLarge); if even
                # the bytes written cannot be had now, the unpack gives all it
                # holds back (TransientError), and the retry asks for the
                # look-ahead it was denied up front, in the queue: a stream that
                # fits gets there, one that does not runs into the workspace's
                # size (too_large) on its own.
                item.unpack_floor = max(item.unpack_floor, total)
                raise _NoRoomNow(f"no workspace free now to unpack {plan.description} past "
                                 f"{format_size(total)}; retried with that much reserved first")

        read = 0

        def progress(frac: float) -> None:  # from the unpacking thread, once a chunk
            nonlocal read
            done = int(frac * plan.size)
            throttle.spend(done - read)  # [convert] rate_limit, on the bytes read
            read = max(read, done)
            if item.withdrawn is not None:
                # Cancelled (convd cancel): the thread stops here, the
                # partial disk is removed and the dropped bytes go to failed/.
                raise Cancelled(item.withdrawn)
            item.progress = frac

        budget = containers.Budget(cap=cap, reserved=first, grow=grow)
        item.progress = 0.0
        if claim.reads_unfinished >= MAX_UNFINISHED_READS:
            raise UnsafeImage(f"convd stopped {claim.reads_unfinished} times while unpacking {plan.description}, "
                              "by a crash or an out-of-memory kill; it is quarantined so that it cannot "
                              "stop the daemon again")
        # Counted (fsynced) while the daemon's own process parses the container: a
        # death here is remembered at the next start; leaving in any other way is not.
        await anyio.to_thread.run_sync(ctx.spool.note_reading, claim, True)
        try:
            async with ctx.bandwidth.share() as rate:
                throttle = Throttle(rate, ctx.stop)
                try:
                    result = await anyio.to_thread.run_sync(functools.partial(
                        containers.unpack, fd, plan, str(dest), budget, stop=ctx.stop, on_progress=progress,
                        tap=verifier.feed if verifier is not None else None))
                except _NoRoomNow as exc:
                    raise TransientError(str(exc)) from None
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(OSError):
                await anyio.to_thread.run_sync(ctx.spool.note_reading, claim, False)
    finally:
        os.close(fd)
        item.timings["unpack"] = item.timings.get("unpack", 0.0) + time.monotonic() - t0
    claim.unpacked = dest
    item.container = {**result.as_dict(), "size": plan.size}
    # Reserved as much as was written, no more: the convert stage reserves its own.
    ctx.ledger.resize(key, max(result.size, 1))
    return Stage.DETECT


def _take_custody(item: Item, ctx: Context) -> None:
    """Take the dropped file into custody (:func:`convd.custody.take`) before its first read;
    once per item (a retry keeps it), never for ``convd convert``'s own file.

    A file that is not regular raises detect's ``NotRegularFile`` (from
    ``open_regular``); a refusal of the take (a writer, another name) is
    ``UnsafeImage``, with the file's size in the record."""
    claim = item.claim
    if claim.source_path is not None or item.custody is not None:
        return
    fd = open_regular(claim.dropped)
    try:
        item.custody = custody.take(fd, shared=ctx.shared, group=custody.group_of(str(claim.dir)))
    except ItemError:
        item.source = {"format": None, "size": os.fstat(fd).st_size}
        raise
    finally:
        os.close(fd)
    log.debug("source in custody", how=item.custody.how)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
