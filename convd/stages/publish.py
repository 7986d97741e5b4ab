"""Publish: re-inspect and checksum the output, fsync it, hand it to ``outgoing/``
with its record (image first, record second: the record promises the image)."""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING, Any

import anyio

from convd import record
from convd.bandwidth import Throttle
from convd.checksum import digest_file
from convd.errors import (
    ConvertFailed,
    CorruptImage,
    NameConflict,
    UnsafeImage,
    UnsupportedFormat,
)
from convd.image.inspection import RAW_FAMILY, inspect_fd
from convd.pipeline.item import Item, Stage
from convd.pipeline.layout import OUTPUT
from convd.stages import verify

if TYPE_CHECKING:
    from convd.pipeline.context import Context

__all__ = ["publish"]


# Every inspector decides within a few MiB on a plain output; one that wants
# more has found a header (e.g. a VMDK asking for its footer) inside it.
_OUTPUT_INSPECT_LIMIT = 16 << 20


def _vet_output(fd: int, target: str, stop: threading.Event) -> int:
    """The output must be what was asked for, with nothing hidden inside; returns its virtual size."""
    try:
        insp = inspect_fd(fd, stop=stop, limit=_OUTPUT_INSPECT_LIMIT)
        found = insp.format
    except UnsupportedFormat as exc:
        # Guest data that starts (or ends) like a format convd refuses: a
        # consumer that probes would read that format, not this disk.
        found = exc.detected or "an unsupported format"
        raise UnsafeImage(f"the {target} output inspects as {found}: the image hides another format "
                          "inside") from None
    except CorruptImage as exc:
        # A header of another format in the guest data need not be a valid
        # one: it is still hidden inside, and the source is not to blame.
        # (A raw output whose guest disk has a damaged partition table is the
        # guest's business: it is the raw disk that was asked for.)
        if exc.detected in (None, target):
            raise
        if target == "raw" and exc.detected in RAW_FAMILY:
            return -(-os.fstat(fd).st_size // 512) * 512
        found = exc.detected
    ok = found in RAW_FAMILY if target == "raw" else found == target
    if not ok:
        raise UnsafeImage(f"the {target} output inspects as {found}: the image hides another format inside")
    return insp.virtual_size


def _finish_output(path: str, item: Item, ctx: Context, throttle: Throttle) -> dict[str, Any]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    sync_error: list[OSError] = []

    def sync() -> None:
        t0 = time.monotonic()
        try:
            os.fsync(fd)
        except OSError as exc:
            sync_error.append(exc)
        item.timings["fsync"] = time.monotonic() - t0

    # The record promises durable bytes: qemu-img's default cache mode never
    # flushes, nor need a producer have.  The flush runs beside the checksum,
    # which reads the same pages from the cache meanwhile.
    syncer = threading.Thread(target=sync, name="fsync", daemon=True)
    syncer.start()
    try:
        size = os.fstat(fd).st_size
        assert item.inspection is not None
        if item.passthrough:
            vsize = item.inspection.virtual_size
        else:
            vsize = _vet_output(fd, item.target_format, ctx.stop)
            # qemu-img converts whole 512-byte sectors: only a raw source's
            # odd tail is padded (with zeros); any other change is a bug.
            want = -(-item.inspection.virtual_size // 512) * 512
            if vsize != want:
                raise ConvertFailed(f"the {item.target_format} output's virtual size is {vsize} bytes, "
                                    f"the source's {item.inspection.virtual_size}: the conversion changed "
                                    "the disk")
        t0 = time.monotonic()
        def hashed(n: int) -> None:
            ctx.count_hashed(n)
            throttle.spend(n)  # [convert] rate_limit

        sums = digest_file(fd, item.cfg.checksum.algorithms, hashed, ctx.stop)
        item.timings["hash"] = time.monotonic() - t0
        if item.source_changed():  # after the checksum: a passthrough's sums cover these bytes
            raise UnsafeImage("the source changed after its safety checks")
    finally:
        syncer.join()
        os.close(fd)
    if sync_error:
        raise sync_error[0]
    out = {"format": item.target_format, "size": size, "virtual_size": vsize, "checksums": sums}
    if not item.passthrough:
        out["layout"] = item.cfg.target.layout(item.target_format)  # what [target.FMT] made
    return out


async def publish(item: Item, ctx: Context) -> Stage:
    t0 = time.monotonic()
    claim = item.claim
    taken = ctx.spool.output_taken(item.name)
    if taken:
        raise NameConflict(f"{taken} already exists")
    payload = claim.source_payload if item.passthrough else OUTPUT
    path = claim.source if item.passthrough else claim.output
    async with ctx.bandwidth.share() as rate:
        target = await anyio.to_thread.run_sync(_finish_output, str(path), item, ctx, Throttle(rate, ctx.stop))
    item.timings["publish"] += time.monotonic() - t0
    status = "passthrough" if item.passthrough else "converted"
    due = item.source_digests_due
    if item.passthrough and item.claim.unpacked is None and due and set(due) <= target["checksums"].keys():
        # A passthrough of the dropped bytes themselves (or their private copy): the same digests.
        item.source_checksums = {a: target["checksums"][a] for a in due}
        item.source_digests_due = None
    await verify.settle(item, ctx)
    rec = record.build(item, status, target=target)

    def handoff() -> None:
        ctx.spool.fence(claim)  # cut off and adopted meanwhile: never published twice
        ctx.spool.stage_handoff(claim, "outgoing", item.name, payload, rec)
        try:
            ctx.spool.complete_handoff(claim)
        except FileExistsError:
            ctx.spool.unstage_handoff(claim)
            raise NameConflict(f"outgoing/{item.name} appeared while publishing") from None

    t0 = time.monotonic()
    await anyio.to_thread.run_sync(handoff)
    item.timings["handoff"] = time.monotonic() - t0  # after the record: in the log event only
    ctx.published(item, rec)
    return Stage.CLEANUP
