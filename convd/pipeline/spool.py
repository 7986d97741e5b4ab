"""The spool: directories, claim by rename, atomic handoff, recovery.

Layout under ``work/``: one claim directory per daemon instance
(``work/<instance>/``, held with an ``flock`` so two daemons never share
one), and in it one directory per item (``work/<instance>/<NAME>/``) holding

* ``source``       the original bytes, until the result is durable;
* ``output``       qemu-img's output while it is being written;
* ``item.json``    attempts so far;
* ``record.json``  the final record and destination, written durably just
                   before the handoff, so recovery can finish it.

An item's stage can be read off its files: no ``record.json`` means it is
converted (again) from ``source``; with one, only the handoff remains.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from convd import durable
from convd.config import SpoolConfig
from convd.errors import ConfigError

__all__ = [
    "IGNORED_SUFFIXES",
    "Claim",
    "Spool",
    "is_candidate_name",
    "name_fits",
]

log = structlog.get_logger("convd.spool")

IGNORED_SUFFIXES = (".part", ".tmp")
SOURCE, OUTPUT, ITEM, RECORD = "source", "output", "item.json", "record.json"
# Attempts, 0.1 s apart, to take the instance lock at start-up.
LOCK_TRIES = 10
# Another instance's temp in outgoing/ or failed/ older than this is abandoned.
STALE_TEMP_AGE = 3600.0


# NAME.json and failed/NAME.N.json must fit in NAME_MAX (255 bytes).
MAX_NAME_BYTES = 255 - len(".json") - len(".999")


def is_candidate_name(name: str) -> bool:
    """Producers write under a dot-name or ``*.part``/``*.tmp`` and rename in."""
    return bool(name) and not name.startswith(".") and not name.endswith(IGNORED_SUFFIXES)


def name_fits(name: str) -> bool:
    """Whether a record can be written beside this name (longer ones wait, logged)."""
    return len(os.fsencode(name)) <= MAX_NAME_BYTES


@dataclass
class Claim:
    """An item this instance owns: its directory under ``work/<instance>/``."""

    name: str
    dir: Path
    attempts: int = 0
    pending: dict[str, Any] | None = None  # record.json, when only the handoff is left
    source_path: Path | None = None  # `convd convert`: the user's file, left where it is

    @property
    def source(self) -> Path:
        return self.source_path or self.dir / SOURCE

    @property
    def output(self) -> Path:
        return self.dir / OUTPUT


class Spool:
    def __init__(self, cfg: SpoolConfig) -> None:
        self.cfg = cfg
        self.incoming, self.outgoing, self.failed = cfg.incoming, cfg.outgoing, cfg.failed
        self.work = cfg.work
        self.claims = cfg.work / cfg.instance
        self._lock_fd: int | None = None

    # -- start-up --------------------------------------------------------

    def prepare(self, *, create: bool = True) -> None:
        """Create the directories, check they share a filesystem, take the instance lock."""
        for d in (self.incoming, self.work, self.outgoing, self.failed, self.claims):
            if create:
                d.mkdir(parents=True, exist_ok=True)
            if not d.is_dir():
                raise ConfigError(f"spool directory {d} does not exist")
        devs = {d: os.stat(d).st_dev for d in (self.incoming, self.work, self.outgoing, self.failed)}
        if len(set(devs.values())) != 1:
            listing = ", ".join(f"{d} (device {dev})" for d, dev in devs.items())
            raise ConfigError(f"[spool]: all spool directories must be on one filesystem; got {listing}")
        fd = os.open(self.claims / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        for _ in range(LOCK_TRIES):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                # Producers probe the lock for a moment to learn whether a
                # daemon runs (convd.protocol.daemons_running): try again.
                time.sleep(0.1)
        else:
            os.close(fd)
            raise ConfigError(
                f"another convd with instance {self.cfg.instance!r} is running on {self.work}"
                " (set [spool] instance to tell daemons apart)"
            ) from None
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def sweep_temp(self) -> int:
        """Remove stale durable-write temp files convd left in its own directories.

        outgoing/ and failed/ are shared: there, only this instance's temps
        (``@instance``) go at once; another's may be a write in progress,
        and is swept only once it is surely abandoned.
        """
        n = 0
        now = time.time()
        own = re.compile(rf"@{re.escape(self.cfg.instance)}\.[0-9a-f]{{8}}{re.escape(durable.TEMP_SUFFIX)}$")
        for d in (self.outgoing, self.failed, self.claims):
            for entry in os.scandir(d):
                if not (entry.name.startswith(".") and entry.name.endswith(durable.TEMP_SUFFIX)):
                    continue
                try:
                    if (d != self.claims and not own.search(entry.name)
                            and now - entry.stat(follow_symlinks=False).st_mtime < STALE_TEMP_AGE):
                        continue
                    os.unlink(entry.path)
                except FileNotFoundError:
                    continue  # another instance swept it first
                n += 1
        return n

    def adopt_orphans(self) -> int:
        """Take over the items of instances that no longer run (their lock is free).

        A renamed host or a container with a new name must not strand what a
        crashed daemon had claimed under the old name.
        """
        adopted = 0
        for entry in os.scandir(self.work):
            if entry.name == self.cfg.instance or not entry.is_dir(follow_symlinks=False):
                continue
            try:
                fd = os.open(os.path.join(entry.path, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # that instance is running
            try:
                for item in os.scandir(entry.path):
                    if item.name.startswith(".") or not item.is_dir(follow_symlinks=False):
                        continue
                    try:
                        os.rename(item.path, self.claims / item.name)  # fails if ours has that name
                        adopted += 1
                        log.warning("adopted an item of a stopped instance", item=item.name,
                                    instance=entry.name)
                    except OSError as exc:
                        log.error("cannot adopt an item of a stopped instance", item=item.name,
                                  instance=entry.name, error=exc.strerror)
            finally:
                os.close(fd)
        if adopted:
            durable.fsync_dir(self.claims)
        return adopted

    def recover(self) -> list[Claim]:
        """This instance's unfinished items, from what ``work/<instance>/`` holds."""
        claims = []
        for entry in sorted(os.scandir(self.claims), key=lambda e: e.name):
            if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                continue
            claim = self.load_claim(entry.name)
            for leftover in os.listdir(claim.dir):
                if leftover.startswith(".") and leftover.endswith(durable.TEMP_SUFFIX):
                    os.unlink(claim.dir / leftover)
            if claim.pending is None:
                if not os.path.lexists(claim.source):
                    log.warning("empty claim removed", item=claim.name)
                    durable.remove_tree(claim.dir)
                    continue
                # Mid-convert at the crash: the partial output is worthless.
                if os.path.lexists(claim.output):
                    os.unlink(claim.output)
            claims.append(claim)
        return claims

    def load_claim(self, name: str) -> Claim:
        """A claim as its directory describes it (attempts, a staged handoff)."""
        d = self.claims / name
        claim = Claim(name=name, dir=d)
        try:
            claim.attempts = int(json.loads((d / ITEM).read_bytes()).get("attempts", 0))
        except (FileNotFoundError, ValueError):
            pass
        try:
            claim.pending = json.loads((d / RECORD).read_bytes())
        except FileNotFoundError:
            pass
        except ValueError:
            # record.json is written durably, so a torn one cannot happen; if
            # it does (disk fault), redo the item from its source.
            log.error("unreadable record.json, converting again", item=name)
            os.unlink(d / RECORD)
        return claim

    # -- intake ----------------------------------------------------------

    def scan_incoming(self) -> Iterator[os.DirEntry[str]]:
        with os.scandir(self.incoming) as it:
            for entry in it:
                if is_candidate_name(entry.name):
                    yield entry

    def claim(self, name: str) -> Claim | None:
        """Take ``incoming/NAME`` by rename into this instance's claim directory.

        Returns None when another daemon (or the producer) got there first:
        losing that race is normal, not an error.

        Raises ``FileExistsError`` while an earlier item of the same name is
        still in ``work/``: the file waits in ``incoming/`` until it is gone.
        """
        d = self.claims / name
        os.mkdir(d, 0o750)
        try:
            # A plain rename: d was just made by us, so nothing can be at
            # d/source, and rename(2) is atomic on every filesystem (NFS too,
            # where renameat2 flags are not), so exactly one claimer wins.
            durable.move(self.incoming / name, d / SOURCE, replace=True, sync=False)
        except FileNotFoundError:
            os.rmdir(d)
            log.debug("claim lost the race", item=name)
            return None
        except BaseException:
            os.rmdir(d)
            raise
        # Durable before any work: a filesystem that logs fsyncs per inode
        # (btrfs) must not resurrect the name in incoming/ after a power cut.
        durable.fsync_dir(d)
        durable.fsync_dir(self.claims)
        durable.fsync_dir(self.incoming)
        return Claim(name=name, dir=d)

    # -- per-item state ---------------------------------------------------

    def note_attempt(self, claim: Claim) -> None:
        claim.attempts += 1
        # Atomic but not fsynced: the count is informational, and a power cut
        # costing it at worst under-reports one attempt.
        durable.write_json(claim.dir / ITEM, {"name": claim.name, "attempts": claim.attempts,
                                              "updated_at": time.time()}, replace=True, sync=False)

    def discard_output(self, claim: Claim) -> None:
        """Remove a partial output; never one whose handoff is staged (recovery owns it)."""
        if claim.pending is not None:
            return
        try:
            os.unlink(claim.output)
        except FileNotFoundError:
            pass

    # -- handoff ----------------------------------------------------------

    def free_failed_name(self, name: str) -> str:
        """``failed/`` never overwrites: NAME, else NAME.1, NAME.2, …"""
        candidate, n = name, 0
        while os.path.lexists(self.failed / candidate) or os.path.lexists(self.failed / f"{candidate}.json"):
            n += 1
            candidate = f"{name}.{n}"
        return candidate

    def output_taken(self, name: str) -> bool:
        return os.path.lexists(self.outgoing / name) or os.path.lexists(self.outgoing / f"{name}.json")

    def stage_handoff(self, claim: Claim, dest: str, final_name: str, payload: str,
                      record: dict[str, Any]) -> None:
        """Write ``record.json``: from here on only the handoff remains, even after a crash.

        The payload's inode number is kept, so recovery writes the record only
        beside this very image (never beside one a consumer put there since).
        """
        st = os.lstat(claim.dir / payload)
        claim.pending = {"dest": dest, "final_name": final_name, "payload": payload, "record": record,
                         "inode": st.st_ino}
        durable.write_json(claim.dir / RECORD, claim.pending, replace=True)

    def unstage_handoff(self, claim: Claim) -> None:
        claim.pending = None
        os.unlink(claim.dir / RECORD)
        durable.fsync_dir(claim.dir)

    def complete_handoff(self, claim: Claim) -> None:
        """Move the payload to ``outgoing/`` or ``failed/``, then its record; idempotent.

        Raises ``FileExistsError`` if ``outgoing/NAME`` was taken meanwhile
        (the record is not written then).  In ``failed/``, which never
        overwrites, a taken name is replaced by the next free one.
        """
        p = claim.pending
        assert p is not None
        dest_dir = self.outgoing if p["dest"] == "outgoing" else self.failed
        payload = claim.dir / p["payload"]
        while os.path.lexists(payload):
            try:
                durable.move(payload, dest_dir / p["final_name"])
            except FileExistsError:
                if p["dest"] == "outgoing":
                    raise
                self.stage_handoff(claim, "failed", self.free_failed_name(claim.name),
                                   p["payload"], p["record"])
                p = claim.pending
        final = dest_dir / p["final_name"]
        rec_path = dest_dir / f"{p['final_name']}.json"
        try:
            ours = os.lstat(final).st_ino == p.get("inode")
        except FileNotFoundError:
            ours = False
        if not ours:
            # Moved before a crash, and since taken away (or replaced) by a
            # consumer: the item was delivered; a record now would lie.
            log.warning("handoff already delivered; record not written again", item=claim.name,
                        dest=p["dest"])
            return
        try:
            durable.write_json(rec_path, p["record"], owner=self.cfg.instance)
        except FileExistsError:
            # Written before a crash that hit before the clean-up.
            if json.loads(rec_path.read_bytes()) != p["record"]:
                log.error("a foreign record sits beside the published image", item=claim.name,
                          record=str(rec_path))

    def remove_claim(self, claim: Claim) -> None:
        """Clean up after a durable handoff.

        ``record.json`` goes last: while it exists recovery only finishes the
        handoff; were it gone first, a surviving ``source`` would be converted
        a second time.
        """
        for name in (SOURCE, OUTPUT, ITEM, RECORD):
            try:
                os.unlink(claim.dir / name)
            except FileNotFoundError:
                pass
        durable.remove_tree(claim.dir)
