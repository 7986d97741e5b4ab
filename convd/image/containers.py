"""Containers and compressed streams: told by their signature, unpacked under a byte budget.

What people upload is often not a disk but a wrapper around one: a cloud
image compressed with gzip, xz, zstd or bzip2, an appliance exported as an
OVA (a tar whose first member is an OVF descriptor), a disk in a
``.tar.gz``.  This module recognises them by content, never by name, and
streams the one disk inside to a file of our choosing: a member's name is
never used as a path, and links, devices, absolute and ``..`` members are
refused.  Writing is bounded by a :class:`Budget` the caller backs with the
workspace ledger, so a decompression bomb stops at the limit.
"""

from __future__ import annotations

import bz2
import hashlib
import io
import lzma
import os
import re
import tarfile
import threading
import urllib.parse
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import IO, Any, Self

import zstandard
from defusedxml import ElementTree as SafeXML
from defusedxml.common import DefusedXmlException

from convd.errors import CorruptImage, Stopped, TooLarge, UnsafeImage, UnsupportedFormat
from convd.image import signatures
from convd.units import format_size

__all__ = [
    "COMPRESSIONS",
    "KINDS",
    "Budget",
    "Plan",
    "Unpacked",
    "describe",
    "foreign",
    "parse_manifest",
    "plan",
    "sniff",
    "unpack",
]

COMPRESSIONS = ("gzip", "xz", "zstd", "bzip2")
ARCHIVES = ("tar", "ova")
KINDS = COMPRESSIONS + ARCHIVES  # what [convert] containers may list (convd.config.CONTAINER_KINDS)
_DESCRIPTION = {
    "gzip": "a gzip-compressed stream",
    "xz": "an xz-compressed stream",
    "zstd": "a zstd-compressed stream",
    "bzip2": "a bzip2-compressed stream",
    "tar": "a tar archive",
    "ova": "an OVA appliance (a tar with an OVF descriptor)",
}

HEAD = 512  # a tar header; every compression magic is within it
_CHUNK = 1 << 20
_ZERO = bytes(_CHUNK)
# What a decoder may allocate: xz -9 needs 65 MiB, zstd's default window
# limit is 128 MiB; a header asking for more is refused, not obeyed.
_XZ_MEMLIMIT = 256 << 20
_ZSTD_MAX_WINDOW = 1 << 27
_OVF_LIMIT = 4 << 20  # an OVF descriptor is a few KiB of XML
_XZ_MAGIC = b"\xfd7zXZ\x00"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# A tar member is a disk candidate with one of these at its start (qcow2,
# VMDK sparse/COWD/descriptor, VDI, dynamic VHD, VHDX, QED), an MBR or GPT,
# an ISO 9660 volume, or else a size of whole sectors from 1 MiB up (a raw
# disk, a fixed VHD).
_DISK_MAGICS = (b"QFI\xfb", b"KDMV", b"COWD", b"# Disk DescriptorFile", b"conectix", b"vhdxfile",
                b"QED\x00")
_TAR = "tar"
_PEEK = 32 << 10 | 8  # through the ISO 9660 volume descriptor at 32769


def describe(kinds: list[str]) -> str:
    """``["gzip", "tar"]`` → ``"a tar archive inside a gzip-compressed stream"``."""
    text = _DESCRIPTION[kinds[-1]]
    for outer in reversed(kinds[:-1]):
        text += f" inside {_DESCRIPTION[outer]}"
    return text


# -- signatures ---------------------------------------------------------------

def _compression(head: bytes) -> str | None:
    if head.startswith(b"\x1f\x8b\x08"):
        return "gzip"
    if head.startswith(_XZ_MAGIC):
        return "xz"
    if head.startswith(_ZSTD_MAGIC) or _zstd_skippable(head[:4]):
        return "zstd"
    if head[:3] == b"BZh" and head[3:4] in b"123456789" and head[4:10] == b"\x31\x41\x59\x26\x53\x59":
        return "bzip2"
    return None


def _octal_field(field: bytes) -> bool:
    """A tar numeric field: octal digits, padded with spaces or NULs (or GNU base-256)."""
    text = field.strip(b" \x00")
    return field[:1] in (b"\x80", b"\xff") or all(48 <= c <= 55 for c in text)


def _tar_header(head: bytes) -> bool:
    """A tar header whose checksum adds up (the magic alone could be chance).

    ustar/GNU/PAX headers carry a magic; a V7 header (``tar --format=v7``)
    has none, so it must also look like one: a name, octal numeric fields,
    a V7 type and nothing where ustar keeps its magic.
    """
    if len(head) < 512:
        return False
    try:
        stored = int(head[148:156].split(b"\x00", 1)[0].strip() or b"-1", 8)
    except ValueError:
        return False
    rest = head[:148] + b" " * 8 + head[156:512]
    if stored not in (sum(rest), sum(b - 256 if b > 127 else b for b in rest)):  # old tars summed signed
        return False
    if head[257:263] in (b"ustar\x00", b"ustar "):
        return True
    name = head[:100].split(b"\x00", 1)[0]
    return (head[257:263] == bytes(6) and bool(name) and all(c >= 32 for c in name)
            and head[156:157] in (b"\x00", b"0", b"1", b"2", b"5")
            and all(_octal_field(head[a:b]) for a, b in ((100, 108), (108, 116), (116, 124), (124, 136),
                                                         (136, 148))))


