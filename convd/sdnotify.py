"""The systemd notify protocol (sd_notify(3)), in pure Python: READY, STATUS,
WATCHDOG, RELOADING and STOPPING datagrams to ``$NOTIFY_SOCKET``.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping
from types import TracebackType

__all__ = ["Notifier"]

log = logging.getLogger(__name__)


class Notifier:
    """Sends state changes to the service manager; a silent no-op outside systemd.

    Notification is best effort by design: a lost or refused datagram is
    logged at debug level and never raised, because a notify failure must not
    take down conversions in flight; most callers of the C ``sd_notify``
    ignore its return value for the same reason.
    """

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        self._address = _socket_address(environ.get("NOTIFY_SOCKET", ""))
        self._sock: socket.socket | None = None
        if self._address is not None:
            try:
                # Opened once and kept: the watchdog pings every few seconds
                # for the life of the daemon.  Non-blocking so a stalled
                # service manager can never stall the event loop.
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            except OSError as exc:
                log.debug("sd_notify disabled: cannot create socket: %s", exc)
        # Only meaningful when there is somewhere to send the pings to.
        self._watchdog_usec = _watchdog_usec(environ) if self._sock is not None else None

    @property
    def enabled(self) -> bool:
        """True when ``$NOTIFY_SOCKET`` named a usable socket."""
        return self._sock is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings, or None when no watchdog is armed.

        Half of ``$WATCHDOG_USEC``, as sd_watchdog_enabled(3) recommends, so a
        single late ping does not get the service killed.
        """
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def send(self, **fields: object) -> bool:
        """Send ``KEY=value`` assignments in one datagram; True if it was sent."""
        text = "".join(f"{key}={_one_line(value)}\n" for key, value in fields.items())
        return self.send_raw(text)

    def send_raw(self, text: str) -> bool:
        """Send ``text`` verbatim as one datagram; True if it was sent."""
        # The socket exists only for an address, so the address check never differs.
        if self._sock is None or self._address is None or not text:
            return False
        try:
            self._sock.sendto(text.encode(), self._address)
        except OSError as exc:
            # EAGAIN (manager busy), ECONNREFUSED/ENOENT (manager gone, e.g.
            # during its own re-exec): the next message will try again.
            log.debug("sd_notify %r failed: %s", text.strip(), exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Start-up (or a reload) is complete."""
        if status is None:
            return self.send(READY=1)
        return self.send(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        """A one-line summary shown by ``systemctl status``."""
        return self.send(STATUS=text)

    def watchdog(self) -> bool:
        """Still alive: resets the ``WatchdogSec=`` timer."""
        return self.send(WATCHDOG=1)

    def reloading(self) -> bool:
        """A configuration reload has begun; ``ready()`` ends it.

        ``MONOTONIC_USEC`` goes in the same datagram: ``Type=notify-reload``
        (systemd >= 253) uses it to tell this reload from an older one, and
        older managers ignore it.
        """
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send(RELOADING=1, MONOTONIC_USEC=now_usec)

    def stopping(self) -> bool:
        """Shutdown has begun."""
        return self.send(STOPPING=1)

    def close(self) -> None:
        """Close the socket; later sends are no-ops.  Safe to call twice."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> Notifier:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _one_line(value: object) -> str:
    # A newline inside a value would start a bogus assignment of its own.
    return str(value).replace("\n", " ")


def _socket_address(value: str) -> str | None:
    """The sendto() address for ``$NOTIFY_SOCKET``, or None if unusable."""
    if value.startswith("@"):
        # Abstract namespace: Linux marks it with a leading NUL byte.
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    if value:
        # sd_notify(3) also rejects relative paths; vsock: needs systemd >= 254.
        log.debug("sd_notify disabled: unsupported NOTIFY_SOCKET %r", value)
    return None


def _watchdog_usec(environ: Mapping[str, str]) -> int | None:
    """``$WATCHDOG_USEC`` if the watchdog is meant for this process, as sd_watchdog_enabled(3)."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = environ.get("WATCHDOG_PID")
    # The variables are inherited: a child started by the real recipient
    # (or this process started by someone else's child) must not ping.
    if pid is not None:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec
