"""The unpack driver: one disk out of a compressed stream, a tar or an OVA, to a file of the caller's choosing.

What people upload is often not a disk but a wrapper around one: a cloud
image compressed with gzip, xz, zstd or bzip2, an appliance exported as an
OVA (a tar whose first member is an OVF descriptor), a disk in a
``.tar.gz``.  Containers are recognised by content, never by name, and the
one disk inside is streamed to a file of our choosing under a
:class:`~convd.image.containers.streams.Budget`.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from convd.errors import CorruptImage, UnsupportedFormat
from convd.image import signatures
from convd.image.containers.kinds import ARCHIVES, HEAD, KINDS, describe, foreign, sniff
from convd.image.containers.ova import (
    _MANIFEST_ALGOS,
    _MANIFEST_LIMIT,
    _OVF_LIMIT,
    _digest_all,
    _Digests,
    _hashing,
    _href_names,
    _norm,
    ovf_disks,
    parse_manifest,
)
from convd.image.containers.stated import _PEEK, Plan
from convd.image.containers.streams import (
    _CHUNK,
    _DECODE_ERRORS,
    Budget,
    _Chained,
    _copy,
    _decoder,
    _read_up_to,
    _reason,
)
from convd.image.containers.tar import _Header, _members, _safe_name
from convd.units import format_size

__all__ = ["Unpacked", "unpack"]


# A tar member is a disk candidate with one of these at its start (qcow2,
# VMDK sparse/COWD/descriptor, VDI, dynamic VHD, VHDX, QED), an MBR or GPT,
# an ISO 9660 volume, or else a size of whole sectors from 1 MiB up (a raw
# disk, a fixed VHD).
_DISK_MAGICS = (b"QFI\xfb", b"KDMV", b"COWD", b"# Disk DescriptorFile", b"conectix", b"vhdxfile",
                b"QED\x00")


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
