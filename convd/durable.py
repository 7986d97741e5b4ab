"""Every durable write and move convd makes on spool files goes through here.

Write: ``O_EXCL`` temp in the destination directory, write, ``fsync``,
close, rename (never replacing unless asked), ``fsync`` the directory (a
write that may be lost skips the directory's, never the file's: see
:func:`write_bytes`).
Move: ``renameat2(RENAME_NOREPLACE)`` (hard link + unlink where the
filesystem lacks it), then ``fsync`` both directories.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any

__all__ = [
    "PARKED_PREFIX",
    "TEMP_SUFFIX",
    "fsync_dir",
    "fsync_file",
    "move",
    "remove_tree",
    "sweep_parked",
    "write_bytes",
    "write_json",
]

TEMP_SUFFIX = ".tmp"
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)


def _fsync(path: str | os.PathLike[str], flags: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    _fsync(path, os.O_DIRECTORY)


def fsync_file(path: str | os.PathLike[str]) -> None:
    _fsync(path, os.O_NOFOLLOW)


def _finish_cut_short(src: str, dst: str) -> None:
    """``dst`` exists: if it is ``src`` itself (a link+unlink move cut short
    between link and unlink), drop the ``src`` name; else ``FileExistsError``."""
    if not os.path.samestat(os.lstat(src), os.lstat(dst)):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), src, None, dst)
    os.unlink(src)


def _rename_noreplace(src: str, dst: str) -> None:
    """Atomic rename that fails with ``FileExistsError`` instead of replacing."""
    if _renameat2 is not None:
        rc = _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            # The VFS answers EEXIST for an existing target before the
            # filesystem sees the flag, so on CephFS/NFS (EINVAL otherwise) a
            # link+unlink move cut short between its two steps lands here, not
            # in the fallback below: finish it as the fallback would.
            _finish_cut_short(src, dst)
            return
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), src, None, dst)
    # NFS and older kernels: a hard link is the portable no-replace rename for
    # regular files.  Anything else is only ever moved by convd into its own
    # directories, so a checked rename cannot race a second writer there.
    # lstat, not isfile(): a source that is gone must raise FileNotFoundError
    # (someone finished this move), never read as "not a file" and then fail
    # as FileExistsError on the destination it was moved to.
    if stat.S_ISREG(os.lstat(src).st_mode):
        try:
            os.link(src, dst, follow_symlinks=False)
        except FileExistsError:
            _finish_cut_short(src, dst)
            return
        os.unlink(src)
        return
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    os.rename(src, dst)


def move(src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
         replace: bool = False, sync: bool = True) -> None:
    """Rename ``src`` to ``dst`` durably; ``FileExistsError`` if ``dst`` exists and not ``replace``."""
    s, d = os.fspath(src), os.fspath(dst)
    if replace:
        os.rename(s, d)
    else:
        _rename_noreplace(s, d)
    if sync:
        sdir, ddir = os.path.dirname(s), os.path.dirname(d)
        fsync_dir(ddir)
        if sdir != ddir:
            fsync_dir(sdir)


def temp_name(name: str, owner: str = "") -> str:
    """``.NAME[@OWNER].RANDOM.tmp``: an owner (a spool instance) may sweep its own.

    NAME is cut to 100 characters so the temp fits NAME_MAX whatever NAME is.
    """
    return f".{name[:100]}{'@' + owner if owner else ''}.{secrets.token_hex(4)}{TEMP_SUFFIX}"


def write_bytes(path: str | os.PathLike[str], data: bytes, *, replace: bool = False,
                mode: int = 0o644, sync: bool = True, owner: str = "") -> None:
    """Durably create ``path`` with ``data``; readers see all of it or nothing.

    ``sync=False`` is for files that may be lost in a crash (the status
    snapshot, the shared ledger, an item's attempt count): the directory is
    not fsynced, so after a power cut the path may hold the previous version
    (or nothing, if there was none).  The data is still flushed before the
    rename: otherwise the rename can reach the disk first (ext4 without
    ``auto_da_alloc``, XFS), and the path then names an empty file after a
    power cut (found by tests/test_powercut.py: an "unreadable shared
    ledger" at the next start).
    """
    p = Path(path)
    tmp = p.with_name(temp_name(p.name, owner))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
        else:
            os.fdatasync(fd)  # the size is data here: a new file's fdatasync writes it
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    try:
        move(tmp, p, replace=replace, sync=sync)
    except BaseException:
        with _suppress_missing():
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike[str], obj: Any, *, replace: bool = False,
               sync: bool = True, owner: str = "", compact: bool = False) -> None:
    """``write_bytes`` of ``obj`` as JSON: indented for people (records), or
    ``compact`` for convd's own files (3-5x cheaper: the C encoder)."""
    text = json.dumps(obj, separators=(",", ":")) if compact else json.dumps(obj, indent=2)
    write_bytes(path, (text + "\n").encode(), replace=replace, sync=sync, owner=owner)


class _suppress_missing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, et: Any, ev: Any, tb: Any) -> bool:
        return et is not None and issubclass(et, FileNotFoundError)


PARKED_PREFIX = ".gone-"


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Remove a per-item work directory (files only one level deep).

    On NFS an unlinked file that a process on this client still holds open
    lives on as ``.nfsXXXX`` (EBUSY to unlink) until it is closed, and keeps
    its directory from being removed.  The item is finished by then, so its
    directory is parked under a dot-name (``.gone-NAME-RANDOM``) that nothing
    takes for an item, and :func:`sweep_parked` removes it later.
    """
    p = os.fspath(path)
    try:
        names = os.listdir(p)
    except FileNotFoundError:
        return
    busy = False
    for n in names:
        full = os.path.join(p, n)
        if os.path.isdir(full) and not os.path.islink(full):
            remove_tree(full)
            continue
        try:
            os.unlink(full)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if not (n.startswith(".nfs") and exc.errno == errno.EBUSY):
                raise
            busy = True
    try:
        os.rmdir(p)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if not busy or exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EBUSY):
            raise
        parent, base = os.path.split(p)
        if not base.startswith(PARKED_PREFIX):
            os.rename(p, os.path.join(parent, f"{PARKED_PREFIX}{base[:100]}-{secrets.token_hex(4)}"))


def sweep_parked(directory: str | os.PathLike[str]) -> None:
    """Remove the directories :func:`remove_tree` parked in ``directory``, as far as NFS lets it."""
    for entry in os.scandir(directory):
        if entry.name.startswith(PARKED_PREFIX) and entry.is_dir(follow_symlinks=False):
            try:
                remove_tree(entry.path)
            except OSError:
                pass  # still held open; the next sweep tries again
