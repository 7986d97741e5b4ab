"""The daemon's lifecycle: start-up, claiming, running items, signals, reload, shutdown.

The watch on ``incoming/`` (``convd.pipeline.watch``) and the daemon's
account of itself (``convd.monitor``) live in their own modules.  Signal
handlers only set events; the main task does the work.  Shutdown is three
steps: stop claiming, stop the qemu-img children (SIGTERM, bounded wait,
SIGKILL), leave their sources in ``work/`` for the next start.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import anyio
import structlog

from convd import __version__, cancel, durable, launcher, logs, protocol, qemu, rbd
from convd.bandwidth import Bandwidth
from convd.config import Config, load
from convd.errors import ConfigError, StartupError
from convd.filesystem import detect_type, probe_filesystem
from convd.metrics import Metrics
from convd.monitor import Monitor
from convd.pipeline.context import Context
from convd.pipeline.item import Item
from convd.pipeline.ledger import SHARED_REFRESH, Ledger, SharedLedger, StatvfsSpace
from convd.pipeline.queue import Intake
from convd.pipeline.runner import finish_handoff, run_item
from convd.pipeline.sidecars import CancelBook
from convd.pipeline.spool import Claim, Spool, name_refused
from convd.pipeline.watch import Watcher
from convd.sdnotify import Notifier
from convd.stages import rbd as rbd_stages

__all__ = ["Daemon"]

log = structlog.get_logger("convd.daemon")

# An item kept in work/ by an internal error is tried again after this,
# doubling up to the maximum (and at every start).
STUCK_RETRY = 60.0
STUCK_RETRY_MAX = 3600.0
# A cancel request naming no item anywhere is removed after this long (a
# claim in progress elsewhere hides an item for a moment).
STALE_CANCEL = 30.0


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.spool = Spool(cfg.spool)
        self.intake = Intake(cfg.spool.incoming, cfg.watch.settle, burst=cfg.convert.priority_burst)
        self.metrics = Metrics(cfg.spool.instance)
        self.notifier = Notifier()
        self.stopping = anyio.Event()
        self.wake = anyio.Event()
        self.reload_requested = False
        self.ctx: Context | None = None
        self._items: anyio.abc.TaskGroup | None = None  # where items run (cancels start theirs there too)
        self.monitor = Monitor(lambda: self.cfg, self.spool, self.intake, self.metrics, self.notifier)
        self.watcher = Watcher(cfg.spool.incoming, self.spool, self.intake,
                               force_polling=bool(cfg.watch.force_polling),  # auto: decided in _run
                               stopping=self.stopping,
                               on_change=self._kick, on_cancel_request=self._cancel_requested)
        self.cancels_pending = True  # look for cancel requests at the next turn of dispatch
        self.cancels = CancelBook(cfg.spool.incoming, name_refused)

    # -- signals ---------------------------------------------------------

    def _on_signal(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            self.reload_requested = True
        else:
            self.stopping.set()
        self._kick()

    def _kick(self) -> None:
        self.wake.set()

    def _cancel_requested(self) -> None:
        self.cancels_pending = True
        self._kick()

    # -- main ------------------------------------------------------------

    async def run(self) -> None:
        cfg = self.cfg
        qemu.check_tools()
        if cfg.publish.to == "rbd":
            missing = rbd.check_tools()
            if missing:
                raise StartupError(f"[publish] to = \"rbd\": {missing}")
        self.spool.prepare()
        try:
            await self._run(cfg)
        finally:
            launcher.shutdown()
            self.metrics.close()
            self.spool.close()
            self.notifier.close()

    async def _run(self, cfg: Config) -> None:
        fstype = detect_type(self.spool.incoming)
        # inotify never sees other clients' changes, and a lease only this host's openers.
        polling = fstype.shared if cfg.watch.force_polling is None else cfg.watch.force_polling
        self.watcher.force_polling = polling
        self.intake.shared = fstype.shared
        shared_ledger = SharedLedger(self.spool.work, cfg.spool.instance)
        recovered = self.spool.recover()
        adopted, stopped = self.spool.take_over()
        shared_ledger.forget(stopped)
        swept = self.spool.sweep_temp()
        fs = probe_filesystem(self.spool.claims)
        sparse = fs.sparse if cfg.limits.sparse == "auto" else cfg.limits.sparse == "true"
        ledger = Ledger(cfg.limits.workspace, cfg.limits.min_free, StatvfsSpace(str(self.spool.work)),
                        shared=shared_ledger)
        self.ctx = ctx = Context(
            spool=self.spool, ledger=ledger, slots=anyio.CapacityLimiter(cfg.convert.max_workers),
            sparse=sparse, block_size=fs.block_size, direct_io=fs.direct_io, count_hashed=self.metrics.hashed.inc,
            on_published=self.monitor.published, on_failed=self.monitor.failed,
            on_retry=self.monitor.retried, shared=fstype.shared,
            bandwidth=Bandwidth(cfg.convert.rate_limit),
        )
        stale: list[str] = []
        if cfg.publish.to == "rbd":
            ctx.rbd = rbd_stages.RbdTarget(cfg.publish.rbd, cfg.spool.instance)
            # Listed before any item runs (each new attempt writes an image of
            # its own name), removed in the background: never published.
            stale = await rbd_stages.stale(ctx.rbd, [cfg.spool.instance, *stopped], recovered + adopted)
        self.monitor.ctx = ctx
        # A broken read lease (convd.custody) signals its holder with SIGIO,
        # whose default action ends the process; the stages ask the lease instead.
        signal.signal(signal.SIGIO, signal.SIG_IGN)
        if cfg.metrics_address:
            host, port = cfg.metrics_address
            try:
                self.metrics.serve(host, port)
            except OSError as exc:
                raise ConfigError(f"[metrics] listen: cannot listen on {cfg.metrics.listen}: {exc.strerror}") from None
        log.info("starting", version=__version__, spool=str(cfg.spool.root), instance=cfg.spool.instance,
                 target_format=cfg.convert.target_format, max_workers=cfg.convert.max_workers,
                 filesystem=str(fstype), shared=fstype.shared, sparse=sparse, direct_io=fs.direct_io,
                 recovered=len(recovered), adopted=len(adopted), swept_temp=swept)

        # Known to the others before the first admission (see SharedLedger).
        await anyio.to_thread.run_sync(ledger.publish, 0)
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._signals, signals)
                items = self._items = await tg.start(self._items_group)
                if stale:
                    tg.start_soon(rbd_stages.sweep, ctx.rbd, stale)
                for claim in recovered + adopted:
                    self._start_item(items, claim)
                watching = anyio.Event()
                tg.start_soon(self.watcher.run, watching)
                await watching.wait()
                self.watcher.scan()  # after the watcher runs: nothing falls between the two
                tg.start_soon(self.watcher.rescan_loop, lambda: self.cfg.watch.rescan_interval)
                tg.start_soon(self.monitor.run)
                tg.start_soon(self._peers_loop, items)
                self.notifier.ready(status=self.monitor.summary())
                log.info("watching", incoming=str(cfg.spool.incoming), polling=polling)
                await self._dispatch(items)
                # Step 1 done: no more claims.  Step 2: stop children, keep sources.
                log.info("stopping", in_flight=len(ctx.items))
                self.notifier.stopping()
                ctx.stop.set()
                items.cancel_scope.cancel()
                tg.cancel_scope.cancel()
        self.monitor.write_status()
        ledger.withdraw()
        log.info("stopped")

    async def _items_group(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as items:
            task_status.started(items)
            await anyio.sleep_forever()

    async def _signals(self, signals: Any) -> None:
        async for signum in signals:
            self._on_signal(signum)

    def _start_item(self, items: anyio.abc.TaskGroup, claim: Claim) -> Item:
        assert self.ctx is not None
        item = Item(claim=claim, cfg=self.cfg)
        # Registered now so the claim limit counts it at once.
        self.ctx.items[claim.name] = item
        items.start_soon(self._process, item)
        return item

    async def _peers_loop(self, items: anyio.abc.TaskGroup) -> None:
        """Live take-over and the shared ledger: what this daemon owes the others on the spool.

        Every ``[spool] takeover_interval`` seconds, adopt the items of
        instances whose lock is free (their daemon died or its node's lease
        on the lock expired) and run them; every ``SHARED_REFRESH`` seconds,
        refresh this daemon's entry in ``work/.ledger``.
        """
        assert self.ctx is not None
        ledger = self.ctx.ledger
        next_check = anyio.current_time() + self.cfg.spool.takeover_interval
        while True:
            try:
                await anyio.to_thread.run_sync(ledger.publish, ledger.outstanding())
            except OSError as exc:  # cut off the shared filesystem: the daemon waits it out
                log.warning("cannot publish this daemon's ledger entry", error=str(exc))
            now = anyio.current_time()
            if now >= next_check:
                next_check = now + self.cfg.spool.takeover_interval
                try:
                    # Cut off longer than the lease: our claims may be adopted; take
                    # the lock again (a new epoch) and rejoin, without a restart.
                    await anyio.to_thread.run_sync(self.spool.keep_lock)
                    adopted, stopped = await anyio.to_thread.run_sync(self.spool.take_over)
                except OSError as exc:
                    log.warning("cannot check the other instances", error=str(exc))
                    adopted, stopped = [], []
                if ledger.shared is not None:
                    ledger.shared.forget(stopped)
                if stopped and self.ctx.rbd is not None:
                    stale = await rbd_stages.stale(self.ctx.rbd, stopped, adopted)
                    items.start_soon(rbd_stages.sweep, self.ctx.rbd, stale)
                for claim in adopted:
                    self._start_item(items, claim)
                if adopted:
                    self.cancels_pending = True  # a request may wait for one of them
                    self.metrics.adopted.inc(len(adopted))
                    log.warning("took over the items of stopped instances", adopted=len(adopted),
                                instances=stopped)
                    self._kick()
                try:
                    await anyio.to_thread.run_sync(self.monitor.count_peers)
                    # Work directories NFS kept busy (silly-renamed files) at clean-up.
                    await anyio.to_thread.run_sync(durable.sweep_parked, self.spool.claims)
                except OSError as exc:
                    log.warning("cannot check the other instances", error=str(exc))
            await anyio.sleep(min(SHARED_REFRESH, max(0.0, next_check - anyio.current_time())))

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
                if self.ctx.items.get(name) is item:
                    del self.ctx.items[name]  # finish_handoff does not unregister
                if item.withdrawn is not None:
                    self.cancels_pending = True  # its request is settled now
                self._kick()
            if not os.path.lexists(item.claim.dir) or (
                    # Claimed before this daemon lost its lock (cut off): retried only if still ours.
                    item.claim.epoch != self.spool.epoch
                    and not await anyio.to_thread.run_sync(self._kept_after_loss, name)):
                self.monitor.stuck.discard(name)
                return
            self.monitor.stuck.add(name)
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
                self.monitor.stuck.discard(name)
                return
            delay = min(delay * 2, STUCK_RETRY_MAX)
            item = Item(claim=claim, cfg=self.cfg)

    def _kept_after_loss(self, name: str) -> bool:
        """Whether ``work/<instance>/NAME`` is still this daemon's to run again (blocking):
        there, and not adopted by another instance while this one was cut off."""
        try:
            return self.spool.owns(self.spool.load_claim(name))
        except OSError:
            return False

    # -- intake ----------------------------------------------------------

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
            if self.cancels_pending:
                self.cancels_pending = False
                await self._handle_cancels()
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
                if isinstance(claim, OSError):
                    # e.g. a producer's directory we may not move, or a full disk:
                    # it stays in incoming/ and the next rescan tries again.
                    log.error("cannot claim; left in incoming/", item=name, error=str(claim))
                    self.intake.forget(name)
                    continue
                self.intake.taken(name)
                self.intake.forget(name)
                if claim is not None:
                    log.info("claimed", item=name)
                    self._start_item(items, claim)
            with anyio.move_on_after(wait if wait is not None else 5.0):
                await self.wake.wait()

    def _claim_all(self, names: list[str]) -> dict[str, Claim | OSError | None]:
        """``Spool.claim_all``, then the claimed names' priority marks go (they served their turn)."""
        claimed = self.spool.claim_all(names)
        for name, claim in claimed.items():
            if claim is not None and not isinstance(claim, OSError):
                protocol.clear_priority(self.spool.incoming, name)
        return claimed

    # -- cancel (contract section 6) ----------------------------------------

    async def _handle_cancels(self) -> None:
        """Act on every cancel request in ``incoming/``; settled ones are removed."""
        paths = cancel.spool_paths(self.cfg)
        refused, over = await anyio.to_thread.run_sync(self.cancels.refresh)
        for filename, reason in refused:
            log.warning("cancel request refused; set aside", request=filename, reason=reason)
        if over:
            log.warning("too many cancel requests; the newest were refused and set aside", refused=over,
                        limit=self.cancels.limit)
        if not self.cancels.entries:
            return
        settled = await anyio.to_thread.run_sync(_names_with_records, paths)
        for req in [e.request for e in self.cancels.entries.values()]:
            try:
                await self._cancel(req, paths, settled)
            except OSError as exc:
                log.error("cannot act on a cancel request", item=req.name, error=str(exc))

    async def _cancel(self, req: protocol.CancelRequest, paths: protocol.SpoolPaths, settled: set[str]) -> None:
        assert self.ctx is not None
        name, msg = req.name, cancel.message(req.reason)
        item = self.ctx.items.get(name)
        if item is not None:
            try:
                inode: int | None = os.lstat(item.claim.dropped).st_ino
            except FileNotFoundError:
                inode = None
            if req.matches(inode):
                if item.withdrawn is None and item.withdraw(msg):
                    log.info("cancel requested", item=name, stage=item.stage.value, reason=req.reason)
                return  # settled when it lands (a publish under way finishes: the cancel is refused)
        where = cancel.locate(self.cfg, name)
        if where.place == "incoming" and req.matches(where.inode) and item is None:
            try:
                claim = await anyio.to_thread.run_sync(self.spool.claim, name)
            except FileExistsError:
                return  # an earlier item's work dir; the request waits
            if claim is not None:
                self.intake.forget(name)
                protocol.clear_priority(self.spool.incoming, name)
                log.info("cancelled before conversion", item=name, reason=req.reason)
                # Run like any claim, withdrawn from the start: the runner
                # rejects it, and a failing disk leaves it to _process's
                # retries (counted as stuck) rather than stranded in work/.
                assert self._items is not None
                self._start_item(self._items, claim).withdraw(msg)
            return
        if where.place == "work":
            return  # the instance holding it acts (or `convd cancel`, or the next start)
        found = None
        if name in settled:
            found = await anyio.to_thread.run_sync(protocol.find_record, paths, name, req.inode)
        # Stale by convd's clock, never the file's own date (a producer's
        # "requested_at" in the future must not keep a request alive).
        if found is not None or self.cancels.age(name) > STALE_CANCEL:
            # Settled (in failed/, or published before the request: refused),
            # or naming nothing: a stale request must not cancel a later item.
            self.cancels.clear(name)

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
            if new.publish != self.cfg.publish:
                raise ConfigError("[publish] changes need a restart")
        except Exception as exc:  # noqa: BLE001 - whatever a bad file raises, the old configuration stays
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
            self.ctx.bandwidth.set_limit(new.convert.rate_limit)
            self.ctx.ledger.workspace = new.limits.workspace
            self.ctx.ledger.min_free = new.limits.min_free
            self.intake.settle = new.watch.settle
            self.intake.burst = new.convert.priority_burst
            log.info("reloaded", config=str(path), target_format=new.convert.target_format,
                     max_workers=new.convert.max_workers, rate_limit=new.convert.rate_limit)
        self.notifier.ready(status=self.monitor.summary())


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
