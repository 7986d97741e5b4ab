"""``convd convert``: one image through the daemon's own stages, outside the spool.

A private work directory beside DST stands in for ``work/``; the source is
read where it lies and never moved; the result is renamed to DST (never
over an existing file) and the record is returned instead of written.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import anyio

from convd import durable, resolved
from convd.bandwidth import Bandwidth
from convd.config import Config
from convd.filesystem import probe_filesystem
from convd.pipeline.context import Context
from convd.pipeline.item import Item
from convd.pipeline.layout import OUTPUT, SOURCE, UNPACKED, Claim
from convd.pipeline.ledger import Ledger, StatvfsSpace
from convd.pipeline.runner import run_item

__all__ = ["convert_one"]


class SingleFileSpool:
    """The spool operations the stages use, for one SRC → DST conversion."""

    def __init__(self, dst: Path) -> None:
        self.dst = dst

    def note_attempt(self, claim: Claim) -> None:
        claim.attempts += 1

    def note_reading(self, claim: Claim, reading: bool) -> None:
        pass  # one run of `convd convert`: nothing survives it to quarantine

    def fence(self, claim: Claim) -> None:
        pass  # one process, no spool: nobody else can hold the claim

    def discard_output(self, claim: Claim) -> None:
        try:
            os.unlink(claim.output)
        except FileNotFoundError:
            pass

    def output_taken(self, name: str) -> str | None:
        return str(self.dst) if os.path.lexists(self.dst) else None

    def free_failed_name(self, name: str) -> str:
        return name

    def stage_handoff(self, claim: Claim, dest: str, final_name: str, payload: str,
                      record: dict[str, Any]) -> None:
        claim.pending = {"dest": dest, "final_name": final_name, "payload": payload, "record": record}

    def unstage_handoff(self, claim: Claim) -> None:
        claim.pending = None

    def complete_handoff(self, claim: Claim) -> None:
        p = claim.pending
        assert p is not None
        if p["dest"] != "outgoing":
            return  # a rejected source stays where the user keeps it
        if p["payload"] == SOURCE:  # passthrough: the user's file is not ours to move
            shutil.copyfile(claim.source, claim.output)
            durable.fsync_file(claim.output)
        # A passthrough of a disk unpacked from a container: that file is ours.
        durable.move(claim.dir / (UNPACKED if p["payload"] == UNPACKED else OUTPUT), self.dst)

    def remove_claim(self, claim: Claim) -> None:
        durable.remove_tree(claim.dir)


async def convert_one(cfg: Config, src: Path, dst: Path, target: str | None) -> dict[str, Any]:
    if target:
        cfg = dataclasses.replace(cfg, convert=dataclasses.replace(cfg.convert, target_format=target))
    dst = dst.absolute()
    workdir = Path(tempfile.mkdtemp(prefix=f".{dst.name}.convd-", dir=dst.parent))
    result: dict[str, Any] = {}

    def keep(_item: Item, rec: dict[str, Any]) -> None:
        result.update(rec)

    try:
        fs = probe_filesystem(workdir)
        spool = SingleFileSpool(dst)
        ctx = Context(
            spool=spool,  # type: ignore[arg-type]
            ledger=Ledger(cfg.limits.workspace, cfg.limits.min_free, StatvfsSpace(str(workdir))),
            slots=anyio.CapacityLimiter(1), sparse=resolved.sparse(cfg.limits.sparse, fs), block_size=fs.block_size,
            direct_io=fs.direct_io,
            on_published=keep, on_failed=keep, bandwidth=Bandwidth(cfg.convert.rate_limit),
        )
        claim = Claim(name=dst.name, dir=workdir, source_path=src.absolute())
        item = Item(claim=claim, cfg=cfg)
        ctx.items[item.name] = item  # the convert stage counts the items converting soon
        await run_item(item, ctx)
    finally:
        durable.remove_tree(workdir)
    if not result:
        result = {"status": "failed", "error": {"code": "internal_error",
                                                "message": "convd hit an internal error; see the log"}}
    return result
