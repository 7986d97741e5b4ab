"""Directory events by ``inotify(7)`` through ctypes: the bench learns that a
record appeared within microseconds, without polling against the daemon for CPU."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import select
import struct
import time
from collections.abc import Iterable

__all__ = ["DirWatch", "QueueOverflow"]

IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_Q_OVERFLOW = 0x00004000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class QueueOverflow(RuntimeError):
    """The kernel dropped events; the caller must look at the directory itself."""


class DirWatch:
    """Names renamed (or created) into some directories, with the monotonic time each was seen."""

    def __init__(self, dirs: Iterable[str | os.PathLike[str]], mask: int = IN_MOVED_TO) -> None:
        self.fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        self.dirs: dict[int, str] = {}
        for d in dirs:
            wd = _libc.inotify_add_watch(self.fd, os.fsencode(d), mask)
            if wd < 0:
                e = ctypes.get_errno()
                os.close(self.fd)
                raise OSError(e, os.strerror(e), os.fspath(d))
            self.dirs[wd] = os.fspath(d)
        self._poll = select.poll()
        self._poll.register(self.fd, select.POLLIN)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> DirWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, timeout: float) -> list[tuple[str, str, float]]:
        """Events within ``timeout`` seconds: (directory, name, monotonic time read)."""
        if not self._poll.poll(max(0, int(timeout * 1000))):
            return []
        now = time.monotonic()
        try:
            buf = os.read(self.fd, 1 << 20)
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                return []
            raise
        out = []
        pos = 0
        while pos < len(buf):
            wd, mask, _cookie, length = _EVENT.unpack_from(buf, pos)
            pos += _EVENT.size
            name = buf[pos:pos + length].rstrip(b"\0").decode(errors="surrogateescape")
            pos += length
            if mask & IN_Q_OVERFLOW:
                raise QueueOverflow("inotify queue overflowed")
            out.append((self.dirs.get(wd, ""), name, now))
        return out

    def wait_for(self, names: Iterable[str], timeout: float) -> dict[str, tuple[str, float]]:
        """Block until every name has appeared; {name: (directory, monotonic time)}."""
        want = set(names)
        seen: dict[str, tuple[str, float]] = {}
        deadline = time.monotonic() + timeout
        while want - seen.keys():
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(want - seen.keys())
                raise TimeoutError(f"timed out after {timeout:g} s waiting for {missing[:5]}"
                                   f"{' …' if len(missing) > 5 else ''}")
            for d, name, t in self.read(min(left, 1.0)):
                if name in want and name not in seen:
                    seen[name] = (d, t)
        return seen
