"""The fake OpenAI upstream, checked with the official ``openai`` SDK.

If the SDK parses what the fake sends, and raises its own exception for each
injected fault, then adapters tested against the fake are tested against the
real wire format.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from tests.fakes.faults import Fault, FaultKind
from tests.fakes.openai_upstream import FakeOpenAI, ScriptedToolCall

KEY = "sk-test-0123456789abcdef"
TEXT = "Hello from the fake upstream."
HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello, please."}]
WEATHER_TOOL: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(api_key=KEY, chunks=4) as server:
        yield server


@pytest.fixture
async def client(fake: FakeOpenAI) -> AsyncIterator[openai.AsyncOpenAI]:
    sdk = openai.AsyncOpenAI(base_url=fake.url, api_key=KEY, max_retries=0, timeout=5.0)
    yield sdk
    await sdk.close()


async def raw_sse(fake: FakeOpenAI, body: dict[str, object]) -> list[str]:
    """The ``data:`` payloads of a stream, checking the SSE framing on the way."""
    async with (
        httpx.AsyncClient() as http,
        http.stream(
            "POST",
            f"{fake.url}/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {KEY}"},
        ) as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        text = (await response.aread()).decode()
    events = text.split("\n\n")
    assert events[-1] == ""  # every event ends with a blank line
    assert all(e.startswith("data: ") and "\n" not in e for e in events[:-1])
    return [e.removeprefix("data: ") for e in events[:-1]]


# -- the happy paths -------------------------------------------------------------------


async def test_models_list(client: openai.AsyncOpenAI) -> None:
    models = [m async for m in client.models.list()]
    assert [m.id for m in models] == ["gpt-4o-mini", "gpt-4o"]
    assert all(m.object == "model" and m.owned_by == "openai" and m.created for m in models)
    assert (await client.models.retrieve("gpt-4o")).id == "gpt-4o"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("gpt-17")


async def test_non_streaming_completion(client: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    completion = await client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "gpt-4o-mini"
    assert completion.system_fingerprint
    (choice,) = completion.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == TEXT
    assert choice.message.refusal is None and choice.message.tool_calls is None
    assert choice.finish_reason == "stop" and choice.logprobs is None
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens == len("Say hello, please.") // 4 + 1
    assert usage.completion_tokens == 4
    assert usage.total_tokens == usage.prompt_tokens + 4
    assert usage.prompt_tokens_details and usage.prompt_tokens_details.cached_tokens == 0
    assert usage.completion_tokens_details is not None

    (request,) = fake.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.body == {"model": "gpt-4o-mini", "messages": HI}
    assert request.status == 200 and request.completed and not request.streamed


async def test_stream_with_usage_chunk(client: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=HI, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(content) == TEXT
    assert len([piece for piece in content if piece]) == 4
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes == [None] * 5 + ["stop"]
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 4
    assert all(c.usage is None for c in body)
    assert fake.requests[-1].body is not None
    assert fake.requests[-1].body["stream_options"] == {"include_usage": True}
    assert fake.requests[-1].completed and fake.open_streams == 0


async def test_stream_wire_format(fake: FakeOpenAI) -> None:
    body: dict[str, object] = {"model": "gpt-4o-mini", "messages": HI, "stream": True}
    events = await raw_sse(fake, body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert all("usage" not in c for c in chunks)  # only with stream_options.include_usage
    with_usage = await raw_sse(fake, {**body, "stream_options": {"include_usage": True}})
    usage_chunk = json.loads(with_usage[-2])
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["total_tokens"] > 0
    assert all(json.loads(e)["usage"] is None for e in with_usage[:-2])


async def test_sdk_stream_helper_accumulates(client: openai.AsyncOpenAI) -> None:
    async with client.chat.completions.stream(model="gpt-4o-mini", messages=HI) as stream:
        final = await stream.get_final_completion()
    assert final.choices[0].message.content == TEXT


async def test_tool_call_streaming(client: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    arguments = '{"city": "Paris", "unit": "celsius"}'
    fake.tool_calls = [ScriptedToolCall("get_weather", arguments)]
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=HI, tools=[WEATHER_TOOL], stream=True
    )
    chunks = [chunk async for chunk in stream]
    pieces = [
        call.function.arguments
        for c in chunks
        for call in (c.choices[0].delta.tool_calls or [])
        if call.function and call.function.arguments
    ]
    assert len(pieces) == 4 and "".join(pieces) == arguments
    head = chunks[0].choices[0].delta
    assert head.role == "assistant" and head.tool_calls is not None
    assert head.tool_calls[0].id and head.tool_calls[0].type == "function"
    assert head.tool_calls[0].function and head.tool_calls[0].function.name == "get_weather"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    async with client.chat.completions.stream(
        model="gpt-4o-mini", messages=HI, tools=[WEATHER_TOOL]
    ) as helper:
        final = await helper.get_final_completion()
    (call,) = final.choices[0].message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}

    completion = await client.chat.completions.create(
        model="gpt-4o-mini", messages=HI, tools=[WEATHER_TOOL]
    )
    assert completion.choices[0].finish_reason == "tool_calls"
    assert completion.choices[0].message.content is None
    (plain_call,) = completion.choices[0].message.tool_calls or []
    assert plain_call.type == "function" and plain_call.function.arguments == arguments

    plain = await client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    assert plain.choices[0].message.content == TEXT  # no tools in the request: text


async def test_json_mode(client: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Answer in JSON."}]
    completion = await client.chat.completions.create(
        model="gpt-4o", messages=messages, response_format={"type": "json_object"}
    )
    assert json.loads(completion.choices[0].message.content or "") == {"reply": TEXT}
    fake.json_reply = {"answer": 42}
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=messages, response_format={"type": "json_object"}, stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert json.loads(text) == {"answer": 42}
    with pytest.raises(openai.BadRequestError) as refused:  # OpenAI insists on the word
        await client.chat.completions.create(
            model="gpt-4o", messages=HI, response_format={"type": "json_object"}
        )
    assert refused.value.param == "messages"


async def test_max_tokens_truncates(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="gpt-4o-mini", messages=HI, max_completion_tokens=2
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 2
    assert (
        completion.choices[0].message.content
        == TEXT[: len(completion.choices[0].message.content or "")]
    )


async def test_reply_for_scripts_per_request(client: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    fake.reply_for = lambda body: f"echo: {body['messages'][-1]['content']}"
    completion = await client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    assert completion.choices[0].message.content == "echo: Say hello, please."


# -- errors OpenAI itself would send ---------------------------------------------------


async def test_wrong_key_is_authentication_error(fake: FakeOpenAI) -> None:
    sdk = openai.AsyncOpenAI(base_url=fake.url, api_key="sk-wrong-key-000", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as error:
        await sdk.chat.completions.create(model="gpt-4o-mini", messages=HI)
    await sdk.close()
    assert error.value.status_code == 401 and error.value.code == "invalid_api_key"
    assert error.value.type == "invalid_request_error"


async def test_missing_key_and_bad_requests(fake: FakeOpenAI) -> None:
    url = f"{fake.url}/chat/completions"
    auth = {"authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient() as http:
        missing = await http.post(url, json={"model": "gpt-4o-mini", "messages": HI})
        not_json = await http.post(url, content=b"{nope", headers=auth)
        no_messages = await http.post(url, json={"model": "gpt-4o-mini"}, headers=auth)
        unknown = await http.post(url, json={"model": "gpt-17", "messages": HI}, headers=auth)
        options = await http.post(
            url,
            json={"model": "gpt-4o", "messages": HI, "stream_options": {"include_usage": True}},
            headers=auth,
        )
        bad_url = await http.get(f"{fake.url}/chat/completions", headers=auth)
    assert missing.status_code == 401
    assert set(missing.json()["error"]) == {"message", "type", "param", "code"}
    assert "didn't provide an API key" in missing.json()["error"]["message"]
    assert not_json.status_code == 400 and "parse the JSON body" in not_json.text
    assert no_messages.status_code == 400
    assert no_messages.json()["error"]["code"] == "missing_required_parameter"
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert options.status_code == 400 and options.json()["error"]["param"] == "stream_options"
    assert bad_url.status_code == 404 and "Invalid URL" in bad_url.json()["error"]["message"]


# -- injected faults -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "exception", "status", "error_type"),
    [
        (Fault.rate_limit(retry_after=7), openai.RateLimitError, 429, "requests"),
        (FaultKind.SERVER_ERROR, openai.InternalServerError, 500, "server_error"),
        (FaultKind.BAD_GATEWAY, openai.InternalServerError, 502, "cf_bad_gateway"),
        (FaultKind.UNAVAILABLE, openai.InternalServerError, 503, "server_error"),
    ],
)
async def test_error_status_faults(
    client: openai.AsyncOpenAI,
    fake: FakeOpenAI,
    fault: Fault | FaultKind,
    exception: type[openai.APIStatusError],
    status: int,
    error_type: str,
) -> None:
    for stream in (False, True):
        fake.set_fault(fault, times=1)
        with pytest.raises(exception) as error:
            await client.chat.completions.create(model="gpt-4o-mini", messages=HI, stream=stream)
        assert error.value.status_code == status
        assert error.value.type == error_type
        assert isinstance(error.value.body, dict) and set(error.value.body) == {
            "message",
            "type",
            "param",
            "code",
        }
    if status == 429:
        assert error.value.response.headers["retry-after"] == "7"
        assert error.value.code == "rate_limit_exceeded"
    fake.clear_faults()
    await client.chat.completions.create(model="gpt-4o-mini", messages=HI)


async def test_fault_counts_and_per_model_faults(fake: FakeOpenAI) -> None:
    fake.set_fault(Fault.rate_limit(retry_after=1), times=1)
    sdk = openai.AsyncOpenAI(base_url=fake.url, api_key=KEY, max_retries=1)
    started = time.monotonic()
    completion = await sdk.chat.completions.create(model="gpt-4o-mini", messages=HI)
    assert completion.choices[0].message.content == TEXT
    assert time.monotonic() - started >= 0.9  # the SDK waited for Retry-After
    assert [r.status for r in fake.requests] == [429, 200]

    once = sdk.with_options(max_retries=0)
    fake.set_fault(FaultKind.SERVER_ERROR, model="gpt-4o")
    fake.set_fault(Fault.rate_limit(), times=2)
    with pytest.raises(openai.InternalServerError):  # the model's own rule wins
        await once.chat.completions.create(model="gpt-4o", messages=HI)
    for _ in range(2):
        with pytest.raises(openai.RateLimitError):
            await once.chat.completions.create(model="gpt-4o-mini", messages=HI)
    await once.chat.completions.create(model="gpt-4o-mini", messages=HI)
    with pytest.raises(openai.InternalServerError):  # times=None: until cleared
        await once.chat.completions.create(model="gpt-4o", messages=HI)
    fake.clear_faults(model="gpt-4o")
    await once.chat.completions.create(model="gpt-4o", messages=HI)
    fake.set_fault(FaultKind.UNAVAILABLE, endpoint="models", times=1)
    with pytest.raises(openai.InternalServerError):
        await once.models.list()
    await sdk.close()


async def test_stream_cut_midway(client: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    fake.set_fault(Fault.stream_cut(after_chunks=3))
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=HI, stream=True, stream_options={"include_usage": True}
    )
    received = []
    with pytest.raises(openai.APIConnectionError):  # httpx: incomplete chunked read
        async for chunk in stream:
            received.append(chunk)
    assert len(received) == 3
    assert all(c.choices and c.choices[0].finish_reason is None for c in received)
    record = fake.requests[-1]
    assert record.events_sent == 3 and record.status == 200 and not record.completed
    assert record.fault is not None
    assert record.fault.kind is FaultKind.STREAM_CUT
    with pytest.raises(openai.APIConnectionError):  # the same fault without a stream
        await client.chat.completions.create(model="gpt-4o-mini", messages=HI)


async def test_malformed_chunk(client: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    fake.set_fault(Fault.malformed_chunk(after_chunks=2), times=1)
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=HI, stream=True)
    received = []
    with pytest.raises(json.JSONDecodeError):  # the SDK does not skip a bad data line
        async for chunk in stream:
            received.append(chunk)
    assert len(received) == 2
    body: dict[str, object] = {"model": "gpt-4o-mini", "messages": HI, "stream": True}
    fake.set_fault(Fault.malformed_chunk(after_chunks=2), times=1)
    events = await raw_sse(fake, body)  # the rest of the stream still follows
    assert events[-1] == "[DONE]" and len(events) == 8
    with pytest.raises(json.JSONDecodeError):
        json.loads(events[2])


async def test_error_event_mid_stream(client: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    fake.set_fault(Fault.stream_error(after_chunks=2, message="boom"), times=1)
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=HI, stream=True)
    received = []
    with pytest.raises(openai.APIError, match="boom"):
        async for chunk in stream:
            received.append(chunk)
    assert len(received) == 2


async def test_read_timeouts(client: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    fake.set_fault(Fault.timeout(delay=60), times=1)
    with pytest.raises(openai.APITimeoutError):
        await client.chat.completions.create(model="gpt-4o-mini", messages=HI, timeout=0.3)
    fake.set_fault(Fault.timeout(delay=60, after_chunks=2), times=1)
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=HI, stream=True, timeout=0.3
    )
    received = []
    with pytest.raises(openai.APITimeoutError):
        async for chunk in stream:
            received.append(chunk)
    assert len(received) == 2
    assert await fake.wait_for_streams_closed(within=2)
    assert fake.requests[-1].client_disconnected


async def test_disconnect_without_response(client: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    fake.set_fault(Fault.disconnect(), times=1)
    with pytest.raises(openai.APIConnectionError) as error:
        await client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    assert not isinstance(error.value, openai.APITimeoutError)
    assert fake.requests[-1].status is None


async def test_connection_refused_then_back(client: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    await client.chat.completions.create(model="gpt-4o-mini", messages=HI)  # a pooled socket
    port = fake.port
    await fake.refuse_connections()
    with pytest.raises(openai.APIConnectionError) as error:
        await client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    assert "ConnectError" in type(error.value.__cause__).__name__
    async with httpx.AsyncClient() as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(f"{fake.url}/models")
    await fake.accept_connections()
    assert fake.port == port
    completion = await client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    assert completion.choices[0].message.content == TEXT


async def test_latency_knobs_and_slow_first_token(
    client: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    async def first_and_total() -> tuple[float, float]:
        started = time.monotonic()
        stream = await client.chat.completions.create(model="gpt-4o", messages=HI, stream=True)
        first = 0.0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and not first:
                first = time.monotonic() - started
        return first, time.monotonic() - started

    fake.first_token_delay, fake.chunk_delay = 0.2, 0.05
    first, total = await first_and_total()
    assert 0.2 <= first < 1.2 and total >= 0.2 + 3 * 0.05
    fake.first_token_delay, fake.chunk_delay = 0.0, 0.0
    fake.set_fault(Fault.slow_first_token(delay=0.4), times=1)
    first, _ = await first_and_total()
    assert first >= 0.4
    await first_and_total()  # times=1: the next call is not slowed
    assert [r.fault is not None for r in fake.requests[-2:]] == [True, False]


async def test_client_cancel_closes_the_stream(
    client: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    fake.chunks, fake.chunk_delay = 20, 0.1
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=HI, stream=True)
    received = 0
    async for _ in stream:
        received += 1
        if received == 3:
            break
    assert fake.open_streams == 1
    await stream.close()
    assert await fake.wait_for_streams_closed(within=2)
    record = fake.requests[-1]
    assert record.client_disconnected and not record.completed
    assert 3 <= record.events_sent < 20


async def test_stop_releases_hung_requests(fake: FakeOpenAI) -> None:
    fake.set_fault(Fault.timeout(delay=60))
    sdk = openai.AsyncOpenAI(base_url=fake.url, api_key=KEY, max_retries=0, timeout=30)
    call = asyncio.ensure_future(sdk.chat.completions.create(model="gpt-4o-mini", messages=HI))
    assert await fake.wait_for_requests(1)
    started = time.monotonic()
    await fake.stop()
    assert time.monotonic() - started < 2
    with pytest.raises(openai.APIConnectionError):
        await call
    await sdk.close()


def test_command_line_entry_point() -> None:
    command = [sys.executable, "-m", "tests.fakes.openai_upstream", "--port", "0"]
    with subprocess.Popen(
        [*command, "--latency-ms", "50"], cwd=ROOT, stdout=subprocess.PIPE, text=True
    ) as process:
        try:
            assert process.stdout is not None
            url = process.stdout.readline().rsplit(" ", 1)[-1].strip()
            assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
            with openai.OpenAI(base_url=url, api_key="any", max_retries=0, timeout=5) as sdk:
                started = time.monotonic()
                completion = sdk.chat.completions.create(model="gpt-4o-mini", messages=HI)
                assert time.monotonic() - started >= 0.05
            assert completion.choices[0].message.content == TEXT
        finally:
            process.terminate()
        assert process.wait(timeout=10) == 0
