"""The stages' RBD side (``[publish] to = "rbd"``): reserve against the pool,
convert straight into a temporary image, publish it under ``NAME``.

The same promises as a file publish, in this order:

1. reserve: the output's data bytes against the pool (its quota, and what
   ``ceph df`` says is available), not the local workspace;
2. convert: ``qemu-img convert -O raw`` into ``POOL/.convd-tmp.INSTANCE+ATTEMPT+NAME``,
   which qemu's rbd driver creates (zero-initialised: qemu-img writes no
   zeros into it, so the image is thin);
3. publish: the image read back from RBD (inspected, its virtual size
   checked, hashed), the snapshot created and protected on the temporary
   image, the record staged in the claim (``record.json``, with the image's
   RBD id), then ``rbd rename`` to ``NAME`` (atomic; refused when ``NAME``
   exists: ``name_conflict``, the existing image untouched), then
   ``outgoing/NAME.json``.

A crash before the record is staged leaves a temporary image that the next
start (or the instance taking over) removes: never published.  A crash after
it is finished by :func:`finish_handoff`, which renames only the image
whose id the record names.
"""

from __future__ import annotations

import os
import secrets
import time
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from convd import durable, protocol, rbd, record
from convd.config import RbdConfig
from convd.errors import (
    ConvertFailed,
    CorruptImage,
    ItemError,
    NameConflict,
    TooLarge,
    TransientError,
    UnsafeImage,
)
from convd.image.inspection import RAW_FAMILY, inspect_fd
from convd.pipeline.item import Item, Stage
from convd.pipeline.layout import RECORD
from convd.pipeline.ledger import Ledger
from convd.pipeline.spool import ClaimLost
from convd.qemu import img as qemu
from convd.stages import verify
from convd.stages.reserve import MARGIN_BYTES, MARGIN_FRACTION

if TYPE_CHECKING:
    from convd.pipeline.context import Context
    from convd.pipeline.layout import Claim
    from convd.pipeline.spool import Spool

__all__ = ["RbdTarget", "convert", "finish_handoff", "publish", "reserve"]

log = structlog.get_logger(__name__)

# As for a file output (convd/stages/publish.py): every inspector decides
# within a few MiB on a plain output.
_OUTPUT_INSPECT_LIMIT = 16 << 20
# How often the pool's free space is asked while an item waits for it.
_SPACE_REFRESH = 2.0


class RbdTarget:
    """The pool an RBD-publishing daemon writes to: its config, space ledger and fsid."""

    def __init__(self, cfg: RbdConfig, instance: str) -> None:
        self.cfg = cfg
        self.instance = instance
        self.space = rbd.PoolSpace(cfg)
        # No budget of convd's own beyond the pool's: the quota is the budget.
        self.ledger = Ledger(1 << 62, 0, self.space)  # type: ignore[arg-type]  # duck-typed space
        self._fsid: str | None = None

    async def fsid(self) -> str:
        if self._fsid is None:
            self._fsid = await rbd.fsid(self.cfg)
        return self._fsid


def _ceph(exc: rbd.CephError) -> ItemError | TransientError:
    return rbd.item_error(exc)


def _target(ctx: Context) -> RbdTarget:
    assert ctx.rbd is not None
    return ctx.rbd


