"""The space ledger: workspace reservations, made before a byte is written.

An output may start only if it fits both the configured ``workspace`` and
the filesystem's real free space less ``min_free`` less what running
outputs have reserved but not yet written.  Items that do not fit now wait
in arrival order; a later, smaller item may go ahead of the oldest waiter,
but at most ``max_bypass`` times in a row, after which admissions stop until
the oldest fits (so a big item is never starved).

Daemons sharing a filesystem also count each other's outstanding bytes
through :class:`SharedLedger` (``work/.ledger``), so together they never
push it below ``min_free``; each one's ``workspace`` stays its own budget.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import anyio
import structlog

from convd import durable
from convd.pipeline.layout import LEDGER, LEDGER_LOCK

__all__ = ["Entry", "Ledger", "Reservation", "SharedLedger", "StatvfsSpace"]

log = structlog.get_logger(__name__)

# Live daemons rewrite their entry at least this often (seconds) ...
SHARED_REFRESH = 5.0
# ... and an entry not rewritten for this long is a dead daemon's: dropped.
SHARED_STALE = 60.0
# How long admission tries for the ledger's lock before it waits for the next round.
SHARED_LOCK_PATIENCE = 0.2


class _Keep:
    pass


KEEP = _Keep()


@dataclass(frozen=True)
class Entry:
    """One daemon's line in the shared ledger."""

    outstanding: int  # bytes reserved by its outputs and not yet written
    workspace: int  # its budget: it never has more than this outstanding
    updated_at: float  # Unix time of its last refresh


@dataclass
class _Txn:
    fd: int
    entries: dict[str, Entry]  # the live ones, by instance
    dropped: bool  # stale or stopped entries left out: write back even if ours is unchanged


class SharedLedger:
    """``work/.ledger``: each daemon's reserved-but-unwritten bytes, for all daemons on one filesystem.

    A JSON object ``{"instances": {INSTANCE: {"outstanding": BYTES,
    "workspace": BYTES, "updated_at": UNIX_TIME}}}``, read-modify-written under an ``flock`` on
    ``work/.ledger.lock`` (flock excludes across NFS, CephFS and GlusterFS
    clients).  Entries older than ``SHARED_STALE`` seconds, and those of
    instances found stopped, are dropped by whoever writes next; this needs
    the nodes' clocks in step (NTP), as any lease does.
    """

    def __init__(self, work: Path, instance: str) -> None:
        self.path = work / LEDGER
        self.lock_path = work / LEDGER_LOCK
        self.instance = instance
        self.others = 0  # the other daemons' outstanding bytes, as last read
        self.others_workspace = 0  # the most they can ever have outstanding, as last read
        self.workspace = 0  # ours, written with our entry
        self._dead: set[str] = set()

    def forget(self, instances: Iterable[str]) -> None:
        """Drop these instances' entries at the next update (they were found stopped)."""
        self._dead.update(instances)

    def begin(self, patience: float = SHARED_LOCK_PATIENCE) -> _Txn | None:
        """Take the ledger's lock and read the live entries; None if the lock stayed
        busy for ``patience`` seconds.  Blocking: call it in a worker thread,
        and always :meth:`end` what it returns.  Raises OSError."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            deadline = time.monotonic() + patience
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        os.close(fd)
                        return None
                    time.sleep(0.01)
            raw = self._read()
        except BaseException:
            os.close(fd)
            raise
        now = time.time()
        live = {k: e for k, e in raw.items()
                if k == self.instance or (k not in self._dead and now - e.updated_at <= SHARED_STALE)}
        self.others = sum(e.outstanding for k, e in live.items() if k != self.instance)
        self.others_workspace = sum(e.workspace for k, e in live.items() if k != self.instance)
        return _Txn(fd, live, dropped=len(live) != len(raw))

    def end(self, txn: _Txn, outstanding: int | _Keep | None = KEEP) -> None:
        """Write this instance's ``outstanding`` bytes (None: remove the entry;
        ``KEEP``: leave it, writing only if stale entries were dropped) and
        release the lock.  Blocking; raises OSError (the lock is released)."""
        try:
            entries = dict(txn.entries)
            if outstanding is None:
                entries.pop(self.instance, None)
            elif not isinstance(outstanding, _Keep):
                entries[self.instance] = Entry(int(outstanding), self.workspace, time.time())
            if entries != txn.entries or txn.dropped:
                doc = {"instances": {k: dataclasses.asdict(e) for k, e in entries.items()}}
                _stale_retry(lambda: durable.write_json(self.path, doc, replace=True, sync=False,
                                                        owner=self.instance))
                self._dead.clear()
        finally:
            os.close(txn.fd)  # drops the lock

    def _read(self) -> dict[str, Entry]:
        """The entries as the file holds them, by instance."""
        try:
            raw = json.loads(_stale_retry(self.path.read_bytes)).get("instances", {})
        except FileNotFoundError:
            return {}
        except (ValueError, AttributeError):
            log.error("unreadable shared ledger; starting it afresh", path=str(self.path))
            return {}
        out = {}
        for inst, e in raw.items():
            try:
                out[inst] = Entry(int(e["outstanding"]), int(e.get("workspace", 0)), float(e["updated_at"]))
            except (TypeError, KeyError, ValueError):
                continue
        return out

    def update(self, outstanding: int | None, patience: float = SHARED_LOCK_PATIENCE) -> int | None:
        """Write this instance's ``outstanding`` bytes (None: remove its entry) and
        return the others' sum, or None if the lock stayed busy.  Blocking."""
        txn = self.begin(patience)
        if txn is None:
            return None
        self.end(txn, outstanding)
        return self.others


