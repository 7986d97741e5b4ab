"""The daemon's side of the spool's sidecars (``convd.protocol``): cancel requests,
indexed and bounded, the producer's expectation taken with the item at claim, and
its layout request applied to the item's ``[target.*]``.

A sidecar is the producer's file: read bounded and without following links
(:func:`convd.protocol.read_sidecar`), and a bad one is logged once and set
aside.  One another producer planted under an item's name counts for nothing
(:func:`convd.protocol.foreign_sidecar`).  Time is convd's own clock, never a
date the file states.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convd.config import target_with
from convd.errors import ConfigError, UnsupportedFormat
from convd.pipeline.item import Item
from convd.pipeline.layout import LAYOUT, Claim
from convd.protocol import (
    CANCEL_PREFIX,
    LAYOUT_PREFIX,
    CancelRequest,
    SidecarError,
    foreign_sidecar,
    is_cancel_request,
    read_cancel_request,
    set_aside,
)

__all__ = ["MAX_CANCEL_REQUESTS", "CancelBook", "apply_layout", "taken_sidecar"]

# Most cancel requests held at once per owner (uid); one more of that owner is
# refused (and removed).  A real request is settled within seconds, so this only
# bounds a flood, and one producer's flood leaves another's requests alone.
MAX_CANCEL_REQUESTS = 256
# Files that could be neither read nor set aside, remembered so each is logged once.
_REMEMBERED_MAX = 10_000


@dataclass
class _Entry:
    ident: tuple[int, int, int, int]  # (inode, size, mtime, ctime) when read: re-read only if it changes
    request: CancelRequest
    first_seen: float  # convd's monotonic clock


class CancelBook:
    """The cancel requests waiting in ``incoming/``, by item name.

    :meth:`refresh` reads only what changed since the last look, refuses a
    request naming a name the intake refuses, a malformed one and any past
    ``limit``, and sets each refused file aside (logged once by the caller).
    """

    def __init__(self, incoming: Path, name_refused: Callable[[str], str | None], *,
                 limit: int = MAX_CANCEL_REQUESTS, clock: Callable[[], float] = time.monotonic) -> None:
        self.incoming = incoming
        self.name_refused = name_refused
        self.limit = limit
        self.clock = clock
        self.entries: dict[str, _Entry] = {}
        self._stuck: dict[str, tuple[int, int, int, int]] = {}  # refused, could not be set aside

    def refresh(self) -> tuple[list[tuple[str, str]], int]:
        """Look at ``incoming/`` again: ``([(file name, why refused)], requests over the limit)``.

        Blocking (a directory listing and an ``lstat`` per request); never
        waits on a request's content (see :func:`convd.protocol.read_sidecar`).
        """
        try:
            names = os.listdir(self.incoming)
        except FileNotFoundError:
            names = []
        refused: list[tuple[str, str]] = []
        over = 0
        seen: set[str] = set()
        # The limit holds per owner: one producer's flood must not refuse another's request.
        held = collections.Counter(e.request.uid for e in self.entries.values())
        requests = [n for n in names if is_cancel_request(n)]
        for filename in requests:
            name = filename[len(CANCEL_PREFIX):]
            path = self.incoming / filename
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            ident = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            entry = self.entries.get(name)
            if entry is not None and entry.ident == ident:
                seen.add(name)
                continue
            if self._stuck.get(filename) == ident:
                continue
            overflow = False
            try:
                why = self.name_refused(name)
                if why is not None:
                    raise SidecarError(f"it names {name!r}, which the intake refuses: {why}")
                if entry is None and held[st.st_uid] >= self.limit:
                    overflow = True
                    raise SidecarError(f"more than {self.limit} cancel requests of uid {st.st_uid} are waiting")
                req = read_cancel_request(path, name)
            except FileNotFoundError:
                continue
            except SidecarError as exc:
                if overflow:
                    over += 1  # one line for all of them, not one each
                else:
                    refused.append((filename, str(exc)))
                if not set_aside(path):
                    if len(self._stuck) >= _REMEMBERED_MAX:
                        self._stuck.clear()
                    self._stuck[filename] = ident
                continue
            # A rewritten request is a new one: its age starts again.
            if entry is not None:
                held[entry.request.uid] -= 1
            held[req.uid] += 1
            self.entries[name] = _Entry(ident, req, self.clock())
            seen.add(name)
        for name in [n for n in self.entries if n not in seen]:
            del self.entries[name]
        present = set(requests)
        for filename in [f for f in self._stuck if f not in present]:
            del self._stuck[filename]
        return refused, over

    def age(self, name: str) -> float:
        """Seconds since this daemon first read the request for ``NAME``."""
        entry = self.entries.get(name)
        return 0.0 if entry is None else self.clock() - entry.first_seen

    def clear(self, name: str) -> None:
        """Remove the request for ``NAME`` (settled)."""
        self.entries.pop(name, None)
        try:
            os.unlink(self.incoming / f"{CANCEL_PREFIX}{name}")
        except FileNotFoundError:
            pass

    def refuse(self, name: str) -> None:
        """Set the request for ``NAME`` aside unread from now on (not its item's producer's); one
        that cannot be removed is remembered, so it is neither acted on nor logged again."""
        entry = self.entries.pop(name, None)
        filename = f"{CANCEL_PREFIX}{name}"
        if not set_aside(self.incoming / filename) and entry is not None:
            if len(self._stuck) >= _REMEMBERED_MAX:
                self._stuck.clear()
            self._stuck[filename] = entry.ident


def taken_sidecar(claim: Claim, dest: str) -> dict[str, Any] | None:
    """What the claim took from a sidecar into ``claim.dir/DEST`` (``Spool._take_sidecars``), or
    None: none was taken, or it was not the producer's (the claim logged and dropped it; this
    sees one a crash kept from being dropped)."""
    try:
        state = json.loads((claim.dir / dest).read_bytes())
    except FileNotFoundError:
        return None
    if not isinstance(state, dict):
        return None
    if "uid" in state and foreign_sidecar(state["uid"], claim.producer_uid) is not None:
        return None  # (taken before the uid was kept: as it was taken)
    return state


def apply_layout(item: Item) -> None:
    """Lay the producer's layout request, taken at claim (``Spool._take_sidecars``), over
    ``item.cfg.target``: the convert, the ledger's reservation and the record's
    ``target.layout`` then follow it.  Nothing when there was none.

    Raises ``UnsupportedFormat`` when the request could not be read or asks for
    what check-config would refuse in ``[target.*]`` (its message, naming the key):
    the output the producer wants cannot be made, and another would not do.
    """
    if item.claim.source_path is not None:
        return  # `convd convert`: no spool, no request
    state = taken_sidecar(item.claim, LAYOUT)
    if state is None:
        return
    sidecar = f"{LAYOUT_PREFIX}{item.name}"
    if "unreadable" in state:
        raise UnsupportedFormat(f"the layout request {sidecar} cannot be used: {state['unreadable']}; "
                                "the bytes are kept as dropped")
    try:
        target = target_with(item.cfg.target, dict(state.get("layout") or {}))
    except ConfigError as exc:
        raise UnsupportedFormat(f"the layout request {sidecar} asks for what qemu-img cannot make: {exc}") from None
    item.cfg = dataclasses.replace(item.cfg, target=target)