def _archive(head: bytes) -> str | None:
    if not _tar_header(head):
        return None
    name = head[:100].split(b"\x00", 1)[0]
    prefix = head[345:500].split(b"\x00", 1)[0] if head[257:263] == b"ustar\x00" else b""
    full = (prefix + b"/" + name) if prefix else name
    # A PAX or GNU long-name header first hides the name; tarfile tells later.
    return "ova" if head[156:157] in b"0\x00" and full.lower().endswith(b".ovf") else "tar"


# Containers and compressions convd does not unpack, told by a magic and a
# check of the fields after it (so that a raw disk starting with the same
# bytes by chance is not taken for one).  Found at the start of a dropped
# file they are unsupported_format, never a raw disk.  Filesystem images
# (ISO 9660, squashfs, ext, FAT) are not here: they are raw disks.
_ZIP_METHODS = {0, 1, 6, 8, 9, 12, 14, 19, 93, 95, 96, 97, 98, 99}


def _lzma_alone(head: bytes) -> bool:
    """A legacy .lzma header (xz's lzma_alone, as xz --format=auto tells it): properties
    byte < 225, a dictionary of 2^n or 2^n + 2^(n-1) bytes, a size under 256 GiB or
    unknown; and the first bytes decode."""
    if len(head) < 13 or head[0] >= 225:
        return False
    d = int.from_bytes(head[1:5], "little")
    top = 1 << (d.bit_length() - 1) if d else 0
    if not d or d not in (top, top | top >> 1):
        return False
    n = int.from_bytes(head[5:13], "little")
    if n != (1 << 64) - 1 and n >= 1 << 38:
        return False
    try:
        lzma.LZMADecompressor(format=lzma.FORMAT_ALONE, memlimit=_XZ_MEMLIMIT).decompress(head, max_length=4096)
    except lzma.LZMAError:
        return False
    return True


def foreign(head: bytes) -> tuple[str, str] | None:
    """A container convd does not unpack: its kind and what it is (``("zip", "a zip archive")``), or None."""
    h = head + bytes(16)  # a file of a few bytes
    if h[:4] == b"PK\x03\x04" and h[4] <= 63 and int.from_bytes(h[8:10], "little") in _ZIP_METHODS:
        return "zip", "a zip archive"
    if h[:6] == b"7z\xbc\xaf\x27\x1c":
        return "7z", "a 7-Zip archive"
    if h[:7] == b"Rar!\x1a\x07\x00" or h[:8] == b"Rar!\x1a\x07\x01\x00":
        return "rar", "a RAR archive"
    if h[:4] == b"\x04\x22\x4d\x18" and h[4] >> 6 == 1 and not h[4] & 0x02:
        return "lz4", "an lz4-compressed stream"
    if h[:4] == b"\x02\x21\x4c\x18":
        return "lz4", "an lz4-compressed stream (legacy format)"
    if h[:4] == b"LZIP" and h[4] in (0, 1):
        return "lzip", "an lzip-compressed stream"
    if h[:9] == b"\x89LZO\x00\r\n\x1a\n":
        return "lzop", "an lzop-compressed stream"
    if h[:2] == b"\x1f\x9d" and 9 <= h[2] & 0x1F <= 16 and not h[2] & 0x60:
        return "compress", "a Unix compress (.Z) stream"
    if h[:4] == b"xar!" and h[4:6] == b"\x00\x1c" and h[6:8] == b"\x00\x01":
        return "xar", "a xar archive"
    if h[:6] in (b"070701", b"070702") and all(c in b"0123456789abcdefABCDEF" for c in h[6:110]):
        return "cpio", "a cpio archive"
    if h[:6] == b"070707" and all(48 <= c <= 55 for c in h[6:76]):
        return "cpio", "a cpio archive"
    if h[:8] == b"!<arch>\n":
        return "ar", "an ar archive (a .deb or static library)"
    if h[:8] == b"MSCF\x00\x00\x00\x00":
        return "cab", "a Microsoft cabinet"
    if _lzma_alone(head):
        return "lzma", "a legacy .lzma stream (lzma_alone)"
    return None


def sniff(head: bytes) -> str | None:
    """The container kind whose signature starts ``head`` (>= 512 bytes), or None."""
    return _compression(head) or _archive(head)


# -- sizes the container states ---------------------------------------------------

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


