"""The spool as a producer sees it: hand-in, records, cancel requests, daemon progress.

This is the on-disk protocol of contract sections 1, 2 and 6, for both sides:
the daemon reads cancel requests with it, and Glance's plugin (in Glance's
own process) uses it to hand images in and wait for their records.  It
imports the standard library, :mod:`convd.durable` and :mod:`convd.cluster`
only, so it loads
wherever convd is installed, with or without the daemon's dependencies.

Cancel requests (contract section 6, "through the spool alone"): a producer
asks convd to give up on ``NAME`` by creating ``incoming/.convd-cancel.NAME``
(a dot-name, so the intake never takes it for an image), a JSON object::

    {"name": "NAME", "inode": 1234, "reason": "…", "requested_at": 1764460800.0}

``inode`` is the inode number of the bytes that were handed in (a rename
keeps it all the way to ``failed/NAME``), so a request left over from an
earlier item can never cancel a later item of the same name; ``null`` means
whatever item of that name is in flight.  Whichever daemon holds the item
(or, with none running, ``convd cancel`` itself) moves it to ``failed/`` with
code ``cancelled`` and removes the request; a request for an item already
published, or for no item at all, is removed and changes nothing.

Expectations (contract section 8): ``incoming/.convd-expect.NAME``, written
before ``NAME`` is renamed in, states what the producer dropped
(``{"size": 123, "sha256": "…"}``); convd takes it with the item at claim.

Layouts (contract section 9): ``incoming/.convd-layout.NAME``, written before
``NAME`` is renamed in, asks for the output's layout as ``[target.FMT]`` keys,
by target format (``{"qcow2": {"compression": "zstd"}, "raw": {…}}``); convd
takes it with the item at claim and applies the section of the format it
makes over its own ``[target.FMT]``.

Every sidecar is the producer's file: convd reads it with :func:`read_sidecar`
(no link followed, never blocking, a few KiB at most, bounded JSON).  Every
producer may write in ``incoming/``, so a sidecar counts only when it belongs
(``st_uid`` of the descriptor read) to the user that owns the file it is about,
to root, or to convd's own user (:func:`foreign_sidecar`); another's is set
aside and the item goes on as if it were absent.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import json
import math
import os
import secrets
import select
import shutil
import stat
import string
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convd import cluster, durable

__all__ = [
    "CANCEL_PREFIX",
    "EXPECT_PREFIX",
    "LAYOUT_KEYS",
    "LAYOUT_PREFIX",
    "PRIORITY_PREFIX",
    "SET_ASIDE_PREFIX",
    "SIDECAR_MAX",
    "CancelRequest",
    "DirWatch",
    "ForeignSidecar",
    "SidecarError",
    "SpoolPaths",
    "clear_cancel_request",
    "clear_priority",
    "daemons_running",
    "expectation",
    "find_record",
    "foreign_sidecar",
    "hand_in",
    "is_cancel_request",
    "item_progress",
    "layout_request",
    "mark_priority",
    "parse_sidecar",
    "read_cancel_request",
    "read_cancel_requests",
    "read_priority",
    "read_record",
    "read_sidecar",
    "read_sidecar_owned",
    "request_cancel",
    "set_aside",
    "write_expectation",
    "write_layout",
]

CANCEL_PREFIX = ".convd-cancel."
# incoming/.convd-priority.NAME: NAME is taken before bulk drops (contract
# section 9; the rule is Intake.ready's).
PRIORITY_PREFIX = ".convd-priority."
PRIORITIES = ("high", "normal")
EXPECT_PREFIX = ".convd-expect."
LAYOUT_PREFIX = ".convd-layout."
# Where a sidecar convd will not act on goes when it cannot be removed (a directory).
SET_ASIDE_PREFIX = ".convd-set-aside."
_IGNORED_SUFFIXES = (".part", ".tmp")


@dataclass(frozen=True)
class SpoolPaths:
    """The four spool directories (contract section 1)."""

    incoming: Path
    work: Path
    outgoing: Path
    failed: Path

    @classmethod
    def under(cls, root: str | os.PathLike[str]) -> SpoolPaths:
        r = Path(root)
        return cls(r / "incoming", r / "work", r / "outgoing", r / "failed")


# -- hand-in -------------------------------------------------------------


def hand_in(src: str | os.PathLike[str], paths: SpoolPaths, name: str, *, priority: str = "normal",
            expect: dict[str, int | str] | None = None,
            layout: dict[str, dict[str, int | str]] | None = None) -> int:
    """Put ``src`` into ``incoming/NAME``: a rename on the same filesystem, else a copy.

    ``priority="high"`` first marks ``NAME`` (:func:`mark_priority`) so the
    daemon takes it before bulk drops; ``"normal"`` marks nothing.
    ``expect`` (contract section 8: ``{"size": bytes, "sha256": hex, …}``) is
    written as ``incoming/.convd-expect.NAME`` first, so convd checks the
    bytes it takes against it; it is removed again if the hand-in fails.
    ``layout`` (contract section 9: ``{"qcow2": {"compression": "zstd"}}``,
    checked with :func:`layout_request`) is written as
    ``incoming/.convd-layout.NAME`` likewise, and removed likewise.

    Either way the bytes pass through ``incoming/.NAME.part`` (fsynced, made
    group-readable with the spool's group) and reach ``NAME`` by a rename
    that never replaces.  ``src`` is gone afterwards.  Returns the inode
    number of the handed-in file, which identifies it in a cancel request.
    Raises ``FileExistsError`` if ``incoming/NAME`` is already there.
    """
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}, not {priority!r}")
    if priority == "high":
        mark_priority(paths, name)  # before NAME appears: the daemon reads it when it first sees NAME
    part = paths.incoming / f".{name}.part"
    if layout:
        layout = layout_request(layout)  # a bad one is the caller's error (ValueError), before anything moves
    if (expect or layout) and os.path.lexists(paths.incoming / name):
        # An earlier hand-in of that name waits: its sidecars are not ours to replace.
        raise FileExistsError(errno.EEXIST, "already in the spool", str(paths.incoming / name))
    expect_path = write_expectation(paths, name, expect) if expect else None
    try:
        layout_path = write_layout(paths, name, layout) if layout else None
    except BaseException:
        if expect_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(expect_path)
        raise
    renamed = True

    def unwrite() -> None:
        for sidecar in (expect_path, layout_path):
            if sidecar is not None:
                with contextlib.suppress(OSError):
                    os.unlink(sidecar)

    try:
        os.rename(src, part)
    except OSError as exc:
        renamed = False
        if exc.errno != errno.EXDEV:
            unwrite()  # e.g. another producer holds .NAME.part in a sticky incoming/
            raise
        try:
            _copy(Path(src), part)  # removes its own partial copy; never one it did not make
        except BaseException:
            unwrite()
            raise
    try:
        fd = os.open(part, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            # A renamed file keeps the group it was made with: give it the
            # spool's (setgid) group so the daemon may read it.
            with contextlib.suppress(OSError):
                os.fchown(fd, -1, os.stat(paths.incoming).st_gid)
            st = os.fstat(fd)
            os.fchmod(fd, (st.st_mode & 0o777) | 0o040)
            os.fsync(fd)
            inode = st.st_ino
        finally:
            os.close(fd)
        durable.move(part, paths.incoming / name)
    except BaseException:
        with contextlib.suppress(OSError):
            if renamed:
                os.rename(part, src)  # the caller's file stays where it was
            else:
                os.unlink(part)
        unwrite()
        raise
    if not renamed:
        os.unlink(src)
    return inode


def mark_priority(paths: SpoolPaths, name: str) -> Path:
    """Write ``incoming/.convd-priority.NAME`` (``{"priority": "high"}``), through a temporary dot-name.

    Written before ``NAME`` is renamed in; the daemon removes it when it claims ``NAME``.
    """
    return _write_sidecar(paths, PRIORITY_PREFIX, name, {"priority": "high"})


def read_priority(incoming: Path, name: str, producer: int | None = None) -> str:
    """``"high"`` if ``incoming/.convd-priority.NAME`` says so, else ``"normal"``.

    The sidecar is a producer's file, read as every sidecar is
    (:func:`read_sidecar`); anything else (absent, unreadable, not JSON,
    another value) is ``"normal"``.  ``producer``: the uid owning ``NAME``
    (None: not known, so only root's or convd's own mark counts); a mark of
    anyone else raises :class:`ForeignSidecar` (the caller sets it aside).
    """
    try:
        body, owner = read_sidecar_owned(incoming / f"{PRIORITY_PREFIX}{name}")
    except (OSError, SidecarError):
        return "normal"
    if body.get("priority") != "high":
        return "normal"
    foreign = foreign_sidecar(owner, producer)
    if foreign is not None:
        raise foreign
    return "high"


def clear_priority(incoming: Path, name: str, producer: int | None = None) -> None:
    """Take ``NAME``'s priority sidecar away once ``NAME`` is claimed; never raises.

    A producer's file: a directory there is set aside like any sidecar
    convd will not act on, and a name too long for the prefix
    (ENAMETOOLONG) has no sidecar at all.  One that is not ``producer``'s
    (the claimed file's owner; :func:`foreign_sidecar`) stays: it may be for
    its owner's own drop of that name, which another file took first.
    """
    path = incoming / f"{PRIORITY_PREFIX}{name}"
    try:
        st = os.lstat(path)
        if foreign_sidecar(st.st_uid if st.st_nlink == 1 or stat.S_ISDIR(st.st_mode) else None,
                           producer) is None:
            set_aside(path)
    except OSError:
        pass


def _copy(src: Path, dst: Path) -> None:
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o640)
    try:
        with open(src, "rb") as fin, os.fdopen(os.dup(fd), "wb") as fout:
            shutil.copyfileobj(fin, fout, 16 << 20)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(dst)
        raise
    os.close(fd)


# -- records ---------------------------------------------------------------


def find_record(paths: SpoolPaths, name: str, inode: int | None = None) -> tuple[str, dict[str, Any]] | None:
    """``("outgoing" | "failed", record)`` for ``NAME``, or None while there is none.

    Looks by listing the directories, never by ``stat()`` of a name that may
    not exist yet: on NFS a negative lookup is cached for up to 30 s, a
    directory listing is not.  In ``failed/`` (``NAME.json``, ``NAME.1.json``,
    …) only the reject of the bytes with inode ``inode`` counts, when given.
    """
    record = f"{name}.json"
    with contextlib.suppress(FileNotFoundError):
        if record in os.listdir(paths.outgoing):
            rec = read_record(paths.outgoing / record)
            if rec is not None:
                return "outgoing", rec
    try:
        names = os.listdir(paths.failed)
    except FileNotFoundError:
        return None
    for entry in names:
        if not (entry == record or (entry.startswith(f"{name}.") and entry.endswith(".json")
                                    and entry[len(name) + 1:-5].isdigit())):
            continue
        rec = read_record(paths.failed / entry)
        if rec is None or rec.get("name") != name:
            continue
        if inode is not None:
            try:
                if os.lstat(paths.failed / entry[:-5]).st_ino != inode:
                    continue
            except FileNotFoundError:
                continue
        return "failed", rec
    return None


# A record convd writes is a few KiB; anything larger is not one of its.
_RECORD_MAX = 1 << 20


def read_record(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The JSON object in the record at ``path``, or None (absent, not a regular file, over 1 MiB, not JSON).

    ``outgoing/`` and ``failed/`` are shared with the consumers: whatever
    sits under a record's name is opened without following a link or
    blocking on a FIFO, and read bounded.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = os.read(fd, _RECORD_MAX + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(data) > _RECORD_MAX:
        return None
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None




# -- sidecars: bounded, link-free reading ---------------------------------------

SIDECAR_MAX = 4096  # bytes a sidecar may have; a request or an expectation is far smaller
SIDECAR_DEPTH = 4  # nesting a sidecar's JSON may have ({"a": {"b": […]}} is 3)
REASON_MAX = 500


class SidecarError(ValueError):
    """A sidecar (cancel request, expectation, layout request) that convd will not act on;
    the message says why.  ``owner``: the uid the file belongs to, when it could be looked
    at (``fstat`` of the descriptor opened on it), else None."""

    def __init__(self, message: str, owner: int | None = None) -> None:
        super().__init__(message)
        self.owner = owner


class ForeignSidecar(SidecarError):
    """A sidecar that belongs to neither the producer of its item, root, nor convd's user.

    Another producer planted it under this item's name: it is set aside, logged,
    and the item goes on as if there were none (never the item's failure).
    """

    def __init__(self, owner: int | None, producer: int | None) -> None:
        whose = "cannot be told" if owner is None else f"is uid {owner}"
        super().__init__(f"its owner {whose}, not the producer of the item (uid {producer}), root, "
                         f"or convd (uid {os.geteuid()})", owner)
        self.producer = producer


def foreign_sidecar(owner: int | None, producer: int | None) -> ForeignSidecar | None:
    """The one rule on whose sidecar counts: None when ``owner`` (a sidecar's ``st_uid``, from
    ``fstat`` of the descriptor read) is ``producer`` (the uid owning the dropped file it is
    about, as convd found it at claim; None if unknown), root (0) or convd's own euid (an
    operator, or the Glance plugin run as convd's user); else the refusal to raise or log.
    """
    if owner is not None and owner in (producer, 0, os.geteuid()):
        return None
    return ForeignSidecar(owner, producer)


def read_sidecar(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON object in the sidecar at ``path`` (see :func:`read_sidecar_owned`)."""
    return read_sidecar_owned(path)[0]


_PROC_FD = "/proc/self/fd"


def read_sidecar_owned(path: str | os.PathLike[str]) -> tuple[dict[str, Any], int]:
    """The JSON object in the sidecar at ``path`` and the uid it belongs to, read without
    following a link or blocking.

    Looked at first through an ``O_PATH | O_NOFOLLOW`` descriptor, whose ``fstat``
    gives its owner and type before anything is opened (a symlink, a FIFO or a
    device is never followed, waited on or read); it must be a regular file of
    at most ``SIDECAR_MAX`` bytes, then opened for reading through that very
    descriptor (``/proc/self/fd``, ``O_NONBLOCK``), holding one JSON object
    nested at most ``SIDECAR_DEPTH`` deep.  Raises ``FileNotFoundError`` when it
    is gone and ``SidecarError`` (the reason, in a producer's words, and the
    owner whenever the file could be looked at) for anything else.
    """
    try:
        held = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise SidecarError(f"it cannot be opened: {exc.strerror}") from None
    try:
        st = os.fstat(held)
        owner = st.st_uid
        if stat.S_ISLNK(st.st_mode):
            raise SidecarError("it is a symbolic link", owner)
        if not stat.S_ISREG(st.st_mode):
            raise SidecarError("it is not a regular file (a directory, FIFO, socket or device)", owner)
        if st.st_nlink != 1:
            # A hard link to someone's file says nothing of who wrote it there:
            # attributed to no one, so it counts for no item (foreign_sidecar).
            raise SidecarError(f"it has {st.st_nlink} hard links; a sidecar has one", None)
        if st.st_size > SIDECAR_MAX:
            raise SidecarError(f"it is {st.st_size} bytes; a sidecar has at most {SIDECAR_MAX}", owner)
        fd = _reopen(held, path, st)
        try:
            data = os.read(fd, SIDECAR_MAX + 1)
        except OSError as exc:
            raise SidecarError(f"it cannot be read: {exc.strerror}", owner) from None
        finally:
            os.close(fd)
    finally:
        os.close(held)
    if len(data) > SIDECAR_MAX:
        raise SidecarError(f"it holds more than {SIDECAR_MAX} bytes", owner)
    try:
        return parse_sidecar(data), owner
    except SidecarError as exc:
        raise SidecarError(str(exc), owner) from None


def _reopen(held: int, path: str | os.PathLike[str], st: os.stat_result) -> int:
    """A read descriptor on the regular file that ``held`` (an ``O_PATH`` descriptor) refers to."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        return os.open(f"{_PROC_FD}/{held}", flags)
    except FileNotFoundError:
        pass  # no /proc mounted (the magic link opens even a file removed meanwhile)
    except OSError as exc:
        raise SidecarError(f"it cannot be opened: {exc.strerror}", st.st_uid) from None
    # By name again, then, and only if it is still the file looked at.
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise
    except OSError as exc:
        why = "it is a symbolic link" if exc.errno == errno.ELOOP else f"it cannot be opened: {exc.strerror}"
        raise SidecarError(why, st.st_uid) from None
    now = os.fstat(fd)
    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise SidecarError("it was replaced while it was read", st.st_uid)
    return fd


def _depth(text: str) -> int:
    """Deepest nesting of ``[``/``{`` outside strings (json would recurse that deep)."""
    depth = most = 0
    in_str = escaped = False
    for ch in text:
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            most = max(most, depth)
        elif ch in "]}":
            depth -= 1
    return most


def parse_sidecar(data: bytes) -> dict[str, Any]:
    """A sidecar's bytes as a JSON object (UTF-8, bounded depth); raises ``SidecarError``."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SidecarError("it is not UTF-8 text") from None
    if _depth(text) > SIDECAR_DEPTH:
        raise SidecarError(f"its JSON is nested more than {SIDECAR_DEPTH} deep")
    try:
        obj = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise SidecarError(f"it is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise SidecarError("it is not a JSON object")
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else " " for ch in text)


# -- cancel requests -------------------------------------------------------


@dataclass(frozen=True)
class CancelRequest:
    name: str
    inode: int | None
    reason: str
    requested_at: float  # as the producer stated it: informational, never trusted for expiry
    uid: int | None = None  # whose the request file is (fstat of the descriptor read): see foreign_sidecar

    def matches(self, inode: int | None) -> bool:
        """Whether this request is for the bytes with ``inode`` (any, if it names none)."""
        return self.inode is None or self.inode == inode


def is_cancel_request(filename: str) -> bool:
    return filename.startswith(CANCEL_PREFIX) and len(filename) > len(CANCEL_PREFIX) \
        and not filename.endswith(_IGNORED_SUFFIXES)


def request_cancel(paths: SpoolPaths, name: str, *, inode: int | None, reason: str = "") -> Path:
    """Ask, through the spool, that ``NAME`` be cancelled (replaces an earlier request)."""
    path = paths.incoming / f"{CANCEL_PREFIX}{name}"
    body = {"name": name, "inode": inode, "reason": reason[:REASON_MAX], "requested_at": time.time()}
    tmp = paths.incoming / f".convd-cancel-{secrets.token_hex(6)}.tmp"
    durable.write_json(tmp, body)
    try:
        durable.move(tmp, path, replace=True)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def read_cancel_request(path: str | os.PathLike[str], name: str) -> CancelRequest:
    """The cancel request for ``NAME`` at ``path``, validated field by field.

    Fields: ``name`` (optional; if given, ``NAME``), ``inode`` (a non-negative
    integer or null), ``reason`` (text, at most ``REASON_MAX`` characters),
    ``requested_at`` (a number, informational).  Unknown fields are ignored.
    Raises ``FileNotFoundError`` or ``SidecarError`` as :func:`read_sidecar_owned`.
    """
    body, owner = read_sidecar_owned(path)
    stated = body.get("name", name)
    if stated != name:
        raise SidecarError(f'its "name" ({_printable(str(stated))[:80]!r}) is not the name in the file name')
    inode = body.get("inode")
    if inode is not None and (isinstance(inode, bool) or not isinstance(inode, int) or inode < 0):
        raise SidecarError('its "inode" is not a non-negative integer or null')
    reason = body.get("reason") or ""
    if not isinstance(reason, str):
        raise SidecarError('its "reason" is not text')
    if len(reason) > REASON_MAX:
        raise SidecarError(f'its "reason" is longer than {REASON_MAX} characters')
    at = body.get("requested_at") or 0.0
    if isinstance(at, bool) or not isinstance(at, (int, float)) or not math.isfinite(at):
        raise SidecarError('its "requested_at" is not a number')
    return CancelRequest(name=name, inode=inode, reason=_printable(reason), requested_at=float(at), uid=owner)


def read_cancel_requests(paths: SpoolPaths) -> Iterator[CancelRequest]:
    """Every well-formed cancel request in ``incoming/`` (a malformed one is removed)."""
    try:
        names = os.listdir(paths.incoming)
    except FileNotFoundError:
        return
    for filename in names:
        if not is_cancel_request(filename):
            continue
        path = paths.incoming / filename
        try:
            yield read_cancel_request(path, filename[len(CANCEL_PREFIX):])
        except FileNotFoundError:
            continue
        except SidecarError:
            set_aside(path)


def set_aside(path: str | os.PathLike[str]) -> bool:
    """Take a sidecar convd will not act on out of the way: removed, or (a directory)
    renamed to a dot-name nothing reads.  False when neither was allowed."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        pass
    p = Path(path)
    try:
        os.rename(p, p.with_name(f"{SET_ASIDE_PREFIX}{secrets.token_hex(6)}"))
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


# -- expectations (contract section 8) --------------------------------------------


def expectation(body: dict[str, Any]) -> dict[str, int | str]:
    """A producer's expectation, validated field by field: ``{"size": bytes, ALGO: hex, …}``.

    ``size`` is a non-negative integer; every other key must be a hashlib
    algorithm of fixed digest length (``sha256``, ``sha512``, ``sha1``, ``md5``, …)
    with a hex digest of that length (case is ignored).  Raises ``SidecarError``.
    """
    out: dict[str, int | str] = {}
    for key, value in body.items():
        if key == "size":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SidecarError('its "size" is not a non-negative integer (bytes)')
            out["size"] = value
            continue
        algo = key.lower() if isinstance(key, str) else ""
        try:
            length = hashlib.new(algo).digest_size * 2 if algo in hashlib.algorithms_available else 0
        except (ValueError, TypeError):
            length = 0
        if not length or algo.startswith("shake"):
            raise SidecarError(f"it states {_printable(key)[:40]!r}, which is neither \"size\" nor a "
                               "hashlib digest name")
        if not isinstance(value, str) or len(value) != length or any(c not in string.hexdigits for c in value):
            raise SidecarError(f'its "{algo}" is not a hex digest of {length} characters')
        out[algo] = value.lower()
    if not out:
        raise SidecarError('it states nothing ("size" or a digest)')
    return out


def write_expectation(paths: SpoolPaths, name: str, expect: dict[str, int | str]) -> Path:
    """Write ``incoming/.convd-expect.NAME`` (through a dot-temp and a rename), before
    ``NAME`` itself is renamed in; it replaces an earlier one."""
    return _write_sidecar(paths, EXPECT_PREFIX, name, dict(expect))


# -- layouts (contract section 9) -----------------------------------------------------

# The [target.FMT] keys a producer may ask for, and the JSON types of their
# values (a size as bytes or as text such as "2MiB").  What the values may be
# is the daemon's check-config rule (convd.config.target_with), not repeated here.
LAYOUT_KEYS: dict[str, dict[str, tuple[type, ...]]] = {
    "raw": {"preallocation": (str,)},
    "qcow2": {"compat": (str,), "cluster_size": (int, str), "compression": (str,), "preallocation": (str,)},
    "vpc": {"subformat": (str,), "size_multiple": (int, str)},
    "vmdk": {"subformat": (str,)},
}
_LAYOUT_VALUE_MAX = 32  # characters: the longest real value is "monolithicSparse"


def layout_request(body: dict[str, Any]) -> dict[str, dict[str, int | str]]:
    """A producer's layout request, validated field by field: ``{FMT: {KEY: value}}``.

    ``FMT`` is one of :data:`LAYOUT_KEYS` (the ``[target.*]`` sections), each
    a JSON object of that section's keys; a value is printable text of at most
    32 characters or a non-negative integer where the key is a size.  Whether
    qemu-img can make it is judged by the daemon, as check-config judges
    ``[target.*]``.  Raises ``SidecarError`` (a ``ValueError``).
    """
    out: dict[str, dict[str, int | str]] = {}
    for fmt, section in body.items():
        keys = LAYOUT_KEYS.get(fmt) if isinstance(fmt, str) else None
        if keys is None:
            raise SidecarError(f"it names {_printable(str(fmt))[:40]!r}, which is not a target format with a "
                               f"layout ({', '.join(LAYOUT_KEYS)})")
        if not isinstance(section, dict):
            raise SidecarError(f'its "{fmt}" is not a JSON object')
        got: dict[str, int | str] = {}
        for key, value in section.items():
            kinds = keys.get(key)
            if kinds is None:
                raise SidecarError(f"its \"{fmt}\" states {_printable(str(key))[:40]!r}, which is not a "
                                   f"[target.{fmt}] key ({', '.join(keys)})")
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise SidecarError(f'its "{fmt}" "{key}" is not {" or ".join(k.__name__ for k in kinds)}')
            if isinstance(value, int):
                if value < 0:
                    raise SidecarError(f'its "{fmt}" "{key}" is negative')
                got[key] = value
            elif isinstance(value, str):
                if len(value) > _LAYOUT_VALUE_MAX or not value.isprintable():
                    raise SidecarError(f'its "{fmt}" "{key}" is not printable text of at most '
                                       f"{_LAYOUT_VALUE_MAX} characters")
                got[key] = value
        out[fmt] = got
    if not any(out.values()):
        raise SidecarError("it asks for nothing (no [target.FMT] key)")
    return out


def write_layout(paths: SpoolPaths, name: str, layout: dict[str, dict[str, int | str]]) -> Path:
    """Write ``incoming/.convd-layout.NAME`` (through a dot-temp and a rename), before
    ``NAME`` itself is renamed in; it replaces an earlier one."""
    return _write_sidecar(paths, LAYOUT_PREFIX, name, layout_request(layout))


def _write_sidecar(paths: SpoolPaths, prefix: str, name: str, body: dict[str, Any]) -> Path:
    """``incoming/PREFIXNAME`` holding ``body``, through a dot-temp and a rename that replaces."""
    path = paths.incoming / f"{prefix}{name}"
    tmp = paths.incoming / f"{prefix.rstrip('.')}-{secrets.token_hex(6)}.tmp"
    durable.write_json(tmp, body)
    try:
        with contextlib.suppress(OSError):
            os.chmod(tmp, 0o640)  # the daemon reads it through the spool's group
        durable.move(tmp, path, replace=True)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def clear_cancel_request(paths: SpoolPaths, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(paths.incoming / f"{CANCEL_PREFIX}{name}")


# -- progress ----------------------------------------------------------------


def daemons_running(paths: SpoolPaths) -> bool:
    """Whether a daemon may be running on this spool (holds its ``work/<instance>/.lock``).

    A running daemon reads cancel requests; with none, a request waits for
    the next start.  Each lock is probed through its ``.adopt`` door
    (:func:`convd.cluster.instance_lock_state`), so the probe never makes a
    starting daemon refuse to start; a door held at that moment (a daemon
    starting, or a peer adopting) counts as running.
    """
    try:
        entries = list(os.scandir(paths.work))
    except OSError:
        return False
    for e in entries:
        if e.name.startswith(".") or not e.is_dir(follow_symlinks=False):
            continue
        if not os.path.lexists(os.path.join(e.path, cluster.LOCK)):
            continue  # never run: nothing to probe (and no lock file to create)
        if cluster.instance_lock_state(Path(e.path)) != "free":
            return True
    return False


def item_progress(paths: SpoolPaths, name: str) -> dict[str, Any] | None:
    """Where ``NAME`` is, as the daemon holding it reports it, or None if no daemon does.

    ``{"instance", "stage", "progress" (0..1), "source_format", "target_format"}``,
    or ``{"stage": "queued"}`` while it waits in ``incoming/``.  Several
    daemons may share the spool: whichever holds the item answers (read from
    :func:`convd.cluster.instances` by heartbeat only, no lock touched).
    """
    for inst in cluster.instances(paths.work, probe_locks=False):
        for entry in inst["in_flight"]:
            if entry.get("name") == name:
                return {"instance": inst["instance"], "stage": entry.get("stage"),
                        "progress": float(entry.get("progress") or 0.0),
                        "source_format": entry.get("source_format"),
                        "target_format": inst["target_format"]}
    with contextlib.suppress(OSError):
        if name in os.listdir(paths.incoming):
            return {"stage": "queued"}
    return None


# -- waiting ---------------------------------------------------------------------

_IN_CLOEXEC = os.O_CLOEXEC
_IN_NONBLOCK = os.O_NONBLOCK
_IN_MOVED_TO = 0x00000080
_IN_CLOSE_WRITE = 0x00000008
_IN_CREATE = 0x00000100


class DirWatch:
    """A wake-up hint when names appear in some directories (inotify), else a plain sleep.

    Only a hint: on NFS and CephFS inotify sees nothing of other clients, so
    callers still look (list the directory) at least every ``timeout``.
    """

    def __init__(self, *directories: str | os.PathLike[str]) -> None:
        self.fd = -1
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        except (OSError, AttributeError):
            return
        if fd < 0:
            return
        for d in directories:
            if libc.inotify_add_watch(fd, os.fsencode(d), _IN_MOVED_TO | _IN_CLOSE_WRITE | _IN_CREATE) < 0:
                os.close(fd)
                return
        self.fd = fd

    def wait(self, timeout: float) -> None:
        """Return after ``timeout`` seconds, or earlier once something appeared."""
        timeout = max(0.0, timeout)
        if self.fd < 0:
            time.sleep(timeout)
            return
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if ready:
            with contextlib.suppress(BlockingIOError):
                while os.read(self.fd, 65536):
                    pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> DirWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
