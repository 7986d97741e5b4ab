"""Safe, pure-Python image inspection: the gate before qemu-img sees a file.

Built on oslo.utils' ``format_inspector`` (the inspector Glance, Nova and
Cinder use).  We add only what it leaves to its callers: opening without
following links or blocking, the ISO+GPT hybrid rule, the fixed-VHD footer
(which the inspector reads as raw), the metadata checks of
:mod:`convd.image.integrity` (tables inside the file, parents, virtual size as
qemu-img reads it), and messages an operator can act on.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import struct
import threading
from dataclasses import dataclass, field
from typing import Any

from oslo_utils.imageutils import format_inspector as fi

from convd.errors import CorruptImage, NotRegularFile, Stopped, UnsafeImage, UnsupportedFormat
from convd.image import containers, integrity, signatures, vmdk, vpc

__all__ = ["RAW_FAMILY", "Inspection", "inspect_fd", "inspect_path", "open_regular", "qemu_probe"]

RAW_FAMILY = frozenset({"raw", "gpt", "iso"})
_QEMU_NAME = {"vhd": "vpc"}  # the inspector's names → qemu-img's
# Small reads first (most headers decide within 64 KiB, and every inspector
# scans every chunk), large ones for the rare image that must be read through.
_FIRST_CHUNK = 64 << 10
_CHUNK = 1 << 20
_VHD_FOOTER = 512

# The inspector logs every failed check at WARNING; we report them ourselves.
logging.getLogger(fi.__name__).setLevel(logging.CRITICAL)


@dataclass
class Inspection:
    format: str  # qemu-img's name, or gpt / iso for raw-family images
    virtual_size: int
    size: int
    matched: list[str] = field(default_factory=list)
    vhd_fixed: bool = False
    # How qemu-img must be told to read the disk (driver options, passed on
    # every qemu-img call on the source), and which rule sized it, for the
    # record: VHD's "current_size" or "chs" (convd.image.vpc.size_rule).
    driver_options: dict[str, str] = field(default_factory=dict)
    size_rule: str | None = None

    @property
    def qemu_format(self) -> str:
        """The ``-f`` value qemu-img must be given."""
        return "raw" if self.format in RAW_FAMILY else self.format

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": self.format, "virtual_size": self.virtual_size, "size": self.size}
        if self.size_rule is not None:
            out["size_rule"] = self.size_rule
        return out


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symlink"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISCHR, "a character device")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | os.PathLike[str]) -> int:
    """Open a regular file read-only, never following a link or blocking on a FIFO."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(f"{_kind(st.st_mode)}, not a regular file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotRegularFile("a symlink, not a regular file") from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise CorruptImage(f"cannot be read: {exc.strerror} (owner uid {st.st_uid}, "
                               f"mode {stat.S_IMODE(st.st_mode):04o})") from None
        if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            # A non-blocking open meets a write lease (F_SETLEASE F_WRLCK):
            # another process keeps the right to change the file under us.
            raise UnsafeImage("another process holds a write lease on the file: its bytes could "
                              "change after the safety checks") from None
        raise
    st2 = os.fstat(fd)
    if not stat.S_ISREG(st2.st_mode) or (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise NotRegularFile(f"{_kind(st2.st_mode)} swapped in for a regular file")
    return fd


def _backing_name(fd: int) -> str:
    """The qcow2 backing file name, for the error message only (bounded read)."""
    try:
        head = os.pread(fd, 20, 0)
        offset, length = struct.unpack(">QI", head[8:20])
        if 0 < length <= 1023:
            return os.pread(fd, length, offset).decode(errors="replace")
    except (OSError, struct.error):
        pass
    return "?"


def _fixed_vhd(fd: int, size: int) -> bool:
    """Whether the file ends in a VHD footer (a fixed VHD, which the inspector reads as raw)."""
    return size >= 2 * _VHD_FOOTER and os.pread(fd, 8, size - _VHD_FOOTER) == b"conectix"


# qemu's format probe (block.c find_image_format) reads the first 512 bytes
# (BLOCK_PROBE_BUF_SIZE) and asks every driver; raw scores 1, so any driver
# that matches wins.  A raw-family disk (or a converted output) any probe
# would claim becomes that format to every consumer that probes (a plain
# `qemu-img info`, libvirt without a format, Glance's old import): the
# inspector covers qcow2, vpc, vhdx, vdi, qed, luks and binary VMDK; these
# are the probes it leaves out.  dmg probes by file name only (".dmg") and
# vvfat/nbd/... never probe file contents.
_PROBE_BYTES = 512
_CLOOP_MAGIC = b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"


def _vmdk_text_probe(buf: bytes) -> bool:
    """block/vmdk.c vmdk_probe for a text descriptor: comments and blank
    (space-only) lines, then ``version=1|2|3`` on its own line."""
    p, end = 0, len(buf)
    while p < end:
        c = buf[p:p + 1]
        if c == b"#":
            nl = buf.find(b"\n", p)
            p = end if nl < 0 else nl + 1
            continue
        if c == b" ":
            while p < end and buf[p:p + 1] == b" ":
                p += 1
            if p < end and buf[p:p + 1] == b"\r":
                p += 1
            if p == end or buf[p:p + 1] != b"\n":
                return False
            p += 1
            continue
        return any(buf.startswith(f"version={v}{eol}".encode(), p) for v in "123" for eol in ("\n", "\r\n"))
    return False


def qemu_probe(buf: bytes) -> str | None:
    """The format qemu 7.2's probe would read ``buf`` (a file's first 512 bytes) as,
    among those the inspector does not recognise; None for raw."""
    buf = buf[:_PROBE_BYTES]
    if not buf:
        return None  # block.c: an empty file is raw without probing
    if buf[:4] in (b"KDMV", b"COWD") or _vmdk_text_probe(buf):
        return "vmdk"
    if buf[:4] == b"QFI\xfb" and buf[4:8] == b"\0\0\0\1":
        return "qcow"
    if _CLOOP_MAGIC.startswith(buf[:len(_CLOOP_MAGIC)]):
        return "cloop"  # cloop.c compares only as many bytes as there are
    if len(buf) >= 64 and buf[:16] in (b"WithoutFreeSpace", b"WithouFreSpacExt") and buf[16:20] == b"\2\0\0\0":
        return "parallels"
    if len(buf) >= 512 and buf[:32].split(b"\0", 1)[0] == b"Bochs Virtual HD Image" and \
            buf[32:48].split(b"\0", 1)[0] == b"Redolog" and buf[48:64].split(b"\0", 1)[0] == b"Growing" and \
            buf[64:68] in (b"\0\0\2\0", b"\0\0\1\0"):
        return "bochs"
    for offset, magic, fmt in integrity.MAGICS:
        if buf[offset:offset + len(magic)] == magic:
            return fmt  # a header the inspector did not accept, still probed by qemu
    return None


def _vmdk_extents(fd: int, size: int) -> str:
    """What a VMDK descriptor says about where its data lives, for the message."""
    text = vmdk.descriptor(fd, size)
    ctype, files = "?", []
    for line in text.splitlines():
        line = line.strip()
        if line.lower().startswith("createtype="):
            ctype = line.split("=", 1)[1].strip().strip('"')
        elif line.split(" ", 1)[0].upper() in ("RW", "RDONLY", "NOACCESS") and '"' in line:
            files.append(line.split('"')[1])
    where = f" (extents: {', '.join(files[:4])}{', …' if len(files) > 4 else ''})" if files else ""
    return f"VMDK createType {ctype} keeps its data in other files{where}"


# Failures the inspector reports that convd.image.integrity judges itself, more
# finely: qcow2 feature bits (extended_l2 and zstd are documented,
# self-contained features; an unknown version is corruption, not an attack).
_REJUDGED = {"qcow2": {"unknown_features"}}


def _describe_failures(fmt: str, fd: int, exc: fi.SafetyCheckFailed) -> str:
    parts = []
    for name, failure in exc.failures.items():
        text = str(failure) or name
        if name == "backing_file":
            text = f"{fmt} has a backing file (an overlay), {signatures.DELTA} {_backing_name(fd)}"
        elif name == "data_file":
            text = f"{fmt} names an external data file"
        elif fmt == "vmdk" and name == "descriptor" and text == "Unsupported subformat":
            text = _vmdk_extents(fd, os.fstat(fd).st_size)
        parts.append(text)
    return "; ".join(parts)


def inspect_fd(fd: int, *, stop: threading.Event | None = None, limit: int | None = None) -> Inspection:
    """Detect and safety-check an open regular file.

    Raises ``UnsupportedFormat`` for a format convd recognises and refuses
    (:mod:`convd.image.signatures`, checked first), ``UnsafeImage`` (a snapshot
    delta among them) or ``CorruptImage``; with
    ``limit``, ``UnsafeImage`` when a header still wants more than ``limit``
    bytes (only an image header does); ``Stopped`` once ``stop`` is set.
    """
    size = os.fstat(fd).st_size
    # What the bytes are comes first: a format convd recognises and refuses
    # is named as such, never judged by the size or safety rules of another.
    if (known := signatures.recognise(fd, size)) is not None:
        error = UnsafeImage if known.delta else UnsupportedFormat
        raise error(known.message, detected=known.format)
    reader = open(fd, "rb", buffering=0, closefd=False)  # noqa: SIM115 - closed below
    wrapper = fi.InspectWrapper(reader)
    try:
        # Stops as soon as every inspector has decided; a VMDK with its grain
        # directory in a footer is read to the end, as the inspector requires.
        chunk, offset = _FIRST_CHUNK, 0
        while data := wrapper.read(chunk):
            if wrapper.formats is not None:
                break
            offset += len(data)
            if offset >= _CHUNK:
                chunk = _CHUNK
            if stop is not None and stop.is_set():
                raise Stopped("inspection interrupted by shutdown")
            if limit is not None and offset >= limit:
                raise UnsafeImage(f"an image header inside asks to read past the first {limit >> 20} MiB")
    finally:
        wrapper.close()
        reader.close()
    try:
        matches = wrapper.formats or []
    except fi.ImageFormatError as exc:
        raise CorruptImage(f"cannot parse image header: {exc}") from None
    names = sorted(_QEMU_NAME.get(str(m), str(m)) for m in matches)
    if len(matches) > 1:
        if set(names) == {"gpt", "iso"}:
            # A hybrid ISO (bootable from disk too): raw-family, both views agree.
            matches = [m for m in matches if str(m) == "iso"]
        else:
            raise UnsafeImage(f"several formats detected at once: {', '.join(names)} "
                              "(one header hidden inside another)", detected="+".join(names))
    insp = matches[0] if matches else None
    fmt = _QEMU_NAME.get(str(insp), str(insp)) if insp is not None else "raw"
    qemu_size = None
    if insp is not None:
        # First: a header that is not a valid instance of its format is
        # corrupt, before any "reason" is read out of its garbage bytes.
        qemu_size = integrity.verify(fd, fmt, size, stop=stop)
        try:
            insp.safety_check()
        except fi.SafetyCheckFailed as exc:
            if set(exc.failures) == {"banned"}:
                raise UnsupportedFormat(f"{fmt} images are not supported", detected=fmt) from None
            for name in _REJUDGED.get(fmt, ()):
                exc.failures.pop(name, None)
            if exc.failures:
                raise UnsafeImage(f"{fmt} failed safety checks: {_describe_failures(fmt, fd, exc)}",
                                  detected=fmt) from None
        except fi.ImageFormatError as exc:
            raise CorruptImage(f"{fmt} header cannot be parsed: {exc}", detected=fmt) from None
    # qemu reads a raw file in whole sectors: a 1000-byte file is a 1024-byte
    # disk to qemu-img info and convert alike (block.c bdrv_getlength).
    result = Inspection(format=fmt, virtual_size=-(-size // 512) * 512, size=size, matched=names)
    if fmt == "raw":
        short = integrity.cut_short_header(fd, size)
        if short:
            raise CorruptImage(f"a {short} header cut short: the file is only {size} bytes", detected=short)
    if fmt in RAW_FAMILY:
        # A fixed VHD of a partitioned disk starts with its MBR/GPT: the
        # footer at the end decides, whatever the inspector saw first.
        if _fixed_vhd(fd, size):
            result.format, result.vhd_fixed = "vpc", True
            result.virtual_size = integrity.verify(fd, "vpc", size, stop=stop) or 0
        elif probed := qemu_probe(os.pread(fd, _PROBE_BYTES, 0)):
            raise UnsafeImage(f"a {fmt} disk whose first sector qemu probes as {probed}: read without "
                              f"an explicit format it becomes a {probed} image (a hidden header)",
                              detected=probed)
    else:
        try:
            result.virtual_size = int(insp.virtual_size) if insp is not None else 0
        except Exception as exc:  # noqa: BLE001 - the inspector's parsers raise what they raise
            raise CorruptImage(f"{fmt} virtual size cannot be read: {exc}", detected=fmt) from None
        if qemu_size is not None:
            # The size qemu-img will convert (integrity documents each rule):
            # VHD by creator (CHS or current size), VDI rounded up to 512, …
            result.virtual_size = qemu_size
    if result.format == "vpc":
        rule = vpc.size_rule(vpc.footer(fd, size))
        result.size_rule = rule
        result.driver_options = {"force_size_calc": rule}
    if result.virtual_size <= 0:
        what = "the file is empty (0 bytes)" if size == 0 else f"{result.format} header gives no virtual size"
        raise CorruptImage(f"{what}: an empty disk", detected=result.format)
    return result


def inspect_path(path: str | os.PathLike[str]) -> Inspection:
    fd = open_regular(path)
    try:
        # A container is reported for what it is (convd unpacks it; qemu-img must not see it).
        if (found := containers.plan(fd)) is not None:
            raise UnsupportedFormat(f"{found.description}, not a disk image; convd unpacks it and "
                                    "checks the disk inside", detected="+".join(found.kinds))
        return inspect_fd(fd)
    finally:
        os.close(fd)