_STREAMS_MAX = 10_000  # gzip members or xz streams in one file (`cat a.gz b.gz` makes two)
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


def _zstd_skippable(magic: bytes) -> bool:
    """A skippable frame's magic, 0x184D2A50..0x184D2A5F (RFC 8878 3.1.2; pzstd starts with one)."""
    return len(magic) == 4 and magic[1:] == b"\x2a\x4d\x18" and magic[0] & 0xF0 == 0x50


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


# -- decoders -----------------------------------------------------------------

class _Concatenated(io.RawIOBase):
    """gzip members or xz streams one after another (zero padding between them allowed),
    read 1 MiB of input at a time.

    ``gzip.GzipFile`` reads its input 8 KiB at a time and hands out small
    pieces (a third slower than ``gzip -dc`` on 2 GiB); ``lzma.LZMAFile``
    takes no memory limit, so an xz header could make it allocate what it
    likes.  zlib checks each gzip member's CRC32 and length, liblzma each
    xz block's check and index.
    """

    def __init__(self, fp: IO[bytes], kind: str, stop: threading.Event | None = None) -> None:
        self._fp, self._kind, self._stop = fp, kind, stop
        self._dec = self._new()
        self._pending = b""
        self._done = False
        self._streams = 1

    def _new(self) -> Any:
        if self._kind == "gzip":
            return zlib.decompressobj(wbits=31)
        # FORMAT_XZ, not the default AUTO: that would take a legacy .lzma stream after an xz one.
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=_XZ_MEMLIMIT)

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def read(self, n: int | None = -1) -> bytes:
        want = n if n is not None and n > 0 else _CHUNK
        while not self._done:
            if self._dec.eof:
                rest = self._dec.unused_data.lstrip(b"\x00")
                while not rest:
                    more = self._fp.read(_CHUNK)
                    if not more:
                        self._done = True
                        return b""
                    rest = more.lstrip(b"\x00")
                magic = b"\x1f\x8b\x08" if self._kind == "gzip" else _XZ_MAGIC
                while len(rest) < len(magic) and (more := self._fp.read(_CHUNK)):
                    rest += more
                if not rest.startswith(magic):
                    # gzip -d ignores such bytes with a warning, xz -d refuses them; convd
                    # does not guess what they are (a second, damaged member? another format?).
                    raise _TrailingData(f"bytes after the end of the {self._kind} stream that are not "
                                       f"another {self._kind} {'member' if self._kind == 'gzip' else 'stream'}")
                # Each new stream starts from what the last one left over (up to a
                # chunk, copied): a flood of tiny streams is bounded, and a
                # shutdown is heard between them (they may write nothing at all).
                self._streams += 1
                if self._streams > _STREAMS_MAX:
                    raise UnsupportedFormat(f"{describe([self._kind])} of more than {_STREAMS_MAX} concatenated "
                                            f"{'members' if self._kind == 'gzip' else 'streams'}; convd "
                                            "unpacks a few", detected=self._kind)
                if self._stop is not None and self._stop.is_set():
                    raise Stopped("unpacking interrupted by shutdown")
                self._dec, self._pending = self._new(), rest
            out = self._step(want)
            if out:
                return out
        return b""

    def _step(self, want: int) -> bytes:
        dec = self._dec
        if self._kind == "gzip":
            data = self._pending or self._fp.read(_CHUNK)
            if not data:
                out = dec.flush()
                if not out and not dec.eof:
                    raise EOFError("the gzip stream ends before its end marker")
                return bytes(out)
            out = dec.decompress(data, want)
            self._pending = dec.unconsumed_tail
            return bytes(out)
        data = b""
        if dec.needs_input:
            data, self._pending = self._pending or self._fp.read(_CHUNK), b""
            if not data:
                raise EOFError("the xz stream ends before its end marker")
        return bytes(dec.decompress(data, want))


def _decoder(kind: str, raw: IO[bytes], stop: threading.Event | None = None) -> Any:
    """A file-like ``read(n)`` of the decompressed bytes of ``raw``."""
    if kind in ("gzip", "xz"):
        return _Concatenated(raw, kind, stop)
    if kind == "bzip2":
        return bz2.BZ2File(raw)
    return zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW).stream_reader(
        raw, read_size=_CHUNK, read_across_frames=True, closefd=False)


class _TrailingData(ValueError):
    """Bytes after a compressed stream's end that are not another stream of its kind."""


_DECODE_ERRORS = (_TrailingData, EOFError, OSError, zlib.error, lzma.LZMAError, zstandard.ZstdError)


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, EOFError) or text == "unexpected end of data":  # tarfile's, for a cut member
        return f"truncated ({text})"
    return text


def _read_up_to(stream: Any, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        data = stream.read(n - got)
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)


