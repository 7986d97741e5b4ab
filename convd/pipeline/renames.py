"""Which names in ``incoming/`` arrived by rename, and which were created in place.

watchfiles reports both as "added", yet the contract treats them
differently: a file renamed in is complete and taken at once, one created
in place must settle first.  A second, non-blocking inotify descriptor on
the same directory (``IN_MOVED_TO | IN_CREATE``) tells them apart; it is
drained whenever watchfiles reports a batch, so it needs no reader task.
Where inotify is unavailable (polling on NFS/CephFS), :meth:`drain`
returns nothing and the intake falls back to timestamps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from pathlib import Path

__all__ = ["RenameWatch"]

_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_IN_CREATE = 0x00000100
_IN_MOVED_TO = 0x00000080
_IN_Q_OVERFLOW = 0x00004000
_EVENT = struct.Struct("iIII")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class RenameWatch:
    def __init__(self, directory: Path) -> None:
        self.fd = -1
        fd = _libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            return
        if _libc.inotify_add_watch(fd, os.fsencode(directory), _IN_CREATE | _IN_MOVED_TO) < 0:
            os.close(fd)
            return
        self.fd = fd

    @property
    def active(self) -> bool:
        return self.fd >= 0

    def drain(self) -> dict[str, bool]:
        """Names seen since the last call: True if renamed in, False if created in place."""
        out: dict[str, bool] = {}
        if self.fd < 0:
            return out
        while True:
            try:
                buf = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                return out
            pos = 0
            while pos + _EVENT.size <= len(buf):
                _wd, mask, _cookie, length = _EVENT.unpack_from(buf, pos)
                raw = buf[pos + _EVENT.size: pos + _EVENT.size + length].rstrip(b"\0")
                pos += _EVENT.size + length
                if mask & _IN_Q_OVERFLOW or not raw:
                    continue
                name = os.fsdecode(raw)
                # Created in place and later renamed over: the rename wins;
                # renamed in and then re-created: the creation wins.
                out[name] = bool(mask & _IN_MOVED_TO)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
