"""Streamed chats reuse the adapter's pooled connection (no new handshake per chat).

Each parser stops reading at its end marker; the adapter then reads the rest
of the body, so the HTTP client returns the connection to its pool. Against a real
provider that saves a TCP and TLS handshake per chat. The fakes record the
client's port of each request: one port for several chats means one connection.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest
from aiohttp import web

from services.providers import AnthropicAdapter, GeminiAdapter, OllamaAdapter, OpenAIAdapter
from services.providers.base import ProviderAdapter
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.faults import FakeUpstream
from tests.fakes.gemini_upstream import FakeGemini
from tests.fakes.ollama_upstream import FakeOllama
from tests.fakes.openai_upstream import FakeOpenAI
from tests.providers.common import TEXT, collect, request, text_of
from tests.providers.local_app import serve

KEY = "sk-reuse"
CHATS = 3

Case = tuple[Callable[[], FakeUpstream], Callable[[str], ProviderAdapter], str]
CASES: dict[str, Case] = {
    "openai": (
        lambda: FakeOpenAI(api_key=KEY, chunks=4),
        lambda url: OpenAIAdapter("openai", url, credential=KEY),
        "gpt-4o-mini",
    ),
    "anthropic": (
        lambda: FakeAnthropic(api_key=KEY, chunks=4),
        lambda url: AnthropicAdapter("anthropic", url, credential=KEY),
        "claude-haiku-4-5",
    ),
    "gemini": (
        lambda: FakeGemini(api_key=KEY, chunks=4),
        lambda url: GeminiAdapter("gemini", url, credential=KEY),
        "gemini-2.5-flash",
    ),
    "ollama": (
        lambda: FakeOllama(chunks=4),
        lambda url: OllamaAdapter("ollama", url),
        "llama3.2:latest",
    ),
}


@pytest.mark.parametrize("provider", CASES)
async def test_consecutive_chats_share_one_connection(provider: str) -> None:
    make_fake, make_adapter, model = CASES[provider]
    async with make_fake() as fake:
        adapter = make_adapter(fake.url)
        try:
            for _ in range(CHATS):
                events, error = await collect(adapter, request(model))
                assert error is None
                assert text_of(events) == TEXT
        finally:
            await adapter.aclose()
        peers = {r.peer for r in fake.requests}
        assert len(fake.requests) == CHATS
        assert None not in peers
        assert len(peers) == 1, peers


async def test_a_body_held_open_after_its_end_marker_does_not_hold_the_answer() -> None:
    """A server that keeps the body open after ``[DONE]``: the stream still ends at once."""
    chunk = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": "held"}, "finish_reason": "stop"}],
    }

    release, ended = asyncio.Event(), asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode())
        await release.wait()  # the body stays open until the test is done
        ended.set()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner, port = await serve(app)
    adapter = OpenAIAdapter("openai", f"http://127.0.0.1:{port}/v1", credential=KEY)
    try:
        # Bounded only so that a regression fails instead of hanging.
        events, error = await asyncio.wait_for(collect(adapter, request("m")), 30)
        answered_while_open = not ended.is_set()
    finally:
        release.set()
        await adapter.aclose()
        await runner.cleanup()
    assert error is None
    assert text_of(events) == "held"
    assert answered_while_open