_T = TypeVar("_T")


def _stale_retry(op: Callable[[], _T], tries: int = 5) -> _T:
    """``op()``, again after ESTALE: on GlusterFS another client's rename of
    the ledger over itself leaves this client a stale handle for a moment."""
    for attempt in range(tries):
        try:
            return op()
        except OSError as exc:
            if exc.errno != errno.ESTALE or attempt == tries - 1:
                raise
            time.sleep(0.02 * (attempt + 1))
    raise AssertionError("unreachable")


@dataclass
class Reservation:
    key: str
    size: int
    output: str | None = None  # the file being written, to see how much is already on disk
    admitted: anyio.Event = field(default_factory=anyio.Event)

    def written(self) -> int:
        if not self.output:
            return 0
        try:
            return os.stat(self.output).st_blocks * 512
        except FileNotFoundError:
            return 0


class StatvfsSpace:
    """Free and total bytes of the filesystem holding ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def free(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def total(self) -> int:
        st = os.statvfs(self.path)
        return st.f_blocks * st.f_frsize


class Ledger:
    def __init__(self, workspace: int, min_free: int, space: StatvfsSpace,
                 max_bypass: int = 4, on_change: Callable[[], None] | None = None,
                 shared: SharedLedger | None = None) -> None:
        self.workspace = workspace
        self.min_free = min_free
        self.space = space
        self.max_bypass = max_bypass
        self.active: dict[str, Reservation] = {}
        self.waiting: list[Reservation] = []
        self._bypassed = 0  # admissions that jumped over the current oldest waiter
        self._on_change = on_change
        self.shared = shared
        self._round = anyio.Lock()  # one shared admission round at a time

    # -- what is reserved and what is free ------------------------------------

    @property
    def reserved(self) -> int:
        return sum(r.size for r in self.active.values())

    def outstanding(self) -> int:
        """Reserved bytes that running outputs have not written yet."""
        return sum(max(0, r.size - r.written()) for r in self.active.values())

    def available(self, others: int | None = None) -> int:
        """Bytes a new output may still take: the smaller of budget and disk.

        ``others``: bytes the other daemons on this filesystem may still
        write (default: their outstanding bytes as last read).
        """
        if others is None:
            others = self.shared.others if self.shared else 0
        budget = self.workspace - self.reserved
        disk = self.space.free() - self.min_free - self.outstanding() - others
        return min(budget, disk)

    def announce(self, outstanding: int) -> None:
        """Refresh this daemon's entry in the shared ledger (every ``SHARED_REFRESH`` s).

        Blocking (a lock and a file on the spool): run it in a worker thread,
        with ``outstanding()`` taken in the event loop, which owns ``active``.
        """
        if self.shared is None:
            return
        self.shared.workspace = self.workspace
        try:
            self.shared.update(outstanding, patience=1.0)
        except OSError as exc:
            log.warning("cannot update the shared ledger", error=str(exc))

    def retract(self) -> None:
        """Remove this daemon's entry from the shared ledger (clean shutdown)."""
        if self.shared is None:
            return
        try:
            self.shared.update(None, patience=1.0)
        except OSError as exc:
            log.warning("cannot update the shared ledger", error=str(exc))

    def could_ever_fit(self, size: int) -> bool:
        return size <= self.largest()

    def largest(self) -> int:
        """The most bytes one reservation could ever be given: the workspace, or the
        filesystem's size less ``min_free`` if smaller."""
        return min(self.workspace, self.space.total() - self.min_free)

    # -- reserve / release ------------------------------------------------

    async def reserve(self, key: str, size: int, output: str | None = None) -> Reservation:
        """Wait until ``size`` bytes are admitted; cancel-safe."""
        r = Reservation(key=key, size=size, output=output)
        self.waiting.append(r)
        try:
            await self._admit_round()
            while not r.admitted.is_set():
                # Free space also grows when consumers take files out of
                # outgoing/, and other daemons finish: look again now and then.
                with anyio.move_on_after(1.0 if self.shared is None else 0.5):
                    await r.admitted.wait()
                await self._admit_round()
        except BaseException:
            if r in self.waiting:
                self.waiting.remove(r)
            self.release(key)
            raise
        return r

    def resize(self, key: str, size: int) -> bool:
        """Change an admitted reservation to ``size`` bytes, at once or not at all.

        Shrinking always succeeds (and may admit waiters).  Growing succeeds
        only while the extra bytes are available now: it never queues, so
        two reservations growing together cannot wait on each other.  Used
        for outputs whose size is learnt as they are written (unpacking).
        """
        r = self.active.get(key)
        if r is None:
            return False
        extra = size - r.size
        if extra > 0 and extra > self.available():
            return False
        r.size = size
        if extra < 0:
            self.admit()
        elif self._on_change:
            self._on_change()
        return True

    def release(self, key: str) -> None:
        if self.active.pop(key, None) is not None:
            self.admit()
            if self._on_change:
                self._on_change()

    def admit(self) -> None:
        """Admit waiters in order; a later one may pass the oldest a bounded number of times.

        With a shared ledger this only notes the change: admission then
        happens in :meth:`reserve`'s rounds, as one locked step with the
        other daemons (never I/O in the event loop).
        """
        if self.shared is None:
            self._admit()
        elif self._on_change:
            self._on_change()

    async def _admit_round(self) -> None:
        """One admission round.

        With a shared ledger, first without any I/O: what fits even if every
        other daemon filled its whole workspace (``others_workspace``, from
        the last refresh) goes at once; on a roomy filesystem that is all.
        Only what does not fit so waits for a locked step: the others'
        outstanding bytes read and ours written under the ledger's lock (in
        worker threads), so two daemons cannot both spend the same free
        bytes; if the lock stays busy, the round admits nothing more.
        """
        if self.shared is None:
            self._admit()
            return
        self._admit(self.shared.others_workspace)
        if not self.waiting:
            return
        async with self._round:
            try:
                txn = await anyio.to_thread.run_sync(self.shared.begin)
            except OSError as exc:
                log.warning("cannot read the shared ledger; admissions wait", error=str(exc))
                return
            if txn is None:
                return
            own: int | _Keep = KEEP
            admitted: list[Reservation] = []
            try:
                # Admitted in our books, but not signalled until the others
                # can see the bytes in the shared file.
                admitted = self._admit(self.shared.others, signal=False)
                if admitted:
                    own = self.outstanding()
                    self.shared.workspace = self.workspace
            finally:
                with anyio.CancelScope(shield=True):
                    try:
                        await anyio.to_thread.run_sync(self.shared.end, txn, own)
                    except OSError as exc:
                        log.warning("cannot update the shared ledger; admissions wait", error=str(exc))
                        # Unseen by the others, they could spend the same bytes: undo.
                        for r in reversed(admitted):
                            # Only one still ours: a waiter cancelled meanwhile released it.
                            if self.active.get(r.key) is r:
                                del self.active[r.key]
                                self.waiting.insert(0, r)
                        admitted = []
                    for r in admitted:
                        r.admitted.set()

    def _admit(self, others: int | None = None, *, signal: bool = True) -> list[Reservation]:
        """Admit what fits, oldest first (bounded bypass); the admitted, signalled unless ``signal`` is False."""
        avail = self.available(others) if self.waiting else 0
        admitted: list[Reservation] = []
        i = 0
        while i < len(self.waiting):
            r = self.waiting[i]
            if r.size <= avail:
                if i > 0:
                    if self._bypassed >= self.max_bypass:
                        break
                    self._bypassed += 1
                else:
                    self._bypassed = 0
                self.waiting.pop(i)
                self.active[r.key] = r
                avail -= r.size
                admitted.append(r)
                if signal:
                    r.admitted.set()
                continue
            i += 1
        if self._on_change:
            self._on_change()
        return admitted
