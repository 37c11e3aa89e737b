"""The Anthropic adapter against the fake Anthropic upstream."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from orchestra.common.v1 import chat_pb2
from services.providers.anthropic import AnthropicAdapter, request_body
from services.providers.base import Finish, ToolCallDelta, UsageReport
from tests.fakes.anthropic_upstream import FakeAnthropic, ScriptedToolCall
from tests.fakes.faults import Fault
from tests.providers.common import (
    FAULT_CASES,
    FAULT_IDS,
    READ_TIMEOUT,
    TEXT,
    FaultCase,
    arguments_of,
    collect,
    message,
    request,
    text_of,
    weather_tool,
)

KEY = "sk-ant-test-0123456789"
MODEL = "claude-haiku-4-5"


@pytest.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropic(api_key=KEY, chunks=4) as server:
        yield server


@pytest.fixture
async def adapter(fake: FakeAnthropic) -> AsyncIterator[AnthropicAdapter]:
    client = AnthropicAdapter("anthropic", fake.url, credential=KEY, read_timeout=READ_TIMEOUT)
    yield client
    await client.aclose()


async def test_text_stream_and_usage(adapter: AnthropicAdapter, fake: FakeAnthropic) -> None:
    events, error = await collect(adapter, request(MODEL, temperature=0.5, stop=["zzz"]))
    assert error is None
    assert text_of(events) == TEXT
    assert [e for e in events if isinstance(e, Finish)] == [Finish(chat_pb2.FINISH_REASON_STOP)]
    (usage,) = [e for e in events if isinstance(e, UsageReport)]
    assert usage.completion_tokens == 4 and usage.prompt_tokens > 0
    (sent,) = fake.requests
    assert sent.path == "/v1/messages"
    assert sent.headers["x-api-key"] == KEY and sent.headers["anthropic-version"] == "2023-06-01"
    assert sent.body == {
        "model": MODEL,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi there."}]}],
        "stream": True,
        "system": "Be brief.",
        "temperature": 0.5,
        "stop_sequences": ["zzz"],
    }


async def test_max_tokens_is_length(adapter: AnthropicAdapter) -> None:
    events, error = await collect(adapter, request(MODEL, max_tokens=2))
    assert error is None and Finish(chat_pb2.FINISH_REASON_LENGTH) in events
    assert [e.completion_tokens for e in events if isinstance(e, UsageReport)] == [2]


async def test_tool_use_stream(adapter: AnthropicAdapter, fake: FakeAnthropic) -> None:
    fake.tool_calls = [ScriptedToolCall("get_weather", '{"city": "Paris"}')]
    events, error = await collect(adapter, request(MODEL, tools=[weather_tool()]))
    assert error is None
    head = next(e for e in events if isinstance(e, ToolCallDelta))
    assert head.index == 0 and head.name == "get_weather" and head.id.startswith("toolu_")
    assert json.loads(arguments_of(events)) == {"city": "Paris"}
    assert Finish(chat_pb2.FINISH_REASON_TOOL_CALLS) in events
    body = fake.requests[0].body
    assert body is not None and body["tools"] == [
        {
            "name": "get_weather",
            "description": "Weather for a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
        }
    ]


def test_tool_results_become_user_blocks() -> None:
    call = chat_pb2.ToolCall(id="toolu_1", name="get_weather", arguments='{"city": "Paris"}')
    conversation = [
        message(chat_pb2.ROLE_USER, "Weather?"),
        message(chat_pb2.ROLE_ASSISTANT, "Looking.", tool_calls=[call]),
        message(chat_pb2.ROLE_TOOL, "sunny", tool_call_id="toolu_1"),
    ]
    body = request_body(request(MODEL, messages=conversation))
    assert "system" not in body
    assert body["messages"][1:] == [
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Looking."},
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
            ],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}],
        },
    ]


async def test_sdk_accepts_a_tool_result_conversation(adapter: AnthropicAdapter) -> None:
    call = chat_pb2.ToolCall(id="toolu_1", name="get_weather", arguments="{}")
    conversation = [
        message(chat_pb2.ROLE_USER, "Weather?"),
        message(chat_pb2.ROLE_ASSISTANT, tool_calls=[call]),
        message(chat_pb2.ROLE_TOOL, "sunny", tool_call_id="toolu_1"),
    ]
    events, error = await collect(adapter, request(MODEL, messages=conversation))
    assert error is None and text_of(events) == TEXT


@pytest.mark.parametrize("case", FAULT_CASES, ids=FAULT_IDS)
async def test_faults(adapter: AnthropicAdapter, fake: FakeAnthropic, case: FaultCase) -> None:
    fake.set_fault(case.fault, times=1)
    events, error = await collect(adapter, request(MODEL))
    assert error is not None and error.kind is case.kind
    assert error.status == case.status
    assert bool(text_of(events)) is case.streamed_first
    if case.fault.retry_after is not None:
        assert error.retry_after == case.fault.retry_after


async def test_overloaded_529_is_server_error(
    adapter: AnthropicAdapter, fake: FakeAnthropic
) -> None:
    fake.set_fault(Fault.http_error(529), times=1)
    _, error = await collect(adapter, request(MODEL))
    assert error is not None and error.retryable and error.status == 529
    assert "overloaded_error" in str(error)


async def test_slow_first_token_still_answers(
    adapter: AnthropicAdapter, fake: FakeAnthropic
) -> None:
    fake.set_fault(Fault.slow_first_token(delay=0.1), times=1)
    events, error = await collect(adapter, request(MODEL))
    assert error is None and text_of(events) == TEXT


async def test_connect_refused(adapter: AnthropicAdapter, fake: FakeAnthropic) -> None:
    await fake.refuse_connections()
    _, error = await collect(adapter, request(MODEL))
    assert error is not None and error.kind.value == "connect"


async def test_unknown_model_and_bad_key(fake: FakeAnthropic) -> None:
    wrong = AnthropicAdapter("anthropic", fake.url, credential="nope")
    _, error = await collect(wrong, request(MODEL))
    await wrong.aclose()
    assert error is not None and error.status == 401 and "authentication_error" in str(error)


async def test_cancel_closes_the_upstream_stream(
    fake: FakeAnthropic, adapter: AnthropicAdapter
) -> None:
    fake.chunk_delay = 0.05
    stream = adapter.stream(request(MODEL))
    async for _ in stream:
        break
    await stream.aclose()  # type: ignore[attr-defined]
    assert await fake.wait_for_streams_closed()
    assert fake.requests[0].client_disconnected
