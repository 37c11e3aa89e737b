"""The Gemini adapter against the fake Gemini upstream."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest

from orchestra.common.v1 import chat_pb2
from services.providers.base import FailureKind, Finish, ToolCallDelta, UsageReport
from services.providers.gemini import GeminiAdapter, _http_error, request_body
from tests.fakes.faults import Fault
from tests.fakes.gemini_upstream import FakeGemini, ScriptedToolCall, error_body
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

KEY = "AIza-test-0123456789"
MODEL = "gemini-2.5-flash"
_RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"


@pytest.fixture
async def fake() -> AsyncIterator[FakeGemini]:
    async with FakeGemini(api_key=KEY, chunks=6) as server:  # stream faults fire after 4
        yield server


@pytest.fixture
async def adapter(fake: FakeGemini) -> AsyncIterator[GeminiAdapter]:
    client = GeminiAdapter("gemini", fake.url, credential=KEY, read_timeout=READ_TIMEOUT)
    yield client
    await client.aclose()


async def test_text_stream_and_usage(adapter: GeminiAdapter, fake: FakeGemini) -> None:
    events, error = await collect(adapter, request(MODEL, temperature=0.5, top_p=0.9, stop=["zz"]))
    assert error is None and text_of(events) == TEXT
    assert Finish(chat_pb2.FINISH_REASON_STOP) in events
    (usage,) = [e for e in events if isinstance(e, UsageReport)]
    assert usage.completion_tokens == 6 and usage.prompt_tokens > 0
    (sent,) = fake.requests
    assert sent.path == f"/v1beta/models/{MODEL}:streamGenerateContent"
    assert sent.query == {"alt": "sse"} and sent.headers["x-goog-api-key"] == KEY
    assert sent.body == {
        "contents": [{"role": "user", "parts": [{"text": "Hi there."}]}],
        "systemInstruction": {"parts": [{"text": "Be brief."}]},
        "generationConfig": {
            "temperature": 0.5,
            "topP": pytest.approx(0.9),
            "maxOutputTokens": 64,
            "stopSequences": ["zz"],
        },
    }


async def test_max_tokens_is_length(adapter: GeminiAdapter) -> None:
    events, error = await collect(adapter, request(MODEL, max_tokens=2))
    assert error is None and Finish(chat_pb2.FINISH_REASON_LENGTH) in events


async def test_function_calls(adapter: GeminiAdapter, fake: FakeGemini) -> None:
    fake.tool_calls = [ScriptedToolCall("get_weather", '{"city": "Paris"}')]
    events, error = await collect(adapter, request(MODEL, tools=[weather_tool()]))
    assert error is None
    (call,) = [e for e in events if isinstance(e, ToolCallDelta)]
    assert call.index == 0 and call.name == "get_weather" and call.id
    assert json.loads(arguments_of(events)) == {"city": "Paris"}
    assert Finish(chat_pb2.FINISH_REASON_TOOL_CALLS) in events  # Gemini itself says STOP
    body = fake.requests[0].body
    assert body is not None
    (declaration,) = body["tools"][0]["functionDeclarations"]
    assert declaration["name"] == "get_weather" and declaration["parameters"]["type"] == "object"


def test_tool_results_become_function_responses() -> None:
    call = chat_pb2.ToolCall(id="c1", name="get_weather", arguments='{"city": "Paris"}')
    conversation = [
        message(chat_pb2.ROLE_USER, "Weather?"),
        message(chat_pb2.ROLE_ASSISTANT, tool_calls=[call]),
        message(chat_pb2.ROLE_TOOL, "sunny", tool_call_id="c1"),
    ]
    body = request_body(request(MODEL, messages=conversation, response_format={"type": 2}))
    assert body["contents"][1:] == [
        {
            "role": "model",
            "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}],
        },
        {
            "role": "user",
            "parts": [
                {"functionResponse": {"name": "get_weather", "response": {"result": "sunny"}}}
            ],
        },
    ]
    assert body["generationConfig"]["responseMimeType"] == "application/json"


def test_retry_info_without_retry_after_header() -> None:
    body = error_body(429, "quota", [{"@type": _RETRY_INFO, "retryDelay": "12s"}])
    error = _http_error(429, json.dumps(body).encode(), httpx.Headers())
    assert error.kind is FailureKind.RATE_LIMITED and error.retry_after == 12.0
    assert "RESOURCE_EXHAUSTED: quota" in str(error)


@pytest.mark.parametrize("case", FAULT_CASES, ids=FAULT_IDS)
async def test_faults(adapter: GeminiAdapter, fake: FakeGemini, case: FaultCase) -> None:
    fake.set_fault(case.fault, times=1)
    events, error = await collect(adapter, request(MODEL))
    assert error is not None and error.kind is case.kind
    assert error.status == case.status
    assert bool(text_of(events)) is case.streamed_first
    if case.fault.retry_after is not None:
        assert error.retry_after == case.fault.retry_after


async def test_unknown_model_and_bad_key(adapter: GeminiAdapter, fake: FakeGemini) -> None:
    _, error = await collect(adapter, request("gemini-17"))
    assert error is not None and error.kind is FailureKind.CLIENT_ERROR and error.status == 404
    wrong = GeminiAdapter("gemini", fake.url + "/v1beta", credential="nope")
    _, error = await collect(wrong, request(MODEL))
    await wrong.aclose()
    assert error is not None and error.status == 400 and "API key not valid" in str(error)
    assert fake.requests[-1].path == f"/v1beta/models/{MODEL}:streamGenerateContent"


async def test_slow_first_token_still_answers(adapter: GeminiAdapter, fake: FakeGemini) -> None:
    fake.set_fault(Fault.slow_first_token(delay=0.1), times=1)
    events, error = await collect(adapter, request(MODEL))
    assert error is None and text_of(events) == TEXT


async def test_connect_refused(adapter: GeminiAdapter, fake: FakeGemini) -> None:
    await fake.refuse_connections()
    _, error = await collect(adapter, request(MODEL))
    assert error is not None and error.kind is FailureKind.CONNECT


async def test_cancel_closes_the_upstream_stream(fake: FakeGemini, adapter: GeminiAdapter) -> None:
    fake.chunk_delay = 0.05
    stream = adapter.stream(request(MODEL))
    async for _ in stream:
        break
    await stream.aclose()  # type: ignore[attr-defined]
    assert await fake.wait_for_streams_closed()
    assert fake.requests[0].client_disconnected
