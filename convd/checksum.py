"""Checksums of published bytes at hashlib speed.

One read of the data in large buffers, in a worker thread (hashlib releases
the GIL); holes found with ``SEEK_HOLE`` are hashed as zeros without reading
them from disk.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from collections.abc import Callable, Sequence

from convd.errors import Stopped

__all__ = ["digest_file"]

_BUF = 4 << 20
_ZEROS = memoryview(bytes(_BUF))


def _data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """[(start, end)] of data; the rest are holes.  Whole file where holes are unknown."""
    ranges = []
    pos = 0
    try:
        while pos < size:
            start = os.lseek(fd, pos, os.SEEK_DATA)
            end = os.lseek(fd, start, os.SEEK_HOLE)
            ranges.append((start, min(end, size)))
            pos = end
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # no data after pos
            return ranges
        return [(0, size)]
    return ranges


def digest_file(fd: int, algorithms: Sequence[str],
                on_bytes: Callable[[int], None] | None = None,
                stop: threading.Event | None = None,
                poll: Callable[[], None] | None = None) -> dict[str, str]:
    """Hex digests of the whole file behind ``fd`` (read with pread; fd offset untouched).

    Raises ``Stopped`` soon after ``stop`` is set: a thread cannot be
    cancelled, and shutdown must not wait for a terabyte to be hashed.
    ``poll`` is called before each buffer, holes' zeros too, and may raise
    to end the read (``on_bytes`` counts only bytes read).
    """
    if not algorithms:
        return {}
    hashers = [hashlib.new(a) for a in algorithms]
    size = os.fstat(fd).st_size
    buf = bytearray(_BUF)
    view = memoryview(buf)
    pos = 0

    def feed(data: memoryview | bytes) -> None:
        if stop is not None and stop.is_set():
            raise Stopped("checksum interrupted by shutdown")
        if poll is not None:
            poll()
        for h in hashers:
            h.update(data)

    for start, end in _data_ranges(fd, size):
        while pos < start:  # a hole: zeros, not read
            n = min(_BUF, start - pos)
            feed(_ZEROS[:n])
            pos += n
        while pos < end:
            n = os.preadv(fd, [view[: min(_BUF, end - pos)]], pos)
            if n == 0:
                break
            feed(view[:n])
            pos += n
            if on_bytes:
                on_bytes(n)
    while pos < size:
        n = min(_BUF, size - pos)
        feed(_ZEROS[:n])
        pos += n
    return {a: h.hexdigest() for a, h in zip(algorithms, hashers)}
