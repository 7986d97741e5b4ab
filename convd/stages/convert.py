"""Convert: one ``qemu-img convert`` into the item's work directory, within a worker slot."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import anyio

from convd.errors import UnsafeImage
from convd.pipeline.item import Item, Stage
from convd.qemu import img as qemu
from convd.stages import verify
from convd.stages.reserve import settle

# Stages of an item that will convert soon: they count when the budget is split.
_CONVERTING_SOON = frozenset({Stage.UNPACK, Stage.DETECT, Stage.RESERVE, Stage.CONVERT})

if TYPE_CHECKING:
    from convd.pipeline.context import Context

__all__ = ["convert"]


async def convert(item: Item, ctx: Context) -> Stage:
    assert item.inspection is not None
    cfg = item.cfg
    src_fmt = item.inspection.qemu_format
    async with ctx.slots:
        await anyio.to_thread.run_sync(ctx.spool.note_attempt, item.claim)
        item.progress = 0.0
        item.convert_started = t0 = time.monotonic()

        def progress(frac: float) -> None:
            item.progress = frac

        if item.source_changed():
            raise UnsafeImage("the source changed after its safety checks")
        # O_DIRECT output (-t none) bypasses the page cache, so a checksum
        # would read every byte back from disk: with checksums, the output is
        # written through the cache (as durable as fast, measured: 0.66-0.74 s
        # against 0.60-0.70 s for 2 GiB qcow2 -> raw) and hashed from it.
        # So is a Glance import's, which Glance reads whole at once: eight
        # 1 GiB imports at once went active in 103 s written with O_DIRECT,
        # 82 s through the cache (docs/benchmarks.md, issue 23's burst).
        args = qemu.convert_args(src_fmt, item.target_format, cfg.qemu_args_for(item.inspection.format),
                                 direct_io=ctx.direct_io and not cfg.checksum.algorithms and not item.read_soon)
        args += qemu.layout_args(item.target_format, cfg.target)
        soon = sum(1 for i in ctx.items.values() if i.stage in _CONVERTING_SOON and not i.passthrough)
        try:
            # [convert] rate_limit: this child's share, as -r (convd.bandwidth).
            async with ctx.bandwidth.share(expected=min(soon, cfg.convert.max_workers)) as rate, \
                    verify.beside(item, ctx):  # the dropped file's digests, on the other core
                await qemu.convert(
                    str(item.claim.source), src_fmt, str(item.claim.output), item.target_format,
                    extra_args=[*args, "-r", str(rate)] if rate else args, timeout=cfg.convert.timeout,
                    on_progress=progress, name=item.label,
                    options=item.inspection.driver_options,
                )
        finally:
            item.timings["convert"] += time.monotonic() - t0
        settle(item, ctx)  # the ledger holds what the output takes now, not its estimate (docs/sizing.md)
    item.progress = 1.0
    return Stage.PUBLISH
