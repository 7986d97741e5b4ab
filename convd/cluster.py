"""The daemons on a spool as anyone may see them: instance locks and status snapshots.

Each daemon holds ``work/<instance>/.lock`` (an exclusive ``flock``) for as
long as it runs, and rewrites ``work/<instance>/.status.json`` every second.
``.adopt`` is the door to ``.lock``: whoever looks at or takes ``.lock`` (a
survivor checking a peer, ``convd status``, ``convd cancel``, a producer
asking whether any daemon runs, or the owner at start-up) takes ``.adopt``
first, so a brief probe never makes a starting daemon think a twin runs,
and a survivor adopting a stopped instance's items keeps everyone else out
(see :mod:`convd.pipeline.spool`).

The daemon, ``convd status``, ``convd cancel`` and the Glance plugin (in
Glance's own process) all read the cluster through this module, which
imports the standard library only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "ADOPT",
    "HEARTBEAT_STALE",
    "LOCK",
    "STATUS_FILE",
    "instance_lock_state",
    "instances",
    "locked_instance",
    "try_flock",
]

LOCK, ADOPT = ".lock", ".adopt"
# Under work/<instance>/: the snapshot `convd status` reads, refreshed every second.
STATUS_FILE = ".status.json"
# A running daemon rewrites its status file every second; one not rewritten
# for this long (seconds) is hung, or its node is cut off.
HEARTBEAT_STALE = 30.0


def try_flock(path: Path) -> int | None:
    """An fd holding an exclusive flock on ``path`` (created if need be), or None if it is held.

    A caller who may not write ``path`` gets a shared flock instead (enough
    to probe: it excludes the daemons' exclusive ones, never to act).

    flock, not fcntl locks: NFS emulates it with a whole-file POSIX lock and
    ceph-fuse passes it to the MDS, so it excludes across clients on every
    shared filesystem tested; nothing else may lock these files.
    """
    try:
        fd, how = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644), fcntl.LOCK_EX
    except PermissionError:
        # Another user's (the Glance plugin's) probe: shared, which still
        # excludes every daemon's exclusive hold and tells whether one is held.
        fd, how = os.open(path, os.O_RDONLY | os.O_CLOEXEC), fcntl.LOCK_SH
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def locked_instance(instance_dir: Path) -> Iterator[str | None]:
    """Hold ``instance_dir``'s door and, if its daemon is not running, its ``.lock``.

    Yields ``"held"`` (its daemon runs; only the door is held), ``"free"``
    (both held: no daemon, starting or surviving, can touch the instance's
    items until the block ends, as a take-over (:class:`convd.pipeline.takeover.TakeOver`) holds them), or
    None when the door is taken (a peer is looking or adopting, or the owner
    is starting: ask again).  Keep the block short: a starting owner waits
    at the door.
    """
    try:
        door = try_flock(instance_dir / ADOPT)
    except OSError:
        yield None
        return
    if door is None:
        yield None
        return
    try:
        try:
            fd = try_flock(instance_dir / LOCK)
        except OSError:
            yield None
            return
        if fd is None:
            yield "held"
            return
        try:
            yield "free"
        finally:
            os.close(fd)
    finally:
        os.close(door)


def instance_lock_state(instance_dir: Path) -> str | None:
    """Whether the daemon of ``work/<instance>/`` runs: ``"held"``, ``"free"``,
    or None when the door is taken (a peer is looking or adopting, or the
    owner is starting: ask again).  Holds the locks for microseconds only."""
    with locked_instance(instance_dir) as state:
        return state


def instances(work: Path, now: float | None = None, *, probe_locks: bool = True,
              probe_old: bool = False) -> list[dict[str, Any]]:
    """Every instance with a directory under ``work/``, sorted by name.

    Each is ``{"instance", "state", "host", "pid", "heartbeat_age",
    "target_format", "items", "in_flight"}``.  ``state`` is ``alive`` (its
    lock is held and its heartbeat, the status file's ``updated_at``, is
    under ``HEARTBEAT_STALE`` seconds old), ``stale`` (lock held, heartbeat
    old: hung, or its node cut off while the filesystem still honours its
    lock), or ``dead`` (lock free: its items are adopted by a live instance
    within ``[spool] takeover_interval``).  ``items`` names the item
    directories it holds; ``in_flight`` is its own account of them (``name``,
    ``stage``, ``progress`` 0..1, ``source_format``, …) while alive.
    ``probe_locks=False`` judges by the heartbeat alone (no lock is
    touched), unless ``probe_old``: then only instances whose heartbeat is
    old are probed (a fresh one is alive either way); the lock probe goes through the instance's ``.adopt`` door and
    never disturbs a starting daemon.  Heartbeat ages compare clocks of
    different nodes: keep them in step (NTP).
    """
    now = time.time() if now is None else now
    out = []
    try:
        entries = sorted(os.scandir(work), key=lambda e: e.name)
    except OSError:
        return []
    for e in entries:
        if e.name.startswith(".") or not e.is_dir(follow_symlinks=False):
            continue
        d = Path(e.path)
        try:
            snap = json.loads((d / STATUS_FILE).read_bytes())
        except (OSError, ValueError):
            snap = None
        if not isinstance(snap, dict):
            snap = None
        try:
            items = sorted(n.name for n in os.scandir(d) if not n.name.startswith(".") and n.is_dir())
        except OSError:
            items = []
        age = now - float(snap.get("updated_at") or 0) if snap else None
        fresh = age is not None and age < HEARTBEAT_STALE
        lock = instance_lock_state(d) if probe_locks or (probe_old and not fresh) else None
        if lock == "free":
            state = "dead"
        elif fresh:
            state = "alive"
        else:
            state = "stale" if lock == "held" or snap else "dead"
        out.append({
            "instance": e.name, "state": state,
            "host": snap.get("host") if snap else None, "pid": snap.get("pid") if snap else None,
            "heartbeat_age": None if age is None else round(age, 1),
            "target_format": snap.get("target_format") if snap else None,
            "items": items,
            "in_flight": snap.get("in_flight", []) if snap and state == "alive" else [],
        })
    return out
