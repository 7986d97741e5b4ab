"""Decoders for gzip, xz, zstd and bzip2 streams (concatenated members too), and writing under a byte
budget, so a decompression bomb stops at the limit the caller backs with the workspace ledger.
"""

from __future__ import annotations

import bz2
import io
import lzma
import os
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

import zstandard

from convd.errors import Stopped, TooLarge, UnsupportedFormat
from convd.image.containers.kinds import _XZ_MAGIC, _XZ_MEMLIMIT, describe
from convd.units import format_size

__all__ = ["Budget"]


_CHUNK = 1 << 20
_ZERO = bytes(_CHUNK)
_ZSTD_MAX_WINDOW = 1 << 27
_STREAMS_MAX = 10_000  # gzip members or xz streams in one file (`cat a.gz b.gz` makes two)


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
