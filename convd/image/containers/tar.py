"""Reading a tar archive's headers safely: a member's name is never a path, links, devices, absolute and
``..`` members are refused, and GNU long-name / PAX headers are capped before tarfile reads them whole.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any, Self

from convd.errors import CorruptImage, UnsafeImage, UnsupportedFormat
from convd.image.containers.kinds import _TAR


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
