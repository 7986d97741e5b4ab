"""The rate_limit budget's split (convd.bandwidth): who gets what share, in what order.

The budget is the daemon's own bookkeeping, so it is exercised directly;
what qemu-img does with its -r is shown end to end in test_layout.py and
measured by the bench.  No timing is asserted.
"""

from __future__ import annotations

import anyio
import pytest

from convd.bandwidth import Bandwidth

pytestmark = pytest.mark.anyio

MiB = 1 << 20


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_conversions_that_start_together_split_the_budget_evenly() -> None:
    bw = Bandwidth(48 * MiB)
    got: list[int] = []
    release = anyio.Event()

    async def consumer() -> None:
        async with bw.share(expected=4) as rate:
            got.append(rate)
            await release.wait()

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(consumer)
        while len(got) < 4:
            await anyio.sleep(0)
        assert got == [12 * MiB] * 4
        assert bw.in_use == 48 * MiB
        release.set()
    assert bw.in_use == 0


async def test_a_newcomer_waits_until_the_budget_it_needs_is_returned() -> None:
    bw = Bandwidth(40 * MiB)
    order: list[str] = []
    first_done = anyio.Event()

    async def first() -> None:
        async with bw.share() as rate:
            order.append(f"first {rate // MiB}")
            await first_done.wait()
        order.append("first ended")

    async def second() -> None:
        async with bw.share() as rate:
            order.append(f"second {rate // MiB}")
            assert bw.in_use <= bw.limit

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        while not order:
            await anyio.sleep(0)
        tg.start_soon(second)
        for _ in range(10):
            await anyio.sleep(0)
        # The first holds the whole budget: the second may not start beside it.
        assert order == ["first 40"]
        first_done.set()
    assert order == ["first 40", "first ended", "second 40"]


async def test_no_limit_grants_zero_meaning_unlimited_and_holds_nothing() -> None:
    bw = Bandwidth(0)
    async with bw.share(expected=3) as rate:
        assert rate == 0
        assert bw.in_use == 0


async def test_a_lower_cap_applies_to_shares_granted_after_it() -> None:
    bw = Bandwidth(40 * MiB)
    async with bw.share() as old:
        bw.set_limit(0)
        async with bw.share() as new:
            assert (old, new) == (40 * MiB, 0)
    bw.set_limit(8 * MiB)
    async with bw.share() as rate:
        assert rate == 8 * MiB
