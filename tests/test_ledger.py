"""The space ledger: budget and real free space, and no starvation of a big item."""

from __future__ import annotations

import anyio
import pytest

from convd.pipeline.ledger import Ledger


class FakeSpace:
    """Stands in for statvfs: the unit test needs exact, controllable free space."""

    def __init__(self, free: int, total: int) -> None:
        self._free, self._total = free, total

    def free(self) -> int:
        return self._free

    def total(self) -> int:
        return self._total


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_reservations_never_exceed_the_workspace():
    ledger = Ledger(workspace=100, min_free=0, space=FakeSpace(10**9, 10**9))
    await ledger.reserve("a", 60)
    admitted = []

    async def second():
        await ledger.reserve("b", 60)
        admitted.append("b")

    async with anyio.create_task_group() as tg:
        tg.start_soon(second)
        await anyio.sleep(0.05)
        assert admitted == [] and ledger.reserved == 60
        ledger.release("a")
        await anyio.sleep(0.05)
    assert admitted == ["b"] and ledger.reserved == 60


@pytest.mark.anyio
async def test_free_space_less_min_free_limits_admission():
    space = FakeSpace(free=150, total=1000)
    ledger = Ledger(workspace=10**6, min_free=100, space=space)
    assert ledger.available() == 50
    assert ledger.could_ever_fit(900) and not ledger.could_ever_fit(901)
    with anyio.move_on_after(0.2):
        await ledger.reserve("x", 60)
    assert "x" not in ledger.active and ledger.waiting == []  # cancelled cleanly
    space._free = 200
    await ledger.reserve("x", 60)
    assert ledger.reserved == 60


@pytest.mark.anyio
async def test_big_item_is_not_starved_by_a_stream_of_small_ones():
    ledger = Ledger(workspace=100, min_free=0, space=FakeSpace(10**9, 10**9), max_bypass=4)
    order: list[str] = []
    await ledger.reserve("hold", 30)

    async def want(key: str, size: int, hold: float) -> None:
        await ledger.reserve(key, size)
        order.append(key)
        await anyio.sleep(hold)
        ledger.release(key)

    async with anyio.create_task_group() as tg:
        tg.start_soon(want, "big", 80, 0.01)
        await anyio.sleep(0.01)
        for i in range(20):  # a steady stream of small items
            tg.start_soon(want, f"s{i}", 10, 0.05)
            await anyio.sleep(0.005)
        await anyio.sleep(0.1)
        ledger.release("hold")
    big_at = order.index("big")
    assert big_at <= ledger.max_bypass, order
    assert len(order) == 21
