"""Custody of a claimed source: from the first check to the last read, bytes no producer can change.

A producer may keep a descriptor on what it dropped (a read-only one
survives the claim's rename), reopen it for writing through
``/proc/self/fd``, or keep a shared writable mapping, where a store moves no
timestamp.  So a claimed source is either *taken* or *copied* before
anything reads it:

- **taken** (``lease``): the inode is made convd's (``fchown`` to convd's
  uid and the group a file convd creates there gets, ``fchmod`` 0640), so no other user can open it for writing
  again, then a read lease (``F_SETLEASE F_RDLCK``) is taken and held until
  the item ends.  The kernel refuses a read lease while any descriptor is
  open for writing or any shared writable mapping exists (each holds the
  file open for writing), so a refusal means the bytes could still change:
  the item is refused (``unsafe_image``).  Any later open for writing (root,
  or convd itself) breaks the lease, which :meth:`Custody.intact` reports
  and the stages turn into a refusal.  Needs ``CAP_CHOWN`` when the
  producer is another user (the unit grants it); the lease then needs no
  ``CAP_LEASE``, convd owning the file.
- **copied** (``copy``): where the inode cannot be taken (no ``CAP_CHOWN``),
  leases are unknown to the filesystem, or the filesystem is shared (a lease
  sees this host's openers only; a writer on another NFS or CephFS client
  keeps writing), the first ``size`` bytes are copied into a file of
  convd's own (a reflink, ``FICLONE``, where the filesystem has them) and
  that copy is what every check, ``qemu-img`` and a passthrough read.

A producer running as convd's own user (or as root) is not kept out by
either: it could change convd itself.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from dataclasses import dataclass

import structlog

from convd.errors import TransientError, UnsafeImage

__all__ = ["MODE", "Custody", "copy_private", "group_of", "take"]

log = structlog.get_logger(__name__)

# A taken source, and so a published passthrough and the bytes failed/
# keeps: convd's, readable by its group (consumers), like converted outputs.
MODE = 0o640
_FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)
_CHUNK = 8 << 20


@dataclass
class Custody:
    """How an item's source is kept from change: ``how`` is ``"lease"`` or ``"copy"``."""

    how: str
    fd: int | None = None  # lease: the descriptor the read lease is held on

    def intact(self) -> bool:
        """False once the read lease was broken (an open for writing since it was taken)."""
        if self.fd is None:
            return True
        try:
            return fcntl.fcntl(self.fd, fcntl.F_GETLEASE) == fcntl.F_RDLCK
        except OSError:
            return False

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def take(fd: int, *, shared: bool, group: int | None = None) -> Custody:
    """Take the inode behind ``fd`` (a regular file opened read-only) into convd's custody.

    ``group``: the gid the file gets (the setgid spool's group, so consumers
    read a passthrough as they read a converted output); convd's own if None.

    Returns a ``lease`` custody (holding a duplicate of ``fd``) or, where the
    inode cannot be taken or leases prove nothing, ``copy``: the caller then
    reads a private copy (:func:`copy_private`).  Raises ``UnsafeImage`` when
    another process still holds the file open for writing or mapped shared
    and writable, or when the file has another name (a hard link), before
    changing anything about it.
    """
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        return Custody("copy")  # not a file: detect refuses it, nothing to hold
    if shared:
        return Custody("copy")
    if st.st_nlink != 1:
        # Another name may be outside the spool (a file of another user the
        # producer may link, or any file where fs.protected_hardlinks is 0):
        # taking the inode would give that file to convd and its group.  Refused
        # untouched, as detect refuses any file with another name.
        raise UnsafeImage(f"the file has {st.st_nlink} hard links; another name could change it after the "
                          "safety checks")
    gid = os.getegid() if group is None else group
    try:
        if (st.st_uid, st.st_gid) != (os.geteuid(), gid):
            os.fchown(fd, os.geteuid(), gid)
        os.fchmod(fd, MODE)
    except PermissionError:
        # No CAP_CHOWN (an older unit): the producer could reopen it for writing.
        log.info("cannot take the source (no CAP_CHOWN); reading a private copy", owner=st.st_uid)
        return Custody("copy")
    held = os.dup(fd)
    try:
        fcntl.fcntl(held, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        os.close(held)
        if exc.errno in (errno.EAGAIN, errno.EBUSY):
            raise UnsafeImage("another process still has the file open for writing (or mapped shared and "
                              "writable): its bytes could change after the safety checks") from None
        # EINVAL: no leases on this filesystem (e.g. overlayfs over NFS, FUSE).
        return Custody("copy")
    return Custody("lease", held)


def group_of(directory: str) -> int:
    """The group a file created in ``directory`` gets: its own when it is setgid, else convd's."""
    st = os.stat(directory)
    return st.st_gid if st.st_mode & stat.S_ISGID else os.getegid()


def copy_private(fd: int, dest: str, size: int) -> None:
    """Copy the first ``size`` bytes of ``fd`` into a new file ``dest`` (mode 0640):
    a reflink where the filesystem makes one, else ``copy_file_range``.

    Never more than ``size`` (what ``fstat`` said at the claim): a producer
    still appending cannot make it grow.  Raises ``TransientError`` when the
    filesystem is full.
    """
    out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, MODE)
    try:
        try:
            if os.fstat(fd).st_size == size:
                fcntl.ioctl(out, _FICLONE, fd)
                if os.fstat(out).st_size == size:
                    return
                os.ftruncate(out, 0)  # grew meanwhile: copy exactly `size` below
        except OSError:
            pass  # no reflinks here (ext4, tmpfs, NFS < 4.2, CephFS): copy
        done = 0
        while done < size:
            try:
                n = os.copy_file_range(fd, out, min(_CHUNK, size - done), done, done)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                data = os.pread(fd, min(_CHUNK, size - done), done)
                n = os.pwrite(out, data, done) if data else 0
            if n == 0:
                break  # truncated meanwhile: the copy is what there was
            done += n
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise TransientError(f"no space for a private copy of the source: {exc.strerror}") from None
        raise
    finally:
        os.close(out)
