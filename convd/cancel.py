"""Cancelling an item (contract section 6): finding it, and withdrawing it where no daemon will.

A running daemon withdraws what it holds, or claims from ``incoming/``, when
it reads a cancel request (``convd.protocol``).  ``convd cancel`` writes that
request and waits; where no daemon can act (the item is in ``incoming/`` and
no daemon runs on the spool, or it sits in a stopped instance's ``work/``
directory) it does the withdrawal itself, holding that instance's ``.adopt``
door and ``.lock`` as a survivor's take-over does, so no daemon starting or
adopting meanwhile can take the item at the same time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from convd import cluster, protocol
from convd.config import Config
from convd.errors import Cancelled
from convd.pipeline.item import Item
from convd.pipeline.layout import SOURCE, name_refused
from convd.pipeline.spool import Spool
from convd.stages.cleanup import reject

__all__ = ["OPERATOR_REASON", "Where", "cancel", "locate", "message", "spool_paths"]

OPERATOR_REASON = "by an operator (convd cancel)"
POLL = 0.1


def message(reason: str) -> str:
    """The ``cancelled`` record's message for a request's reason."""
    return f"cancelled {reason}" if reason.startswith("by ") else (
        f"cancelled: {reason}" if reason else "cancelled on request")


def spool_paths(cfg: Config) -> protocol.SpoolPaths:
    sp = cfg.spool
    return protocol.SpoolPaths(sp.incoming, sp.work, sp.outgoing, sp.failed)


@dataclass(frozen=True)
class Where:
    """Where an item's original bytes are: ``incoming`` or ``work`` (of ``instance``), or nowhere."""

    place: str | None
    instance: str | None = None
    inode: int | None = None
    uid: int | None = None  # in incoming/: whose file it is (whose cancel requests count)


def locate(cfg: Config, name: str) -> Where:
    """Where ``NAME`` is.  A producer may not look into ``work/`` (docs/operations.md,
    "Who may do what in the spool"): for it, an item not in ``incoming/`` may be
    there, ``Where("work")`` with no instance, which only a daemon can act on."""
    sp = cfg.spool
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(sp.incoming / name)
        return Where("incoming", inode=st.st_ino, uid=st.st_uid)
    with contextlib.suppress(FileNotFoundError):
        try:
            instances = sorted(os.listdir(sp.work))
        except PermissionError:
            return Where("work")
        for inst in instances:
            d = sp.work / inst / name
            if inst.startswith(".") or not d.is_dir():
                continue
            try:
                inode: int | None = os.lstat(d / SOURCE).st_ino
            except (FileNotFoundError, PermissionError):
                inode = None  # only the hand-off is left, an empty claim, or a consumer looking
            return Where("work", inst, inode)
    return Where(None)


@contextlib.contextmanager
def _instance(cfg: Config, instance: str) -> Iterator[Spool | None]:
    """That instance's spool, held as a take-over (:class:`convd.pipeline.takeover.TakeOver`) holds a peer (its
    ``.adopt`` door, then its ``.lock``), or None while its daemon runs or
    someone else is at the door (a daemon starting or adopting: ask again).

    While held, no daemon starts on that instance and no survivor adopts its items.
    """
    claims = cfg.spool.work / instance
    claims.mkdir(mode=0o750, exist_ok=True)
    with cluster.locked_instance(claims) as state:
        yield Spool(dataclasses.replace(cfg.spool, instance=instance)) if state == "free" else None


def _withdraw_here(cfg: Config, name: str, where: Where, reason: str) -> bool:
    """Withdraw the item ourselves if no daemon can; True if we acted."""
    if where.place == "incoming":
        if protocol.daemons_running(spool_paths(cfg)):
            return False
        instance = cfg.spool.instance
    elif where.place == "work" and where.instance is not None:
        instance = where.instance
    else:
        return False
    with _instance(cfg, instance) as spool:
        if spool is None:
            return False  # its daemon runs: it reads the request
        if where.place == "incoming":
            claim = spool.claim(name)
            if claim is None:
                return False  # gone meanwhile
        elif not (spool.claims / name).is_dir():
            return False  # adopted by a live daemon meanwhile: it reads the request
        else:
            claim = spool.load_claim(name)
        if claim.pending is not None:
            # Only the hand-off was left: finish it as recovery would (the
            # result of a publish stands).
            spool.complete_handoff(claim)
            spool.remove_claim(claim)
            return True
        if not os.path.lexists(claim.dropped):
            spool.remove_claim(claim)
            return True
        reject(spool, Item(claim=claim, cfg=cfg), Cancelled(message(reason)))
        return True


def cancel(cfg: Config, name: str, *, wait: float = 30.0, reason: str = OPERATOR_REASON) -> tuple[int, str]:
    """``convd cancel``: ``(exit code, what to tell the user)``."""
    paths = spool_paths(cfg)
    refused = name_refused(name)
    if refused is not None:
        # Never an item (it waits in incoming/ until renamed): claiming it here
        # would put its bytes in failed/ under a record's name.
        return 1, f"{name}: not an item: {refused}"
    where = locate(cfg, name)
    # A producer cannot see into work/: there, only a record tells it more.
    unseen = where == Where("work")
    if where.place is None or (unseen and protocol.find_record(paths, name) is not None):
        found = protocol.find_record(paths, name)
        if found is None:
            return 1, f"{name}: no such item"
        if found[0] == "outgoing":
            return 1, f"{name}: already published (outgoing/{name}.json); the result stands"
        return 0, f"{name}: already in failed/ ({found[1].get('error', {}).get('code')})"
    protocol.request_cancel(paths, name, inode=where.inode, reason=reason)
    deadline = time.monotonic() + wait
    try:
        while True:
            found = protocol.find_record(paths, name, where.inode)
            now = locate(cfg, name)
            if found is not None and found[0] == "failed":
                code = found[1].get("error", {}).get("code")
                return 0, f"{name}: {'cancelled' if code == 'cancelled' else code}; its bytes and record are in failed/"
            if found is not None and (now.place is None or now == Where("work")):
                return 1, f"{name}: already published (outgoing/{name}.json); the result stands"
            if now.place is not None and (where.inode is None or now.inode in (None, where.inode)):
                _withdraw_here(cfg, name, now, reason)
            if time.monotonic() > deadline:
                if not os.path.lexists(paths.incoming / f"{protocol.CANCEL_PREFIX}{name}") \
                        and protocol.find_record(paths, name, where.inode) is None:
                    return 1, (f"{name}: a daemon set the cancel request aside: only the item's producer "
                               "(the owner of the file dropped), root or convd's user may cancel it")
                return 1, (f"{name}: no daemon acted on the cancel within {wait:.0f} s; the request "
                           f"stays in incoming/ and the next daemon to start honours it")
            time.sleep(POLL)
    finally:
        if time.monotonic() <= deadline:
            protocol.clear_cancel_request(paths, name)
