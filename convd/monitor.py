"""The daemon's own account of itself: counters, the status snapshot that
``convd status`` reads, the Prometheus gauges, and systemd's STATUS/WATCHDOG."""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import anyio
import structlog

from convd import __version__, durable
from convd.bandwidth import Bandwidth
from convd.cluster import STATUS_FILE, instances
from convd.config import Config
from convd.metrics import Metrics
from convd.pipeline.item import Item, Stage
from convd.pipeline.ledger import Ledger
from convd.pipeline.queue import Intake
from convd.pipeline.spool import Spool
from convd.sdnotify import Notifier

__all__ = ["Monitor"]

log = structlog.get_logger(__name__)


class Monitor:
    """Counts results, writes the status snapshot, refreshes metrics and systemd's status."""

    def __init__(self, cfg: Callable[[], Config], spool: Spool, intake: Intake, metrics: Metrics,
                 notifier: Notifier, *, items: dict[str, Item], ledger: Ledger, bandwidth: Bandwidth,
                 rbd: Any = None) -> None:
        """``cfg``: the config in force (SIGHUP swaps it); ``items``: the daemon's items in flight
        (``Context.items``, read only); ``rbd``: the Ceph pool of ``[publish] to = "rbd"``, else None."""
        self._cfg = cfg
        self.spool = spool
        self.intake = intake
        self.metrics = metrics
        self.notifier = notifier
        self.items = items
        self.ledger = ledger
        self.bandwidth = bandwidth
        self.rbd = rbd
        self.counters: Counter[str] = Counter()
        self.stuck: set[str] = set()  # items kept in work/ by an internal error
        self.started = time.time()

    # -- hooks from the runner -------------------------------------------

    def published(self, item: Item, rec: dict[str, Any]) -> None:
        status = rec.get("status", "converted")
        self.counters[status] += 1
        self.metrics.images.labels(status=status).inc()
        self.metrics.bytes_read.inc(rec.get("source", {}).get("size", 0) or 0)
        self.metrics.bytes_written.inc((rec.get("target") or {}).get("size", 0) or 0)
        if status == "converted":
            secs = rec.get("timings", {}).get("convert", 0.0)
            self.metrics.convert_seconds.observe(secs)
            if secs > 0:
                self.metrics.throughput.observe(rec["source"].get("virtual_size", 0) / secs)

    def failed(self, item: Item, rec: dict[str, Any]) -> None:
        self.counters["failed"] += 1
        self.metrics.images.labels(status="failed").inc()
        self.metrics.errors.labels(code=rec.get("error", {}).get("code", "unknown")).inc()

    def retried(self, item: Item, error: str) -> None:
        self.metrics.retries.inc()

    # -- status ------------------------------------------------------------

    def summary(self) -> str:
        """One line for systemd's STATUS=."""
        items = self.items.values()
        converting = sum(1 for i in items if i.stage is Stage.CONVERT)
        return (f"{len(self.intake)} queued, {converting} converting, "
                f"{self.counters['converted'] + self.counters['passthrough']} done, "
                f"{self.counters['failed']} failed")

    def snapshot(self) -> dict[str, Any]:
        """The status snapshot (the shape ``convd status --json`` shows as ``daemon``)."""
        cfg = self._cfg()
        ledger = self.ledger
        now = time.monotonic()
        return {
            "version": __version__,
            "pid": os.getpid(),
            "instance": cfg.spool.instance,
            "host": socket.gethostname(),
            "updated_at": time.time(),
            "started_at": self.started,
            "target_format": cfg.convert.target_format,
            "max_workers": cfg.convert.max_workers,
            "queued": len(self.intake),
            "in_flight": [
                {"name": i.name, "stage": i.stage.value, "progress": round(i.progress, 4),
                 "eta": None if i.eta() is None else round(i.eta() or 0, 1),
                 "source_format": i.source.get("format"), "virtual_size": i.source.get("virtual_size"),
                 "reserved": sum(r.size for r in (i.reservation, i.unpack_reservation) if r is not None),
                 "attempts": i.claim.attempts, "elapsed": round(now - i.started, 3)}
                for i in self.items.values()
            ],
            "workspace": {"limit": ledger.workspace, "reserved": ledger.reserved,
                          "available": max(0, ledger.available()), "filesystem_free": ledger.space.free(),
                          "waiting": len(ledger.waiting)},
            "bandwidth": {"limit": self.bandwidth.limit, "in_use": self.bandwidth.in_use},
            "counters": {"converted": self.counters["converted"], "passthrough": self.counters["passthrough"],
                         "failed": self.counters["failed"]},
            "stuck": sorted(self.stuck),
            "rbd": self._rbd(),
        }

    def _rbd(self) -> dict[str, Any] | None:
        """The Ceph pool an RBD publish writes to, as last asked (``[publish] to = "rbd"``), else None."""
        tgt = self.rbd
        if tgt is None:
            return None
        sp, ledger = tgt.space, tgt.ledger
        return {"pool": tgt.cfg.pool, "quota": sp.quota, "stored": sp.stored, "max_avail": sp.max_avail,
                "available": max(0, ledger.available()), "reserved": ledger.reserved,
                "waiting": len(ledger.waiting),
                "asked_ago": None if not sp.refreshed else round(time.monotonic() - sp.refreshed, 1)}

    def write_status(self) -> None:
        """Write the snapshot under ``work/<instance>/`` and refresh the gauges from it."""
        self.save(self.refresh())

    def save(self, snap: dict[str, Any]) -> None:
        """Write ``snap`` to the status file; blocking (on a shared filesystem it can
        wait seconds for another client's caps), so :meth:`run` calls it in a thread."""
        try:
            durable.write_json(self.spool.claims / STATUS_FILE, snap, replace=True, sync=False)
        except OSError as exc:
            log.warning("cannot write status snapshot", error=str(exc))

    def refresh(self) -> dict[str, Any]:
        """Take the snapshot (in the event loop, which owns the items) and refresh the gauges."""
        snap = self.snapshot()
        m = self.metrics
        m.queued.set(snap["queued"])
        stages = Counter(i["stage"] for i in snap["in_flight"])
        for st in Stage:
            m.in_flight.labels(stage=st.value).set(stages.get(st.value, 0))
        m.progress.clear()
        for i in snap["in_flight"]:
            if i["stage"] == "convert":
                m.progress.labels(item=i["name"]).set(i["progress"])
        m.reserved.set(snap["workspace"]["reserved"])
        m.free.set(snap["workspace"]["available"])
        m.fs_free.set(snap["workspace"]["filesystem_free"])
        m.rate_limit.set(snap["bandwidth"]["limit"])
        m.rate_in_use.set(snap["bandwidth"]["in_use"])
        if snap["rbd"] is not None:
            m.rbd_reserved.set(snap["rbd"]["reserved"])
            m.rbd_available.set(snap["rbd"]["available"])
            m.rbd_waiting.set(snap["rbd"]["waiting"])
        return snap

    def count_peers(self) -> None:
        """Refresh the per-instance gauges: heartbeats, and the lock of each instance whose heartbeat is old
        (so a stopped instance counts as dead, a hung one as stale, as ``convd status`` says)."""
        try:
            insts = instances(self.spool.work, probe_locks=False, probe_old=True)
        except OSError as exc:
            log.warning("cannot list the spool's instances", error=str(exc))
            return
        for state in ("alive", "stale", "dead"):
            self.metrics.peers.labels(state=state).set(sum(1 for i in insts if i["state"] == state))
        self.metrics.peer_items.clear()
        for i in insts:
            self.metrics.peer_items.labels(spool_instance=i["instance"]).set(len(i["items"]))

    async def run(self, interval: float = 1.0) -> None:
        """Every ``interval`` seconds (or the watchdog's, if shorter): snapshot, STATUS=, WATCHDOG=1."""
        wd = self.notifier.watchdog_interval
        last_status = ""
        while True:
            # The ping says the event loop runs; it must not wait behind a
            # status write that a slow shared filesystem holds up.
            if wd:
                self.notifier.watchdog()
            try:
                snap = self.refresh()
            except OSError as exc:  # the spool's filesystem cut off (statvfs): the next round
                log.warning("cannot take the status snapshot", error=str(exc))
                snap = None
            summary = self.summary()
            if summary != last_status:
                self.notifier.status(summary)
                last_status = summary
            if snap is not None:
                await anyio.to_thread.run_sync(self.save, snap)
            await anyio.sleep(min(interval, wd) if wd else interval)
