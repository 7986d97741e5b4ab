"""Take-over: a survivor adopts the items of the instances whose daemon no longer runs.

Each ``work/<instance>/`` has two lock files (:mod:`convd.cluster`).
``.lock`` is held (``flock``, exclusive) by its daemon for as long as it
runs.  ``.adopt`` is the door to it: whoever wants to look at ``.lock`` (a
survivor checking whether the instance is alive, ``convd status``, or the
owner itself at start-up) takes ``.adopt`` first.  A survivor that finds
``.lock`` free keeps both while it moves the items into its own directory,
so exactly one survivor adopts them, and an owner starting meanwhile waits
at the door (``convd.pipeline.spool.ADOPT_WAIT``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import structlog

from convd import durable
from convd.cluster import ADOPT, LOCK, try_flock
from convd.pipeline.layout import ITEM, RECORD, SOURCE, Claim, is_item
from convd.pipeline.spool import Spool

__all__ = ["TakeOver"]

log = structlog.get_logger(__name__)


class TakeOver:
    """This instance's take-overs of stopped peers on ``spool`` (one per daemon: it remembers
    adopted items it could not read yet, and tries them again at the next :meth:`run`)."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self._unrecovered: list[str] = []  # adopted, but not yet readable (run() retries them)

    def peers(self) -> list[str]:
        """The other instances that have a directory under ``work/``."""
        return sorted(e.name for e in os.scandir(self.spool.work)
                      if e.name != self.spool.cfg.instance and not e.name.startswith(".")
                      and e.is_dir(follow_symlinks=False))

    def run(self) -> tuple[list[Claim], list[str]]:
        """Adopt the items of every other instance whose daemon no longer runs.

        Called at start-up and then every ``[spool] takeover_interval``: a
        peer whose ``.lock`` is free (its process died, or its node's lease
        on the lock expired) has its items moved into this instance's
        directory and returned, ready to run (as :meth:`Spool.recover` leaves
        them).  Also returns the instances found stopped.  Exactly one
        survivor adopts a given item: it holds the peer's ``.adopt`` and
        ``.lock`` while it moves them, and a rename has one winner anyway.
        An instance directory without items is not probed at all.
        """
        names: list[str] = []
        stopped: list[str] = []
        for peer in self.peers():
            pdir = self.spool.work / peer
            try:
                with os.scandir(pdir) as it:
                    if not any(is_item(e) for e in it):
                        continue
                door = try_flock(pdir / ADOPT)
            except OSError:
                continue  # vanished or unreadable: nothing of ours
            if door is None:
                continue  # another survivor is looking (it adopts), or the owner is starting
            try:
                fd = try_flock(pdir / LOCK)
                if fd is None:
                    continue  # that instance is running
                try:
                    stopped.append(peer)
                    names += self._adopt_from(pdir, peer)
                finally:
                    os.close(fd)
            except OSError as exc:
                log.error("cannot take over a stopped instance", instance=peer, error=exc.strerror)
            finally:
                os.close(door)
        if names:
            durable.fsync_dir(self.spool.claims)
        # Adopted items already sit in our directory: one that cannot be read
        # now (a stalled shared filesystem) is tried again at the next check,
        # and never keeps the others from running.
        names += self._unrecovered
        self._unrecovered = []
        claims = []
        for n in sorted(set(names)):
            try:
                claim = self.spool.recover_claim(n)
            except OSError as exc:
                log.error("cannot recover an adopted item; trying again at the next check", item=n,
                          error=exc.strerror)
                self._unrecovered.append(n)
                continue
            if claim is not None:
                claims.append(claim)
        return claims, stopped

    def _adopt_from(self, pdir: Path, peer: str) -> list[str]:
        adopted = []
        for item in os.scandir(pdir):
            if not is_item(item):
                continue
            with self.spool.claims_guard:
                if os.path.lexists(self.spool.claims / item.name):
                    # Same name in flight here: it waits for the next check.
                    log.info("not adopting yet: an item of that name is in flight here", item=item.name,
                             instance=peer)
                    continue
                try:
                    os.rename(item.path, self.spool.claims / item.name)
                except FileNotFoundError:
                    continue  # gone (its owner cleaned it up before it died)
                except OSError as exc:
                    log.error("cannot adopt an item of a stopped instance", item=item.name,
                              instance=peer, error=exc.strerror)
                    continue
            taken = self.spool.claims / item.name
            self._mark_owner(taken)
            adopted.append(item.name)  # recovered next: an empty one is removed there
            if os.path.lexists(taken / SOURCE) or os.path.lexists(taken / RECORD):
                log.warning("adopted an item of a stopped instance", item=item.name, instance=peer)
            else:
                # A claim its owner began and never finished (cut off between the mkdir and
                # the move): the file is still in incoming/, and nothing was adopted.
                log.info("took over an empty claim of a stopped instance", item=item.name, instance=peer)
        if adopted:
            durable.fsync_dir(pdir)
        return adopted

    def _mark_owner(self, d: Path) -> None:
        """Write this instance as ``owner`` in an adopted item's ``item.json``: what the
        instance it was adopted from reads before touching it (see :meth:`Spool.fence`)."""
        try:
            state = json.loads((d / ITEM).read_bytes())
        except (FileNotFoundError, ValueError):
            state = {"name": d.name}
        if not isinstance(state, dict):
            state = {"name": d.name}
        state["owner"] = self.spool.cfg.instance
        durable.write_json(d / ITEM, state, replace=True, sync=False, compact=True)