async def reserve(item: Item, ctx: Context) -> Stage:
    """Wait until the pool can take the output's data bytes (a raw source too: RBD needs a copy)."""
    assert item.inspection is not None
    tgt = _target(ctx)
    refused = rbd.name_refused(item.name, tgt.instance)
    if refused:
        raise NameConflict(f"RBD cannot hold {item.name!r} as an image name: it {refused}")
    insp = item.inspection
    t0 = time.monotonic()
    # This attempt's image, a name of its own (see rbd.tmp_name); a retry comes back here for a new one.
    item.rbd_tmp = tmp = rbd.tmp_name(tgt.instance, item.name, secrets.token_hex(4))
    try:
        # RBD images are thin whatever the source: only data extents are written.  The map, the
        # pool's space (two runs of the ceph tool, most of a second each) and the look at the
        # temporary name (is the pool there, may we read it?) side by side.
        data, _, there = await rbd.together(
            qemu.data_bytes(str(item.claim.source), insp.qemu_format, 4096, limits=item.cfg.detect,
                            name=item.label),
            tgt.space.refresh(), rbd.image_id(tgt.cfg, tmp))
    except rbd.CephError as exc:
        raise _ceph(exc) from None
    if there is not None:
        raise TransientError(f"the image {tgt.cfg.pool}/{tmp} exists already")
    item.timings["rbd_space"] = time.monotonic() - t0
    need = data + int(data * MARGIN_FRACTION) + MARGIN_BYTES
    item.estimate = need
    if not tgt.ledger.could_ever_fit(need):
        raise TooLarge(f"the raw image needs about {need} bytes in the Ceph pool {tgt.cfg.pool!r}, which "
                       f"could never hold it ({'quota' if tgt.space.quota else 'size'} "
                       f"{tgt.space.total()} bytes)")
    t0 = time.monotonic()
    async with anyio.create_task_group() as tg:
        async def refresh() -> None:
            while True:
                await anyio.sleep(_SPACE_REFRESH)
                try:
                    await tgt.space.refresh()
                except rbd.CephError as exc:
                    log.warning("cannot ask the Ceph pool for its space", error=str(exc))
        tg.start_soon(refresh)
        item.rbd_reservation = await tgt.ledger.reserve(item.name, need)
        tg.cancel_scope.cancel()
    item.timings["wait_space"] += time.monotonic() - t0
    return Stage.CONVERT


async def _discard_tmp(cfg: RbdConfig, tmp: str) -> None:
    """Remove an attempt's temporary image; a failure is logged (the next start sweeps it)."""
    # Bounded: an image its killed writer still watches cannot go yet (the next start removes it).
    with anyio.CancelScope(shield=True), anyio.move_on_after(10):
        try:
            await rbd.remove(cfg, tmp)
        except rbd.CephError as exc:
            log.warning("cannot remove the temporary image; the next start removes it", image=tmp,
                        error=str(exc))


async def convert(item: Item, ctx: Context) -> Stage:
    """``qemu-img convert -O raw`` straight into the attempt's temporary image."""
    assert item.inspection is not None
    tgt = _target(ctx)
    cfg = item.cfg
    # Named and looked at by reserve(); publish reads it back from here.
    tmp = item.rbd_tmp
    assert tmp is not None
    src_fmt = item.inspection.qemu_format
    async with ctx.slots:
        await anyio.to_thread.run_sync(ctx.spool.note_attempt, item.claim)
        item.progress = 0.0
        item.convert_started = t0 = time.monotonic()

        def progress(frac: float) -> None:
            item.progress = frac

        if item.source_changed():
            raise UnsafeImage("the source changed after its safety checks")
        # -t none: librbd's own cache off, so every write has reached the
        # OSDs when qemu-img exits; -W: writes out of order, many in flight.
        args = qemu.convert_args(src_fmt, "raw", cfg.qemu_args_for(item.inspection.format), direct_io=True)
        ok = False
        try:
            # [convert] rate_limit and the source driver's options hold here as for a file target.
            async with ctx.bandwidth.share() as rate, verify.beside(item, ctx):
                await qemu.convert(str(item.claim.source), src_fmt, rbd.qemu_target(tgt.cfg, tmp), "raw",
                                   extra_args=[*args, "-r", str(rate)] if rate else args,
                                   timeout=cfg.convert.timeout, on_progress=progress,
                                   name=item.label, options=item.inspection.driver_options,
                                   network=True)
            ok = True
        finally:
            item.timings["convert"] += time.monotonic() - t0
            if not ok and not ctx.stop.is_set():
                await _discard_tmp(tgt.cfg, tmp)
    item.progress = 1.0
    return Stage.PUBLISH


def _vet_head(head: bytes, size: int) -> int:
    """The output's first bytes must inspect as raw; its virtual size (as for a file output)."""
    fd = os.memfd_create("convd-rbd-head", os.MFD_CLOEXEC)
    try:
        os.write(fd, head)
        os.ftruncate(fd, size)
        try:
            insp = inspect_fd(fd, limit=_OUTPUT_INSPECT_LIMIT)
            found = insp.format
        except CorruptImage as exc:
            if exc.detected in (None, "raw"):
                raise
            if exc.detected in RAW_FAMILY:
                return size
            found = exc.detected
        if found not in RAW_FAMILY:
            raise UnsafeImage(f"the raw output inspects as {found}: the image hides another format inside")
        return insp.virtual_size
    finally:
        os.close(fd)


