"""The daemon: watch, scan, claim, run items; signals, reload, status, metrics, notify.

Signal handlers only set events; the main task does the work.  Shutdown is
three steps: stop claiming, stop the qemu-img children (SIGTERM, bounded
wait, SIGKILL), leave their sources in ``work/`` for the next start.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import structlog
import watchfiles

from convd import __version__, durable, logs, qemu
from convd.config import Config, load
from convd.errors import ConfigError
from convd.metrics import Metrics
from convd.pipeline.item import Item, Stage
from convd.pipeline.ledger import Ledger, StatvfsSpace
from convd.pipeline.queue import Intake
from convd.pipeline.renames import RenameWatch
from convd.pipeline.runner import Context, finish_handoff, run_item
from convd.pipeline.spool import Spool, is_candidate_name, name_refused
from convd.sdnotify import Notifier

__all__ = ["Daemon", "FsTraits", "probe_filesystem"]

log = structlog.get_logger("convd.daemon")

STATUS_FILE = ".status.json"
# An item kept in work/ by an internal error is tried again after this,
# doubling up to the maximum (and at every start).
STUCK_RETRY = 60.0
STUCK_RETRY_MAX = 3600.0


@dataclass(frozen=True)
class FsTraits:
    sparse: bool  # keeps holes
    block_size: int
    direct_io: bool  # O_DIRECT works (not on tmpfs, some network filesystems)


def probe_filesystem(directory: Path) -> FsTraits:
    """What the work filesystem can do, learnt once at start-up."""
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe.", suffix=".tmp") as fh:
        fh.truncate(64 << 20)
        fh.flush()
        sparse = os.fstat(fh.fileno()).st_blocks * 512 < (1 << 20)
        try:
            os.close(os.open(fh.name, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC))
            direct = True
        except OSError:
            direct = False
    return FsTraits(sparse=sparse, block_size=os.statvfs(directory).f_bsize, direct_io=direct)


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.spool = Spool(cfg.spool)
        self.intake = Intake(cfg.spool.incoming, cfg.watch.settle)
        self.metrics = Metrics()
        self.notifier = Notifier()
        self.stopping = anyio.Event()
        self.wake = anyio.Event()
        self.reload_requested = False
        self.counters: Counter[str] = Counter()
        self.stuck: set[str] = set()
        self.ctx: Context | None = None
        self.started = time.time()

    # -- signals ---------------------------------------------------------

    def _on_signal(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            self.reload_requested = True
        else:
            self.stopping.set()
        self._kick()

    def _kick(self) -> None:
        self.wake.set()

    # -- hooks from the runner -------------------------------------------

    def _published(self, item: Item, rec: dict[str, Any]) -> None:
        self.counters[rec.get("status", "converted")] += 1
        self.metrics.images.labels(status=rec.get("status", "converted")).inc()
        self.metrics.bytes_read.inc(rec.get("source", {}).get("size", 0) or 0)
        self.metrics.bytes_written.inc((rec.get("target") or {}).get("size", 0) or 0)
        if rec.get("status") == "converted":
            secs = rec.get("timings", {}).get("convert", 0.0)
            self.metrics.convert_seconds.observe(secs)
            if secs > 0:
                self.metrics.throughput.observe(rec["source"].get("virtual_size", 0) / secs)

    def _failed(self, item: Item, rec: dict[str, Any]) -> None:
        self.counters["failed"] += 1
        self.metrics.images.labels(status="failed").inc()
        self.metrics.errors.labels(code=rec.get("error", {}).get("code", "unknown")).inc()

    # -- main ------------------------------------------------------------

    async def run(self) -> None:
        cfg = self.cfg
        qemu.check_tools()
        self.spool.prepare()
        try:
            await self._run(cfg)
        finally:
            self.metrics.close()
            self.spool.close()
            self.notifier.close()

    async def _run(self, cfg: Config) -> None:
        adopted = self.spool.adopt_orphans()
        swept = self.spool.sweep_temp()
        fs = probe_filesystem(self.spool.claims)
        sparse = fs.sparse if cfg.limits.sparse == "auto" else cfg.limits.sparse == "true"
        ledger = Ledger(cfg.limits.workspace, cfg.limits.min_free, StatvfsSpace(str(self.spool.work)))
        self.ctx = ctx = Context(
            spool=self.spool, ledger=ledger, slots=anyio.CapacityLimiter(cfg.convert.max_workers),
            sparse=sparse, block_size=fs.block_size, direct_io=fs.direct_io, count_hashed=self.metrics.hashed.inc,
            on_published=self._published, on_failed=self._failed,
            on_retry=lambda item, err: self.metrics.retries.inc(),
        )
        if cfg.metrics_address:
            host, port = cfg.metrics_address
            try:
                self.metrics.serve(host, port)
            except OSError as exc:
                raise ConfigError(f"[metrics] listen: cannot listen on {cfg.metrics.listen}: {exc.strerror}") from None
        recovered = self.spool.recover()
        log.info("starting", version=__version__, spool=str(cfg.spool.root), instance=cfg.spool.instance,
                 target_format=cfg.convert.target_format, max_workers=cfg.convert.max_workers,
                 sparse=sparse, direct_io=fs.direct_io, recovered=len(recovered), adopted=adopted, swept_temp=swept)

        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._signals, signals)
                items = await tg.start(self._items_group)
                for claim in recovered:
                    items.start_soon(self._process, Item(claim=claim, cfg=cfg))
                watching = anyio.Event()
                tg.start_soon(self._watch, watching)
                await watching.wait()
                self._scan()  # after the watcher runs: nothing falls between the two
                tg.start_soon(self._rescan_loop)
                tg.start_soon(self._housekeeping)
                self.notifier.ready(status=self._summary())
                log.info("watching", incoming=str(cfg.spool.incoming), polling=cfg.watch.force_polling)
                await self._dispatch(items)
                # Step 1 done: no more claims.  Step 2: stop children, keep sources.
                log.info("stopping", in_flight=len(ctx.items))
                self.notifier.stopping()
                ctx.stop.set()
                items.cancel_scope.cancel()
                tg.cancel_scope.cancel()
        self._write_status()
        log.info("stopped")

    async def _items_group(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as items:
            task_status.started(items)
            await anyio.sleep_forever()

    async def _signals(self, signals: Any) -> None:
        async for signum in signals:
            self._on_signal(signum)

    async def _process(self, item: Item) -> None:
        """Run an item; one kept in work/ by an error of convd's own is retried with backoff."""
        assert self.ctx is not None
        name, delay = item.name, STUCK_RETRY
        while True:
            try:
                if item.claim.pending is not None:
                    try:
                        await finish_handoff(item, self.ctx)
                    except Exception:
                        log.exception("cannot finish the handoff; kept in work/", item=name)
                else:
                    await run_item(item, self.ctx)
            finally:
                self._kick()
            if not os.path.lexists(item.claim.dir):
                self.stuck.discard(name)
                return
            self.stuck.add(name)
            log.warning("kept in work/ after an internal error; will retry", item=name, retry_in=delay)
            await anyio.sleep(delay)
            delay = min(delay * 2, STUCK_RETRY_MAX)
            item = Item(claim=self.spool.load_claim(name), cfg=self.cfg)

    # -- intake ----------------------------------------------------------

    async def _watch(self, watching: anyio.Event) -> None:
        incoming = self.cfg.spool.incoming
        renames = RenameWatch(incoming) if not self.cfg.watch.force_polling else None
        arrivals: dict[str, bool] = {}

        def wanted(change: watchfiles.Change, path: str) -> bool:
            name = os.path.basename(path)
            return change != watchfiles.Change.deleted and is_candidate_name(name) and name_refused(name) is None

        try:
            while not self.stopping.is_set():
                try:
                    async for changes in watchfiles.awatch(
                        incoming, watch_filter=wanted, recursive=False,
                        force_polling=self.cfg.watch.force_polling, poll_delay_ms=200, step=5,
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
                            if os.path.dirname(path) == str(incoming):
                                self.intake.saw(name, modified=change == watchfiles.Change.modified,
                                                renamed=arrivals.pop(name, None))
                        if changes:
                            self._kick()
                except Exception as exc:  # noqa: BLE001 - also its task group's ExceptionGroup
                    # watchfiles gives up on, e.g., a name that is not UTF-8;
                    # the directory is the truth, so rescan and watch again.
                    log.warning("watcher failed; rescanning and restarting it", error=str(exc))
                    watching.set()
                    self._scan()
                    await anyio.sleep(1.0)
        finally:
            watching.set()  # a stop before the first yield must not leave start-up waiting
            if renames is not None:
                renames.close()

    def _scan(self) -> None:
        for entry in self.spool.scan_incoming():
            refused = name_refused(entry.name) if entry.name not in self.intake.pending else None
            if refused:
                log.error("name refused; left in incoming/", item=entry.name, reason=refused)
                continue
            self.intake.saw(entry.name)
        self._kick()

    async def _rescan_loop(self) -> None:
        while True:
            await anyio.sleep(self.cfg.watch.rescan_interval)
            self._scan()

    def _claim_limit(self) -> int:
        # Claim a little ahead of the workers so detection overlaps conversion,
        # but leave the backlog in incoming/ where other instances can take it.
        return self.cfg.convert.max_workers * 2

    async def _dispatch(self, items: anyio.abc.TaskGroup) -> None:
        assert self.ctx is not None
        while not self.stopping.is_set():
            # A fresh event before looking, so a kick while we claim is not lost.
            self.wake = anyio.Event()
            if self.reload_requested:
                self.reload_requested = False
                self._reload()
            room = self._claim_limit() - len(self.ctx.items)
            names, wait = self.intake.ready(limit=room) if room > 0 else ([], None)
            for name in names:
                if self.stopping.is_set():
                    break
                if name in self.ctx.items:
                    self.intake.defer(name)  # same name still in flight: it waits in incoming/
                    continue
                try:
                    claim = await anyio.to_thread.run_sync(self.spool.claim, name)
                except FileExistsError:
                    self.intake.defer(name)  # an earlier item's work dir, kept after an internal error
                    continue
                except OSError as exc:
                    # e.g. a producer's directory we may not move, or a full disk:
                    # it stays in incoming/ and the next rescan tries again.
                    log.error("cannot claim; left in incoming/", item=name, error=str(exc))
                    self.intake.forget(name)
                    continue
                self.intake.forget(name)
                if claim is not None:
                    log.info("claimed", item=name)
                    item = Item(claim=claim, cfg=self.cfg)
                    # Registered now so the claim limit counts it at once.
                    self.ctx.items[name] = item
                    items.start_soon(self._process, item)
            with anyio.move_on_after(wait if wait is not None else 5.0):
                await self.wake.wait()

    # -- reload ----------------------------------------------------------

    def _reload(self) -> None:
        self.notifier.reloading()
        path = self.cfg.source
        try:
            if path is None:
                raise ConfigError("no config file to reload")
            new = load(path)
            if new.spool != self.cfg.spool:
                raise ConfigError("[spool] changes need a restart")
        except Exception as exc:  # whatever a bad file raises, the old configuration stays
            log.error("reload refused; keeping the old configuration", error=str(exc))
        else:
            for key, old_v, new_v in (
                ("[watch] force_polling", self.cfg.watch.force_polling, new.watch.force_polling),
                ("[metrics] listen", self.cfg.metrics.listen, new.metrics.listen),
                ("[limits] sparse", self.cfg.limits.sparse, new.limits.sparse),
            ):
                if old_v != new_v:
                    log.warning("this change applies from the next start", key=key)
            if new.log != self.cfg.log:
                logs.setup(new.log.format, new.log.level)
            self.cfg = new
            assert self.ctx is not None
            self.ctx.slots.total_tokens = new.convert.max_workers
            self.ctx.ledger.workspace = new.limits.workspace
            self.ctx.ledger.min_free = new.limits.min_free
            self.intake.settle = new.watch.settle
            log.info("reloaded", config=str(path), target_format=new.convert.target_format,
                     max_workers=new.convert.max_workers)
        self.notifier.ready(status=self._summary())

    # -- status, metrics, watchdog ---------------------------------------------

    def _summary(self) -> str:
        items = self.ctx.items.values() if self.ctx else []
        converting = sum(1 for i in items if i.stage is Stage.CONVERT)
        return (f"{len(self.intake)} queued, {converting} converting, "
                f"{self.counters['converted'] + self.counters['passthrough']} done, "
                f"{self.counters['failed']} failed")

    def snapshot(self) -> dict[str, Any]:
        assert self.ctx is not None
        ledger = self.ctx.ledger
        now = time.monotonic()
        return {
            "version": __version__,
            "pid": os.getpid(),
            "instance": self.cfg.spool.instance,
            "updated_at": time.time(),
            "started_at": self.started,
            "target_format": self.cfg.convert.target_format,
            "max_workers": self.cfg.convert.max_workers,
            "queued": len(self.intake),
            "in_flight": [
                {"name": i.name, "stage": i.stage.value, "progress": round(i.progress, 4),
                 "eta": None if i.eta() is None else round(i.eta() or 0, 1),
                 "source_format": i.source.get("format"), "virtual_size": i.source.get("virtual_size"),
                 "reserved": i.reservation.size if i.reservation else 0,
                 "attempts": i.claim.attempts, "elapsed": round(now - i.started, 3)}
                for i in self.ctx.items.values()
            ],
            "workspace": {"limit": ledger.workspace, "reserved": ledger.reserved,
                          "available": max(0, ledger.available()), "filesystem_free": ledger.space.free(),
                          "waiting": len(ledger.waiting)},
            "counters": {"converted": self.counters["converted"], "passthrough": self.counters["passthrough"],
                         "failed": self.counters["failed"]},
            "stuck": sorted(self.stuck),
        }

    def _write_status(self) -> None:
        if self.ctx is None:
            return
        snap = self.snapshot()
        try:
            durable.write_json(self.spool.claims / STATUS_FILE, snap, replace=True, sync=False)
        except OSError as exc:
            log.warning("cannot write status snapshot", error=str(exc))
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

    async def _housekeeping(self) -> None:
        interval = 1.0
        wd = self.notifier.watchdog_interval
        last_status = ""
        while True:
            self._write_status()
            summary = self._summary()
            if summary != last_status:
                self.notifier.status(summary)
                last_status = summary
            if wd:
                self.notifier.watchdog()
            await anyio.sleep(min(interval, wd) if wd else interval)

