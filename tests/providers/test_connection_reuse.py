"""Streamed chats reuse the adapter's pooled connection (no new handshake per chat).

Each parser stops reading at its end marker; the adapter then reads the rest
of the body, so httpx returns the connection to its pool. Against a real
provider that saves a TCP and TLS handshake per chat. The fakes record the
client's port of each request: one port for several chats means one connection.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from services.providers import AnthropicAdapter, GeminiAdapter, OllamaAdapter, OpenAIAdapter
from services.providers.base import ProviderAdapter
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.faults import FakeUpstream
from tests.fakes.gemini_upstream import FakeGemini
from tests.fakes.ollama_upstream import FakeOllama
from tests.fakes.openai_upstream import FakeOpenAI
from tests.providers.common import TEXT, collect, request, text_of

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
