"""Bounded reads of an open image for the per-format checks: a read past the end is corruption.

:class:`ImageFile` reads headers and tables with ``pread`` (never guest data
beyond what a check names), slices large tables, and counts data extents past
the end of the file so the message says how much is missing.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from array import array
from collections.abc import Iterator

from convd.errors import CorruptImage, Stopped
from convd.units import format_size

__all__ = ["SECTOR", "ImageFile", "bytes_without", "qcow2_plain_table", "round_up", "table", "u32_table", "u64_table",
           "used"]

SECTOR = 512
# Tables are read in slices of this many bytes (a table is metadata, but a
# 4 TiB image's qcow2 L2 tables or VMDK grain tables are hundreds of MiB).
_SLICE = 1 << 20


def round_up(n: int, to: int) -> int:
    return -(-n // to) * to


class ImageFile:
    """Bounded reads of an open image; anything past the end is corruption."""

    def __init__(self, fd: int, size: int, fmt: str, stop: threading.Event | None) -> None:
        self.fd, self.size, self.fmt, self.stop = fd, size, fmt, stop
        # Data extents past the end: counted through the whole table, so the
        # message can say how much is missing, not just the first miss.
        self.missing = 0
        self.first_missing = ""
        self.farthest = 0

    def data_past_end(self, what: str, end: int) -> None:
        """Note a data extent (guest bytes) that ends past the end of the file."""
        if not self.missing:
            self.first_missing = what
        self.missing += 1
        self.farthest = max(self.farthest, end)

    def raise_missing(self) -> None:
        if self.missing:
            extents = "data extent points" if self.missing == 1 else "data extents point"
            raise self.corrupt(
                f"{self.missing} {extents} past the end of the file ({format_size(self.size)}), up to "
                f"{format_size(self.farthest - self.size)} past it; the first is "
                f"{self.first_missing.rstrip(',')}: the upload is truncated or the metadata is damaged")

    def corrupt(self, message: str) -> CorruptImage:
        return CorruptImage(f"{self.fmt}: {message}", detected=self.fmt)

    def past_end(self, what: str, end: int) -> CorruptImage:
        over = end - self.size
        return self.corrupt(f"{what} points {format_size(over)} past the end of the file "
                            f"({format_size(self.size)}): the upload is truncated or the metadata is damaged")

    def read(self, offset: int, length: int, what: str) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise self.past_end(what, offset + length)
        data = os.pread(self.fd, length, offset)
        if len(data) != length:  # the file shrank under us
            raise self.past_end(what, offset + length)
        return data

    def slices(self, offset: int, length: int, what: str, item: int) -> Iterator[tuple[int, bytes]]:
        """``(index of the first item, bytes)`` for a table of ``length`` bytes, ``_SLICE`` at a time."""
        if offset < 0 or offset + length > self.size:
            raise self.past_end(what, offset + length)
        step = _SLICE - _SLICE % item
        for start in range(0, length, step):
            if self.stop is not None and self.stop.is_set():
                raise Stopped("integrity check interrupted by shutdown")
            yield start // item, self.read(offset + start, min(step, length - start), what)


_NATIVE_BIG = sys.byteorder == "big"


def table(data: bytes, code: str, big_endian: bool) -> array:
    """A table of unsigned integers (``code`` "I": 32-bit, "Q": 64-bit) in the file's byte order."""
    table = array(code, data)
    if big_endian != _NATIVE_BIG:
        table.byteswap()
    return table


@functools.lru_cache(maxsize=64)
def bytes_without(mask: int) -> bytes:
    """Every byte value with none of ``mask``'s bits set (a ``translate`` deletion table)."""
    return bytes(v for v in range(256) if not v & mask)


def qcow2_plain_table(raw: bytes, cluster_bits: int) -> bool:
    """Whether every entry of a big-endian standard L2 table is plain: no compressed
    flag, no reserved bits, offsets cluster-aligned (bit 0, "reads as zeros", allowed).

    Byte slices and ``translate`` keep this at C speed: the common case of a
    large image costs no Python loop per entry.
    """
    if raw[0::8].translate(None, b"\x00\x80"):  # bits 56-62: reserved, compressed
        return False
    for k in range((cluster_bits + 7) // 8):  # byte 7 - k holds bits 8k .. 8k+7
        width = min(cluster_bits - 8 * k, 8)
        mask = (1 << width) - 1
        if k == 0:
            mask &= ~1
        if raw[7 - k::8].translate(None, bytes_without(mask)):
            return False
    return True


def used(data: bytes, item: int) -> bytes:
    """``data`` without its trailing all-zero entries of ``item`` bytes: tables
    fill from the front, so a small image's mostly empty table costs no Python
    loop over its unused tail."""
    end = len(data.rstrip(b"\0"))
    return data[:-(-end // item) * item]


def u32_table(data: bytes, big_endian: bool) -> array:
    return table(data, "I", big_endian)


def u64_table(data: bytes, big_endian: bool) -> array:
    return table(data, "Q", big_endian)
