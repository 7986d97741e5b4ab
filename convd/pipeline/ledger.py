"""The space ledger: workspace reservations, made before a byte is written.

An output may start only if it fits both the configured ``workspace`` and
the filesystem's real free space less ``min_free`` less what running
outputs have reserved but not yet written.  Items that do not fit now wait
in arrival order; a later, smaller item may go ahead of the oldest waiter,
but at most ``max_bypass`` times in a row, after which admissions stop until
the oldest fits (so a big item is never starved).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio

__all__ = ["Ledger", "Reservation", "StatvfsSpace"]


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
                 max_bypass: int = 4, on_change: Callable[[], None] | None = None) -> None:
        self.workspace = workspace
        self.min_free = min_free
        self.space = space
        self.max_bypass = max_bypass
        self.active: dict[str, Reservation] = {}
        self.waiting: list[Reservation] = []
        self._bypassed = 0  # admissions that jumped over the current oldest waiter
        self._on_change = on_change

    # -- what is reserved and what is free ------------------------------------

    @property
    def reserved(self) -> int:
        return sum(r.size for r in self.active.values())

    def outstanding(self) -> int:
        """Reserved bytes that running outputs have not written yet."""
        return sum(max(0, r.size - r.written()) for r in self.active.values())

    def available(self) -> int:
        """Bytes a new output may still take: the smaller of budget and disk."""
        budget = self.workspace - self.reserved
        disk = self.space.free() - self.min_free - self.outstanding()
        return min(budget, disk)

    def could_ever_fit(self, size: int) -> bool:
        return size <= self.workspace and size <= self.space.total() - self.min_free

    # -- reserve / release ------------------------------------------------

    async def reserve(self, key: str, size: int, output: str | None = None) -> Reservation:
        """Wait until ``size`` bytes are admitted; cancel-safe."""
        r = Reservation(key=key, size=size, output=output)
        self.waiting.append(r)
        self.admit()
        try:
            while not r.admitted.is_set():
                # Free space also grows when consumers take files out of
                # outgoing/: look again now and then, not only on release.
                with anyio.move_on_after(1.0):
                    await r.admitted.wait()
                self.admit()
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
        """Admit waiters in order; a later one may pass the oldest a bounded number of times."""
        avail = self.available() if self.waiting else 0
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
                r.admitted.set()
                continue
            i += 1
        if self._on_change:
            self._on_change()
