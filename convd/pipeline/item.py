"""An item in flight: its claim, the config it was claimed under, what the stages learnt."""

from __future__ import annotations

import enum
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

if TYPE_CHECKING:

    from convd.config import Config
    from convd.custody import Custody
    from convd.image.inspection import Inspection
    from convd.pipeline.layout import Claim
    from convd.pipeline.ledger import Reservation

__all__ = ["CANCELLABLE", "Item", "Stage"]


class Stage(str, enum.Enum):  # noqa: UP042 - StrEnum would change str() and format() of a stage
    UNPACK = "unpack"
    DETECT = "detect"
    RESERVE = "reserve"
    CONVERT = "convert"
    PUBLISH = "publish"
    CLEANUP = "cleanup"
    DONE = "done"


# Stages an item can be cancelled in: nothing of it is published yet.
CANCELLABLE = frozenset({Stage.UNPACK, Stage.DETECT, Stage.RESERVE, Stage.CONVERT})


@dataclass
class Item:
    claim: Claim
    cfg: Config  # the config in force when it was claimed (SIGHUP applies to later items)
    # Its producer reads the output whole as soon as it is published: a Glance
    # import (a priority mark at claim), which Glance hashes and uploads at once.
    read_soon: bool = False
    stage: Stage = Stage.UNPACK
    inspection: Inspection | None = None
    source: dict[str, Any] = field(default_factory=dict)
    # What unpacking a container learnt ({"container": [...], "member": ..., "size":
    # the dropped file's}); it overrides ``source``'s keys in the record.
    container: dict[str, Any] | None = None
    passthrough: bool = False
    # Digests of the bytes as dropped (the record's source.checksums), once verified.
    source_checksums: dict[str, str] | None = None
    # The algorithms of those digests when they are still to be taken: no
    # stated digest had to be checked before converting, so they are read
    # beside the conversion (convd.stages.verify.beside), not before it.
    source_digests_due: tuple[str, ...] | None = None
    estimate: int = 0
    reservation: Reservation | None = None
    unpack_reservation: Reservation | None = None  # the unpacked disk's bytes, until the item ends
    # What a size-less stream's unpack asked to grow to and was denied (other
    # items held the space): its next attempt reserves that much up front.
    unpack_floor: int = 0
    rbd_reservation: Reservation | None = None  # the output's bytes in the Ceph pool ([publish] to = "rbd")
    rbd_tmp: str | None = None  # the temporary RBD image the current attempt writes
    progress: float = 0.0
    started: float = field(default_factory=time.monotonic)
    convert_started: float | None = None
    timings: dict[str, float] = field(
        default_factory=lambda: {"detect": 0.0, "wait_space": 0.0, "convert": 0.0, "publish": 0.0}
    )
    # (inode, size, mtime, ctime) of the source when detect vetted it: any
    # change afterwards (an old writer's fd) voids the checks.
    vetted: tuple[int, int, int, int] | None = None
    # How the source is kept from change from the first check to the last
    # read (convd.custody): its read lease, or the private copy it reads.
    custody: Custody | None = None
    # Set when the item is cancelled: the message of its `cancelled` record.
    # `scope` is the cancel scope of the stage running now, while it may be cut short.
    withdrawn: str | None = None
    scope: anyio.CancelScope | None = None

    def withdraw(self, message: str) -> bool:
        """Cancel the item unless it is already publishing; the runner quarantines it."""
        if self.stage not in CANCELLABLE:
            return False
        self.withdrawn = message
        if self.scope is not None:
            self.scope.cancel()  # e.g. qemu-img convert: the child is stopped
        return True

    def vet(self, st: os.stat_result) -> None:
        """Remember the source as the safety checks saw it."""
        self.vetted = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def source_changed(self) -> bool:
        """Whether the source is not the file that was vetted (ctime cannot be faked),
        or its read lease was broken (someone opened it for writing)."""
        if self.custody is not None and not self.custody.intact():
            return True
        if self.vetted is None:
            return False
        st = os.lstat(self.claim.source)
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) != self.vetted

    @property
    def name(self) -> str:
        return self.claim.name

    @property
    def label(self) -> str:
        """How messages name the source: the item's name, or for ``convd convert``
        the user's own path (never a path inside work/)."""
        return str(self.claim.source_path) if self.claim.source_path is not None else self.name

    @property
    def target_format(self) -> str:
        return self.cfg.convert.target_format

    def eta(self) -> float | None:
        if self.stage is not Stage.CONVERT or self.convert_started is None or self.progress <= 0.01:
            return None
        spent = time.monotonic() - self.convert_started
        return spent * (1 - self.progress) / self.progress
