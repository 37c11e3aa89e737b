"""Adaptive mode on a real Redis: a near entry is explored, and the fresh answer
stored with the exploration's id teaches that entry whether it was right."""

from __future__ import annotations

import json

import redis.asyncio as aioredis

from orchestra.cache.v1 import cache_service_pb2
from services.cache.keyspace import entry_key
from tests.cache.builders import answer, conversation, key, store_request
from tests.cache.conftest import StartCache, Stub

Metadata = list[tuple[str, str]]
ADAPTIVE = {
    "ORCHESTRA_CACHE_SEMANTIC_MODE": "adaptive",
    "ORCHESTRA_CACHE_WRONG_ANSWER_BOUND": "0.02",
}
QUESTION = "What is the best way to improve my English speaking in 30 days?"
PARAPHRASE = "How can I improve my spoken English in 30 days?"


async def _explore(stub: Stub, internal: Metadata) -> str:
    """Looks the paraphrase up until the policy explores (it serves rarely while
    the entry has no record); returns the explored entry's id."""
    for _ in range(200):
        reply = await stub.Lookup(
            cache_service_pb2.LookupRequest(key=key(messages=conversation(PARAPHRASE))),
            metadata=internal,
        )
        if reply.explored_entry_id:
            assert not reply.hit
            return str(reply.explored_entry_id)
    raise AssertionError("the adaptive policy never explored a fresh entry")


async def _state(redis_client: aioredis.Redis, entry_id: str, tenant: str = "acme") -> dict:  # type: ignore[type-arg]
    raw = await redis_client.hget(entry_key(tenant, entry_id), "adapt")
    return json.loads(raw) if raw else {}


async def test_an_exploration_teaches_the_entry_it_agreed(
    start_cache: StartCache, internal: Metadata, redis_client: aioredis.Redis
) -> None:
    stub = await start_cache(env=ADAPTIVE)
    stored = await stub.Store(
        store_request(key(messages=conversation(QUESTION)), answer("Speak every day.")),
        metadata=internal,
    )

    explored = await _explore(stub, internal)
    assert explored == stored.entry_id
    await stub.Store(
        store_request(
            key(messages=conversation(PARAPHRASE)),
            answer("Speak every day."),
            request_id="req-2",
            explored_entry_id=explored,
        ),
        metadata=internal,
    )

    state = await _state(redis_client, explored)
    assert [label for _, label in state["obs"]] == [1]
    assert state["explored"] == 1


async def test_a_different_fresh_answer_is_recorded_as_a_wrong_one(
    start_cache: StartCache, internal: Metadata, redis_client: aioredis.Redis
) -> None:
    stub = await start_cache(env=ADAPTIVE)
    await stub.Store(
        store_request(key(messages=conversation(QUESTION)), answer("Speak every day.")),
        metadata=internal,
    )
    explored = await _explore(stub, internal)

    await stub.Store(
        store_request(
            key(messages=conversation(PARAPHRASE)),
            answer("It takes 90 days, not 30."),
            request_id="req-2",
            explored_entry_id=explored,
        ),
        metadata=internal,
    )

    assert [label for _, label in (await _state(redis_client, explored))["obs"]] == [0]


async def test_another_tenants_exploration_id_is_ignored(
    start_cache: StartCache, internal: Metadata, redis_client: aioredis.Redis
) -> None:
    stub = await start_cache(env=ADAPTIVE)
    await stub.Store(
        store_request(key(messages=conversation(QUESTION)), answer("Speak every day.")),
        metadata=internal,
    )
    explored = await _explore(stub, internal)

    await stub.Store(
        store_request(
            key(tenant="globex", messages=conversation(PARAPHRASE)),
            answer("Something else entirely."),
            request_id="req-2",
            explored_entry_id=explored,
        ),
        metadata=internal,
    )

    assert await _state(redis_client, explored) == {}
