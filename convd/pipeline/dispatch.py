"""Intake to claim: the loop that takes settled files from the intake, claims them into
``work/`` and starts an item for each, and the retries of items kept by an internal error.

The dispatcher is the one owner of the daemon's in-flight items
(``Context.items``): it registers an item when it starts it, so the claim
limit counts it at once, and unregisters it when it ends.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
import structlog

from convd import protocol
from convd.config import Config
from convd.pipeline.context import Context
from convd.pipeline.item import Item
from convd.pipeline.layout import Claim
from convd.pipeline.queue import Intake
from convd.pipeline.runner import finish_handoff, run_item
from convd.pipeline.spool import ClaimNotDurable, Spool

__all__ = ["STUCK_RETRY", "STUCK_RETRY_MAX", "Dispatcher"]

log = structlog.get_logger(__name__)

# An item kept in work/ by an internal error is tried again after this,
# doubling up to the maximum (and at every start).
STUCK_RETRY = 60.0
STUCK_RETRY_MAX = 3600.0


class Dispatcher:
    """Claims what the intake says is ready and runs each claim as an item, up to the claim limit."""

    def __init__(self, cfg: Callable[[], Config], spool: Spool, intake: Intake, ctx: Context, *,
                 stopping: anyio.Event, stuck: set[str], on_turn: Callable[[], Awaitable[None]],
                 on_item_done: Callable[[Item], None]) -> None:
        """``cfg``: the config in force (a reload swaps it); ``stuck``: the names of items kept in
        work/ by an internal error (the monitor reports them); ``on_turn``: the daemon's work at each
        turn of the loop, before it claims (reload, cancel requests); ``on_item_done``: an item ended."""
        self._cfg = cfg
        self.spool = spool
        self.intake = intake
        self.ctx = ctx
        self.stopping = stopping
        self.stuck = stuck
        self._on_turn = on_turn
        self._on_item_done = on_item_done
        self.wake = anyio.Event()
        self.items: anyio.abc.TaskGroup | None = None  # where items run; set by run()

    def kick(self) -> None:
        """Look again now (a change in incoming/, a signal, an item that ended)."""
        self.wake.set()

    def start_item(self, claim: Claim, *, read_soon: bool = False) -> Item:
        """Run ``claim`` as an item in the items' task group.

        ``read_soon``: a consumer reads the output as soon as it is published
        (a Glance hand-in, marked for priority), so it is written through the
        page cache (:attr:`Item.read_soon`).
        """
        assert self.items is not None, "start_item before run()"
        item = Item(claim=claim, cfg=self._cfg(), read_soon=read_soon)
        # Registered now so the claim limit counts it at once.
        self.ctx.items[claim.name] = item
        self.items.start_soon(self._process, item)
        return item

    async def items_group(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        """The task group items run in (cancels and take-overs start theirs there too)."""
        async with anyio.create_task_group() as items:
            self.items = items
            task_status.started(items)
            await anyio.sleep_forever()

    async def _process(self, item: Item) -> None:
        """Run an item; one kept in work/ by an error of convd's own is retried with backoff."""
        name, delay = item.name, STUCK_RETRY
        while True:
            self.ctx.items[name] = item  # a retry's item is a new one
            try:
                if item.claim.pending is not None:
                    try:
                        await finish_handoff(item, self.ctx)
                    except Exception:
                        log.exception("cannot finish the handoff; kept in work/", item=name)
                else:
                    await run_item(item, self.ctx)
            finally:
                if self.ctx.items.get(name) is item:
                    del self.ctx.items[name]
                self._on_item_done(item)
                self.kick()
            if not os.path.lexists(item.claim.dir) or (
                    # Claimed before this daemon lost its lock (cut off): retried only if still ours.
                    item.claim.epoch != self.spool.epoch
                    and not await anyio.to_thread.run_sync(self._kept_after_loss, name)):
                self.stuck.discard(name)
                return
            self.stuck.add(name)
            log.warning("kept in work/ after an internal error; will retry", item=name, retry_in=delay)
            await anyio.sleep(delay)
            while True:
                try:
                    claim = await anyio.to_thread.run_sync(self.spool.load_claim, name)
                    break
                except OSError as exc:  # e.g. a shared filesystem's EIO: later, and the daemon goes on
                    log.error("cannot read a kept item; will retry", item=name, error=str(exc))
                    await anyio.sleep(delay)
            if not await anyio.to_thread.run_sync(self.spool.owns, claim):
                log.warning("a kept item was adopted by another instance; left to it", item=name)
                self.stuck.discard(name)
                return
            delay = min(delay * 2, STUCK_RETRY_MAX)
            item = Item(claim=claim, cfg=self._cfg())

    def _kept_after_loss(self, name: str) -> bool:
        """Whether ``work/<instance>/NAME`` is still this daemon's to run again (blocking):
        there, and not adopted by another instance while this one was cut off."""
        try:
            return self.spool.owns(self.spool.load_claim(name))
        except OSError:
            return False

    def _claim_limit(self) -> int:
        # Claim a little ahead of the workers so detection overlaps conversion,
        # but leave the backlog in incoming/ where other instances can take it.
        return self._cfg().convert.max_workers * 2

    async def run(self) -> None:
        """Claim and start items until the daemon stops."""
        while not self.stopping.is_set():
            # A fresh event before looking, so a kick while we claim is not lost.
            self.wake = anyio.Event()
            await self._on_turn()
            room = self._claim_limit() - len(self.ctx.items)
            names, wait = self.intake.ready(limit=room) if room > 0 else ([], None)
            wanted = []
            for name in names:
                if name in self.ctx.items:
                    self.intake.defer(name)  # same name still in flight: it waits in incoming/
                else:
                    wanted.append(name)
            # One thread hop and one pair of directory fsyncs for the whole batch.
            claimed = {}
            if wanted and not self.stopping.is_set():
                claimed = await anyio.to_thread.run_sync(self._claim_all, wanted)
            for name, claim in claimed.items():
                if isinstance(claim, FileExistsError):
                    self.intake.defer(name)  # an earlier item's work dir, kept after an internal error
                    continue
                if isinstance(claim, ClaimNotDurable):
                    log.error("claimed, but not durably; left in work/ for the next start or a take-over",
                              item=name, error=str(claim))
                    self.intake.taken(name)
                    self.intake.forget(name)
                    continue
                if isinstance(claim, OSError):
                    # e.g. a producer's directory we may not move, or a full disk:
                    # it stays in incoming/ and the next rescan tries again.
                    log.error("cannot claim; left in incoming/", item=name, error=str(claim))
                    self.intake.forget(name)
                    continue
                marked = name in self.intake.pending and self.intake.pending[name].priority
                self.intake.taken(name)
                self.intake.forget(name)
                if claim is not None:
                    log.info("claimed", item=name)
                    self.start_item(claim, read_soon=marked)
            with anyio.move_on_after(wait if wait is not None else 5.0):
                await self.wake.wait()

    def _claim_all(self, names: list[str]) -> dict[str, Claim | OSError | None]:
        """``Spool.claim_all``, then the claimed names' priority marks go (they served their turn)."""
        claimed = self.spool.claim_all(names)
        for name, claim in claimed.items():
            if claim is not None and not isinstance(claim, OSError):
                protocol.clear_priority(self.spool.incoming, name, claim.producer_uid)
        return claimed
