"""The daemon's side of cancelling (contract section 6): acting on the cancel requests in ``incoming/``.

``convd.cancel`` is the operator's side (``convd cancel``: write a request
and wait, or withdraw where no daemon will) and the helpers both sides use.
Here a running daemon withdraws an item it holds, or claims one still in
``incoming/`` and runs it withdrawn from the start, and removes settled and
stale requests.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import anyio
import structlog

from convd import cancel, protocol
from convd.config import Config
from convd.pipeline.item import Item
from convd.pipeline.layout import Claim, name_refused
from convd.pipeline.queue import Intake
from convd.pipeline.sidecars import CancelBook
from convd.pipeline.spool import Spool

__all__ = ["STALE_CANCEL", "CancelRequests"]

log = structlog.get_logger(__name__)

# A cancel request naming no item anywhere is removed after this long (a
# claim in progress elsewhere hides an item for a moment).
STALE_CANCEL = 30.0


class CancelRequests:
    """The cancel requests a daemon acts on, looked at again when :attr:`pending` says so."""

    def __init__(self, cfg: Callable[[], Config], spool: Spool, intake: Intake, items: dict[str, Item],
                 start_item: Callable[[Claim], Item]) -> None:
        """``cfg``: the config in force; ``items``: the daemon's items in flight, by name (read only);
        ``start_item``: runs a claim as an item (a request for one in ``incoming/`` claims it)."""
        self._cfg = cfg
        self.spool = spool
        self.intake = intake
        self.items = items
        self.start_item = start_item
        self.book = CancelBook(spool.incoming, name_refused)
        self.pending = True  # look for cancel requests at the next turn of dispatch

    def note(self) -> None:
        """Something a request may wait for happened (a new request, an item ended or was adopted)."""
        self.pending = True

    async def handle(self) -> None:
        """Act on every cancel request in ``incoming/`` if :attr:`pending`; settled ones are removed."""
        if not self.pending:
            return
        self.pending = False
        cfg = self._cfg()
        paths = cancel.spool_paths(cfg)
        refused, over = await anyio.to_thread.run_sync(self.book.refresh)
        for filename, reason in refused:
            log.warning("cancel request refused; set aside", request=filename, reason=reason)
        if over:
            log.warning("too many cancel requests; the newest were refused and set aside", refused=over,
                        limit=self.book.limit)
        if not self.book.entries:
            return
        settled = await anyio.to_thread.run_sync(_names_with_records, paths)
        for req in [e.request for e in self.book.entries.values()]:
            try:
                await self._cancel(cfg, req, paths, settled)
            except OSError as exc:
                log.error("cannot act on a cancel request", item=req.name, error=str(exc))

    async def _cancel(self, cfg: Config, req: protocol.CancelRequest, paths: protocol.SpoolPaths,
                      settled: set[str]) -> None:
        name, msg = req.name, cancel.message(req.reason)
        item = self.items.get(name)
        if item is not None:
            try:
                inode: int | None = os.lstat(item.claim.dropped).st_ino
            except FileNotFoundError:
                inode = None
            if req.matches(inode):
                if self._foreign(req, item.claim.producer_uid):
                    return
                if item.withdrawn is None and item.withdraw(msg):
                    log.info("cancel requested", item=name, stage=item.stage.value, reason=req.reason)
                return  # settled when it lands (a publish under way finishes: the cancel is refused)
        where = cancel.locate(cfg, name)
        if where.place == "incoming" and req.matches(where.inode) and item is None:
            if self._foreign(req, where.uid):
                return  # nothing claimed: the intake takes it in its turn
            try:
                claim = await anyio.to_thread.run_sync(self.spool.claim, name)
            except FileExistsError:
                return  # an earlier item's work dir; the request waits
            if claim is not None:
                self.intake.forget(name)
                protocol.clear_priority(self.spool.incoming, name, claim.producer_uid)
                # Checked again on what was claimed: another file may have taken the name since.
                if self._foreign(req, claim.producer_uid):
                    self.start_item(claim)
                    return
                log.info("cancelled before conversion", item=name, reason=req.reason)
                # Run like any claim, withdrawn from the start: the runner
                # rejects it, and a failing disk leaves it to the dispatcher's
                # retries (counted as stuck) rather than stranded in work/.
                self.start_item(claim).withdraw(msg)
            return
        if where.place == "work":
            return  # the instance holding it acts (or `convd cancel`, or the next start)
        found = None
        if name in settled:
            found = await anyio.to_thread.run_sync(protocol.find_record, paths, name, req.inode)
        # Stale by convd's clock, never the file's own date (a producer's
        # "requested_at" in the future must not keep a request alive).
        if found is not None or self.book.age(name) > STALE_CANCEL:
            # Settled (in failed/, or published before the request: refused),
            # or naming nothing: a stale request must not cancel a later item.
            self.book.clear(name)


    def _foreign(self, req: protocol.CancelRequest, producer: int | None) -> bool:
        """Whether ``req`` is not the producer's of the item it would cancel (nor root's or
        convd's): then it is set aside and logged, and the item goes on uncancelled."""
        foreign = protocol.foreign_sidecar(req.uid, producer)
        if foreign is None:
            return False
        log.warning("sidecar not the producer's; ignored", item=req.name,
                    sidecar=f"{protocol.CANCEL_PREFIX}{req.name}", reason=str(foreign), uid=req.uid,
                    producer_uid=producer)
        self.book.refuse(req.name)
        return True


def _names_with_records(paths: protocol.SpoolPaths) -> set[str]:
    """Every NAME with a record in ``outgoing/`` or ``failed/`` (``NAME.json``, ``NAME.N.json``):
    one listing of each, so a cancel request looks for its record only where one may be."""
    names: set[str] = set()
    for d in (paths.outgoing, paths.failed):
        try:
            entries = os.listdir(d)
        except FileNotFoundError:
            continue
        for entry in entries:
            if not entry.endswith(".json") or entry.startswith("."):
                continue
            base = entry[:-5]
            names.add(base)
            stem, _, n = base.rpartition(".")
            if stem and n.isdigit():
                names.add(stem)
    return names
