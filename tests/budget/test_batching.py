"""Group commit: concurrent submits share one flush; errors reach every waiter."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from services.budget.batching import Batcher


async def test_concurrent_items_share_flushes_and_get_their_own_results() -> None:
    flushes: list[list[int]] = []

    async def flush(items: Sequence[int]) -> list[int]:
        flushes.append(list(items))
        await asyncio.sleep(0.01)  # a write in flight: later items queue behind it
        return [i * 10 for i in items]

    batcher: Batcher[int, int] = Batcher(flush, max_batch=40)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(100)))
    assert results == [i * 10 for i in range(100)]
    assert len(flushes) < 10 and max(len(f) for f in flushes) <= 40
    assert sorted(i for f in flushes for i in f) == list(range(100))


async def test_a_failed_flush_fails_its_batch_only() -> None:
    async def flush(items: Sequence[int]) -> list[int]:
        await asyncio.sleep(0.01)
        if 3 in items:
            raise ConnectionError("store down")
        return list(items)

    batcher: Batcher[int, int] = Batcher(flush)
    first = asyncio.ensure_future(batcher.submit(1))
    await asyncio.sleep(0)  # 1 is being written; 2 and 3 wait together
    rest = [asyncio.ensure_future(batcher.submit(i)) for i in (2, 3)]
    assert await first == 1
    for waiter in rest:
        with pytest.raises(ConnectionError):
            await waiter
    assert await batcher.submit(4) == 4  # the batcher goes on