async def publish(item: Item, ctx: Context) -> Stage:
    """Read back, snapshot, stage the record, rename into place, write ``outgoing/NAME.json``."""
    assert item.inspection is not None
    t0 = time.monotonic()
    tgt = _target(ctx)
    cfg = tgt.cfg
    tmp = item.rbd_tmp
    assert tmp is not None
    staged = False
    try:
        if ctx.spool.output_taken(item.name) or (ctx.spool.outgoing / f"{item.name}.json").exists():
            raise NameConflict(f"outgoing/{item.name}.json already exists")
        try:
            # The read-back is most of the time: the round trips that need not wait for it go beside it,
            # the snapshot too (of the temporary image, whose content is final once qemu-img has
            # exited: a failed check below discards the image with its snapshot).
            t1 = time.monotonic()

            async def timed_readback() -> rbd.Readback:
                back = await rbd.readback(cfg, tmp, item.cfg.checksum.algorithms,
                                          head_bytes=_OUTPUT_INSPECT_LIMIT, stop=ctx.stop,
                                          timeout=item.cfg.convert.timeout, on_bytes=ctx.count_hashed)
                item.timings["hash"] = time.monotonic() - t1
                return back

            async def snap() -> None:
                if cfg.snapshot:
                    await rbd.snapshot(cfg, tmp, cfg.snapshot, fresh=True)

            taken, image, fsid, back, _ = await rbd.together(
                rbd.image_id(cfg, item.name), rbd.image_id(cfg, tmp), tgt.fsid(), timed_readback(), snap())
            item.timings["rbd_calls"] = time.monotonic() - t1
            if taken is not None:
                raise NameConflict(f"the image {cfg.pool}/{item.name} already exists in the Ceph pool")
            if image is None:
                raise TransientError(f"the temporary image {cfg.pool}/{tmp} vanished before its publish")
            vsize = await anyio.to_thread.run_sync(_vet_head, back.head, back.size)
            want = -(-item.inspection.virtual_size // 512) * 512
            if vsize != want or back.size != want:
                raise ConvertFailed(f"the image written to RBD is {back.size} bytes, the source's virtual size "
                                    f"{item.inspection.virtual_size}: the conversion changed the disk")
            if item.source_changed():
                raise UnsafeImage("the source changed after its safety checks")
            where = rbd.location(fsid, cfg.pool, item.name, cfg.snapshot)
        except rbd.CephError as exc:
            raise _ceph(exc) from None
        target = {"format": "raw", "size": back.size, "virtual_size": vsize, "checksums": back.checksums,
                  "location": where}
        item.timings["publish"] += time.monotonic() - t0
        await verify.settle(item, ctx)  # due still only if beside() did not run (never, today)
        rec = record.build(item, "converted", target=target)
        pending = {"dest": "outgoing", "final_name": item.name, "record": rec,
                   "rbd": {"pool": cfg.pool, "ceph_conf": str(cfg.ceph_conf), "user": cfg.user,
                           "keyring": cfg.keyring, "snapshot": cfg.snapshot, "tmp": tmp, "name": item.name,
                           "id": image}}
        try:
            # Cut off and adopted meanwhile: the adopter publishes it, never this daemon too.
            await anyio.to_thread.run_sync(ctx.spool.fence, item.claim)
        except ClaimLost:
            await _discard_tmp(cfg, tmp)  # this attempt's own image (its name has our instance and a token)
            raise
        await anyio.to_thread.run_sync(_stage, item.claim, pending)
        staged = True
        with anyio.CancelScope(shield=True):
            await _complete(ctx.spool, item.claim, fresh=True)
    except NameConflict:
        if staged:
            await anyio.to_thread.run_sync(ctx.spool.unstage_handoff, item.claim)
        await _discard_tmp(cfg, tmp)
        raise
    except (ItemError, TransientError):
        if not staged:
            await _discard_tmp(cfg, tmp)
        raise
    ctx.published(item, rec)
    return Stage.CLEANUP


def _stage(claim: Claim, pending: dict[str, Any]) -> None:
    claim.pending = pending
    durable.write_json(claim.dir / RECORD, pending, replace=True, compact=True)


async def _complete(spool: Spool, claim: Claim, *, fresh: bool = False) -> None:
    """Rename the staged image into place (or find it there already), then write its record; idempotent.

    Raises ``NameConflict`` when ``NAME`` is another image; CephError
    (cluster unreachable…) leaves the handoff staged for a later try.
    ``fresh``: right after staging, the images were just looked at (the
    rename itself refuses an existing ``NAME``); recovery looks again.
    """
    p = claim.pending
    assert p is not None and "rbd" in p
    r = p["rbd"]
    cfg = rbd.config_of(p)
    there = None if fresh else await rbd.image_id(cfg, r["name"])
    if there is None:
        if not fresh and await rbd.image_id(cfg, r["tmp"]) != r["id"]:
            raise ConvertFailed(f"the staged image {cfg.pool}/{r['tmp']} is gone before its rename")
        try:
            await rbd.rename(cfg, r["tmp"], r["name"])
        except rbd.CephError as exc:
            if exc.errno == 17:  # EEXIST: NAME appeared meanwhile
                raise NameConflict(f"the image {cfg.pool}/{r['name']} appeared in the Ceph pool while "
                                   "publishing") from None
            raise
    elif there != r["id"]:
        raise NameConflict(f"the image {cfg.pool}/{r['name']} already exists in the Ceph pool")
    rec_path = spool.outgoing / f"{p['final_name']}.json"

    def write() -> None:
        try:
            durable.write_json(rec_path, p["record"], owner=spool.cfg.instance)
        except FileExistsError:
            if protocol.read_record(rec_path) != p["record"]:
                log.error("a foreign record sits in outgoing/ for the published image", item=claim.name,
                          record=str(rec_path))

    await anyio.to_thread.run_sync(write)


async def finish_handoff(item: Item, ctx: Context) -> bool:
    """Recovery of an RBD publish that crashed after staging its record; False when not one.

    The rename happens only for the image whose RBD id the record names:
    an image another writer put under the temporary or final name is never
    published.  A ``NAME`` taken meanwhile is ``name_conflict``; a Ceph
    failure leaves the claim for the next try.
    """
    from convd.stages.cleanup import quarantine
    claim = item.claim
    p = claim.pending or {}
    if "rbd" not in p:
        return False
    try:
        # Adopted while this node was cut off: the adopter finishes it.
        await anyio.to_thread.run_sync(ctx.spool.fence, claim)
    except ClaimLost as lost:
        log.warning("claim lost to another instance; abandoned without publishing, moving or removing anything",
                    reason=str(lost))
        return True
    try:
        await _complete(ctx.spool, claim)
    except (NameConflict, ConvertFailed) as exc:
        item.source = p.get("record", {}).get("source", {})
        await anyio.to_thread.run_sync(ctx.spool.unstage_handoff, claim)
        await _discard_tmp(rbd.config_of(p), p["rbd"]["tmp"])
        await quarantine(item, ctx, exc)
        return True
    await anyio.to_thread.run_sync(ctx.spool.remove_claim, claim)
    log.info("recovered handoff", item=item.name, dest="rbd")
    ctx.on_published(item, p.get("record", {}))
    return True


async def stale(tgt: RbdTarget, instances: list[str], claims: list[Claim]) -> list[str]:
    """The temporary images of unfinished attempts of ``instances`` (listed before any new attempt
    starts: at start-up, at take-over), those of staged handoffs in ``claims`` excepted."""
    keep = {c.pending["rbd"]["tmp"] for c in claims if c.pending and "rbd" in c.pending}
    try:
        return await rbd.stale_images(tgt.cfg, instances, keep)
    except rbd.CephError as exc:
        log.warning("cannot list the pool's temporary images; the next start removes them", error=str(exc))
        return []


async def sweep(tgt: RbdTarget, names: list[str]) -> None:
    """Remove ``names`` (from :func:`stale`), in the background: a crashed writer's watch lasts 30 s."""
    if not names:
        return
    removed = await rbd.sweep(tgt.cfg, names)
    if removed:
        log.info("removed temporary images of unfinished attempts", images=removed)
