"""Group commit: concurrent submits share one flush; errors reach every waiter."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from services.budget.batching import Batcher, CoalescedScript


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


_COUNT = """
if ARGV[1] == 'fail' then return redis.error_reply('refused') end
return redis.call('INCR', KEYS[1])
"""


async def _connections(redis: aioredis.Redis) -> int:
    info = await redis.info("clients")
    return int(info["connected_clients"])


async def test_concurrent_script_calls_share_round_trips_and_run_one_by_one(
    redis_client: aioredis.Redis, redis_url: str
) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        script = CoalescedScript(client, _COUNT)
        before = await _connections(redis_client)
        replies = await asyncio.gather(*(script(["n"], ["ok"]) for _ in range(200)))
        # Each call ran atomically: every count from 1 to 200 once.
        assert sorted(int(r) for r in replies) == list(range(1, 201))
        # One call alone, then the rest in a pipeline or two: a handful of
        # connections, not one per concurrent call.
        assert await _connections(redis_client) - before <= 3
    finally:
        await client.aclose()


async def test_a_script_error_reaches_its_caller_only_and_flushed_scripts_load_again(
    redis_client: aioredis.Redis, redis_url: str
) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        script = CoalescedScript(client, _COUNT)
        await script(["n"], ["ok"])  # loaded
        await redis_client.script_flush()  # as after a Redis restart
        calls = [script(["n"], ["fail" if i == 3 else "ok"]) for i in range(8)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        counts = [int(r) for r in results if not isinstance(r, BaseException)]
        assert len(failed) == 1 and isinstance(failed[0], ResponseError)
        assert "refused" in str(failed[0])
        assert sorted(counts) == list(range(2, 9))
    finally:
        await client.aclose()
