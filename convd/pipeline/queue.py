"""The intake queue: names seen in ``incoming/``, oldest first, and when each may be claimed.

Priority (contract section 9): a name whose producer marked it
(``incoming/.convd-priority.NAME``, as the Glance plugin does) is taken
before every unmarked one, oldest first; but after ``burst`` marked names
in a row, the oldest unmarked name that is ready goes next, so a stream of
imports never starves an operator's backlog, and the backlog delays an
import by at most one file in ``burst + 1``.

A file renamed in is ready at once.  A file written in place is ready only
when no process holds it open for writing (a read lease is refused while a
writer has it open; ``/proc/*/fd`` where leases are not allowed) and its
size and mtime have been still for ``settle`` seconds.

On a shared filesystem (NFS, CephFS, GlusterFS, …) the writer check is only
a hint: a lease sees this host's openers at most, and NFSv4 refuses one
whenever the client holds no read delegation, which on a server granting
none is forever.  There a refused lease that ``/proc`` cannot confirm makes
the file wait ``settle`` like one written in place, never longer; producers
must rename in (documented), and ``settle`` guards the rest.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from convd.protocol import PRIORITY_PREFIX, ForeignSidecar, read_priority

__all__ = ["Candidate", "Intake", "Writer", "writer_state"]

log = structlog.get_logger(__name__)


def _proc_writers(path: Path) -> bool:
    """Whether any process we can see has ``path`` open for writing (slow path)."""
    target = os.fspath(path)
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") != target:
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as fh:
                    # "pos:" comes first; the open flags are on the "flags:" line, in octal.
                    flags = next(int(line.split()[1], 8) for line in fh if line.startswith("flags:"))
            except (OSError, ValueError, IndexError, StopIteration):
                continue
            if flags & (os.O_WRONLY | os.O_RDWR):
                return True
    return False


class Writer(enum.Enum):
    """What the writer check learnt of a file."""

    NONE = "none"  # nobody (that this host can see) has it open for writing
    OPEN = "open"  # a process on this host has it open for writing
    UNSURE = "unsure"  # the lease was refused and nothing here explains why (NFSv4)


def writer_state(path: Path, *, shared: bool = False) -> Writer:
    """Whether some process holds ``path`` open for writing.

    A read lease (``F_SETLEASE``) is refused while a writer has the file
    open.  On a local filesystem a refusal is the answer; on a shared one
    (``shared``) it may only mean the NFSv4 client holds no delegation, so
    ``/proc`` decides, and where it finds no writer the answer is UNSURE.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return Writer.NONE  # gone, or not ours to open: the claim will find out
    try:
        try:
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EBUSY):
                if not shared:
                    return Writer.OPEN
                return Writer.OPEN if _proc_writers(path) else Writer.UNSURE
            # EACCES (not our file and no CAP_LEASE), EINVAL (NFSv3 and other
            # filesystems without leases): look for writers the slow way.
            return Writer.OPEN if _proc_writers(path) else Writer.NONE
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return Writer.NONE
    finally:
        os.close(fd)


@dataclass
class Candidate:
    name: str
    seen: float
    size: int = -1
    mtime_ns: int = -1
    still_since: float = 0.0
    in_place: bool = False  # written where it lies: settle applies
    priority: bool = False  # its producer marked it (.convd-priority.NAME)


