"""The fake Ollama upstream, checked with the official ``ollama`` SDK."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import ollama
import pytest

from tests.fakes.faults import Fault, FaultKind
from tests.fakes.ollama_upstream import FakeOllama, ScriptedToolCall

TEXT = "Hello from the fake upstream."
MODEL = "llama3.2:latest"
HI = [{"role": "user", "content": "Say hello, please."}]


@pytest.fixture
async def fake() -> AsyncIterator[FakeOllama]:
    async with FakeOllama(chunks=4) as server:
        yield server


@pytest.fixture
def client(fake: FakeOllama) -> ollama.AsyncClient:
    return ollama.AsyncClient(host=fake.url, timeout=5.0)


async def test_tags_and_ps(client: ollama.AsyncClient) -> None:
    listed = await client.list()
    assert [m.model for m in listed.models] == ["llama3.2:latest", "qwen2.5:0.5b"]
    assert listed.models[0].details is not None and listed.models[0].details.family == "llama"
    assert listed.models[0].size and listed.models[0].modified_at is not None
    running = await client.ps()
    assert [m.model for m in running.models] == [MODEL]
    assert running.models[0].expires_at is not None and running.models[0].context_length == 4096


async def test_non_streaming_chat(client: ollama.AsyncClient, fake: FakeOllama) -> None:
    response = await client.chat(model=MODEL, messages=HI, options={"temperature": 0.1})
    assert response.message.role == "assistant" and response.message.content == TEXT
    assert response.done and response.done_reason == "stop"
    assert response.eval_count == 4 and response.prompt_eval_count
    (request,) = fake.requests
    assert request.path == "/api/chat" and request.body is not None
    assert request.body["stream"] is False and request.body["options"] == {"temperature": 0.1}


async def test_streaming_chat(client: ollama.AsyncClient) -> None:
    parts = [part async for part in await client.chat(model=MODEL, messages=HI, stream=True)]
    assert "".join(p.message.content or "" for p in parts) == TEXT
    assert [p.done for p in parts] == [False] * 4 + [True]
    final = parts[-1]
    assert final.done_reason == "stop" and final.eval_count == 4 and final.prompt_eval_count


async def test_num_predict_is_length(client: ollama.AsyncClient) -> None:
    response = await client.chat(model=MODEL, messages=HI, options={"num_predict": 2})
    assert response.done_reason == "length" and response.eval_count == 2


async def test_tool_calls(client: ollama.AsyncClient, fake: FakeOllama) -> None:
    fake.tool_calls = [ScriptedToolCall("get_weather", '{"city": "Paris"}')]
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    response = await client.chat(model=MODEL, messages=HI, tools=[tool])
    (call,) = response.message.tool_calls or []
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
    parts = [
        p async for p in await client.chat(model=MODEL, messages=HI, tools=[tool], stream=True)
    ]
    assert parts[0].message.tool_calls and parts[-1].done


async def test_unknown_model(client: ollama.AsyncClient) -> None:
    with pytest.raises(ollama.ResponseError) as error:
        await client.chat(model="nope:1b", messages=HI)
    assert error.value.status_code == 404 and "try pulling it first" in error.value.error


@pytest.mark.parametrize(
    ("fault", "status"),
    [
        (Fault.rate_limit(retry_after=2), 429),
        (FaultKind.SERVER_ERROR, 500),
        (FaultKind.UNAVAILABLE, 503),
    ],
)
async def test_error_status_faults(
    client: ollama.AsyncClient, fake: FakeOllama, fault: Fault | FaultKind, status: int
) -> None:
    fake.set_fault(fault, times=1)
    with pytest.raises(ollama.ResponseError) as error:
        await client.chat(model=MODEL, messages=HI)
    assert error.value.status_code == status and error.value.error


async def test_stream_faults(client: ollama.AsyncClient, fake: FakeOllama) -> None:
    fake.set_fault(Fault.stream_error(after_chunks=2, message="boom"), times=1)
    with pytest.raises(ollama.ResponseError, match="boom"):
        async for _ in await client.chat(model=MODEL, messages=HI, stream=True):
            pass
    fake.set_fault(Fault.malformed_chunk(after_chunks=2), times=1)
    with pytest.raises(json.JSONDecodeError):
        async for _ in await client.chat(model=MODEL, messages=HI, stream=True):
            pass
    fake.set_fault(Fault.stream_cut(after_chunks=2), times=1)
    with pytest.raises(httpx.RemoteProtocolError):
        async for _ in await client.chat(model=MODEL, messages=HI, stream=True):
            pass


async def test_timeout(fake: FakeOllama) -> None:
    fake.set_fault(Fault.timeout(delay=60), times=1)
    # Only the read may time out: a connect slowed by a busy CI machine must not.
    client = ollama.AsyncClient(host=fake.url, timeout=httpx.Timeout(0.3, connect=5.0))
    with pytest.raises(httpx.ReadTimeout):
        await client.chat(model=MODEL, messages=HI)