class _Chained:
    """Bytes already read, then the rest of a stream: ``read(n)`` for tarfile's stream mode."""

    def __init__(self, first: bytes, rest: Any) -> None:
        self._first, self._rest = first, rest

    def read(self, n: int = -1) -> bytes:
        if self._first:
            if n < 0 or n >= len(self._first):
                data, self._first = self._first, b""
                return data if n < 0 else data + self._rest.read(n - len(data))
            data, self._first = self._first[:n], self._first[n:]
            return data
        return self._rest.read(n)


# -- writing under a budget ------------------------------------------------------

@dataclass
class Budget:
    """Bytes the unpacked file may take, grown through ``grow`` up to ``cap``.

    ``grow(total)`` asks the ledger for ``total`` bytes in all; it returns
    once they are reserved, or raises (``TransientError`` when the space
    does not come, ``TooLarge`` when it never could).  Past ``cap``,
    :meth:`need` raises ``TooLarge`` naming ``limit_text``.
    """

    cap: int
    reserved: int
    grow: Callable[[int], None]
    limit_text: str = "max_virtual_size"

    def need(self, total: int, what: str) -> None:
        if total > self.cap:
            raise TooLarge(f"{what} unpacks to more than {format_size(self.cap)} "
                           f"(the limit from {self.limit_text})")
        if total > self.reserved:
            # Ahead by doubling, so a stream of unknown size asks the ledger
            # a few dozen times, not once a chunk.
            want = min(self.cap, max(total, 2 * self.reserved))
            while True:
                try:
                    self.grow(want)
                    break
                except TooLarge:
                    # The look-ahead could never fit, what is written so
                    # far may: look less far ahead, and refuse only when
                    # the bytes really written (``total``) cannot fit.
                    if want <= total:
                        raise
                    want = total + (want - total) // 4
            self.reserved = want


def _copy(read: Callable[[int], bytes], out: int, budget: Budget, what: str,
          stop: threading.Event, progress: Callable[[], None], known: int | None = None,
          first: bytes = b"") -> int:
    """Stream ``read`` into ``out`` (holes for zero blocks); returns the bytes written."""
    if known is not None:
        budget.need(known, what)
    written = 0
    chunk = first or read(_CHUNK)
    while chunk:
        end = written + len(chunk)
        budget.need(end, what)
        if chunk != (_ZERO if len(chunk) == _CHUNK else _ZERO[: len(chunk)]):  # else leave a hole
            os.pwrite(out, chunk, written)
        written = end
        if stop.is_set():
            raise Stopped("unpacking interrupted by shutdown")
        progress()
        chunk = read(_CHUNK)
    os.ftruncate(out, written)
    return written


# -- archives -------------------------------------------------------------------------

def _safe_name(member: tarfile.TarInfo, archive: str) -> None:
    name = PurePosixPath(member.name)
    shown = repr(member.name)
    if member.name.startswith("/") or name.is_absolute():
        raise UnsafeImage(f"{archive} member {shown} has an absolute path")
    if ".." in name.parts:
        raise UnsafeImage(f"{archive} member {shown} points outside the archive (..)")
    if member.issym() or member.islnk():
        raise UnsafeImage(f"{archive} member {shown} is a link (to {member.linkname!r})")
    if member.ischr() or member.isblk() or member.isfifo():
        raise UnsafeImage(f"{archive} member {shown} is a device or FIFO")
    if not (member.isreg() or member.isdir()):
        raise UnsafeImage(f"{archive} member {shown} has tar type {member.type!r}, not a file")


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _attr(el: Any, name: str) -> str | None:
    for key, value in el.attrib.items():
        if _local(key) == name:
            return str(value)
    return None


def ovf_disks(xml: bytes) -> list[str]:
    """The file names of the disks an OVF descriptor references (DSP0243 ``DiskSection``).

    Raises ``UnsafeImage`` for entities or external references (refused by
    defusedxml), ``CorruptImage`` for XML that does not parse, and
    ``UnsupportedFormat`` for a disk split in chunks or stored compressed.
    """
    try:
        root = SafeXML.fromstring(xml, forbid_dtd=True)
    except DefusedXmlException as exc:
        raise UnsafeImage(f"the OVF descriptor uses refused XML features: {exc}") from None
    except SafeXML.ParseError as exc:
        raise CorruptImage(f"the OVF descriptor is not valid XML: {exc}") from None
    files: dict[str, Any] = {}
    for el in root.iter():
        if isinstance(el.tag, str) and _local(el.tag) == "File" and _attr(el, "id"):
            files[_attr(el, "id") or ""] = el
    names: list[str] = []
    for el in root.iter():
        if not (isinstance(el.tag, str) and _local(el.tag) == "Disk"):
            continue
        ref = _attr(el, "fileRef")
        if not ref:
            continue  # a blank disk, created empty at import: nothing to convert
        f = files.get(ref)
        href = _attr(f, "href") if f is not None else None
        if not href:
            raise CorruptImage(f"the OVF descriptor's disk refers to file {ref!r}, which it does not list")
        if _attr(f, "chunkSize") or _attr(f, "compression") not in (None, "identity"):
            raise UnsupportedFormat(f"the OVF descriptor stores disk {href!r} chunked or compressed, "
                                    "which convd does not unpack")
        if href not in names:
            names.append(href)
    return names


