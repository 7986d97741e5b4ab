"""The watch on ``incoming/``: filesystem events as hints, the directory as the truth.

watchfiles (inotify, or polling where inotify cannot see other nodes'
changes) feeds names to the intake queue; an initial scan once the watcher
runs and a periodic rescan make sure nothing is missed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import anyio
import structlog
import watchfiles

from convd.pipeline.layout import is_candidate_name, name_refused
from convd.pipeline.queue import Intake
from convd.pipeline.renames import RenameWatch
from convd.pipeline.spool import Spool
from convd.protocol import is_cancel_request

__all__ = ["Watcher"]

log = structlog.get_logger(__name__)


class Watcher:
    """Feeds ``intake`` from ``incoming/``; calls ``on_change`` when there is news."""

    def __init__(self, incoming: Path, spool: Spool, intake: Intake, *, force_polling: bool,
                 stopping: anyio.Event, on_change: Callable[[], None],
                 on_cancel_request: Callable[[], None] = lambda: None) -> None:
        self.incoming = incoming
        self.spool = spool
        self.intake = intake
        self.force_polling = force_polling
        self.stopping = stopping
        self.on_change = on_change
        self.on_cancel_request = on_cancel_request  # a request file (convd.protocol) came or may have
        self._refused: dict[str, int] = {}  # refused name -> its inode, logged once until it changes

    async def run(self, watching: anyio.Event) -> None:
        """Watch until ``stopping``; sets ``watching`` once events flow (or it gave up)."""
        incoming = self.incoming
        renames = RenameWatch(incoming) if not self.force_polling else None
        arrivals: dict[str, bool] = {}

        def wanted(change: watchfiles.Change, path: str) -> bool:
            name = os.path.basename(path)
            if change == watchfiles.Change.deleted:
                return False
            return (is_candidate_name(name) and name_refused(name) is None) or is_cancel_request(name)

        try:
            while not self.stopping.is_set():
                try:
                    async for changes in watchfiles.awatch(
                        incoming, watch_filter=wanted, recursive=False,
                        force_polling=self.force_polling, poll_delay_ms=200, step=5,
                        debounce=100, stop_event=self.stopping, rust_timeout=500,
                        yield_on_timeout=True, ignore_permission_denied=True,
                    ):
                        watching.set()
                        if renames is not None:
                            if len(arrivals) > 10_000:
                                arrivals.clear()  # names watchfiles never reported
                            arrivals.update(renames.drain())
                        for change, path in changes:
                            name = os.path.basename(path)
                            if is_cancel_request(name):
                                self.on_cancel_request()
                            elif os.path.dirname(path) == str(incoming):
                                self.intake.saw(name, modified=change == watchfiles.Change.modified,
                                                renamed=arrivals.pop(name, None))
                        if changes:
                            self.on_change()
                except Exception as exc:  # noqa: BLE001 - also its task group's ExceptionGroup
                    # watchfiles gives up on, e.g., a name that is not UTF-8;
                    # the directory is the truth, so rescan and watch again.
                    log.warning("watcher failed; rescanning and restarting it", error=str(exc))
                    watching.set()
                    self.scan()
                    await anyio.sleep(1.0)
        finally:
            watching.set()  # a stop before the first yield must not leave start-up waiting
            if renames is not None:
                renames.close()

    def scan(self) -> None:
        """Note every candidate name in ``incoming/`` (the directory is the truth)."""
        refused_now: dict[str, int] = {}
        try:
            for entry in self.spool.scan_incoming():
                refused = name_refused(entry.name) if entry.name not in self.intake.pending else None
                if refused:
                    refused_now[entry.name] = inode = entry.inode()
                    if self._refused.get(entry.name) != inode:  # once per file, not at every rescan
                        log.error("name refused; left in incoming/", item=entry.name, reason=refused)
                    continue
                self.intake.saw(entry.name)
        except OSError as exc:
            # A shared filesystem's client cut off or evicted (ceph-fuse answers
            # ESHUTDOWN until remounted): the next rescan looks again.
            log.warning("cannot list incoming/; rescanning later", error=str(exc))
            return
        self._refused = refused_now
        self.on_cancel_request()
        self.on_change()

    async def rescan_loop(self, interval: Callable[[], float]) -> None:
        """Rescan every ``interval()`` seconds (read each time: SIGHUP may change it)."""
        while True:
            await anyio.sleep(interval())
            self.scan()
