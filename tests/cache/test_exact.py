"""Store then Lookup through the real servicer: what hits, what misses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from orchestra.cache.v1 import cache_service_pb2
from orchestra.common.v1 import chat_pb2
from tests.cache.builders import (
    QUESTION,
    SYSTEM,
    answer,
    conversation,
    key,
    lookup_request,
    store_request,
    text_message,
)
from tests.cache.conftest import StartCache, Stub

Metadata = list[tuple[str, str]]


async def test_store_then_lookup_hits(stub: Stub, internal: Metadata) -> None:
    stored = await stub.Store(store_request(), metadata=internal)
    assert stored.stored
    assert len(stored.entry_id) == 64

    found = await stub.Lookup(lookup_request(key()), metadata=internal)

    assert found.hit
    assert found.match_kind == cache_service_pb2.MATCH_KIND_EXACT
    assert found.entry_id == stored.entry_id
    assert found.answer == answer()
    assert found.similarity == 1.0


async def test_lookup_before_store_misses(stub: Stub, internal: Metadata) -> None:
    found = await stub.Lookup(lookup_request(key()), metadata=internal)
    assert not found.hit
    assert found.match_kind == cache_service_pb2.MATCH_KIND_UNSPECIFIED
    assert not found.HasField("answer")


@pytest.mark.parametrize(
    "question",
    [
        "What is  the capital of France?",
        "  What is the capital of France?\n",
        "What is the capital of France?\r\n",
        "What is\tthe capital\u00a0of France?   ",
        "\n\nWhat is the capital of France?\n\n\n",
    ],
)
async def test_whitespace_only_differences_hit(
    stub: Stub, internal: Metadata, question: str
) -> None:
    await stub.Store(store_request(key(messages=conversation(QUESTION))), metadata=internal)

    found = await stub.Lookup(
        lookup_request(key(messages=conversation(question))), metadata=internal
    )

    assert found.hit


def _agent(call_id: str) -> list[chat_pb2.Message]:
    return [
        text_message(chat_pb2.ROLE_USER, "Weather in Paris?"),
        chat_pb2.Message(
            role=chat_pb2.ROLE_ASSISTANT,
            tool_calls=[
                chat_pb2.ToolCall(id=call_id, name="weather", arguments='{"city":"Paris"}')
            ],
        ),
        chat_pb2.Message(
            role=chat_pb2.ROLE_TOOL,
            tool_call_id=call_id,
            content=[chat_pb2.ContentPart(text="18C")],
        ),
    ]


@pytest.mark.parametrize(
    ("stored_key", "looked_up_key"),
    [
        pytest.param(key(stop=["b", "a"]), key(stop=["a", "b"]), id="stop-order"),
        pytest.param(
            key(),
            key(response_format=chat_pb2.ResponseFormat(type=chat_pb2.RESPONSE_FORMAT_TYPE_TEXT)),
            id="text-format-explicit",
        ),
        pytest.param(key(messages=_agent("call_1")), key(messages=_agent("call_9")), id="call-ids"),
        pytest.param(key(temperature=0.3), key(temperature=0.30000001), id="float32-noise"),
    ],
)
async def test_equivalent_requests_hit(
    stub: Stub,
    internal: Metadata,
    stored_key: cache_service_pb2.CacheKey,
    looked_up_key: cache_service_pb2.CacheKey,
) -> None:
    await stub.Store(store_request(stored_key), metadata=internal)
    assert (await stub.Lookup(lookup_request(looked_up_key), metadata=internal)).hit


def _with_earlier_turn(previous_answer: str) -> list[chat_pb2.Message]:
    return [
        text_message(chat_pb2.ROLE_SYSTEM, SYSTEM),
        text_message(chat_pb2.ROLE_USER, "Hi"),
        text_message(chat_pb2.ROLE_ASSISTANT, previous_answer),
        text_message(chat_pb2.ROLE_USER, QUESTION),
    ]


def _with_image(url: str) -> list[chat_pb2.Message]:
    part = chat_pb2.ContentPart(image_url=chat_pb2.ImageUrl(url=url))
    return [chat_pb2.Message(role=chat_pb2.ROLE_USER, content=[part])]


def _with_tool() -> cache_service_pb2.CacheKey:
    changed = key()
    changed.tools.add().function.name = "weather"
    return changed


_MISSES: list[Any] = [
    pytest.param(key(temperature=0.2), id="temperature"),
    pytest.param(
        cache_service_pb2.CacheKey(
            tenant_id="acme", model="openai/gpt-4o-mini", messages=conversation()
        ),
        id="temperature-unset",
    ),
    pytest.param(key(top_p=0.9), id="top_p"),
    pytest.param(key(max_tokens=100), id="max_tokens"),
    pytest.param(key(stop=["\n"]), id="stop"),
    pytest.param(key(seed=7), id="seed"),
    pytest.param(key(presence_penalty=0.5), id="presence_penalty"),
    pytest.param(key(frequency_penalty=0.5), id="frequency_penalty"),
    pytest.param(
        key(
            response_format=chat_pb2.ResponseFormat(type=chat_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT)
        ),
        id="response_format",
    ),
    pytest.param(key(model="openai/gpt-4o"), id="model"),
    pytest.param(key(messages=conversation(system="You are a pirate.")), id="system-prompt"),
    pytest.param(
        key(messages=conversation(question="What is the capital of Spain?")), id="question"
    ),
    pytest.param(key(messages=conversation(question="what is the capital of france?")), id="case"),
    pytest.param(key(messages=conversation()[1:]), id="no-system-prompt"),
    pytest.param(_with_tool(), id="tools"),
]


@pytest.mark.parametrize("other", _MISSES)
async def test_any_change_of_scope_misses(
    stub: Stub, internal: Metadata, other: cache_service_pb2.CacheKey
) -> None:
    await stub.Store(store_request(key()), metadata=internal)

    assert not (await stub.Lookup(lookup_request(other), metadata=internal)).hit
    assert (await stub.Lookup(lookup_request(key()), metadata=internal)).hit


async def test_an_earlier_turn_is_part_of_the_key(stub: Stub, internal: Metadata) -> None:
    await stub.Store(store_request(key(messages=_with_earlier_turn("Hello!"))), metadata=internal)

    other = key(messages=_with_earlier_turn("Hello there!"))
    assert not (await stub.Lookup(lookup_request(other), metadata=internal)).hit


async def test_code_indentation_is_not_whitespace_noise(stub: Stub, internal: Metadata) -> None:
    nested = "Fix:\nif x:\n    if y:\n        go()"
    flat = "Fix:\nif x:\n    if y:\n    go()"
    await stub.Store(store_request(key(messages=conversation(nested))), metadata=internal)

    assert not (
        await stub.Lookup(lookup_request(key(messages=conversation(flat))), metadata=internal)
    ).hit


async def test_images_are_part_of_the_key(stub: Stub, internal: Metadata) -> None:
    await stub.Store(
        store_request(key(messages=_with_image("https://x.test/a.png"))), metadata=internal
    )

    other = key(messages=_with_image("https://x.test/b.png"))
    assert not (await stub.Lookup(lookup_request(other), metadata=internal)).hit
    same = key(messages=_with_image("https://x.test/a.png"))
    assert (await stub.Lookup(lookup_request(same), metadata=internal)).hit


async def test_store_is_idempotent(
    stub: Stub, internal: Metadata, as_caller: Callable[..., Metadata]
) -> None:
    first = await stub.Store(store_request(), metadata=internal)
    again = await stub.Store(store_request(), metadata=internal)  # an outbox retry

    assert again.stored and again.entry_id == first.entry_id
    stats = await stub.GetCacheStats(
        cache_service_pb2.GetCacheStatsRequest(), metadata=as_caller("acme", "read")
    )
    assert stats.stats.stores == 1
    assert stats.stats.entries == 1


async def test_a_fresh_answer_replaces_the_entry(stub: Stub, internal: Metadata) -> None:
    await stub.Store(store_request(cached=answer("Paris.")), metadata=internal)
    await stub.Store(
        store_request(cached=answer("Paris, France."), request_id="req-2"), metadata=internal
    )

    found = await stub.Lookup(lookup_request(key()), metadata=internal)
    assert found.answer.text == "Paris, France."


async def test_entries_expire_after_the_requested_ttl(
    stub: Stub, internal: Metadata, redis_client: Any
) -> None:
    stored = await stub.Store(store_request(ttl_seconds=120), metadata=internal)

    ttl = await redis_client.ttl(f"cache:{{acme}}:e:{stored.entry_id}")
    assert 0 < ttl <= 120


async def test_entries_get_the_default_ttl(
    stub: Stub, internal: Metadata, redis_client: Any
) -> None:
    stored = await stub.Store(store_request(), metadata=internal)

    ttl = await redis_client.ttl(f"cache:{{acme}}:e:{stored.entry_id}")
    assert 86_400 - 60 < ttl <= 86_400


async def test_default_ttl_is_configurable(
    start_cache: StartCache, internal: Metadata, redis_client: Any
) -> None:
    stub = await start_cache(env={"ORCHESTRA_CACHE_TTL_SECONDS": "600"})

    stored = await stub.Store(store_request(), metadata=internal)

    ttl = await redis_client.ttl(f"cache:{{acme}}:e:{stored.entry_id}")
    assert 0 < ttl <= 600


async def test_replicas_share_entries_and_a_restart_loses_nothing(
    start_cache: StartCache, internal: Metadata
) -> None:
    first = await start_cache()
    second = await start_cache()

    stored = await first.Store(store_request(), metadata=internal)
    seen = await second.Lookup(lookup_request(key()), metadata=internal)
    assert seen.hit and seen.entry_id == stored.entry_id

    restarted = await start_cache()  # a new process: nothing in memory
    again = await restarted.Lookup(lookup_request(key()), metadata=internal)
    assert again.hit and again.answer == answer()
