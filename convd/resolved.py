"""Every "auto" setting decided once, at start-up, from the configuration and the spool's filesystem.

Like uvicorn's ``Config.load()``: the daemon (``convd run``) and ``convd
convert`` call :func:`resolve` (or :func:`sparse`) before they build a part,
and build each part with the final values, so no part is patched after it
was made.  A change of these settings by a reload applies from the next
start (the daemon warns).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from convd.config import Config
from convd.filesystem import Filesystem, FsTraits, detect_type, probe_filesystem

__all__ = ["Resolved", "resolve", "sparse"]


@dataclass(frozen=True)
class Resolved:
    """The settings that depend on where the spool lies, as decided at start-up."""

    filesystem: Filesystem  # what incoming/ is on (detect_type)
    # The spool is on a filesystem other hosts write to: inotify never sees
    # other clients' changes, and a lease only this host's openers.
    shared: bool
    polling: bool  # [watch] force_polling, "auto" decided by ``shared``
    sparse: bool  # [limits] sparse, "auto" decided by what the work directory's filesystem does
    block_size: int  # of the work directory's filesystem, bytes
    direct_io: bool  # whether the work directory's filesystem takes O_DIRECT


def sparse(setting: str, traits: FsTraits) -> bool:
    """``[limits] sparse`` ("auto", "true", "false") for a filesystem with ``traits``."""
    return traits.sparse if setting == "auto" else setting == "true"


def resolve(cfg: Config, incoming: Path, work: Path) -> Resolved:
    """Decide every "auto" setting for a spool whose ``incoming/`` and work directory are given.

    Blocking: reads ``/proc/self/mountinfo`` and probes ``work`` with a
    temporary file (:func:`convd.filesystem.probe_filesystem`).
    """
    fstype = detect_type(incoming)
    traits = probe_filesystem(work)
    polling = fstype.shared if cfg.watch.force_polling is None else cfg.watch.force_polling
    return Resolved(filesystem=fstype, shared=fstype.shared, polling=polling,
                    sparse=sparse(cfg.limits.sparse, traits), block_size=traits.block_size,
                    direct_io=traits.direct_io)
