"""The fake Gemini upstream, checked with the official ``google-genai`` SDK."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from google import genai
from google.genai import errors, types

from tests.fakes.faults import Fault, FaultKind
from tests.fakes.gemini_upstream import FakeGemini, ScriptedToolCall

KEY = "AIza-test-0123456789"
TEXT = "Hello from the fake upstream."
MODEL = "gemini-2.5-flash"
WEATHER = types.Tool(
    function_declarations=[
        types.FunctionDeclaration(
            name="get_weather",
            description="Weather for a city",
            parameters_json_schema={"type": "object", "properties": {"city": {"type": "string"}}},
        )
    ]
)


@pytest.fixture
async def fake() -> AsyncIterator[FakeGemini]:
    async with FakeGemini(api_key=KEY, chunks=4) as server:
        yield server


def sdk(url: str, key: str = KEY, timeout_ms: int = 5000) -> genai.Client:
    options = types.HttpOptions(
        base_url=url, timeout=timeout_ms, retry_options=types.HttpRetryOptions(attempts=1)
    )
    return genai.Client(api_key=key, http_options=options)


@pytest.fixture
def client(fake: FakeGemini) -> genai.Client:
    return sdk(fake.url)


async def test_generate_content(client: genai.Client, fake: FakeGemini) -> None:
    config = types.GenerateContentConfig(system_instruction="Be brief.", temperature=0.2)
    response = await client.aio.models.generate_content(model=MODEL, contents="Hi", config=config)
    assert response.text == TEXT
    assert response.candidates and response.candidates[0].finish_reason == types.FinishReason.STOP
    usage = response.usage_metadata
    assert usage is not None and usage.candidates_token_count == 4 and usage.prompt_token_count
    (request,) = fake.requests
    # This SDK version calls /v1 (the adapter calls /v1beta): the fake serves both.
    assert request.path in (f"/{v}/models/{MODEL}:generateContent" for v in ("v1", "v1beta"))
    assert request.headers["x-goog-api-key"] == KEY
    assert request.body is not None
    assert request.body["systemInstruction"]["parts"] == [{"text": "Be brief."}]
    assert request.body["generationConfig"] == {"temperature": 0.2}


async def test_stream(client: genai.Client, fake: FakeGemini) -> None:
    chunks = [
        c async for c in await client.aio.models.generate_content_stream(model=MODEL, contents="Hi")
    ]
    assert "".join(c.text or "" for c in chunks) == TEXT and len(chunks) == 4
    last = chunks[-1]
    assert last.candidates and last.candidates[0].finish_reason == types.FinishReason.STOP
    assert last.usage_metadata is not None and last.usage_metadata.candidates_token_count == 4
    assert fake.requests[0].query == {"alt": "sse"}


async def test_max_output_tokens(client: genai.Client) -> None:
    config = types.GenerateContentConfig(max_output_tokens=2)
    response = await client.aio.models.generate_content(model=MODEL, contents="Hi", config=config)
    assert (
        response.candidates
        and response.candidates[0].finish_reason == types.FinishReason.MAX_TOKENS
    )


async def test_function_calls(client: genai.Client, fake: FakeGemini) -> None:
    fake.tool_calls = [ScriptedToolCall("get_weather", '{"city": "Paris"}')]
    config = types.GenerateContentConfig(tools=[WEATHER])
    response = await client.aio.models.generate_content(model=MODEL, contents="Hi", config=config)
    (call,) = response.function_calls or []
    assert call.name == "get_weather" and call.args == {"city": "Paris"}
    stream = await client.aio.models.generate_content_stream(
        model=MODEL, contents="Hi", config=config
    )
    chunks = [c async for c in stream]
    assert chunks[0].function_calls and chunks[0].function_calls[0].name == "get_weather"


async def test_models(client: genai.Client) -> None:
    models = [m async for m in await client.aio.models.list()]
    assert [m.name for m in models] == ["models/gemini-2.5-flash", "models/gemini-2.5-pro"]
    assert (await client.aio.models.get(model=MODEL)).input_token_limit == 1048576


async def test_refusals(fake: FakeGemini, client: genai.Client) -> None:
    with pytest.raises(errors.ClientError) as bad_key:
        await sdk(fake.url, key="nope").aio.models.generate_content(model=MODEL, contents="Hi")
    assert bad_key.value.code == 400 and bad_key.value.status == "INVALID_ARGUMENT"
    with pytest.raises(errors.ClientError) as missing:
        await client.aio.models.generate_content(model="gemini-17", contents="Hi")
    assert missing.value.code == 404 and missing.value.status == "NOT_FOUND"


@pytest.mark.parametrize(
    ("fault", "exception", "status"),
    [
        (Fault.rate_limit(retry_after=7), errors.ClientError, "RESOURCE_EXHAUSTED"),
        (FaultKind.SERVER_ERROR, errors.ServerError, "INTERNAL"),
        (FaultKind.UNAVAILABLE, errors.ServerError, "UNAVAILABLE"),
    ],
)
async def test_error_status_faults(
    client: genai.Client,
    fake: FakeGemini,
    fault: Fault | FaultKind,
    exception: type[errors.APIError],
    status: str,
) -> None:
    fake.set_fault(fault, times=1)
    with pytest.raises(exception) as error:
        await client.aio.models.generate_content(model=MODEL, contents="Hi")
    assert error.value.status == status


async def test_stream_faults(client: genai.Client, fake: FakeGemini) -> None:
    fake.set_fault(Fault.stream_error(after_chunks=2, message="boom"), times=1)
    with pytest.raises(errors.ServerError, match="boom"):
        async for _ in await client.aio.models.generate_content_stream(model=MODEL, contents="Hi"):
            pass
    fake.set_fault(Fault.malformed_chunk(after_chunks=2), times=1)
    with pytest.raises(errors.UnknownApiResponseError, match="Failed to parse"):
        async for _ in await client.aio.models.generate_content_stream(model=MODEL, contents="Hi"):
            pass
