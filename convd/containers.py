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
import io
import lzma
import os
import tarfile
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import IO, Any

import zstandard
from defusedxml import ElementTree as SafeXML
from defusedxml.common import DefusedXmlException

from convd.config import CONTAINER_KINDS, format_size
from convd.errors import CorruptImage, Stopped, TooLarge, UnsafeImage, UnsupportedFormat

__all__ = [
    "COMPRESSIONS",
    "KINDS",
    "Budget",
    "Plan",
    "Unpacked",
    "describe",
    "plan",
    "sniff",
    "unpack",
]

COMPRESSIONS = ("gzip", "xz", "zstd", "bzip2")
ARCHIVES = ("tar", "ova")
KINDS = CONTAINER_KINDS  # what [convert] containers may list
assert set(KINDS) == set(COMPRESSIONS + ARCHIVES)
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
# A tar member is a disk candidate with one of these at its start (qcow2,
# VMDK sparse/COWD/descriptor, VDI, dynamic VHD, VHDX, QED), an MBR or GPT,
# an ISO 9660 volume, or else a size of whole sectors from 1 MiB up (a raw
# disk, a fixed VHD).
_DISK_MAGICS = (b"QFI\xfb", b"KDMV", b"COWD", b"# Disk DescriptorFile", b"conectix", b"vhdxfile",
                b"QED\x00")
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
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    if head[:3] == b"BZh" and head[3:4] in b"123456789" and head[4:10] == b"\x31\x41\x59\x26\x53\x59":
        return "bzip2"
    return None


def _tar_header(head: bytes) -> bool:
    """A ustar/GNU header whose checksum adds up (the magic alone could be chance)."""
    if len(head) < 512 or head[257:263] not in (b"ustar\x00", b"ustar "):
        return False
    try:
        stored = int(head[148:156].split(b"\x00", 1)[0].strip() or b"-1", 8)
    except ValueError:
        return False
    return stored == sum(head[:148]) + 8 * 32 + sum(head[156:512])


def _archive(head: bytes) -> str | None:
    if not _tar_header(head):
        return None
    name = head[:100].split(b"\x00", 1)[0]
    prefix = head[345:500].split(b"\x00", 1)[0] if head[257:263] == b"ustar\x00" else b""
    full = (prefix + b"/" + name) if prefix else name
    # A PAX or GNU long-name header first hides the name; tarfile tells later.
    return "ova" if head[156:157] in b"0\x00" and full.lower().endswith(b".ovf") else "tar"


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


def _xz_size(fd: int, size: int) -> int | None:
    """Uncompressed bytes of every stream in an xz file, from their indexes (xz file format 1.1, 4-6)."""
    total, pos = 0, size
    try:
        while pos > 0:
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
            if backward > 64 << 20 or index_at < 12:
                return None
            index = os.pread(fd, backward, index_at)
            if index[0] != 0:
                return None
            records, p = _varint(index, 1)
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


@dataclass
class Plan:
    """What a look at the start (and, for xz, the end) of a dropped file tells."""

    kinds: list[str]  # outermost first: ["xz"], ["gzip", "tar"], ["ova"]
    size: int  # the dropped file's bytes
    stated: int | None = None  # bytes it unpacks to, as its format records them
    exact: bool = False  # ``stated`` is checked by the decoder (xz index, zstd frame), not a hint
    peek: bytes = b""

    @property
    def description(self) -> str:
        return describe(self.kinds)


def _stated(fd: int, kind: str, size: int, head: bytes) -> tuple[int | None, bool]:
    if kind == "xz":
        n = _xz_size(fd, size)
        return n, n is not None
    if kind == "zstd":
        try:
            n = zstandard.frame_content_size(head)
        except zstandard.ZstdError:
            return None, False
        # Only the first frame's; more frames may follow, so it is a floor.
        return (n, True) if n >= 0 else (None, False)
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

    def __init__(self, fp: IO[bytes], kind: str) -> None:
        self._fp, self._kind = fp, kind
        self._dec = self._new()
        self._pending = b""
        self._done = False

    def _new(self) -> Any:
        if self._kind == "gzip":
            return zlib.decompressobj(wbits=31)
        return lzma.LZMADecompressor(memlimit=_XZ_MEMLIMIT)

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


def _decoder(kind: str, raw: IO[bytes]) -> Any:
    """A file-like ``read(n)`` of the decompressed bytes of ``raw``."""
    if kind in ("gzip", "xz"):
        return _Concatenated(raw, kind)
    if kind == "bzip2":
        return bz2.BZ2File(raw)
    return zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW).stream_reader(
        raw, read_size=_CHUNK, read_across_frames=True, closefd=False)


_DECODE_ERRORS = (EOFError, OSError, zlib.error, lzma.LZMAError, zstandard.ZstdError)


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, EOFError):
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
            self.grow(want)
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


