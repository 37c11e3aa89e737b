"""Which answers Store refuses, and that refused answers are never served."""

from __future__ import annotations

from typing import Any

import pytest

from orchestra.cache.v1 import cache_service_pb2
from orchestra.common.v1 import chat_pb2
from tests.cache.builders import answer, conversation, key, lookup_request, store_request
from tests.cache.conftest import StartCache, Stub

Metadata = list[tuple[str, str]]

_UNSET_TEMPERATURE = cache_service_pb2.CacheKey(
    tenant_id="acme", model="openai/gpt-4o-mini", messages=conversation()
)


@pytest.mark.parametrize(
    ("cache_key", "cached", "reason"),
    [
        pytest.param(key(temperature=0.9), answer(), "temperature", id="hot"),
        pytest.param(key(temperature=0.51), answer(), "temperature", id="just-above-max"),
        pytest.param(
            key(),
            answer(tool_calls=[chat_pb2.ToolCall(id="c1", name="f", arguments="{}")]),
            "tool_calls",
            id="tool-calls",
        ),
        pytest.param(
            key(),
            answer(finish_reason=chat_pb2.FINISH_REASON_TOOL_CALLS),
            "tool_calls",
            id="finish-tools",
        ),
        pytest.param(
            key(), answer(finish_reason=chat_pb2.FINISH_REASON_ERROR), "error", id="error"
        ),
        pytest.param(
            key(),
            answer(finish_reason=chat_pb2.FINISH_REASON_CANCELLED),
            "cancelled",
            id="cancelled",
        ),
        pytest.param(
            key(),
            answer(finish_reason=chat_pb2.FINISH_REASON_CONTENT_FILTER),
            "content_filter",
            id="content-filter",
        ),
        pytest.param(
            key(),
            answer(finish_reason=chat_pb2.FINISH_REASON_UNSPECIFIED),
            "finish_unknown",
            id="finish-unknown",
        ),
        pytest.param(key(), answer(""), "empty_answer", id="empty"),
        pytest.param(key(), answer(" \n\t "), "empty_answer", id="blank"),
    ],
)
async def test_ineligible_answers_are_not_stored(
    stub: Stub,
    internal: Metadata,
    cache_key: cache_service_pb2.CacheKey,
    cached: cache_service_pb2.CachedAnswer,
    reason: str,
) -> None:
    result = await stub.Store(store_request(cache_key, cached), metadata=internal)

    assert not result.stored
    assert result.skip_reason == reason
    assert result.entry_id == ""
    assert not (await stub.Lookup(lookup_request(cache_key), metadata=internal)).hit


@pytest.mark.parametrize(
    ("cache_key", "cached"),
    [
        pytest.param(key(temperature=0.0), answer(), id="greedy"),
        pytest.param(key(temperature=0.5), answer(), id="at-max"),
        pytest.param(_UNSET_TEMPERATURE, answer(), id="temperature-unset"),
        pytest.param(key(), answer(finish_reason=chat_pb2.FINISH_REASON_LENGTH), id="length"),
    ],
)
async def test_eligible_answers_are_stored(
    stub: Stub,
    internal: Metadata,
    cache_key: cache_service_pb2.CacheKey,
    cached: cache_service_pb2.CachedAnswer,
) -> None:
    result = await stub.Store(store_request(cache_key, cached), metadata=internal)

    assert result.stored and result.skip_reason == ""
    assert (await stub.Lookup(lookup_request(cache_key), metadata=internal)).hit


@pytest.mark.parametrize(
    ("env", "cache_key", "cached", "reason"),
    [
        ({"ORCHESTRA_CACHE_MAX_TEMPERATURE": "0.2"}, key(temperature=0.3), answer(), "temperature"),
        (
            {"ORCHESTRA_CACHE_STORE_UNSET_TEMPERATURE": "false"},
            _UNSET_TEMPERATURE,
            answer(),
            "temperature",
        ),
        ({"ORCHESTRA_CACHE_MAX_ENTRY_BYTES": "100"}, key(), answer("x" * 200), "too_large"),
    ],
)
async def test_eligibility_is_configurable(
    start_cache: StartCache,
    internal: Metadata,
    env: dict[str, str],
    cache_key: cache_service_pb2.CacheKey,
    cached: cache_service_pb2.CachedAnswer,
    reason: str,
) -> None:
    stub = await start_cache(env=env)

    result = await stub.Store(store_request(cache_key, cached), metadata=internal)

    assert (result.stored, result.skip_reason) == (False, reason)


async def test_configured_max_temperature_still_stores_at_the_limit(
    start_cache: StartCache, internal: Metadata
) -> None:
    stub: Any = await start_cache(env={"ORCHESTRA_CACHE_MAX_TEMPERATURE": "0.3"})

    result = await stub.Store(store_request(key(temperature=0.3)), metadata=internal)

    assert result.stored
