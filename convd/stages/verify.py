"""Verify, in unpack: the dropped bytes against the producer's expectation (contract
section 8), and their digests for the record's ``source.checksums``, of the file as
dropped (for a container, the container file).

The digests come from a read convd makes anyway where it can: unpacking a
compressed stream reads the whole container in order (``containers.unpack``'s
``tap``).  Otherwise (a plain disk, a tar read by seeking, an unpack that
stopped early) they cost one read of their own: before converting when the
expectation states a digest (the contract checks stated values first),
else beside the conversion (:func:`beside`), where the other core is
mostly idle, and not on the item's critical path.  The bytes are in
convd's custody from unpack on (no producer can change them), so a digest
taken later is of the same bytes.  An item that fails first gets them at
its quarantine (:func:`settle`): a record in ``failed/`` has them too.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import stat
import threading
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

import anyio

from convd.checksum import digest_file
from convd.errors import Cancelled, CorruptImage, Stopped
from convd.image.inspection import open_regular
from convd.pipeline.item import Item
from convd.pipeline.layout import EXPECT
from convd.pipeline.sidecars import taken_sidecar
from convd.protocol import EXPECT_PREFIX

if TYPE_CHECKING:
    from convd.pipeline.context import Context

__all__ = ["Verifier", "begin", "beside", "settle"]


def _expectation(item: Item) -> dict[str, Any]:
    """What the claim took from ``incoming/.convd-expect.NAME`` (see ``Spool._take_sidecars``)."""
    if item.claim.source_path is not None:
        return {}  # `convd convert`: no spool, no expectation
    state = taken_sidecar(item.claim, EXPECT)
    if state is None:
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
        then the check.  Sets ``item.source_checksums``; raises ``CorruptImage`` on a mismatch.

        With nothing stated but the size (checked already), the read is left
        for :func:`beside` (``item.source_digests_due``)."""
        if self._fed == self.size:
            sums = {a: h.hexdigest() for a, h in zip(self.algorithms, self._hashers)}
        elif set(self.expect) <= {"size"}:
            self.item.source_digests_due = tuple(self.algorithms)
            self._check({})  # the size
            return
        else:
            sums = await anyio.to_thread.run_sync(_read, self.item, self.ctx, self.algorithms, None)
        self.item.source_checksums = sums
        self._check(sums)

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


def _read(item: Item, ctx: Context, algorithms: Sequence[str], abandon: threading.Event | None) -> dict[str, str]:
    """The dropped file's digests (blocking); ``Cancelled`` once withdrawn or ``abandon`` is set."""

    def poll() -> None:  # from the hashing thread, before each buffer
        if item.withdrawn is not None:
            raise Cancelled(item.withdrawn)
        if abandon is not None and abandon.is_set():
            raise Cancelled("the conversion beside it ended first")

    fd = open_regular(item.claim.dropped)
    try:
        return digest_file(fd, algorithms, ctx.count_hashed, ctx.stop, poll)
    finally:
        os.close(fd)


@contextlib.asynccontextmanager
async def beside(item: Item, ctx: Context) -> AsyncIterator[None]:
    """Take the digests still due (``item.source_digests_due``) while the body runs.

    Used around ``qemu-img convert``: both read the same custody-held bytes,
    mostly from the page cache.  The body's outcome wins: if it fails, the
    read is abandoned (the item's quarantine takes the digests, see
    :func:`settle`); if the read fails (withdrawn, shutdown), that error
    is raised once the body is done.
    """
    algorithms = item.source_digests_due
    if algorithms is None:
        yield
        return
    abandon = threading.Event()
    # A thread of the loop's executor, not a task group: the body's own
    # exception must reach the stage as it is (a task group would wrap it).
    reading = asyncio.get_running_loop().run_in_executor(None, _read, item, ctx, algorithms, abandon)
    try:
        yield
        sums = await reading
    except BaseException:
        abandon.set()  # the thread ends at its next buffer; its outcome is not wanted
        reading.add_done_callback(lambda f: f.cancelled() or f.exception())
        raise
    item.source_checksums = sums
    item.source_digests_due = None


async def settle(item: Item, ctx: Context, *, failing: bool = False) -> None:
    """Take the digests still due now (a passthrough, which converts nothing; an item
    that failed before converting).  ``failing``: for a record in ``failed/``,
    where a digest that cannot be taken (withdrawn, shutdown, gone) is left out."""
    algorithms = item.source_digests_due
    if algorithms is None:
        return
    try:
        item.source_checksums = await anyio.to_thread.run_sync(_read, item, ctx, algorithms, None)
    except (Cancelled, Stopped, OSError):
        if not failing:
            raise
    item.source_digests_due = None