def _is_disk_candidate(head: bytes, size: int) -> bool:
    if head.startswith(_DISK_MAGICS) or sniff(head[:HEAD]) is not None:
        return True
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

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"container": list(self.kinds), "unpacked_size": self.size}
        if self.member is not None:
            out["member"] = self.member
        return out


def _from_archive(fileobj: Any, seekable: bool, p: Plan, out: int, budget: Budget,
                  stop: threading.Event, progress: Callable[[], None]) -> Unpacked:
    kinds = list(p.kinds)
    what = describe(kinds)
    archive = "OVA" if kinds[-1] == "ova" else "tar"
    wanted: list[str] | None = None
    taken: str | None = None
    candidates: list[str] = []
    members: list[str] = []
    size = 0
    with tarfile.open(fileobj=fileobj, mode="r:" if seekable else "r|") as tf:
        for i, member in enumerate(_members(tf)):
            _safe_name(member, archive)
            if member.isdir():
                continue
            name = _norm(member.name)
            members.append(name)
            if i == 0 and name.lower().endswith(".ovf"):
                kinds[-1], archive, what = "ova", "OVA", describe(kinds[:-1] + ["ova"])
                if member.size > _OVF_LIMIT:
                    raise UnsupportedFormat(f"the OVF descriptor {name!r} is {format_size(member.size)}; "
                                            "convd reads descriptors up to 4 MiB")
                src = tf.extractfile(member)
                assert src is not None
                wanted = [_norm(n) for n in ovf_disks(src.read(_OVF_LIMIT))]
                if not wanted:
                    raise UnsupportedFormat(f"{what} whose descriptor references no disk")
                if len(wanted) > 1:
                    raise UnsupportedFormat(f"{what} with {len(wanted)} disks ({', '.join(wanted)}); "
                                            "convd converts single-disk appliances only")
                continue
            src = tf.extractfile(member)
            assert src is not None
            if wanted is not None:
                if name != wanted[0] or taken is not None:
                    continue
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
            size = _copy(src.read, out, budget, f"member {name!r} of {what}", stop, progress,
                         known=member.size)
            taken = name
    if wanted is not None and taken is None:
        raise UnsupportedFormat(f"{what} references disk {wanted[0]!r}, which the archive does not hold")
    if len(candidates) > 1:
        raise UnsupportedFormat(f"{what} holds {len(candidates)} disk images ({', '.join(candidates)}); "
                                "convd converts one disk per drop")
    if taken is None:
        listed = ", ".join(members[:10]) + (" …" if len(members) > 10 else "")
        raise UnsupportedFormat(f"{what} holds no disk image (members: {listed or 'none'})")
    return Unpacked(kinds=kinds, size=size, member=taken)


def _members(tf: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    while True:
        member = tf.next()
        if member is None:
            return
        yield member


# -- unpacking -------------------------------------------------------------------------

def unpack(fd: int, p: Plan, dest: str, budget: Budget, *, stop: threading.Event,
           on_progress: Callable[[float], None] = lambda _f: None) -> Unpacked:
    """Write the one disk inside the container ``fd`` to ``dest`` (created, never followed).

    Raises ``TooLarge`` past the budget's cap, ``UnsafeImage`` for a member
    that is a link, device, absolute or ``..`` path, ``UnsupportedFormat``
    for no disk, several disks, or a container inside the disk,
    ``CorruptImage`` when the stream or archive is damaged, ``Stopped`` at
    shutdown, and whatever ``budget.grow`` raises.  On any error ``dest``
    is removed.
    """
    out = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    ok = False
    try:
        with open(fd, "rb", buffering=_CHUNK, closefd=False) as raw:
            raw.seek(0)  # the descriptor's offset is shared with every reader of it

            def progress() -> None:
                on_progress(min(1.0, raw.tell() / p.size) if p.size else 1.0)

            try:
                result = _unpack(raw, p, out, budget, stop, progress)
            except (tarfile.TarError, *_DECODE_ERRORS) as exc:
                raise CorruptImage(f"{p.description} cannot be unpacked: {_reason(exc)}",
                                   detected=p.kinds[0]) from None
        inner = sniff(os.pread(out, HEAD, 0))
        if inner is not None:
            raise UnsupportedFormat(f"{describe(result.kinds + [inner])}: convd unpacks one layer of "
                                    "compression and one archive, not more")
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
    stream = _decoder(outer, raw)
    first = _read_up_to(stream, HEAD)
    if len(p.kinds) > 1:
        return _from_archive(_Chained(first, stream), False, p, out, budget, stop, progress)
    size = _copy(stream.read, out, budget, p.description, stop, progress, first=first)
    return Unpacked(kinds=list(p.kinds), size=size)
