"""``convd run``: the daemon's lifecycle: start-up, signals, reload, shutdown.

Start-up resolves every "auto" setting once (:func:`convd.resolved.resolve`)
and then builds each part with its final values: the intake, the ledger, the
context the stages share, the monitor, the dispatcher
(``convd.pipeline.dispatch``, intake to claim), the cancel requests
(``convd.cancel_requests``) and the watch on ``incoming/``
(``convd.pipeline.watch``).  Signal handlers only set events; the main task
does the work.  Shutdown is three steps: stop claiming, stop the qemu-img
children (SIGTERM, bounded wait, SIGKILL), leave their sources in ``work/``
for the next start.
"""

from __future__ import annotations

import signal
from typing import Any

import anyio
import anyio.abc
import structlog

from convd import __version__, durable, logs, rbd
from convd.bandwidth import Bandwidth
from convd.cancel_requests import CancelRequests
from convd.config import Config, load
from convd.errors import ConfigError, StartupError
from convd.metrics import Metrics
from convd.monitor import Monitor
from convd.pipeline.context import Context
from convd.pipeline.dispatch import Dispatcher
from convd.pipeline.item import Item
from convd.pipeline.layout import Claim
from convd.pipeline.ledger import SHARED_REFRESH, Ledger, SharedLedger, StatvfsSpace
from convd.pipeline.queue import Intake
from convd.pipeline.spool import Spool
from convd.pipeline.takeover import TakeOver
from convd.pipeline.watch import Watcher
from convd.qemu import img as qemu
from convd.qemu import launcher
from convd.resolved import Resolved, resolve
from convd.sdnotify import Notifier
from convd.stages import rbd as rbd_stages

__all__ = ["Daemon"]

log = structlog.get_logger(__name__)


