"""Model listing against real local HTTP servers speaking each provider's format."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from orchestra.discovery.v1 import discovery_service_pb2 as pb
from services.providers import list_models
from services.providers.listing import Endpoint, ListedModel, ListingError
from tests.fakes.faults import Fault
from tests.fakes.openai_upstream import FakeOpenAI
from tests.providers.listing_upstreams import FakeOllama, JsonUpstream

SECRET = "sk-live-LISTING-secret-0123456789abcdef"


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


@pytest.fixture
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    """An OpenAI-wire upstream that requires ``SECRET``."""
    async with FakeOpenAI(
        api_key=SECRET, models=["gpt-4o-mini", "gpt-4o-2024-08-06", "text-embedding-3-small"]
    ) as fake:
        yield fake


@pytest.fixture
async def fake_ollama() -> AsyncIterator[FakeOllama]:
    """An Ollama upstream with two models, one loaded."""
    server = FakeOllama(["llama3.1:8b", "smollm2:135m"], loaded=["smollm2:135m"])
    await server.start()
    yield server
    await server.stop()


async def test_openai_lists_chat_models_with_bearer_and_organization(
    fake_openai: FakeOpenAI, http: httpx.AsyncClient
) -> None:
    endpoint = Endpoint(
        pb.PROVIDER_TYPE_OPENAI, fake_openai.url, credential=SECRET, organization="org-42"
    )

    models = await list_models(endpoint, http)

    # The official API's embedding model is not a chat model.
    assert [m.model_id for m in models] == ["gpt-4o-2024-08-06", "gpt-4o-mini"]
    sent = fake_openai.requests[-1]
    assert sent.path == "/v1/models"
    assert sent.headers["authorization"] == f"Bearer {SECRET}"
    assert sent.headers["openai-organization"] == "org-42"


async def test_openai_compatible_keeps_every_model_and_extra_headers(
    fake_openai: FakeOpenAI, http: httpx.AsyncClient
) -> None:
    endpoint = Endpoint(
        pb.PROVIDER_TYPE_OPENAI_COMPATIBLE,
        fake_openai.url,
        credential=SECRET,
        # The provider's credential wins over an operator header of any case.
        headers={"x-team": "search", "Authorization": "Bearer not-the-key"},
        local=True,
    )

    models = await list_models(endpoint, http)

    assert [m.model_id for m in models] == [
        "gpt-4o-2024-08-06",
        "gpt-4o-mini",
        "text-embedding-3-small",
    ]
    assert all(m.loaded for m in models)  # a local OpenAI-wire server serves what it lists
    sent = fake_openai.requests[-1].headers
    assert sent["x-team"] == "search"
    assert sent.getall("authorization") == [f"Bearer {SECRET}"]


async def test_vllm_reports_its_context_window(http: httpx.AsyncClient) -> None:
    body = {
        "object": "list",
        "data": [
            {"id": "meta-llama/Llama-3.1-8B-Instruct", "object": "model", "max_model_len": 32768}
        ],
    }
    server = JsonUpstream({"/v1/models": lambda _q: body})
    await server.start()
    try:
        models = await list_models(Endpoint(pb.PROVIDER_TYPE_VLLM, f"{server.base_url}/v1"), http)
    finally:
        await server.stop()
    assert models == [ListedModel("meta-llama/Llama-3.1-8B-Instruct", context_window=32768)]


async def test_ollama_lists_tags_and_marks_loaded(
    fake_ollama: FakeOllama, http: httpx.AsyncClient
) -> None:
    # An operator may paste the OpenAI-compatible URL; the native API is at the root.
    endpoint = Endpoint(pb.PROVIDER_TYPE_OLLAMA, f"{fake_ollama.base_url}/v1")
    fake_ollama.contexts = {"llama3.1:8b": 131072}

    models = await list_models(endpoint, http)

    assert models == [
        ListedModel("llama3.1:8b", context_window=131072, loaded=False),
        ListedModel(
            "smollm2:135m",
            loaded=True,
            vram_bytes=FakeOllama.SIZE_VRAM,
            memory_bytes=FakeOllama.SIZE,
        ),
    ]
    paths = [r.path for r in fake_ollama.requests]
    assert paths[:2] == ["/api/tags", "/api/ps"]
    assert sorted(paths[2:]) == ["/api/show", "/api/show"]


async def test_ollama_without_show_or_ps_still_lists(http: httpx.AsyncClient) -> None:
    # An old server: /api/tags only. Loaded state and context are hints.
    tags = {"models": [{"name": "llama3.2:latest", "model": "llama3.2:latest"}]}
    server = JsonUpstream({"/api/tags": lambda _q: tags})
    await server.start()
    try:
        models = await list_models(Endpoint(pb.PROVIDER_TYPE_OLLAMA, server.base_url), http)
    finally:
        await server.stop()
    assert models == [ListedModel("llama3.2:latest")]


async def test_anthropic_follows_pages(http: httpx.AsyncClient) -> None:
    def page(query: dict[str, str]) -> dict[str, Any]:
        if "after_id" not in query:
            return {
                "data": [{"type": "model", "id": "claude-sonnet-4-20250514"}],
                "has_more": True,
                "first_id": "claude-sonnet-4-20250514",
                "last_id": "claude-sonnet-4-20250514",
            }
        return {
            "data": [{"type": "model", "id": "claude-3-5-haiku-20241022"}],
            "has_more": False,
            "first_id": "claude-3-5-haiku-20241022",
            "last_id": "claude-3-5-haiku-20241022",
        }

    server = JsonUpstream({"/v1/models": page})
    await server.start()
    try:
        endpoint = Endpoint(pb.PROVIDER_TYPE_ANTHROPIC, server.base_url, credential=SECRET)
        models = await list_models(endpoint, http)
    finally:
        await server.stop()
    assert [m.model_id for m in models] == ["claude-3-5-haiku-20241022", "claude-sonnet-4-20250514"]
    first, second = server.requests
    assert first.headers["x-api-key"] == SECRET
    assert first.headers["anthropic-version"] == "2023-06-01"
    assert second.query["after_id"] == "claude-sonnet-4-20250514"


async def test_gemini_follows_pages_and_keeps_chat_models(http: httpx.AsyncClient) -> None:
    def page(query: dict[str, str]) -> dict[str, Any]:
        if "pageToken" not in query:
            return {
                "models": [
                    {
                        "name": "models/gemini-2.0-flash",
                        "inputTokenLimit": 1048576,
                        "outputTokenLimit": 8192,
                        "supportedGenerationMethods": ["generateContent", "countTokens"],
                    },
                    {
                        "name": "models/text-embedding-004",
                        "inputTokenLimit": 2048,
                        "supportedGenerationMethods": ["embedContent"],
                    },
                ],
                "nextPageToken": "page-2",
            }
        return {
            "models": [
                {
                    "name": "models/gemini-2.5-pro",
                    "inputTokenLimit": 1048576,
                    "outputTokenLimit": 65536,
                    "supportedGenerationMethods": ["generateContent"],
                }
            ]
        }

    server = JsonUpstream({"/v1beta/models": page})
    await server.start()
    try:
        endpoint = Endpoint(pb.PROVIDER_TYPE_GEMINI, server.base_url, credential=SECRET)
        models = await list_models(endpoint, http)
    finally:
        await server.stop()
    assert models == [
        ListedModel("gemini-2.0-flash", context_window=1048576, max_output_tokens=8192),
        ListedModel("gemini-2.5-pro", context_window=1048576, max_output_tokens=65536),
    ]
    assert server.requests[0].headers["x-goog-api-key"] == SECRET
    assert "key" not in server.requests[0].query  # never in the URL
    assert server.requests[1].query["pageToken"] == "page-2"


async def test_wrong_key_is_a_listing_error_without_the_key(
    fake_openai: FakeOpenAI, http: httpx.AsyncClient
) -> None:
    wrong = "sk-wrong-" + "Q" * 30
    with pytest.raises(ListingError) as info:
        await list_models(
            Endpoint(pb.PROVIDER_TYPE_OPENAI, fake_openai.url, credential=wrong), http
        )
    assert str(info.value).startswith("HTTP 401: Incorrect API key provided")
    assert wrong not in str(info.value)


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (Fault.http_error(500), "HTTP 500: The server had an error"),
        (Fault.rate_limit(retry_after=3), "HTTP 429: Rate limit reached"),
        (Fault.disconnect(), "cannot reach provider"),
    ],
)
async def test_upstream_failures_are_listing_errors(
    fake_openai: FakeOpenAI, http: httpx.AsyncClient, fault: Fault, message: str
) -> None:
    fake_openai.set_fault(fault, endpoint="models")
    endpoint = Endpoint(pb.PROVIDER_TYPE_OPENAI, fake_openai.url, credential=SECRET)
    with pytest.raises(ListingError, match=message):
        await list_models(endpoint, http)


async def test_unreachable_malformed_slow_and_unsupported(
    fake_openai: FakeOpenAI, http: httpx.AsyncClient
) -> None:
    await fake_openai.refuse_connections()
    with pytest.raises(ListingError, match="cannot reach provider"):
        await list_models(Endpoint(pb.PROVIDER_TYPE_OPENAI, fake_openai.url), http)

    server = JsonUpstream({"/v1/models": lambda _q: {"object": "list", "models": []}})
    await server.start()
    try:
        with pytest.raises(ListingError, match="malformed response"):
            await list_models(Endpoint(pb.PROVIDER_TYPE_VLLM, f"{server.base_url}/v1"), http)
    finally:
        await server.stop()

    await fake_openai.accept_connections()
    fake_openai.set_fault(Fault.timeout(delay=30), endpoint="models")
    with pytest.raises(ListingError, match=r"did not finish within 0\.3s"):
        endpoint = Endpoint(pb.PROVIDER_TYPE_OPENAI, fake_openai.url, credential=SECRET)
        await list_models(endpoint, http, deadline=0.3)

    with pytest.raises(ListingError, match="not supported for PROVIDER_TYPE_UNSPECIFIED"):
        await list_models(Endpoint(pb.PROVIDER_TYPE_UNSPECIFIED, "http://127.0.0.1:9"), http)
    # A custom provider is never asked: it reports the models it declares.
    declared = Endpoint(pb.PROVIDER_TYPE_CUSTOM, "http://127.0.0.1:9", declared_models=["m1"])
    assert [m.model_id for m in await list_models(declared, http)] == ["m1"]
