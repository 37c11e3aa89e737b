"""The fake Anthropic upstream, checked with the official ``anthropic`` SDK."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import anthropic
import httpx2
import pytest

from tests.fakes.anthropic_upstream import FakeAnthropic, ScriptedToolCall
from tests.fakes.faults import Fault, FaultKind

KEY = "sk-ant-test-0123456789"
TEXT = "Hello from the fake upstream."
MODEL = "claude-haiku-4-5"
HI: list[anthropic.types.MessageParam] = [{"role": "user", "content": "Say hello, please."}]
TOOL: anthropic.types.ToolParam = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


@pytest.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropic(api_key=KEY, chunks=4) as server:
        yield server


@pytest.fixture
async def client(fake: FakeAnthropic) -> AsyncIterator[anthropic.AsyncAnthropic]:
    sdk = anthropic.AsyncAnthropic(base_url=fake.url, api_key=KEY, max_retries=0, timeout=5.0)
    yield sdk
    await sdk.close()


async def test_non_streaming_message(client: anthropic.AsyncAnthropic, fake: FakeAnthropic) -> None:
    message = await client.messages.create(
        model=MODEL, max_tokens=64, system="Be brief.", messages=HI
    )
    assert message.type == "message" and message.role == "assistant" and message.model == MODEL
    assert message.id.startswith("msg_")
    (block,) = message.content
    assert isinstance(block, anthropic.types.TextBlock) and block.text == TEXT
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.usage.output_tokens == 4 and message.usage.input_tokens > 0
    (request,) = fake.requests
    assert request.path == "/v1/messages"
    # This SDK sends the key as a bearer token and its own (newer) API version.
    assert KEY in (request.headers.get("x-api-key"), request.headers.get("authorization", "")[7:])
    assert request.headers["anthropic-version"]
    assert request.body == {"model": MODEL, "max_tokens": 64, "system": "Be brief.", "messages": HI}


async def test_stream_events(client: anthropic.AsyncAnthropic) -> None:
    stream = await client.messages.create(model=MODEL, max_tokens=64, messages=HI, stream=True)
    events = [event async for event in stream]
    types = [e.type for e in events]
    assert types[0] == "message_start" and types[-2:] == ["message_delta", "message_stop"]
    assert types.count("content_block_delta") == 4
    text = "".join(
        e.delta.text
        for e in events
        if e.type == "content_block_delta" and e.delta.type == "text_delta"
    )
    assert text == TEXT


async def test_stream_helper_accumulates(client: anthropic.AsyncAnthropic) -> None:
    async with client.messages.stream(model=MODEL, max_tokens=64, messages=HI) as stream:
        pieces = [t async for t in stream.text_stream]
        final = await stream.get_final_message()
    assert "".join(pieces) == TEXT and len(pieces) == 4
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 4 and final.usage.input_tokens > 0


async def test_tool_use_stream(client: anthropic.AsyncAnthropic, fake: FakeAnthropic) -> None:
    fake.tool_calls = [ScriptedToolCall("get_weather", '{"city": "Paris"}')]
    async with client.messages.stream(
        model=MODEL, max_tokens=64, messages=HI, tools=[TOOL]
    ) as stream:
        final = await stream.get_final_message()
    (block,) = final.content
    assert isinstance(block, anthropic.types.ToolUseBlock)
    assert block.name == "get_weather" and block.input == {"city": "Paris"}
    assert block.id.startswith("toolu_") and final.stop_reason == "tool_use"
    message = await client.messages.create(model=MODEL, max_tokens=64, messages=HI, tools=[TOOL])
    assert message.content[0].type == "tool_use"


async def test_max_tokens_and_stop_sequence(client: anthropic.AsyncAnthropic) -> None:
    cut = await client.messages.create(model=MODEL, max_tokens=2, messages=HI)
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 2
    stopped = await client.messages.create(
        model=MODEL, max_tokens=64, messages=HI, stop_sequences=["fake"]
    )
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "fake"
    assert stopped.content[0].type == "text" and stopped.content[0].text == "Hello from the "


async def test_refusals(fake: FakeAnthropic, client: anthropic.AsyncAnthropic) -> None:
    wrong = anthropic.AsyncAnthropic(base_url=fake.url, api_key="nope", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        await wrong.messages.create(model=MODEL, max_tokens=8, messages=HI)
    await wrong.close()
    with pytest.raises(anthropic.NotFoundError):
        await client.messages.create(model="claude-17", max_tokens=8, messages=HI)
    bad: list[anthropic.types.MessageParam] = [{"role": "system", "content": "x"}]
    with pytest.raises(anthropic.BadRequestError):
        await client.messages.create(model=MODEL, max_tokens=8, messages=bad)


@pytest.mark.parametrize(
    ("fault", "exception", "error_type"),
    [
        (Fault.rate_limit(retry_after=7), anthropic.RateLimitError, "rate_limit_error"),
        (FaultKind.SERVER_ERROR, anthropic.InternalServerError, "api_error"),
        (Fault.http_error(529), anthropic.OverloadedError, "overloaded_error"),
        (FaultKind.UNAVAILABLE, anthropic.InternalServerError, "api_error"),
    ],
)
async def test_error_status_faults(
    client: anthropic.AsyncAnthropic,
    fake: FakeAnthropic,
    fault: Fault | FaultKind,
    exception: type[anthropic.APIStatusError],
    error_type: str,
) -> None:
    fake.set_fault(fault, times=1)
    with pytest.raises(exception) as error:
        await client.messages.create(model=MODEL, max_tokens=8, messages=HI)
    assert isinstance(error.value.body, dict)
    assert error.value.body["error"]["type"] == error_type
    if error_type == "rate_limit_error":
        assert error.value.response.headers["retry-after"] == "7"


async def test_error_event_mid_stream(
    client: anthropic.AsyncAnthropic, fake: FakeAnthropic
) -> None:
    fake.set_fault(Fault.stream_error(after_chunks=3, message="boom"), times=1)
    stream = await client.messages.create(model=MODEL, max_tokens=64, messages=HI, stream=True)
    with pytest.raises(anthropic.APIStatusError, match="boom"):
        async for _ in stream:
            pass


async def test_stream_cut_and_malformed(
    client: anthropic.AsyncAnthropic, fake: FakeAnthropic
) -> None:
    fake.set_fault(Fault.stream_cut(after_chunks=3), times=1)
    stream = await client.messages.create(model=MODEL, max_tokens=64, messages=HI, stream=True)
    # Mid-stream the SDK wraps its HTTP library's error (an incomplete chunked read)
    # as a connection error, the cause kept.
    with pytest.raises(anthropic.APIConnectionError, match="incomplete chunked read") as cut:
        async for _ in stream:
            pass
    assert isinstance(cut.value.__cause__, httpx2.RemoteProtocolError)
    fake.set_fault(Fault.malformed_chunk(after_chunks=2), times=1)
    stream = await client.messages.create(model=MODEL, max_tokens=64, messages=HI, stream=True)
    with pytest.raises(json.JSONDecodeError):
        async for _ in stream:
            pass


async def test_timeout_and_disconnect(
    client: anthropic.AsyncAnthropic, fake: FakeAnthropic
) -> None:
    fake.set_fault(Fault.timeout(delay=60), times=1)
    with pytest.raises(anthropic.APITimeoutError):
        await client.messages.create(model=MODEL, max_tokens=8, messages=HI, timeout=0.3)
    fake.set_fault(Fault.disconnect(), times=1)
    with pytest.raises(anthropic.APIConnectionError):
        await client.messages.create(model=MODEL, max_tokens=8, messages=HI)


async def test_models_list(client: anthropic.AsyncAnthropic) -> None:
    models = [m async for m in client.models.list()]
    assert [m.id for m in models] == ["claude-haiku-4-5", "claude-sonnet-4-5"]
