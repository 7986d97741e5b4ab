"""What the stages share while an item runs: the spool, the ledger, the worker
slots, what the filesystem can do, and the hooks that report results.

Its own module so that the runner (which drives the stages) and the stages
(which only use the context) never import each other.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog

from convd.bandwidth import Bandwidth
from convd.pipeline.item import Item
from convd.pipeline.ledger import Ledger
from convd.pipeline.spool import Spool

__all__ = ["Context"]

log = structlog.get_logger(__name__)


def _noop(*_: Any) -> None:
    return None


@dataclass
class Context:
    """What the stages share: the spool, the ledger, the worker slots, the hooks."""

    spool: Spool
    ledger: Ledger
    slots: anyio.CapacityLimiter
    sparse: bool = True
    block_size: int = 4096
    direct_io: bool = True
    # The spool is on a filesystem other hosts write to: a lease proves
    # nothing there, so every source is read from a private copy (convd.custody).
    shared: bool = False
    count_hashed: Callable[[int], None] = _noop
    on_published: Callable[[Item, dict[str, Any]], None] = _noop
    on_failed: Callable[[Item, dict[str, Any]], None] = _noop
    on_retry: Callable[[Item, str], None] = _noop
    items: dict[str, Item] = field(default_factory=dict)
    # [convert] rate_limit, shared by conversions, unpacking and checksumming.
    bandwidth: Bandwidth = field(default_factory=Bandwidth)
    # Set at shutdown so work in threads (checksums) gives up promptly.
    stop: threading.Event = field(default_factory=threading.Event)
    # [publish] to = "rbd": the pool (convd.stages.rbd.RbdTarget); None publishes to outgoing/.
    rbd: Any = None

    def release(self, item: Item) -> None:
        for r in (item.reservation, item.unpack_reservation):
            if r is not None:
                self.ledger.release(r.key)
        item.reservation = item.unpack_reservation = None
        if item.rbd_reservation is not None and self.rbd is not None:
            self.rbd.ledger.release(item.rbd_reservation.key)
        item.rbd_reservation = None

    def published(self, item: Item, rec: dict[str, Any]) -> None:
        # One constant event per published item; the figures are fields, so
        # log tools can key on the event.  ``timings`` has where the time went
        # (the record's, plus the handoff that follows the record).
        timings = {k: round(v, 6) for k, v in item.timings.items()}
        if rec["status"] == "converted":
            target = rec.get("target") or {}
            secs = max(item.timings["convert"], 1e-6)
            log.info("converted", source_format=rec["source"].get("format"),
                     target_format=target.get("format"),
                     virtual_size=rec["source"].get("virtual_size", 0),
                     output_size=target.get("size", 0), seconds=round(secs, 3),
                     mib_per_s=round(target.get("size", 0) / secs / 2**20, 1), timings=timings)
        else:
            log.info("passed through", source_format=rec["source"].get("format"), timings=timings)
        self.on_published(item, rec)

    def failed(self, item: Item, rec: dict[str, Any]) -> None:
        log.warning("rejected", code=rec["error"]["code"], message=rec["error"]["message"])
        self.on_failed(item, rec)
