"""Verify, in unpack: the dropped bytes against the producer's expectation (contract
section 8), and their digests for the record's ``source.checksums``, of the file as
dropped (for a container, the container file).

The digests come from a read convd makes anyway where it can: unpacking a
compressed stream reads the whole container in order (``containers.unpack``'s
``tap``).  Otherwise (a plain disk, a tar read by seeking, an unpack that
stopped early) they cost one read of their own.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from typing import TYPE_CHECKING, Any

import anyio

from convd.checksum import digest_file
from convd.errors import Cancelled, CorruptImage
from convd.image.inspection import open_regular
from convd.pipeline.item import Item
from convd.pipeline.layout import EXPECT
from convd.protocol import EXPECT_PREFIX

if TYPE_CHECKING:
    from convd.pipeline.context import Context

__all__ = ["Verifier", "begin"]


def _expectation(item: Item) -> dict[str, Any]:
    """What the claim took from ``incoming/.convd-expect.NAME`` (see ``Spool._take_sidecars``)."""
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


class Verifier:
    """The digests of one item's dropped file, taken while it is unpacked or by a read of their own."""

    def __init__(self, item: Item, ctx: Context, expect: dict[str, Any], size: int) -> None:
        self.item, self.ctx, self.expect, self.size = item, ctx, expect, size
        self.algorithms = list(dict.fromkeys([*item.cfg.checksum.algorithms,
                                              *(k for k in expect if k != "size")]))
        self._hashers = [hashlib.new(a) for a in self.algorithms]
        self._fed = 0

    def feed(self, data: memoryview) -> None:
        """The container's next bytes, in order from byte 0 (``containers.unpack``'s tap)."""
        for h in self._hashers:
            h.update(data)
        self._fed += len(data)

    async def finish(self) -> None:
        """Digests from what was fed if that was the whole file, else from a read of their own;
        then the check.  Sets ``item.source_checksums``; raises ``CorruptImage`` on a mismatch."""
        if self._fed == self.size:
            sums = {a: h.hexdigest() for a, h in zip(self.algorithms, self._hashers)}
        else:
            sums = await anyio.to_thread.run_sync(self._read)
        self.item.source_checksums = sums
        self._check(sums)

    def _read(self) -> dict[str, str]:
        item, ctx = self.item, self.ctx

        def on_bytes(n: int) -> None:  # from the hashing thread
            if item.withdrawn is not None:
                raise Cancelled(item.withdrawn)
            ctx.count_hashed(n)

        fd = open_regular(item.claim.dropped)
        try:
            return digest_file(fd, self.algorithms, on_bytes, ctx.stop)
        finally:
            os.close(fd)

    def _check(self, sums: dict[str, str]) -> None:
        item = self.item
        stated = self.expect.get("size")
        if stated is not None and stated != self.size:
            item.source = {**item.source, "size": self.size}
            raise CorruptImage(f"{item.label}: the producer stated size {stated} bytes; "
                               f"{self.size} bytes were received")
        for algo, want in self.expect.items():
            if algo != "size" and sums[algo] != want:
                raise CorruptImage(f"{item.label}: the producer stated {algo} {want}; "
                                   f"the bytes received have {algo} {sums[algo]}")


async def begin(item: Item, ctx: Context) -> Verifier | None:
    """A verifier for the item's dropped file, or None when it was verified already (a retry)
    or is not a regular file (detect rejects it in its own words).  A size that differs from
    the stated one fails here, before anything is unpacked; so does an unusable expectation."""
    if item.source_checksums is not None:
        return None

    def look() -> tuple[dict[str, Any], int] | None:
        st = os.lstat(item.claim.dropped)
        try:
            expect = _expectation(item)
        except CorruptImage:
            if stat.S_ISREG(st.st_mode):
                item.source = {"format": None, "size": st.st_size}  # the record's, as for a mismatch
            raise
        return (expect, st.st_size) if stat.S_ISREG(st.st_mode) else None

    got = await anyio.to_thread.run_sync(look)
    if got is None:
        return None
    verifier = Verifier(item, ctx, *got)
    if "size" in verifier.expect and verifier.expect["size"] != verifier.size:
        item.source = {"format": None, "size": verifier.size}
        await verifier.finish()  # the record's digests, then the mismatch
    return verifier
