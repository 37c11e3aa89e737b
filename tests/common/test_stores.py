"""The Redis client: one server or a Redis Cluster, from the URL."""

from __future__ import annotations

import redis.asyncio as aioredis

from services.common.stores import connect_redis
from tests.conftest import CLUSTER


async def test_the_url_picks_one_server_or_a_cluster(redis_url: str) -> None:
    client = connect_redis(redis_url)
    try:
        if CLUSTER:  # ORCHESTRA_TEST_REDIS=cluster: the suites really run on three nodes
            assert redis_url.startswith("redis+cluster://")
            assert isinstance(client, aioredis.RedisCluster)
            await client.ping()
            assert len(client.get_primaries()) == 3
            # A key's hash tag decides its slot: one tenant's cache keys, or
            # every budget key, always land together.
            assert client.keyslot("{budget}:hold:a") == client.keyslot("{budget}:ctr:b:c")
        else:
            assert isinstance(client, aioredis.Redis)
            info = await client.info("cluster")
            assert info["cluster_enabled"] == 0
    finally:
        await client.aclose()
