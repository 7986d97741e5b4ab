"""The spool: directories, claim by rename, atomic handoff, recovery.

The layout itself (which file is where) is :mod:`convd.pipeline.layout`'s.

Each ``work/<instance>/`` is held by its daemon (``.lock``) behind a door
(``.adopt``) that a starting owner waits at (``ADOPT_WAIT``) while a peer
looks; adopting a stopped instance's items is :mod:`convd.pipeline.takeover`'s.

Fencing: a daemon whose node was cut off the shared filesystem for longer
than its lease (NFSv4's lease, CephFS's session autoclose) has lost
``.lock`` without knowing it, and a survivor may have adopted its items.
Before each step that makes a result visible or removes what an item holds
(:meth:`Spool.fence`: staging a handoff, finishing one, quarantining,
discarding an output), the daemon checks through the door that ``.lock`` is
still its own.  When it is not, it takes it again and starts a new *epoch*:
every claim of an earlier epoch raises :class:`ClaimLost` and is abandoned
untouched.  A survivor writes its own name as the ``owner`` in ``item.json``
of every item it adopts (:mod:`convd.pipeline.takeover`), so a path that
still leads the returning node to an adopted item (an NFS client's cached
lookup) says whose it is now.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import structlog

from convd import durable, protocol
from convd.cluster import ADOPT, LOCK, instance_lock_state, try_flock
from convd.config import SpoolConfig
from convd.errors import ConfigError
from convd.pipeline.layout import (
    EXPECT,
    FAILED_NUMBER_MAX,
    ITEM,
    LAYOUT,
    OUTPUT,
    PRIVATE,
    RECORD,
    SOURCE,
    UNPACKED,
    Claim,
    is_candidate_name,
    is_item,
)

__all__ = ["ClaimLost", "ClaimNotDurable", "Spool", "instance_lock_state"]

log = structlog.get_logger(__name__)

# Another instance's temp in outgoing/ or failed/ older than this is abandoned.
STALE_TEMP_AGE = 3600.0

# How long a starting daemon waits while a peer holds its door (a liveness
# probe takes milliseconds; adopting many items on a slow filesystem, longer).
ADOPT_WAIT = 60.0

# Names whose next free number in failed/ is remembered (so numbering is O(1) when warm).
_FAILED_NEXT_KEPT = 4096


_BOOT_ID: str | None = None


class ClaimNotDurable(OSError):
    """Moved into ``work/<instance>/``, but the directories' ``fsync`` failed (a shared
    filesystem cut off mid-claim): not started, since a filesystem that logs fsyncs per
    inode could bring the name back to ``incoming/`` after a power cut; the next start,
    or a peer's take-over, recovers it from ``work/``."""


class ClaimLost(Exception):
    """The claim is no longer this daemon's: it lost its instance lock (its node was cut off
    longer than the filesystem's lease) or a survivor adopted the item.  Nothing of it may be
    published, moved or removed by this daemon."""


def boot_id() -> str:
    """This machine's boot, as the kernel names it (``/proc/sys/kernel/random/boot_id``)."""
    global _BOOT_ID
    if _BOOT_ID is None:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                _BOOT_ID = f.read().strip()
        except OSError:
            _BOOT_ID = ""
    return _BOOT_ID


