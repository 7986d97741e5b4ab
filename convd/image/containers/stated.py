"""What a container states about itself before it is unpacked: its kind, its description and the size it
unpacks to (a gzip ISIZE, an xz index, zstd frame headers), read from its ends with bounded reads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from convd.errors import CorruptImage, UnsupportedFormat
from convd.image.containers.kinds import (
    _XZ_MAGIC,
    _ZSTD_MAGIC,
    ARCHIVES,
    COMPRESSIONS,
    HEAD,
    KINDS,
    _archive,
    _zstd_skippable,
    describe,
    foreign,
    sniff,
)
from convd.image.containers.streams import _CHUNK, _DECODE_ERRORS, _decoder, _read_up_to, _reason

__all__ = ["Plan", "plan"]


_PEEK = 32 << 10 | 8  # through the ISO 9660 volume descriptor at 32769


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("bad xz index")
        b = buf[pos]
        value |= (b & 0x7F) << shift
        pos += 1
        if not b & 0x80:
            return value, pos
        shift += 7
_XZ_INDEX_MAX = 4 << 20  # an index of ~500k blocks: a TiB in 2 MiB blocks
_XZ_STREAMS_MAX = 64  # concatenated streams looked through (`cat a.xz b.xz` makes two)


def _xz_size(fd: int, size: int) -> int | None:
    """Uncompressed bytes of every stream in an xz file, from their indexes (xz file format 1.1, 4-6)."""
    total, pos, streams = 0, size, 0
    try:
        while pos > 0:
            # Bounded work: a hostile file of many streams or a huge index
            # is simply not sized (decoded as is, under the unpack budget).
            streams += 1
            if streams > _XZ_STREAMS_MAX:
                return None
            # Stream padding: zero bytes in fours.  Only a little is looked
            # through; a file ending in more is not sized (and decoded as is).
            tail = os.pread(fd, min(pos, 64 << 10), pos - min(pos, 64 << 10))
            padding = (len(tail) - len(tail.rstrip(b"\x00"))) // 4 * 4
            if padding == len(tail) and padding:
                return None
            pos -= padding
            if pos < 32:
                return None
            footer = os.pread(fd, 12, pos - 12)
            if footer[10:12] != b"YZ":
                return None
            backward = (int.from_bytes(footer[4:8], "little") + 1) * 4
            index_at = pos - 12 - backward
            if backward > _XZ_INDEX_MAX or index_at < 12:
                return None
            index = os.pread(fd, backward, index_at)
            if not index or index[0] != 0:
                return None
            records, p = _varint(index, 1)
            if records > len(index) // 2:  # each record takes two bytes at least
                return None
            blocks = 0
            for _ in range(records):
                unpadded, p = _varint(index, p)
                uncompressed, p = _varint(index, p)
                blocks += (unpadded + 3) & ~3
                total += uncompressed
            pos = index_at - blocks - 12
            if pos < 0 or os.pread(fd, 6, pos) != _XZ_MAGIC:
                return None
    except ValueError:
        return None
    return total


class _Window:
    """``pread`` through a 1 MiB window: many small reads of headers, few system calls."""

    def __init__(self, fd: int) -> None:
        self._fd, self._base, self._buf = fd, 0, b""

    def get(self, pos: int, n: int) -> bytes:
        if not (self._base <= pos and pos + n <= self._base + len(self._buf)):
            self._base, self._buf = pos, os.pread(self._fd, max(n, _CHUNK), pos)
        return self._buf[pos - self._base: pos - self._base + n]


def _zstd_size(fd: int, size: int) -> int | None:
    """Walk every frame of a zstd file by its headers (RFC 8878 3.1): the content sizes
    they state added up, or None when a frame states none.

    The decoder alone cannot tell a stream cut at a frame or block boundary
    from its end, so a frame or block that runs past the end of the file,
    a frame that never reaches its last block, and bytes after the last
    frame that are not a frame are all ``CorruptImage`` here, before a byte
    is decoded.  Costs one header read per block (a block holds at most
    128 KiB of output).
    """
    what = describe(["zstd"])
    w, pos, total, known, frames = _Window(fd), 0, 0, True, 0

    def truncated(start: int) -> CorruptImage:
        return CorruptImage(f"{what} is truncated: the frame at byte {start} runs past the end of the "
                            f"file ({size} bytes); the upload was probably cut short", detected="zstd")

    while pos < size:
        start = pos
        magic = w.get(pos, 4)
        if len(magic) < 4:
            raise truncated(start)
        if _zstd_skippable(magic):
            length = w.get(pos + 4, 4)
            pos += 8 + int.from_bytes(length, "little")
            if len(length) < 4 or pos > size:
                raise truncated(start)
            continue
        if magic != _ZSTD_MAGIC and frames == 0 and (other := foreign(w.get(pos, HEAD))) is not None:
            # lz4 shares zstd's skippable frames: skippable frames, then an lz4 frame.
            raise UnsupportedFormat(f"{other[1]}, not a disk image; convd unpacks {', '.join(KINDS)} only",
                                    detected=other[0])
        if magic != _ZSTD_MAGIC:
            raise CorruptImage(f"{what} has {size - pos} bytes after its last frame (from byte {pos}) "
                               "that are not a zstd frame", detected="zstd")
        desc = w.get(pos + 4, 1)
        if not desc:
            raise truncated(start)
        d = desc[0]
        if d & 0x08:
            raise CorruptImage(f"{what} has a frame header with its reserved bit set (byte {start})",
                               detected="zstd")
        single = bool(d & 0x20)
        fcs_len = (1 if single else 0, 2, 4, 8)[d >> 6]
        hlen = 1 + (0 if single else 1) + (0, 1, 2, 4)[d & 3] + fcs_len
        header = w.get(pos + 4, hlen)
        if len(header) < hlen:
            raise truncated(start)
        if fcs_len:
            total += int.from_bytes(header[hlen - fcs_len:], "little") + (256 if fcs_len == 2 else 0)
        else:
            known = False
        pos += 4 + hlen
        while True:
            block = w.get(pos, 3)
            if len(block) < 3:
                raise truncated(start)
            v = int.from_bytes(block, "little")
            if (v >> 1) & 3 == 3:
                raise CorruptImage(f"{what} has a block of the reserved type at byte {pos}", detected="zstd")
            pos += 3 + (1 if (v >> 1) & 3 == 1 else v >> 3)  # an RLE block stores one byte
            if pos > size:
                raise truncated(start)
            if v & 1:
                break
        pos += 4 if d & 0x04 else 0  # the content checksum
        if pos > size:
            raise truncated(start)
        frames += 1
    if not frames:
        raise CorruptImage(f"{what} holds no data frame, only skippable ones", detected="zstd")
    return total if known else None


@dataclass
class Plan:
    """What a look at the start (and, for xz, the end) of a dropped file tells."""

    kinds: list[str]  # outermost first: ["xz"], ["gzip", "tar"], ["ova"]
    size: int  # the dropped file's bytes
    stated: int | None = None  # bytes it unpacks to, as its format records them
    exact: bool = False  # ``stated`` is a sum the unpacked size must equal (xz index, zstd frames), not a hint
    peek: bytes = b""

    @property
    def description(self) -> str:
        return describe(self.kinds)


def _stated(fd: int, kind: str, size: int, head: bytes) -> tuple[int | None, bool]:
    if kind == "xz":
        n = _xz_size(fd, size)
        return n, n is not None
    if kind == "zstd":
        n = _zstd_size(fd, size)
        return n, n is not None
    if kind == "gzip" and size >= 18:
        # ISIZE is the last member's size modulo 4 GiB: a hint, never a limit.
        return int.from_bytes(os.pread(fd, 4, size - 4), "little"), False
    if kind in ARCHIVES:
        return size, False
    return None, False


def plan(fd: int, *, peek: bool = True) -> Plan | None:
    """Look at an open dropped file: its container kinds and stated size, or None for no container.

    For a compressed stream the first decompressed block is read too, to
    tell a tar inside (the tar's member headers give exact sizes later).
    Raises ``CorruptImage`` when even that block cannot be decompressed.
    """
    size = os.fstat(fd).st_size
    head = os.pread(fd, HEAD, 0)
    kind = sniff(head)
    if kind is None:
        if (other := foreign(head)) is not None:
            raise UnsupportedFormat(f"{other[1]}, not a disk image; convd unpacks {', '.join(KINDS)} only",
                                    detected=other[0])
        return None
    p = Plan(kinds=[kind], size=size)
    p.stated, p.exact = _stated(fd, kind, size, head)
    if kind in COMPRESSIONS and peek:
        with open(fd, "rb", closefd=False) as raw:
            raw.seek(0)
            stream = _decoder(kind, raw)
            try:
                p.peek = _read_up_to(stream, HEAD)
            except _DECODE_ERRORS as exc:
                raise CorruptImage(f"{describe([kind])} cannot be decompressed: {_reason(exc)}",
                                   detected=kind) from None
        inner = _archive(p.peek)
        if inner:
            p.kinds.append(inner)
    return p
