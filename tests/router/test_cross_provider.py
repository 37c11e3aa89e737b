"""One chat across providers of different wire formats, through the real router."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest

from orchestra.common.v1 import chat_pb2
from orchestra.router.v1 import chat_service_pb2 as chat_api
from orchestra.router.v1 import chat_service_pb2_grpc as chat_grpc
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.faults import Fault
from tests.fakes.ollama_upstream import FakeOllama
from tests.fakes.openai_upstream import FakeOpenAI
from tests.router.conftest import running_suite

CONFIG = """
providers:
  - {{id: openai, type: openai, base_url: "{openai}", credential: sk-openai-test}}
  - {{id: anthropic, type: anthropic, base_url: "{anthropic}", credential: sk-ant-test}}
  - {{id: ollama, type: ollama, base_url: "{ollama}", local: true}}
tenants:
  - id: acme
    policy: {{cache_enabled: false}}
    api_keys: [{{id: app, secret: ok_app_0123456789abcdefghijklmn, scopes: [chat]}}]
"""


@pytest.fixture
async def fakes() -> AsyncIterator[tuple[FakeOpenAI, FakeAnthropic, FakeOllama]]:
    openai = FakeOpenAI(api_key="sk-openai-test", models=["gpt-4o-mini"])
    anthropic = FakeAnthropic(api_key="sk-ant-test", models=["claude-3-5-haiku-latest"])
    ollama = FakeOllama(models=["llama3.2:latest"])
    for fake in (openai, anthropic, ollama):
        await fake.start()
    yield openai, anthropic, ollama
    for fake in (openai, anthropic, ollama):
        await fake.stop()


def _request(model: str, fallbacks: list[str]) -> chat_api.ChatRequest:
    return chat_api.ChatRequest(
        model=model,
        messages=[
            chat_pb2.Message(
                role=chat_pb2.ROLE_SYSTEM, content=[chat_pb2.ContentPart(text="Be brief.")]
            ),
            chat_pb2.Message(role=chat_pb2.ROLE_USER, content=[chat_pb2.ContentPart(text="Hi")]),
        ],
        generation=chat_pb2.GenerationConfig(max_tokens=32),
        routing=chat_api.RoutingHints(fallback_models=fallbacks),
    )


async def test_a_chat_falls_back_across_wire_formats(
    pg_url: str,
    redis_url: str,
    tmp_path: Path,
    as_caller: Callable[..., list[tuple[str, str]]],
    fakes: tuple[FakeOpenAI, FakeAnthropic, FakeOllama],
) -> None:
    openai, anthropic, ollama = fakes
    config = CONFIG.format(openai=openai.url, anthropic=anthropic.base_url, ollama=ollama.base_url)
    async with (
        running_suite(pg_url, redis_url, config, tmp_path) as (settings, _),
        grpc.aio.insecure_channel(settings.addrs["router"]) as channel,
    ):
        stub = chat_grpc.ChatServiceStub(channel)
        metadata = as_caller("acme", "chat", key_id="app")
        openai.set_fault(Fault.http_error(503))  # the primary fails before its first token
        request = _request("openai/gpt-4o-mini", ["anthropic/claude-3-5-haiku-latest"])
        events = [e async for e in stub.ChatStream(request, metadata=metadata)]
        assert events[0].start.model == "anthropic/claude-3-5-haiku-latest"
        text = "".join(e.text_delta.text for e in events if e.WhichOneof("event") == "text_delta")
        assert text == anthropic.reply_text
        end = events[-1].end
        assert [f.model for f in end.fallbacks] == ["openai/gpt-4o-mini"]
        assert end.usage.prompt_tokens > 0 and not end.usage.estimated
        sent = [r for r in anthropic.requests if r.path.endswith("/messages")][-1].body
        assert sent is not None
        assert sent["system"] == "Be brief." and sent["max_tokens"] == 32

        events = [
            e
            async for e in stub.ChatStream(
                _request("ollama/llama3.2:latest", []), metadata=metadata
            )
        ]
        assert events[-1].end.finish_reason == chat_pb2.FINISH_REASON_STOP
        assert events[-1].end.cost_micro_usd == 0  # a local provider