class Spool:
    def __init__(self, cfg: SpoolConfig) -> None:
        self.cfg = cfg
        self.incoming, self.outgoing, self.failed = cfg.incoming, cfg.outgoing, cfg.failed
        self.work = cfg.work
        self.claims = cfg.work / cfg.instance
        self._lock_fd: int | None = None
        self._locking = False  # prepare() took the lock: keep_lock() watches it
        # claim() and a take-over (convd.pipeline.takeover) both make entries in claims/: never at once
        # (they run in worker threads), so an adopted item never lands on the
        # directory of a claim being made.
        self.claims_guard = threading.Lock()
        self._failed_next: dict[str, int] = {}  # NAME -> the number to try next in failed/
        # Bumped each time this daemon finds it lost .lock and takes it again.
        self.epoch = 0

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
        self._lock_fd = self._take_own_lock()
        self._locking = True

    def _take_own_lock(self) -> int:
        """``work/<instance>/.lock``, entered through ``.adopt`` (see the module docstring).

        Raises ConfigError when a running daemon has the same instance name.
        """
        deadline = time.monotonic() + ADOPT_WAIT
        waited = False
        while (door := try_flock(self.claims / ADOPT)) is None:
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"instance {self.cfg.instance!r}: {self.claims / ADOPT} has been held for {ADOPT_WAIT:.0f} s"
                    " (a peer adopting this instance's items?); try again")
            if not waited:
                log.info("a peer is checking or adopting this instance; waiting", instance=self.cfg.instance)
                waited = True
            time.sleep(0.05)
        try:
            fd = try_flock(self.claims / LOCK)
        finally:
            os.close(door)
        if fd is None:
            # Behind the door, only a running daemon holds .lock.
            raise ConfigError(
                f"another convd with instance {self.cfg.instance!r} is running on {self.work}"
                " (set [spool] instance to tell daemons apart)")
        return fd

    def close(self) -> None:
        self._locking = False
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def sweep_temp(self) -> int:
        """Remove stale durable-write temp files convd left in its own directories.

        outgoing/, failed/ and work/ (the shared ledger) are shared: there, only this instance's temps
        (``@instance``) go at once; another's may be a write in progress,
        and is swept only once it is surely abandoned.
        """
        durable.sweep_parked(self.claims)
        n = 0
        now = time.time()
        own = re.compile(rf"@{re.escape(self.cfg.instance)}\.[0-9a-f]{{8}}{re.escape(durable.TEMP_SUFFIX)}$")
        for d in (self.outgoing, self.failed, self.work, self.claims):
            for entry in os.scandir(d):
                if not (entry.name.startswith(".") and entry.name.endswith(durable.TEMP_SUFFIX)):
                    continue
                try:
                    if entry.is_dir(follow_symlinks=False):
                        # Not a temp convd writes (those are files): a group
                        # member's directory, which must not stop a start.
                        continue
                    if (d != self.claims and not own.search(entry.name)
                            and now - entry.stat(follow_symlinks=False).st_mtime < STALE_TEMP_AGE):
                        continue
                    os.unlink(entry.path)
                except FileNotFoundError:
                    continue  # another instance swept it first
                except OSError as exc:
                    log.warning("cannot remove a stale temporary file", path=entry.name, error=exc.strerror)
                    continue
                n += 1
        return n

    # -- fencing ------------------------------------------------------------

    def keep_lock(self, *, wait: float = 0.0) -> bool | None:
        """Whether this daemon still holds ``work/<instance>/.lock`` (True), or had lost
        it (False: a new epoch has begun, and the lock is taken again when it can be);
        None when a peer held the door for all of ``wait`` seconds (a probe, or a
        survivor adopting).

        Two signs of a lost lock, behind the door: a write and fsync through the
        held descriptor fails (NFSv4: I/O under a lock the client could not
        reclaim after its lease expired fails with ``EIO``; an evicted
        ``ceph-fuse`` mount answers nothing any more), or a second ``flock`` on
        a new descriptor is granted (only the old hold could refuse it: the
        server or the MDS dropped it).
        """
        if not self._locking:
            return True  # never prepared (a tool reading the spool): no lock to keep
        deadline = time.monotonic() + wait
        while (door := try_flock(self.claims / ADOPT)) is None:
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)
        lost = False
        try:
            if self._lock_fd is not None and not _still_answers(self._lock_fd):
                # Lost: the new epoch begins now, before anything below can
                # fail on a dead mount (the re-take is tried again at the next
                # check; had the epoch waited for it, a later re-take would
                # have found no old hold and the loss would never be seen).
                lost = True
                self._lose()
            fd = try_flock(self.claims / LOCK)
        finally:
            os.close(door)
        if fd is not None:
            if self._lock_fd is not None:
                lost = True
                self._lose()
            self._lock_fd = fd
            if lost:
                log.info("took this instance's lock again", instance=self.cfg.instance, epoch=self.epoch)
        return not lost and self._lock_fd is not None

    def _lose(self) -> None:
        """The hold on ``.lock`` is lost: drop it and begin a new epoch (claims of earlier
        ones are abandoned, :meth:`fence`)."""
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):  # a lost lock's descriptor, perhaps on a dead mount
                os.close(self._lock_fd)
            self._lock_fd = None
        self.epoch += 1
        log.error("this instance had lost its lock on the spool (cut off longer than the filesystem's lease?);"
                  " took it again: items claimed before are abandoned to whoever adopted them",
                  instance=self.cfg.instance, epoch=self.epoch)

    def owns(self, claim: Claim) -> bool:
        """Whether ``claim`` is still this daemon's as far as it can tell without the lock:
        claimed in the current epoch, its directory there, and no other owner in ``item.json``."""
        if claim.source_path is not None:
            return True  # `convd convert`: no spool, no peers
        if claim.epoch != self.epoch or not os.path.lexists(claim.dir):
            return False
        try:
            owner = json.loads((claim.dir / ITEM).read_bytes()).get("owner")
        except (FileNotFoundError, ValueError, AttributeError):
            owner = None
        return owner in (None, self.cfg.instance)

    def fence(self, claim: Claim) -> None:
        """Raise :class:`ClaimLost` unless ``claim`` is still this daemon's to hand off.

        Checks the instance lock through the door (waiting up to ``ADOPT_WAIT`` while a
        peer holds it), then :meth:`owns`.  Called before each step that makes a
        result visible or removes what an item holds.
        """
        if claim.source_path is not None:
            return
        if self.keep_lock(wait=ADOPT_WAIT) is None:
            raise ClaimLost(f"{self.claims / ADOPT} held for {ADOPT_WAIT:.0f} s (a peer adopting?)")
        if self._locking and self._lock_fd is None:
            raise ClaimLost("this instance's lock is lost and held elsewhere")
        if not self.owns(claim):
            raise ClaimLost("adopted by another instance while this one was cut off")

    def recover(self) -> list[Claim]:
        """This instance's unfinished items, from what ``work/<instance>/`` holds."""
        names = sorted(e.name for e in os.scandir(self.claims) if is_item(e))
        return [c for c in (self.recover_claim(n) for n in names) if c is not None]

    def recover_claim(self, name: str) -> Claim | None:
        """A claim left by a crash, made ready to run again (None: nothing left of it)."""
        claim = self.load_claim(name)
        for leftover in os.listdir(claim.dir):
            if leftover.startswith(".") and leftover.endswith(durable.TEMP_SUFFIX):
                os.unlink(claim.dir / leftover)
        if claim.pending is None:
            if not os.path.lexists(claim.dropped):
                log.warning("empty claim removed", item=claim.name)
                durable.remove_tree(claim.dir)
                return None
            # Mid-convert at the crash: the partial output is worthless;
            # an unpacked disk may be partial too, and is unpacked again.
            for partial in (claim.output, claim.dir / UNPACKED, claim.dir / PRIVATE):
                if os.path.lexists(partial):
                    os.unlink(partial)
        return claim

    def load_claim(self, name: str) -> Claim:
        """A claim as its directory describes it (attempts, a staged handoff)."""
        d = self.claims / name
        claim = Claim(name=name, dir=d, epoch=self.epoch)
        try:
            state = json.loads((d / ITEM).read_bytes())
            claim.owner = state.get("owner")
            uid = state.get("producer_uid")
            claim.producer_uid = uid if isinstance(uid, int) and not isinstance(uid, bool) else None
            claim.attempts = int(state.get("attempts", 0))
            claim.reads_unfinished = int(state.get("reads_unfinished", 0))
            if claim.reads_unfinished and state.get("reading_boot") != boot_id():
                # The last unpack ended with the machine (a power cut, a
                # reboot, another node's), not with the daemon: not the
                # input's doing, so it does not count towards quarantine.
                claim.reads_unfinished -= 1
        except (FileNotFoundError, ValueError, AttributeError, TypeError):
            pass
        if claim.producer_uid is None:
            # No item.json (a claim cut short): the drop is still the producer's
            # unless custody took it, and then convd's (only root's and convd's
            # own sidecars count).
            with contextlib.suppress(OSError):
                claim.producer_uid = os.lstat(d / SOURCE).st_uid
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
        got = self.claim_all([name])[name]
        if isinstance(got, OSError):
            raise got
        return got

    def claim_all(self, names: list[str]) -> dict[str, Claim | OSError | None]:
        """``claim`` for several names at once, with one ``fsync`` of ``work/<instance>/``
        and of ``incoming/`` for all of them: each claim is durable when this returns,
        as ``claim``'s is.  Per name: the claim, None (lost the race), or the error."""
        out: dict[str, Claim | OSError | None] = {}
        taken: list[Claim] = []
        for name in names:
            # The guard: take-over must not adopt a same-named item between our mkdir and rename.
            with self.claims_guard:
                try:
                    got = self._claim(name)
                except OSError as exc:  # e.g. undoing a lost race on an evicted ceph-fuse (ESHUTDOWN)
                    got = exc
                out[name] = got
            if isinstance(got, Claim):
                taken.append(got)
        # Durable before any work: a filesystem that logs fsyncs per inode
        # (btrfs) must not resurrect the name in incoming/ after a power cut.
        try:
            for claim in taken:
                durable.fsync_dir(claim.dir)
            if taken:
                durable.fsync_dir(self.claims)
                durable.fsync_dir(self.incoming)
        except OSError as exc:
            # Moved but not durable: not started now; the next start recovers them.
            for claim in taken:
                out[claim.name] = ClaimNotDurable(exc.errno, exc.strerror)
        return out

    def _take_sidecar(self, name: str, d: Path, prefix: str, key: str,
                      parse: Callable[[Any], Any], dest: str) -> tuple[Path, str, int | None] | None:
        """Read ``incoming/PREFIX+NAME`` (bounded, link-free: :func:`protocol.read_sidecar_owned`)
        into ``d/DEST`` as ``{KEY: parse(value)}``, or ``{"unreadable": why}``, with ``"uid"``,
        whose file it was; ``(its path in incoming/ (to remove once the claim is won), DEST,
        that uid)``, or None when there is none."""
        path = self.incoming / f"{prefix}{name}"
        if not os.path.lexists(path):
            return None
        owner: int | None = None
        try:
            body, owner = protocol.read_sidecar_owned(path)
            state: dict[str, Any] = {key: parse(body)}
        except FileNotFoundError:
            return None
        except protocol.SidecarError as exc:
            state = {"unreadable": str(exc)}
            owner = exc.owner if owner is None else owner
        state["uid"] = owner
        durable.write_json(d / dest, state, sync=False, compact=True)
        return path, dest, owner

    def _take_sidecars(self, name: str, d: Path) -> list[tuple[Path, str, int | None]]:
        """The producer's expectation (contract section 8) into ``d/expect.json`` and
        its layout request (section 9) into ``d/layout.json``: what was taken."""
        taken = (self._take_sidecar(name, d, protocol.EXPECT_PREFIX, "expect", protocol.expectation, EXPECT),
                 self._take_sidecar(name, d, protocol.LAYOUT_PREFIX, "layout", protocol.layout_request, LAYOUT))
        return [t for t in taken if t is not None]

    def _claim(self, name: str) -> Claim | OSError | None:
        d = self.claims / name
        try:
            # convd's alone: a consumer may read work/<instance>/ (status
            # snapshots, lock probes), never an item's bytes.
            os.mkdir(d, 0o700)
        except OSError as exc:
            return exc
        try:
            # Before the move: a sidecar written after it is the next item's.
            taken = self._take_sidecars(name, d)
        except OSError as exc:
            _unclaim(d)
            return exc
        try:
            # A plain rename: d was just made by us, so nothing can be at
            # d/source, and rename(2) is atomic on every filesystem (NFS too,
            # where renameat2 flags are not), so exactly one claimer wins.
            durable.move(self.incoming / name, d / SOURCE, replace=True, sync=False)
        except FileNotFoundError:
            _unclaim(d)
            log.debug("claim lost the race", item=name)
            return None
        except OSError as exc:
            _unclaim(d)
            return exc
        claim = Claim(name=name, dir=d, epoch=self.epoch)
        # Whose drop it is, now that no producer can swap it (d is convd's alone);
        # custody makes the file convd's later, so item.json keeps it.
        with contextlib.suppress(OSError):
            claim.producer_uid = os.lstat(d / SOURCE).st_uid
        for path, dest, owner in taken:
            foreign = protocol.foreign_sidecar(owner, claim.producer_uid)
            if foreign is not None:
                # Another producer's: as if there were none.  Left where it is, not
                # removed: it may be for its owner's own drop of this name, which
                # another file took first (removing it would strip that drop's).
                log.warning("sidecar not the producer's; ignored", item=name, sidecar=path.name,
                            reason=str(foreign), uid=owner, producer_uid=claim.producer_uid)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(d / dest)
                continue
            protocol.set_aside(path)  # taken with the item: removed (a directory, renamed away)
        with contextlib.suppress(OSError):
            # Not durable yet (claim_all fsyncs the directory): lost, it is
            # read again from source while custody has not taken it, and
            # otherwise only root's and convd's own sidecars count.
            self._write_item(claim, sync=False)
        return claim

    # -- per-item state ---------------------------------------------------

    def note_attempt(self, claim: Claim) -> None:
        claim.attempts += 1
        # Atomic, but the rename is not made durable: the count is
        # informational, and a power cut costing it at worst under-reports one attempt.
        self._write_item(claim, sync=False)

    def note_reading(self, claim: Claim, reading: bool) -> None:
        """Count an unpack of the item (the daemon's own process parsing a container) begun, or
        take one back once it ended.  Fsynced when begun: an unpack the daemon died in (a crash,
        an OOM kill) stays counted, so an input that keeps taking the daemon down is quarantined
        instead of retried forever."""
        claim.reads_unfinished = claim.reads_unfinished + 1 if reading else max(0, claim.reads_unfinished - 1)
        self._write_item(claim, sync=reading)

    def _write_item(self, claim: Claim, *, sync: bool) -> None:
        if not self.owns(claim):
            return  # adopted meanwhile: its item.json (and owner) are the adopter's
        durable.write_json(claim.dir / ITEM, {"name": claim.name, "producer_uid": claim.producer_uid,
                                              "attempts": claim.attempts,
                                              "reads_unfinished": claim.reads_unfinished,
                                              "reading_boot": boot_id(), "owner": self.cfg.instance,
                                              "updated_at": time.time()}, replace=True, sync=sync,
                           compact=True)

    def discard_output(self, claim: Claim) -> None:
        """Remove a partial output and any unpacked disk; never one whose handoff is
        staged (recovery owns it)."""
        if claim.pending is not None:
            return
        try:
            self.fence(claim)
        except (ClaimLost, OSError):
            return  # the adopter's now, or the filesystem is cut off: recovery removes it
        for path in (claim.output, claim.dir / UNPACKED):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        claim.unpacked = None

    # -- handoff ----------------------------------------------------------

    def _failed_free(self, candidate: str) -> bool:
        return not (os.path.lexists(self.failed / candidate) or os.path.lexists(self.failed / f"{candidate}.json"))

    def free_failed_name(self, name: str) -> str:
        """``failed/`` never overwrites: NAME, else NAME.1, NAME.2, … (N at most ``FAILED_NUMBER_MAX``).

        The next number is remembered per name, and found afresh by doubling
        then halving (a few ``lstat`` calls, not one per earlier reject), so
        the thousandth reject of a name costs what the second did.
        """
        if self._failed_free(name):
            return name
        n = self._failed_next.pop(name, None)
        if n is None:
            lo, hi = 0, 1  # NAME.lo is taken (or lo is 0), NAME.hi to be seen
            while hi < FAILED_NUMBER_MAX and not self._failed_free(f"{name}.{hi}"):
                lo, hi = hi, min(hi * 2, FAILED_NUMBER_MAX)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if self._failed_free(f"{name}.{mid}"):
                    hi = mid
                else:
                    lo = mid
            n = hi
        while n < FAILED_NUMBER_MAX and not self._failed_free(f"{name}.{n}"):
            n += 1  # taken since (another instance): the next one
        if len(self._failed_next) >= _FAILED_NEXT_KEPT:
            del self._failed_next[next(iter(self._failed_next))]
        self._failed_next[name] = n + 1
        return f"{name}.{n}"

    def output_taken(self, name: str) -> str | None:
        """Which of ``outgoing/NAME`` and its record already exists (for the message), else None."""
        for taken in (name, f"{name}.json"):
            if os.path.lexists(self.outgoing / taken):
                return f"outgoing/{taken}"
        return None

    def stage_handoff(self, claim: Claim, dest: str, final_name: str, payload: str,
                      record: dict[str, Any]) -> None:
        """Write ``record.json``: from here on only the handoff remains, even after a crash.

        The payload's inode number is kept, so recovery writes the record only
        beside this very image (never beside one a consumer put there since).
        """
        st = os.lstat(claim.dir / payload)
        claim.pending = {"dest": dest, "final_name": final_name, "payload": payload, "record": record,
                         "inode": st.st_ino}
        durable.write_json(claim.dir / RECORD, claim.pending, replace=True, compact=True)

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
            final = dest_dir / p["final_name"]
            try:
                durable.move(payload, final)
            except FileNotFoundError:
                if os.path.lexists(payload):
                    raise
                continue  # the payload went meanwhile (its move was finished): see below
            except FileExistsError:
                if self._is_staged_payload(final, p) and self._is_staged_payload(payload, p):
                    # Our own image, left there by a move cut short between
                    # link and unlink (a crash, perhaps of the instance whose
                    # item this was): finish the move, never call it a conflict.
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(payload)
                    durable.fsync_dir(claim.dir)
                    continue
                if p["dest"] == "outgoing":
                    raise
                self.stage_handoff(claim, "failed", self.free_failed_name(claim.name),
                                   p["payload"], p["record"])
                p = claim.pending
                assert p is not None  # stage_handoff has just set it
        final = dest_dir / p["final_name"]
        rec_path = dest_dir / f"{p['final_name']}.json"
        ours = self._is_staged_payload(final, p)
        if not ours:
            # Moved before a crash, and since taken away (or replaced) by a
            # consumer: the item was delivered; a record now would lie.
            log.warning("handoff already delivered; record not written again", item=claim.name,
                        dest=p["dest"])
            return
        try:
            durable.write_json(rec_path, p["record"], owner=self.cfg.instance)
        except FileExistsError:
            # Written before a crash that hit before the clean-up, or planted
            # meanwhile by whoever may write there: read without following a
            # link or blocking on a FIFO, bounded, never trusted.
            if protocol.read_record(rec_path) != p["record"]:
                log.error("a foreign record sits beside the published image", item=claim.name,
                          record=str(rec_path))

    @staticmethod
    def _is_staged_payload(path: Path, pending: dict[str, Any]) -> bool:
        """Whether ``path`` is the very file the staged handoff moves (its inode number)."""
        try:
            return os.lstat(path).st_ino == pending.get("inode")
        except FileNotFoundError:
            return False

    def remove_claim(self, claim: Claim) -> None:
        """Clean up after a durable handoff.

        ``record.json`` goes last: while it exists recovery only finishes the
        handoff; were it gone first, a surviving ``source`` would be converted
        a second time.
        """
        for name in (SOURCE, UNPACKED, PRIVATE, OUTPUT, EXPECT, LAYOUT, ITEM, RECORD):
            try:
                os.unlink(claim.dir / name)
            except FileNotFoundError:
                pass
        durable.remove_tree(claim.dir)


# What I/O through a lost lock answers: NFSv4 after a lease the client could
# not reclaim (EIO), an evicted ceph-fuse (ESHUTDOWN, ENOTCONN), a server that
# forgot the file (ESTALE).  A full disk or quota (ENOSPC, EDQUOT) says nothing
# about the lock: taking it for a lost one abandoned every item on a full disk.
_LOCK_GONE = frozenset({errno.EIO, errno.ESHUTDOWN, errno.ENOTCONN, errno.ESTALE, errno.ENOLCK, errno.EBADF})


def _still_answers(fd: int) -> bool:
    """Whether I/O through the lock's descriptor still works (a byte written and fsynced;
    nobody reads ``.lock``'s content): False only for the errors of a lost lock or a
    dead mount (:data:`_LOCK_GONE`)."""
    try:
        os.pwrite(fd, b"\0", 0)
        os.fsync(fd)
    except OSError as exc:
        return exc.errno not in _LOCK_GONE
    return True


def _unclaim(d: Path) -> None:
    """Undo a claim directory that got no source (its sidecar copies, then itself)."""
    for name in (EXPECT, LAYOUT):
        try:
            os.unlink(d / name)
        except FileNotFoundError:
            pass
    os.rmdir(d)
