"""The spool's on-disk layout: the one module that names what lies where.

Four directories: ``incoming/`` (producers drop files there, under a
dot-name or ``*.part``/``*.tmp`` until they rename them in), ``work/``,
``outgoing/`` (results and their records, ``NAME`` and ``NAME.json``) and
``failed/`` (rejected originals, ``NAME`` or ``NAME.N``, and their records).

Layout under ``work/``: one claim directory per daemon instance
(``work/<instance>/``, held with an ``flock`` so two daemons never share
one), and in it one directory per item (``work/<instance>/<NAME>/``) holding

* ``source``       the original bytes, until the result is durable;
* ``unpacked``     the disk unpacked from a container (gzip, xz, tar, OVA, …),
                   when ``source`` is one; rewritten from ``source`` after a crash;
* ``private``      a copy of ``source`` read instead of it where convd cannot
                   take the inode itself (``convd.custody``); made again after a crash;
* ``output``       qemu-img's output while it is being written;
* ``item.json``    the producer's uid (the dropped file's owner at claim),
                   attempts so far, and unpacks begun but never finished: the
                   daemon died in them (see ``note_reading``);
* ``record.json``  the final record and destination, written durably just
                   before the handoff, so recovery can finish it.

An item's stage can be read off its files: no ``record.json`` means it is
converted (again) from ``source``; with one, only the handoff remains.

Beside the instance directories, ``work/.ledger`` (and its lock) holds
every daemon's outstanding workspace (:class:`convd.pipeline.ledger.SharedLedger`).
The files of each instance directory itself (``.lock``, ``.adopt``, the
status snapshot) are named in :mod:`convd.cluster`, which the operator
commands and :mod:`convd.protocol` read without the daemon; the producers'
sidecars in ``incoming/`` in :mod:`convd.protocol`.  :class:`convd.pipeline.spool.Spool` moves items
between the directories, :mod:`convd.pipeline.takeover` between instances.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "EXPECT",
    "FAILED_NUMBER_MAX",
    "IGNORED_SUFFIXES",
    "ITEM",
    "LAYOUT",
    "LEDGER",
    "LEDGER_LOCK",
    "MAX_NAME_BYTES",
    "OUTPUT",
    "PRIVATE",
    "RECORD",
    "SOURCE",
    "UNPACKED",
    "Claim",
    "is_candidate_name",
    "is_item",
    "name_fits",
    "name_refused",
]

IGNORED_SUFFIXES = (".part", ".tmp")
LEDGER, LEDGER_LOCK = ".ledger", ".ledger.lock"  # in work/
SOURCE, OUTPUT, ITEM, RECORD = "source", "output", "item.json", "record.json"
# The producer's expectation (contract section 8) as convd read it at claim:
# {"expect": {...}} or {"unreadable": "why"}, and "uid": whose file it was; written
# by convd, never the producer's file.
EXPECT = "expect.json"
# The producer's layout request (contract section 9), likewise: {"layout": {...}} or {"unreadable": "why"}.
LAYOUT = "layout.json"
UNPACKED = "unpacked"
PRIVATE = "private"

# NAME.json and failed/NAME.N.json (N up to 8 digits) must fit in NAME_MAX (255 bytes).
FAILED_NUMBER_MAX = 99_999_999
MAX_NAME_BYTES = 255 - len(".json") - len(f".{FAILED_NUMBER_MAX}")  # 241


def is_candidate_name(name: str) -> bool:
    """Producers write under a dot-name or ``*.part``/``*.tmp`` and rename in."""
    return bool(name) and not name.startswith(".") and not name.endswith(IGNORED_SUFFIXES)


def is_item(entry: os.DirEntry[str]) -> bool:
    return not entry.name.startswith(".") and entry.is_dir(follow_symlinks=False)


def name_fits(name: str) -> bool:
    """Whether a record can be written beside this name (longer ones wait, logged)."""
    return len(os.fsencode(name)) <= MAX_NAME_BYTES


def name_refused(name: str) -> str | None:
    """Why a name dropped in ``incoming/`` can never be an input (it waits there, logged), or None.

    ``NAME.json`` is refused: published or rejected, its bytes would take the
    name of the record of an input called ``NAME`` (in ``outgoing/`` or
    ``failed/``), and a consumer waiting for that record could read an
    image as it.  No rename into ``failed/`` avoids that, so it stays put.
    """
    if not name_fits(name):
        return f"longer than {MAX_NAME_BYTES} bytes: no record name would fit"
    if name.endswith(".json"):
        return "NAME.json would take the name of another input's record (rename it, e.g. to NAME.json.img)"
    return None


@dataclass
class Claim:
    """An item this instance owns: its directory under ``work/<instance>/``."""

    name: str
    dir: Path
    attempts: int = 0
    reads_unfinished: int = 0  # unpacks of it the daemon never came back from (it died in them)
    pending: dict[str, Any] | None = None  # record.json, when only the handoff is left
    source_path: Path | None = None  # `convd convert`: the user's file, left where it is
    unpacked: Path | None = None  # the disk unpacked from a container source, once written
    private: Path | None = None  # the private copy of a source convd could not take (convd.custody)
    epoch: int = 0  # the Spool's lock epoch it was claimed or loaded in (see Spool.fence)
    owner: str | None = None  # item.json's owner: the instance that last adopted it (None: its claimer)
    # The uid that owned the dropped file when it was claimed (item.json's producer_uid: custody
    # makes the file convd's later), whose sidecars count for it (protocol.foreign_sidecar).
    producer_uid: int | None = None

    @property
    def dropped(self) -> Path:
        """The file as it was dropped (the bytes ``failed/`` keeps)."""
        return self.source_path or self.dir / SOURCE

    @property
    def source(self) -> Path:
        """The disk the stages read: the unpacked one when the drop was a container,
        the private copy when convd could not take the dropped inode."""
        return self.unpacked or self.private or self.dropped

    @property
    def source_payload(self) -> str:
        """The file a passthrough publishes."""
        return UNPACKED if self.unpacked else PRIVATE if self.private else SOURCE

    @property
    def output(self) -> Path:
        return self.dir / OUTPUT