def _norm(name: str) -> str:
    return str(PurePosixPath(name))  # "./disk1.vmdk" → "disk1.vmdk"


def _href_names(href: str, what: str) -> tuple[str, ...]:
    """The member names an OVF ``href`` may mean: as written, and percent-decoded
    (it is a URI reference, DSP0243 8.1: ``my%20disk.vmdk`` is ``my disk.vmdk``).
    Raises ``UnsupportedFormat`` for a URL with a scheme or host: a disk outside the archive."""
    url = urllib.parse.urlsplit(href)
    if url.scheme or url.netloc:
        raise UnsupportedFormat(f"{what} references disk {href!r} by URL, outside the archive; "
                                "convd converts the disk an OVA holds")
    return tuple(dict.fromkeys((_norm(href), _norm(urllib.parse.unquote(url.path)))))


def _is_disk_candidate(head: bytes, size: int) -> bool:
    if head.startswith(_DISK_MAGICS) or sniff(head[:HEAD]) is not None:
        return True
    if signatures.recognise_head(head) is not None:
        return True  # a format convd refuses: detect names it
    if head.startswith(b"<<< ") and head[64:68] == b"\x7f\x10\xda\xbe":  # VDI
        return True
    if head[510:512] == b"\x55\xaa" or head[512:520] == b"EFI PART" or head[32769:32774] == b"CD001":
        return True
    return size >= 1 << 20 and size % 512 == 0


@dataclass
class Unpacked:
    """What was unpacked: for the record's ``source``."""

    kinds: list[str]
    size: int  # bytes of the unpacked file
    member: str | None = None  # the tar/OVA member it came from
    manifest: str | None = None  # the OVF manifest every listed member was checked against

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"container": list(self.kinds), "unpacked_size": self.size}
        if self.member is not None:
            out["member"] = self.member
        if self.manifest is not None:
            out["manifest"] = self.manifest
        return out


# An OVF manifest (DSP0243 5.1): one "ALGO(file)= hex" line per file of the
# package; "ALGO (file) = hex" (BSD/openssl style) is written too.
_MANIFEST_LIMIT = 1 << 20
_MANIFEST_LINE = re.compile(r"(SHA1|SHA256|SHA512)\s*\((.+)\)\s*=\s*([0-9A-Fa-f]+)")
_MANIFEST_ALGOS = {"SHA1": "sha1", "SHA256": "sha256", "SHA512": "sha512"}


