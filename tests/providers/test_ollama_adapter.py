"""The Ollama adapter against the fake Ollama upstream."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from orchestra.common.v1 import chat_pb2
from services.providers.base import FailureKind, Finish, ToolCallDelta, UsageReport
from services.providers.ollama import OllamaAdapter, request_body
from tests.fakes.faults import Fault
from tests.fakes.ollama_upstream import FakeOllama, ScriptedToolCall
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

MODEL = "llama3.2:latest"


@pytest.fixture
async def fake() -> AsyncIterator[FakeOllama]:
    async with FakeOllama(chunks=4) as server:
        yield server


@pytest.fixture
async def adapter(fake: FakeOllama) -> AsyncIterator[OllamaAdapter]:
    client = OllamaAdapter("ollama", fake.url, read_timeout=READ_TIMEOUT)
    yield client
    await client.aclose()


async def test_text_stream_and_usage(adapter: OllamaAdapter, fake: FakeOllama) -> None:
    events, error = await collect(adapter, request(MODEL, temperature=0.5, seed=7, stop=["zzz"]))
    assert error is None and text_of(events) == TEXT
    assert events[-2:-1] == [Finish(chat_pb2.FINISH_REASON_STOP)]
    (usage,) = [e for e in events if isinstance(e, UsageReport)]
    assert usage.completion_tokens == 4 and usage.prompt_tokens > 0
    (sent,) = fake.requests
    assert sent.path == "/api/chat"
    assert sent.body == {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi there."},
        ],
        "stream": True,
        "options": {"temperature": 0.5, "num_predict": 64, "seed": 7, "stop": ["zzz"]},
    }


async def test_num_predict_is_length(adapter: OllamaAdapter) -> None:
    events, error = await collect(adapter, request(MODEL, max_tokens=2))
    assert error is None and Finish(chat_pb2.FINISH_REASON_LENGTH) in events


async def test_tool_calls(adapter: OllamaAdapter, fake: FakeOllama) -> None:
    fake.tool_calls = [ScriptedToolCall("get_weather", '{"city": "Paris"}')]
    events, error = await collect(adapter, request(MODEL, tools=[weather_tool()]))
    assert error is None
    (call,) = [e for e in events if isinstance(e, ToolCallDelta)]
    assert call.index == 0 and call.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(arguments_of(events)) == {"city": "Paris"}
    assert Finish(chat_pb2.FINISH_REASON_TOOL_CALLS) in events  # Ollama itself says "stop"
    body = fake.requests[0].body
    assert body is not None and body["tools"][0]["function"]["name"] == "get_weather"


def test_tool_results_and_json_mode() -> None:
    call = chat_pb2.ToolCall(id="c1", name="get_weather", arguments='{"city": "Paris"}')
    conversation = [
        message(chat_pb2.ROLE_USER, "Weather?"),
        message(chat_pb2.ROLE_ASSISTANT, tool_calls=[call]),
        message(chat_pb2.ROLE_TOOL, "sunny", tool_call_id="c1"),
    ]
    upstream = request(MODEL, messages=conversation, response_format={"type": 2})
    body = request_body(upstream)
    assert body["messages"][1:] == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
    ]
    assert body["format"] == "json"


@pytest.mark.parametrize("case", FAULT_CASES, ids=FAULT_IDS)
async def test_faults(adapter: OllamaAdapter, fake: FakeOllama, case: FaultCase) -> None:
    fake.set_fault(case.fault, times=1)
    events, error = await collect(adapter, request(MODEL))
    assert error is not None and error.kind is case.kind
    assert error.status == case.status
    assert bool(text_of(events)) is case.streamed_first
    if case.fault.retry_after is not None:
        assert error.retry_after == case.fault.retry_after


async def test_unknown_model_is_client_error(adapter: OllamaAdapter) -> None:
    _, error = await collect(adapter, request("nope:1b"))
    assert error is not None and error.kind is FailureKind.CLIENT_ERROR and error.status == 404
    assert "try pulling it first" in str(error)


async def test_slow_first_token_still_answers(adapter: OllamaAdapter, fake: FakeOllama) -> None:
    fake.set_fault(Fault.slow_first_token(delay=0.1), times=1)
    events, error = await collect(adapter, request(MODEL))
    assert error is None and text_of(events) == TEXT


async def test_connect_refused(adapter: OllamaAdapter, fake: FakeOllama) -> None:
    await fake.refuse_connections()
    _, error = await collect(adapter, request(MODEL))
    assert error is not None and error.kind is FailureKind.CONNECT


async def test_cancel_closes_the_upstream_stream(fake: FakeOllama, adapter: OllamaAdapter) -> None:
    fake.chunk_delay = 0.05
    stream = adapter.stream(request(MODEL))
    async for _ in stream:
        break
    await stream.aclose()  # type: ignore[attr-defined]
    assert await fake.wait_for_streams_closed()
    assert fake.requests[0].client_disconnected
