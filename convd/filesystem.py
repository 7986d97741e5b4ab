"""What the spool's filesystem can do, learnt once at start-up."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FsTraits", "probe_filesystem"]


@dataclass(frozen=True)
class FsTraits:
    sparse: bool  # keeps holes
    block_size: int  # bytes, statvfs f_bsize
    direct_io: bool  # O_DIRECT works (not on tmpfs, some network filesystems)


def probe_filesystem(directory: Path) -> FsTraits:
    """Probe ``directory``'s filesystem with a 64 MiB sparse temp file (removed after)."""
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe.", suffix=".tmp") as fh:
        fh.truncate(64 << 20)
        fh.flush()
        sparse = os.fstat(fh.fileno()).st_blocks * 512 < (1 << 20)
        try:
            os.close(os.open(fh.name, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC))
            direct = True
        except OSError:
            direct = False
    return FsTraits(sparse=sparse, block_size=os.statvfs(directory).f_bsize, direct_io=direct)
