"""The ``[convert] rate_limit`` budget: bytes per second all conversions, unpacking and checksumming move together.

Every consumer holds a share of the budget while it runs: a ``qemu-img
convert`` child gets its share as ``-r`` (bytes per second), an unpacking or
checksumming thread a token bucket (:class:`Throttle`) at its share.  A share
is ``rate_limit / n``, ``n`` being the consumers running or waiting (a
conversion also counts the items that will convert soon, up to
``max_workers``, so conversions that start together split the budget
evenly).  qemu-img cannot change the ``-r`` of a running child, and
restarting one would throw away its work, so a share is fixed for the
consumer's life: a newcomer whose share is not free waits until running
consumers end and return theirs.  The shares held never add up to more than
the budget: the total holds, and re-splitting happens as consumers start
and end.  A reload (SIGHUP) applies to shares granted afterwards; shares
already held keep their rate until their consumer ends.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import AsyncIterator

import anyio

__all__ = ["Bandwidth", "Throttle"]


class Bandwidth:
    """The daemon's one budget (``limit`` bytes per second; 0: none)."""

    def __init__(self, limit: int = 0) -> None:
        self.limit = limit
        self.held: dict[int, int] = {}  # consumer id -> bytes per second
        self._waiting: list[int] = []
        self._next = 0
        self._changed = anyio.Event()

    @property
    def in_use(self) -> int:
        """Bytes per second granted to running consumers (the most they may move now)."""
        return sum(self.held.values())

    def set_limit(self, limit: int) -> None:
        self.limit = limit
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    @contextlib.asynccontextmanager
    async def share(self, expected: int = 1) -> AsyncIterator[int]:
        """Hold a share for the block: yields bytes per second, 0 for no limit.

        ``expected``: consumers about to run alongside (the caller's
        estimate; the share is ``limit`` divided by the larger of this and
        the consumers running and waiting).  Waits, first come first
        served, until that share is free.
        """
        if not self.limit:
            yield 0
            return
        self._next += 1
        me = self._next
        self._waiting.append(me)
        try:
            while True:
                limit = self.limit
                if not limit:
                    rate = 0
                    break
                n = max(expected, len(self.held) + len(self._waiting))
                rate = max(1, limit // n)
                if self._waiting[0] == me and limit - self.in_use >= rate:
                    break
                await self._changed.wait()
        finally:
            self._waiting.remove(me)
            self._wake()
        if rate:
            self.held[me] = rate
        try:
            yield rate
        finally:
            self.held.pop(me, None)
            self._wake()


class Throttle:
    """A token bucket for a thread: :meth:`spend` sleeps so that bytes stay at ``rate`` per second.

    ``rate`` 0 never sleeps.  At most a quarter of a second of bytes may
    pass in a burst.  ``stop`` ends a sleep early (shutdown).
    """

    def __init__(self, rate: int, stop: threading.Event | None = None) -> None:
        self.rate = rate
        self.stop = stop
        self._tokens = rate / 4
        self._at = time.monotonic()

    def spend(self, n: int) -> None:
        if not self.rate or n <= 0:
            return
        now = time.monotonic()
        self._tokens = min(self.rate / 4, self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= n
        if self._tokens < 0:
            delay = -self._tokens / self.rate
            if self.stop is not None:
                self.stop.wait(delay)
            else:
                time.sleep(delay)
