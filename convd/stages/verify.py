"""Verify, before unpack: the dropped bytes against the producer's expectation (contract
section 8), and their digests for the record's ``source.checksums``, in one read of the
file as dropped (for a container, the container file)."""

from __future__ import annotations

import json
import os
import stat
from typing import TYPE_CHECKING, Any

import anyio

from convd.checksum import digest_file
from convd.errors import Cancelled, CorruptImage
from convd.inspection import open_regular
from convd.pipeline.item import Item
from convd.pipeline.spool import EXPECT
from convd.protocol import EXPECT_PREFIX

if TYPE_CHECKING:
    from convd.pipeline.context import Context

__all__ = ["verify"]


def _expectation(item: Item) -> dict[str, Any]:
    """What the claim took from ``incoming/.convd-expect.NAME`` (see ``Spool._take_expectation``)."""
    if item.claim.source_path is not None:
        return {}  # `convd convert`: no spool, no expectation
    try:
        state = json.loads((item.claim.dir / EXPECT).read_bytes())
    except FileNotFoundError:
        return {}
    if "unreadable" in state:
        raise CorruptImage(f"the expectation {EXPECT_PREFIX}{item.name} cannot be used: {state['unreadable']}; "
                           "the bytes are kept as dropped, unchecked")
    return dict(state.get("expect") or {})


async def verify(item: Item, ctx: Context) -> None:
    """Set ``item.source_checksums``; raise ``CorruptImage`` when the bytes are not what the
    producer stated (the message gives the stated and the received value).  Once per item:
    a retry does not read the file again."""
    if item.source_checksums is not None:
        return
    expect = await anyio.to_thread.run_sync(_expectation, item)
    algorithms = list(dict.fromkeys([*item.cfg.checksum.algorithms, *(k for k in expect if k != "size")]))

    def on_bytes(n: int) -> None:  # from the hashing thread
        if item.withdrawn is not None:
            raise Cancelled(item.withdrawn)
        ctx.count_hashed(n)

    def read() -> tuple[int, dict[str, str]] | None:
        if not stat.S_ISREG(os.lstat(item.claim.dropped).st_mode):
            return None  # not a file: detect rejects it, in its own words
        fd = open_regular(item.claim.dropped)
        try:
            return os.fstat(fd).st_size, digest_file(fd, algorithms, on_bytes, ctx.stop)
        finally:
            os.close(fd)

    got = await anyio.to_thread.run_sync(read)
    if got is None:
        return
    size, sums = got
    item.source_checksums = sums
    if "size" in expect and expect["size"] != size:
        item.source = {"format": None, "size": size}
        raise CorruptImage(f"{item.label}: the producer stated size {expect['size']} bytes; "
                           f"{size} bytes were received")
    for algo, stated in expect.items():
        if algo != "size" and sums[algo] != stated:
            item.source = {"format": None, "size": size}
            raise CorruptImage(f"{item.label}: the producer stated {algo} {stated}; "
                               f"the bytes received have {algo} {sums[algo]}")