def parse_manifest(text: bytes, name: str) -> dict[str, tuple[str, str]]:
    """``{member: (hashlib name, hex digest)}`` from an OVF manifest ``name``.

    Raises ``CorruptImage`` for a line that is not ``SHA1|SHA256|SHA512(file)= hex``
    with a digest of that algorithm's length, or a file named twice.
    """
    out: dict[str, tuple[str, str]] = {}
    for n, line in enumerate(text.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        m = _MANIFEST_LINE.fullmatch(line.strip())
        algo = _MANIFEST_ALGOS.get(m.group(1)) if m else None
        if m is None or algo is None or len(m.group(3)) != hashlib.new(algo).digest_size * 2:
            raise CorruptImage(f"the OVF manifest {name!r} line {n} is not 'SHA1|SHA256|SHA512(file)= digest': "
                               f"{line[:80]!r}", detected="ova")
        member = _norm(m.group(2).strip())
        if member in out:
            raise CorruptImage(f"the OVF manifest {name!r} lists {member!r} twice", detected="ova")
        out[member] = (algo, m.group(3).lower())
    return out


class _Digests:
    """What the package's manifests state, and the digests of the members as read."""

    def __init__(self) -> None:
        self.stated: list[tuple[str, dict[str, tuple[str, str]]]] = []  # (manifest, its lines)
        self.got: dict[str, dict[str, str]] = {}  # member -> {algo: hex}

    def wanted(self, member: str) -> list[str]:
        """The algorithms manifests seen so far state for ``member``."""
        return sorted({lines[member][0] for _, lines in self.stated if member in lines})

    def note(self, member: str, hashers: list[Any]) -> None:
        self.got.setdefault(member, {}).update({h.name: h.hexdigest() for h in hashers})

    def check(self, members: list[str], rehash: Callable[[str, list[str]], None]) -> str | None:
        """Compare; ``rehash(member, algos)`` computes what was not hashed on the way.
        Returns the manifest's name (the first one) or None; raises ``CorruptImage``."""
        for manifest, lines in self.stated:
            for member, (algo, want) in lines.items():
                if member not in members:
                    raise CorruptImage(f"the OVF manifest {manifest!r} lists {member!r}, which the archive does "
                                       "not hold", detected="ova")
                if algo not in self.got.get(member, {}):
                    rehash(member, [algo])
                got = self.got[member][algo]
                if got != want:
                    raise CorruptImage(f"the OVF manifest {manifest!r} gives {member!r} {algo} {want}, the "
                                       f"archive's member has {got}: it changed after the manifest was written "
                                       "(damaged in transfer?)", detected="ova")
        return self.stated[0][0] if self.stated else None


def _hashing(read: Callable[[int], bytes], hashers: list[Any]) -> Callable[[int], bytes]:
    if not hashers:
        return read

    def hashed(n: int) -> bytes:
        data = read(n)
        for h in hashers:
            h.update(data)
        return data
    return hashed


def _digest_all(read: Callable[[int], bytes], algos: list[str], stop: threading.Event) -> list[Any]:
    hashers = [hashlib.new(a) for a in algos]
    while data := read(_CHUNK):
        for h in hashers:
            h.update(data)
        if stop.is_set():
            raise Stopped("unpacking interrupted by shutdown")
    return hashers


def _from_archive(fileobj: Any, seekable: bool, p: Plan, out: int, budget: Budget,
                  stop: threading.Event, progress: Callable[[], None]) -> Unpacked:
    kinds = list(p.kinds)
    what = describe(kinds)
    archive = "OVA" if kinds[-1] == "ova" else "tar"
    wanted: list[str] | None = None
    names: tuple[str, ...] = ()
    taken: str | None = None
    candidates: list[str] = []
    members: list[str] = []
    digests = _Digests()
    disk_hashers: list[Any] = []
    infos: dict[str, tarfile.TarInfo] = {}
    size = 0
    with tarfile.open(fileobj=fileobj, mode="r:" if seekable else "r|", tarinfo=_Header) as tf:
        for i, member in enumerate(_members(tf, what)):
            _safe_name(member, archive)
            if member.isdir():
                continue
            name = _norm(member.name)
            members.append(name)
            if i == 0 and name.lower().endswith(".ovf"):
                kinds[-1], archive, what = "ova", "OVA", describe([*kinds[:-1], "ova"])
                if member.size > _OVF_LIMIT:
                    raise UnsupportedFormat(f"the OVF descriptor {name!r} is {format_size(member.size)}; "
                                            "convd reads descriptors up to 4 MiB")
                src = tf.extractfile(member)
                assert src is not None
                xml = src.read(_OVF_LIMIT)
                digests.note(name, [hashlib.new(a, xml) for a in _MANIFEST_ALGOS.values()])
                wanted = ovf_disks(xml)
                if not wanted:
                    raise UnsupportedFormat(f"{what} whose descriptor references no disk")
                if len(wanted) > 1:
                    raise UnsupportedFormat(f"{what} with {len(wanted)} disks ({', '.join(wanted)}); "
                                            "convd converts single-disk appliances only")
                names = _href_names(wanted[0], what)
                continue
            src = tf.extractfile(member)
            assert src is not None
            infos[name] = member
            if wanted is not None and name.lower().endswith(".mf"):
                if member.size > _MANIFEST_LIMIT:
                    raise CorruptImage(f"the OVF manifest {name!r} is {format_size(member.size)}; a manifest is "
                                       "a line per file", detected="ova")
                digests.stated.append((name, parse_manifest(src.read(_MANIFEST_LIMIT), name)))
                continue
            if wanted is not None:
                if name not in names:
                    if digests.stated or not seekable:  # a member a manifest may list
                        algos = digests.wanted(name) if seekable else list(_MANIFEST_ALGOS.values())
                        digests.note(name, _digest_all(src.read, algos, stop))
                    continue
                if taken is not None:
                    # tar -r appends a newer copy; tar xf keeps the last, a
                    # streaming reader the first: which one is meant is unclear.
                    raise UnsupportedFormat(f"{what} holds the disk its descriptor references, {name!r}, "
                                            "more than once; convd converts an appliance whose disk is "
                                            "there once")
            else:
                head = _read_up_to(src, _PEEK)
                if not _is_disk_candidate(head, member.size):
                    continue
                candidates.append(name)
                if taken is not None:
                    continue  # a second disk: named below, never written
                size = _copy(src.read, out, budget, f"member {name!r} of {what}", stop, progress,
                             known=member.size, first=head)
                taken = name
                continue
            # The manifest's digest of the disk is folded into the one read that unpacks it.
            disk_hashers = [hashlib.new(a) for a in digests.wanted(name)]
            size = _copy(_hashing(src.read, disk_hashers), out, budget, f"member {name!r} of {what}", stop,
                         progress, known=member.size)
            digests.note(name, disk_hashers)
            taken = name

        def rehash(member: str, algos: list[str]) -> None:
            # A manifest after the member it lists: the disk is read back from
            # what was written; another member from the archive (or, streamed, it was hashed on the way).
            if member == taken:
                pos = [0]

                def read_out(n: int) -> bytes:
                    data = os.pread(out, n, pos[0])
                    pos[0] += len(data)
                    return data
                digests.note(member, _digest_all(read_out, algos, stop))
            elif seekable:
                src = tf.extractfile(infos[member])
                assert src is not None
                digests.note(member, _digest_all(src.read, algos, stop))
            else:
                raise CorruptImage(f"{what}: a member its manifest lists, {member!r}, could not be checked",
                                   detected="ova")

        manifest = digests.check(members, rehash) if wanted is not None else None
    if wanted is not None and taken is None:
        raise UnsupportedFormat(f"{what} references disk {wanted[0]!r}, which the archive does not hold")
    if len(candidates) > 1:
        raise UnsupportedFormat(f"{what} holds {len(candidates)} disk images ({', '.join(candidates)}); "
                                "convd converts one disk per drop")
    if taken is None:
        listed = ", ".join(members[:10]) + (" …" if len(members) > 10 else "")
        raise UnsupportedFormat(f"{what} holds no disk image (members: {listed or 'none'})")
    return Unpacked(kinds=kinds, size=size, member=taken, manifest=manifest)


# tarfile reads a GNU long-name or PAX header whole into memory, as large as the
# header states (a 99 KB .tar.zst can state 3 GiB): capped before it is read.
_EXT_HEADER_MAX = 64 << 10  # one such header (a path is at most 4096 bytes)
_EXT_TOTAL_MAX = 1 << 20  # all of them in one archive
_EXT_CHAIN_MAX = 16  # such headers in a row before a member's own (tarfile recurses on each)
_MEMBERS_MAX = 10_000  # members of one archive (tarfile keeps every header it read)


class _Header(tarfile.TarInfo):
    """A tar header that remembers why reading stopped: tarfile ends its member list
    quietly at end of file, at half a header and at a bad one, as at the end-of-archive
    blocks; only the last is a whole archive.  Extension headers (GNU long names, PAX)
    are bounded before tarfile reads them, and GNU sparse members refused (their maps
    are read without bound)."""

    def _bound_extension(self, tf: tarfile.TarFile) -> None:
        what = "GNU long-name" if self.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK) else "PAX"
        if not 0 <= self.size <= _EXT_HEADER_MAX:  # base-256 sizes may be negative: read(-n) reads all
            raise CorruptImage(f"a tar {what} header at byte {self.offset} states {self.size} bytes; convd "
                               f"reads such headers up to {_EXT_HEADER_MAX // 1024} KiB", detected=_TAR)
        total = getattr(tf, "convd_ext_bytes", 0) + self.size
        chain = getattr(tf, "convd_ext_chain", 0) + 1
        if total > _EXT_TOTAL_MAX:
            raise CorruptImage(f"the archive's long-name and PAX headers add up to more than "
                               f"{_EXT_TOTAL_MAX >> 20} MiB (at byte {self.offset})", detected=_TAR)
        if chain > _EXT_CHAIN_MAX:
            raise CorruptImage(f"more than {_EXT_CHAIN_MAX} tar extension headers in a row at byte "
                               f"{self.offset}", detected=_TAR)
        tf.convd_ext_bytes, tf.convd_ext_chain = total, chain  # type: ignore[attr-defined]  # our own tally

    def _proc_gnulong(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        self._bound_extension(tarfile_)
        return super()._proc_gnulong(tarfile_)  # type: ignore[misc]  # tarfile's private hook

    def _proc_pax(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        self._bound_extension(tarfile_)
        return super()._proc_pax(tarfile_)  # type: ignore[misc]  # tarfile's private hook

    def _proc_builtin(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.size < 0:
            raise CorruptImage(f"tar member {self.name!r} states a negative size", detected=_TAR)
        tarfile_.convd_ext_chain = 0  # type: ignore[attr-defined]  # a member's own header ends a chain
        return super()._proc_builtin(tarfile_)  # type: ignore[misc]  # tarfile's private hook

    def _proc_sparse(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        raise UnsupportedFormat(f"tar member {self.name!r} is a GNU sparse file; convd unpacks plain members",
                                detected=_TAR)

    def _proc_gnusparse_10(self, *_args: Any) -> None:
        raise UnsupportedFormat(f"tar member {self.name!r} is a GNU sparse file; convd unpacks plain members",
                                detected=_TAR)

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> Self:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.HeaderError as exc:
            tarfile_.convd_end = exc  # type: ignore[attr-defined]  # convd's own mark, read by _members
            raise


def _members(tf: tarfile.TarFile, what: str) -> Iterator[tarfile.TarInfo]:
    """The members of ``tf`` (opened with ``tarinfo=_Header``), then a check that the archive
    ended with its end-of-archive block. Raises ``CorruptImage`` for a cut or damaged one."""
    count = 0
    while True:
        member = tf.next()
        if member is not None:
            count += 1
            if count > _MEMBERS_MAX:
                raise UnsupportedFormat(f"{what} has more than {_MEMBERS_MAX} members; convd unpacks "
                                        "archives of a few files", detected=_TAR)
            yield member
            continue
        end = getattr(tf, "convd_end", None)
        # tarfile's own header errors, undocumented and so absent from typeshed's stub.
        if isinstance(end, tarfile.EOFHeaderError):  # type: ignore[attr-defined]
            return
        if isinstance(end, (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError)):  # type: ignore[attr-defined]
            raise CorruptImage(f"{what} is a truncated archive: it ends at byte {tf.offset} without the "
                               "end-of-archive blocks (the upload was probably cut short)", detected=_TAR)
        raise CorruptImage(f"{what} is a damaged archive: no valid tar header at byte {tf.offset}",
                           detected=_TAR)


# -- unpacking -------------------------------------------------------------------------

class _Tapped(io.RawIOBase):
    """``fd`` read with ``pread`` at its own offset; ``tap`` sees the file's bytes in order
    from byte 0 for as long as the reads are contiguous (a seek past bytes ends that)."""

    def __init__(self, fd: int, tap: Callable[[memoryview], None]) -> None:
        super().__init__()
        self.fd, self.tap, self.pos, self.tapped = fd, tap, 0, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        n = os.preadv(self.fd, [view], self.pos)
        if self.pos == self.tapped and n:
            self.tap(view[:n])
            self.tapped += n
        self.pos += n
        return n

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: os.fstat(self.fd).st_size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos


def unpack(fd: int, p: Plan, dest: str, budget: Budget, *, stop: threading.Event,
           on_progress: Callable[[float], None] = lambda _f: None,
           tap: Callable[[memoryview], None] | None = None) -> Unpacked:
    """Write the one disk inside the container ``fd`` to ``dest`` (created, never followed).

    Raises ``TooLarge`` past the budget's cap, ``UnsafeImage`` for a member
    that is a link, device, absolute or ``..`` path, ``UnsupportedFormat``
    for no disk, several disks, or a container inside the disk,
    ``CorruptImage`` when the stream or archive is damaged, ``Stopped`` at
    shutdown, and whatever ``budget.grow`` raises.  On any error ``dest``
    is removed.  ``tap`` (from the unpacking thread) sees the container's bytes
    in order from byte 0 while they are read in order: a compressed stream
    is read whole, so its digest needs no read of its own.
    """
    out = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    ok = False
    try:
        reader = (open(fd, "rb", buffering=_CHUNK, closefd=False) if tap is None  # noqa: SIM115 - closed by with
                  else io.BufferedReader(_Tapped(fd, tap), buffer_size=_CHUNK))
        with reader as raw:
            raw.seek(0)  # the descriptor's offset is shared with every reader of it

            def progress() -> None:
                on_progress(min(1.0, raw.tell() / p.size) if p.size else 1.0)

            try:
                result = _unpack(raw, p, out, budget, stop, progress)
            except (tarfile.TarError, *_DECODE_ERRORS) as exc:
                raise CorruptImage(f"{p.description} cannot be unpacked: {_reason(exc)}",
                                   detected=p.kinds[0]) from None
        head = os.pread(out, HEAD, 0)
        inner = sniff(head)
        if inner is not None:
            raise UnsupportedFormat(f"{describe([*result.kinds, inner])}: convd unpacks one layer of "
                                    "compression and one archive, not more")
        if (other := foreign(head)) is not None:
            raise UnsupportedFormat(f"{other[1]} inside {describe(result.kinds)}, not a disk image; convd "
                                    f"unpacks {', '.join(KINDS)} only")
        ok = True
        return result
    finally:
        os.close(out)
        if not ok:
            try:
                os.unlink(dest)
            except FileNotFoundError:
                pass


def _unpack(raw: IO[bytes], p: Plan, out: int, budget: Budget, stop: threading.Event,
            progress: Callable[[], None]) -> Unpacked:
    outer = p.kinds[0]
    if outer in ARCHIVES:
        return _from_archive(raw, True, p, out, budget, stop, progress)
    stream = _decoder(outer, raw, stop)
    first = _read_up_to(stream, HEAD)
    if len(p.kinds) > 1:
        return _from_archive(_Chained(first, stream), False, p, out, budget, stop, progress)
    size = _copy(stream.read, out, budget, p.description, stop, progress, first=first)
    if p.exact and p.stated is not None and size != p.stated:
        raise CorruptImage(f"{p.description} unpacks to {size} bytes, but its headers state {p.stated}",
                           detected=outer)
    return Unpacked(kinds=list(p.kinds), size=size)