class Daemon:
    """``convd run``: checks the tools, prepares the spool, resolves the "auto" settings, runs the parts."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.spool = Spool(cfg.spool)
        self.metrics = Metrics(cfg.spool.instance)
        self.notifier = Notifier()

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
        spool = self.spool
        resolved = resolve(cfg, spool.incoming, spool.claims)
        shared_ledger = SharedLedger(spool.work, cfg.spool.instance)
        recovered = spool.recover()
        takeover = TakeOver(spool)
        adopted, stopped = takeover.run()
        shared_ledger.forget(stopped)
        swept = spool.sweep_temp()
        ledger = Ledger(cfg.limits.workspace, cfg.limits.min_free, StatvfsSpace(str(spool.work)),
                        shared=shared_ledger)
        stale: list[str] = []
        target = None
        if cfg.publish.to == "rbd":
            target = rbd_stages.RbdTarget(cfg.publish.rbd, cfg.spool.instance)
            # Listed before any item runs (each new attempt writes an image of
            # its own name), removed in the background: never published.
            stale = await rbd_stages.stale(target, [cfg.spool.instance, *stopped], recovered + adopted)
        running = _Running(cfg, spool, self.metrics, self.notifier, resolved, ledger, target, takeover)
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
                 filesystem=str(resolved.filesystem), shared=resolved.shared, sparse=resolved.sparse,
                 direct_io=resolved.direct_io, recovered=len(recovered), adopted=len(adopted), swept_temp=swept)
        await running.serve(recovered + adopted, stale)


class _Running:
    """The daemon once assembled: every part built with its final values, and what runs them."""

    def __init__(self, cfg: Config, spool: Spool, metrics: Metrics, notifier: Notifier, resolved: Resolved,
                 ledger: Ledger, target: rbd_stages.RbdTarget | None, takeover: TakeOver) -> None:
        self.cfg = cfg
        self.spool = spool
        self.takeover = takeover
        self.metrics = metrics
        self.notifier = notifier
        self.resolved = resolved
        self.stopping = anyio.Event()
        self.reload_requested = False
        self.intake = Intake(cfg.spool.incoming, cfg.watch.settle, shared=resolved.shared,
                             burst=cfg.convert.priority_burst)
        items: dict[str, Item] = {}
        bandwidth = Bandwidth(cfg.convert.rate_limit)
        self.monitor = Monitor(lambda: self.cfg, spool, self.intake, metrics, notifier,
                               items=items, ledger=ledger, bandwidth=bandwidth, rbd=target)
        self.ctx = Context(
            spool=spool, ledger=ledger, slots=anyio.CapacityLimiter(cfg.convert.max_workers),
            sparse=resolved.sparse, block_size=resolved.block_size, direct_io=resolved.direct_io,
            count_hashed=metrics.hashed.inc, on_published=self.monitor.published, on_failed=self.monitor.failed,
            on_retry=self.monitor.retried, shared=resolved.shared, items=items, bandwidth=bandwidth, rbd=target,
        )
        self.dispatcher = Dispatcher(lambda: self.cfg, spool, self.intake, self.ctx, stopping=self.stopping,
                                     stuck=self.monitor.stuck, on_turn=self._turn, on_item_done=self._item_done)
        self.cancels = CancelRequests(lambda: self.cfg, spool, self.intake, items, self.dispatcher.start_item)
        self.watcher = Watcher(cfg.spool.incoming, spool, self.intake, force_polling=resolved.polling,
                               stopping=self.stopping, on_change=self.dispatcher.kick,
                               on_cancel_request=self._cancel_requested)

    # -- signals and hooks ---------------------------------------------------

    def _on_signal(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            self.reload_requested = True
        else:
            self.stopping.set()
        self.dispatcher.kick()

    def _cancel_requested(self) -> None:
        self.cancels.note()
        self.dispatcher.kick()

    def _item_done(self, item: Item) -> None:
        if item.withdrawn is not None:
            self.cancels.note()  # its request is settled now

    async def _turn(self) -> None:
        """The daemon's work at each turn of the dispatcher, before it claims."""
        if self.reload_requested:
            self.reload_requested = False
            self._reload()
        await self.cancels.handle()

    # -- main ------------------------------------------------------------------

    async def serve(self, resumed: list[Claim], stale: list[str]) -> None:
        """Run until SIGTERM or SIGINT: ``resumed`` claims (recovered, adopted) first, then what arrives."""
        cfg, ctx, ledger = self.cfg, self.ctx, self.ctx.ledger
        # Known to the others before the first admission (see SharedLedger).
        await anyio.to_thread.run_sync(ledger.announce, 0)
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._signals, signals)
                items = await tg.start(self.dispatcher.items_group)
                if stale:
                    tg.start_soon(rbd_stages.sweep, ctx.rbd, stale)
                for claim in resumed:
                    self.dispatcher.start_item(claim)
                watching = anyio.Event()
                tg.start_soon(self.watcher.run, watching)
                await watching.wait()
                self.watcher.scan()  # after the watcher runs: nothing falls between the two
                tg.start_soon(self.watcher.rescan_loop, lambda: self.cfg.watch.rescan_interval)
                tg.start_soon(self.monitor.run)
                tg.start_soon(self._peers_loop)
                self.notifier.ready(status=self.monitor.summary())
                log.info("watching", incoming=str(cfg.spool.incoming), polling=self.resolved.polling)
                await self.dispatcher.run()
                # Step 1 done: no more claims.  Step 2: stop children, keep sources.
                log.info("stopping", in_flight=len(ctx.items))
                self.notifier.stopping()
                ctx.stop.set()
                items.cancel_scope.cancel()
                tg.cancel_scope.cancel()
        self.monitor.write_status()
        ledger.retract()
        log.info("stopped")

    async def _signals(self, signals: Any) -> None:
        async for signum in signals:
            self._on_signal(signum)

    async def _peers_loop(self) -> None:
        """Live take-over and the shared ledger: what this daemon owes the others on the spool.

        Every ``[spool] takeover_interval`` seconds, adopt the items of
        instances whose lock is free (their daemon died or its node's lease
        on the lock expired) and run them; every ``SHARED_REFRESH`` seconds,
        refresh this daemon's entry in ``work/.ledger``.
        """
        ledger = self.ctx.ledger
        next_check = anyio.current_time() + self.cfg.spool.takeover_interval
        while True:
            try:
                await anyio.to_thread.run_sync(ledger.announce, ledger.outstanding())
            except OSError as exc:  # cut off the shared filesystem: the daemon waits it out
                log.warning("cannot publish this daemon's ledger entry", error=str(exc))
            now = anyio.current_time()
            if now >= next_check:
                next_check = now + self.cfg.spool.takeover_interval
                try:
                    # Cut off longer than the lease: our claims may be adopted; take
                    # the lock again (a new epoch) and rejoin, without a restart.
                    await anyio.to_thread.run_sync(self.spool.keep_lock)
                    adopted, stopped = await anyio.to_thread.run_sync(self.takeover.run)
                except OSError as exc:
                    log.warning("cannot check the other instances", error=str(exc))
                    adopted, stopped = [], []
                if ledger.shared is not None:
                    ledger.shared.forget(stopped)
                if stopped and self.ctx.rbd is not None:
                    stale = await rbd_stages.stale(self.ctx.rbd, stopped, adopted)
                    assert self.dispatcher.items is not None  # serve() started the items' group first
                    self.dispatcher.items.start_soon(rbd_stages.sweep, self.ctx.rbd, stale)
                for claim in adopted:
                    self.dispatcher.start_item(claim)
                if adopted:
                    self.cancels.note()  # a request may wait for one of them
                    self.metrics.adopted.inc(len(adopted))
                    log.warning("took over the items of stopped instances", adopted=len(adopted),
                                instances=stopped)
                    self.dispatcher.kick()
                try:
                    await anyio.to_thread.run_sync(self.monitor.count_peers)
                    # Work directories NFS kept busy (silly-renamed files) at clean-up.
                    await anyio.to_thread.run_sync(durable.sweep_parked, self.spool.claims)
                except OSError as exc:
                    log.warning("cannot check the other instances", error=str(exc))
            await anyio.sleep(min(SHARED_REFRESH, max(0.0, next_check - anyio.current_time())))

    # -- reload ----------------------------------------------------------------

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
            self._apply(new)
            log.info("reloaded", config=str(path), target_format=new.convert.target_format,
                     max_workers=new.convert.max_workers, rate_limit=new.convert.rate_limit)
        self.notifier.ready(status=self.monitor.summary())

    def _apply(self, new: Config) -> None:
        """The one way a reload reaches the parts: every setting that applies at once, in one place.

        The parts that read the config in force call ``lambda: self.cfg``
        (the monitor, the dispatcher, the cancel requests, the rescan loop);
        items keep the config they were claimed under.
        """
        self.cfg = new
        self.ctx.slots.total_tokens = new.convert.max_workers
        self.ctx.bandwidth.set_limit(new.convert.rate_limit)
        self.ctx.ledger.workspace = new.limits.workspace
        self.ctx.ledger.min_free = new.limits.min_free
        self.intake.settle = new.watch.settle
        self.intake.burst = new.convert.priority_burst