class Intake:
    def __init__(self, incoming: Path, settle: float, *, shared: bool = False, burst: int = 4) -> None:
        """``shared``: ``incoming/`` is on a filesystem other hosts write to (see the module docstring);
        ``burst``: marked names taken in a row before a waiting unmarked one."""
        self.incoming = incoming
        self.settle = settle
        self.shared = shared
        self.burst = burst
        self.pending: dict[str, Candidate] = {}
        self.streak = 0  # marked names taken in a row

    def __len__(self) -> int:
        return len(self.pending)

    def saw(self, name: str, *, modified: bool = False, renamed: bool | None = None) -> None:
        """Note a name; ``renamed`` is what inotify said of its arrival, None if unknown."""
        now = time.monotonic()
        c = self.pending.get(name)
        if c is None:
            c = self.pending[name] = Candidate(name=name, seen=now, still_since=now)
            # The producer writes the mark before renaming NAME in.
            c.priority = self._marked(name)
            # watchfiles reports a rename into incoming/ and a file created in
            # place alike ("added"); without inotify's word, timestamps decide.
            c.in_place = (not renamed) if renamed is not None else self._looks_in_place(name)
        elif renamed is False:
            c.in_place = True
        if modified:
            c.in_place = True

    def _marked(self, name: str) -> bool:
        """Whether ``NAME``'s producer marked it; another producer's mark is set aside, logged."""
        try:
            producer: int | None = os.lstat(self.incoming / name).st_uid
        except OSError:
            producer = None  # gone already: only root's or convd's own mark would count
        try:
            return read_priority(self.incoming, name, producer) == "high"
        except ForeignSidecar as exc:
            mark = f"{PRIORITY_PREFIX}{name}"
            # Left where it is: it may be for its owner's own drop of this name.
            log.warning("sidecar not the producer's; ignored", item=name, sidecar=mark, reason=str(exc),
                        uid=exc.owner, producer_uid=producer)
            return False

    def forget(self, name: str) -> None:
        self.pending.pop(name, None)

    def taken(self, name: str) -> None:
        """Note that ``name`` was claimed (before ``forget``): counts marked names in a row."""
        c = self.pending.get(name)
        self.streak = self.streak + 1 if c is not None and c.priority else 0

    def _order(self) -> list[Candidate]:
        """Pending names in the order they are offered (the module docstring's rule)."""
        marked = [c for c in self.pending.values() if c.priority]
        if not marked:
            return list(self.pending.values())
        bulk = [c for c in self.pending.values() if not c.priority]
        out: list[Candidate] = []
        run = self.streak
        while marked or bulk:
            if marked and (run < self.burst or not bulk):
                out.append(marked.pop(0))
                run += 1
            else:
                out.append(bulk.pop(0))
                run = 0
        return out

    def defer(self, name: str) -> None:
        """Send a name that cannot be claimed yet to the back of the line."""
        c = self.pending.pop(name, None)
        if c is not None:
            self.pending[name] = c

    def _looks_in_place(self, name: str) -> bool:
        """Recently written and not renamed since.

        A rename updates ctime, not mtime, so a file renamed in after its last
        write has ``ctime > mtime``.  Inode timestamps tick coarsely (a jiffy),
        so a rename within the same tick as the last write looks in place and
        merely waits ``settle``: delay, never a half-written claim.
        """
        try:
            st = os.lstat(self.incoming / name)
        except OSError:  # gone, or the filesystem cut off (ready() says so): not now
            return False
        recent = time.time_ns() - st.st_mtime_ns < self.settle * 1e9
        renamed_after_write = st.st_ctime_ns > st.st_mtime_ns
        return recent and not renamed_after_write

    def ready(self, limit: int) -> tuple[list[str], float | None]:
        """Up to ``limit`` names that may be claimed now (oldest first), and
        seconds until one now held back may be.  Stops looking once it has
        ``limit``: a long backlog costs nothing until its turn."""
        now = time.monotonic()
        out: list[str] = []
        wait: float | None = None
        for c in self._order():
            name = c.name
            if len(out) >= limit:
                break
            path = self.incoming / name
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                del self.pending[name]
                continue
            except OSError as exc:
                # The spool's filesystem answers errors (an evicted ceph-fuse
                # answers ESHUTDOWN until it is mounted again): nothing more is
                # taken now, and the daemon looks again in a second.
                log.warning("cannot look at incoming/; trying again", item=name, error=str(exc))
                return out, self._sooner(wait, 1.0)
            if not stat.S_ISREG(st.st_mode):
                out.append(name)  # detect rejects it; nothing to wait for
                continue
            if (st.st_size, st.st_mtime_ns) != (c.size, c.mtime_ns):
                if c.size >= 0:
                    c.in_place = True  # it changed under our eyes
                c.size, c.mtime_ns, c.still_since = st.st_size, st.st_mtime_ns, now
            # Settle first: a file still settling waits anyway, and the writer
            # check (a lease, maybe a /proc scan) is asked only of a file
            # that could go now.
            if c.in_place and self._settling(c, now):
                wait = self._sooner(wait, c.still_since + self.settle - now)
                continue
            writer = writer_state(path, shared=self.shared)
            if writer is Writer.OPEN:
                c.in_place, c.still_since = True, now
                wait = self._sooner(wait, max(self.settle, 0.2))
                continue
            if writer is Writer.UNSURE and not c.in_place:
                # Only settle can vouch for it now: it waits as if written
                # in place, measured from when it last changed, never longer.
                c.in_place = True
                if self._settling(c, now):
                    wait = self._sooner(wait, c.still_since + self.settle - now)
                    continue
            out.append(name)
        return out, wait

    def _settling(self, c: Candidate, now: float) -> bool:
        return c.still_since + self.settle - now > 0

    @staticmethod
    def _sooner(wait: float | None, t: float) -> float:
        return t if wait is None else min(wait, t)
