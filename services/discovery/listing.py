"""Asks a provider which models it serves, in the provider's own wire format.

* OpenAI, vLLM, LM Studio and any OpenAI-compatible server:
  ``GET {base_url}/models`` with ``Authorization: Bearer`` (and
  ``OpenAI-Organization`` when set) answers ``{"object": "list", "data":
  [{"id": ...}]}``; vLLM adds ``max_model_len``. ``base_url`` ends in ``/v1``
  as it does for the OpenAI SDK.
* Ollama: ``GET {base}/api/tags`` answers ``{"models": [{"name", "model",
  "details"}]}``; ``GET {base}/api/ps`` names the models loaded in memory now
  with their ``size`` and ``size_vram``, and ``POST {base}/api/show`` gives
  each model's context length (``model_info["<arch>.context_length"]``). Both
  are best effort: an old server without them is not a failure.
* Anthropic: ``GET {base}/v1/models`` with ``x-api-key`` and
  ``anthropic-version``, paginated by ``after_id`` while ``has_more``.
* Gemini: ``GET {base}/v1beta/models`` with ``x-goog-api-key`` (never ``?key=``,
  which would put the key in URLs and error messages), paginated by
  ``pageToken``; only models that support ``generateContent`` are chat models.

Errors become :class:`ListingError` with a short message fit for an operator
(status, the provider's own error text): never a credential or header value.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from orchestra.discovery.v1 import discovery_service_pb2 as pb

ANTHROPIC_VERSION = "2023-06-01"
DEFAULT_DEADLINE_SECONDS = 20.0
_MAX_PAGES = 20  # a provider with more than 20 pages of models is misbehaving
_MAX_ERROR_CHARS = 300
_OLLAMA_SHOW_CONCURRENCY = 4  # one local server: a few /api/show at a time
_MAX_DETAILS = 100_000

DetailCache = dict[tuple[str, str, str], int]
"""(server root, model name, digest) -> context length, from Ollama's /api/show."""

_OPENAI_WIRE = frozenset(
    {
        pb.PROVIDER_TYPE_OPENAI,
        pb.PROVIDER_TYPE_VLLM,
        pb.PROVIDER_TYPE_LM_STUDIO,
        pb.PROVIDER_TYPE_OPENAI_COMPATIBLE,
    }
)
# OpenAI's own /models lists embedding, image, audio and moderation models too;
# the gateway routes chat, so those are left out (only for the official API,
# where the ids are known; compatible servers list what they serve).
_OPENAI_NON_CHAT = re.compile(
    r"^(text-embedding|embedding|dall-e|gpt-image|tts-|whisper|omni-moderation|"
    r"text-moderation|davinci|babbage|sora|computer-use)"
)


class ListingError(Exception):
    """The provider could not be listed; the message says why (no secrets)."""


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """What listing needs to know about a provider.

    Attributes:
        type: Its wire format (``ProviderType`` value).
        base_url: Base URL without a trailing slash.
        credential: The API credential in clear ("" for none).
        headers: Extra headers sent with every request.
        organization: OpenAI organisation id ("" for none).
        connect_timeout: Seconds to wait for a connection.
        read_timeout: Seconds to wait between bytes.
        local: A local server (its listed models are loaded and free).
        declared_models: Models the provider declares (a custom provider):
            reported as they are, without a request.
    """

    type: int
    base_url: str
    credential: str = ""
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    organization: str = ""
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    local: bool = False
    declared_models: Sequence[str] = ()


@dataclasses.dataclass(frozen=True)
class ListedModel:
    """A model as the provider reports it.

    Attributes:
        model_id: The provider's id for it.
        context_window: Tokens, when the provider says (0 otherwise).
        max_output_tokens: Tokens, when the provider says (0 otherwise).
        loaded: For local servers, whether it is in memory now.
        vram_bytes: For a loaded local model, bytes in accelerator memory.
        memory_bytes: For a loaded local model, bytes in all.
    """

    model_id: str
    context_window: int = 0
    max_output_tokens: int = 0
    loaded: bool = False
    vram_bytes: int = 0
    memory_bytes: int = 0


def supports_listing(provider_type: int) -> bool:
    """Whether :func:`list_models` knows how to list this wire format."""
    return provider_type in _OPENAI_WIRE or provider_type in (
        pb.PROVIDER_TYPE_CUSTOM,  # its declared models
        pb.PROVIDER_TYPE_OLLAMA,
        pb.PROVIDER_TYPE_ANTHROPIC,
        pb.PROVIDER_TYPE_GEMINI,
    )


async def list_models(
    endpoint: Endpoint,
    client: httpx.AsyncClient,
    *,
    deadline: float = DEFAULT_DEADLINE_SECONDS,
    details: DetailCache | None = None,
) -> list[ListedModel]:
    """Lists the models ``endpoint`` serves, sorted by id, without duplicates.

    Args:
        endpoint: The provider.
        client: A shared HTTP client (timeouts are set per request).
        deadline: Seconds for the whole listing, pagination included.
        details: Per-model details already fetched (Ollama's ``/api/show``),
            kept between passes; a model's details are fetched again only
            when its digest changes.

    Raises:
        ListingError: The provider is unreachable, refused, or answered
            something that is not its documented format.
    """
    try:
        async with asyncio.timeout(deadline):
            models = await _dispatch(endpoint, client, details if details is not None else {})
    except TimeoutError:
        raise ListingError(f"listing did not finish within {deadline:g}s") from None
    except httpx.TimeoutException as exc:
        raise ListingError(f"timed out: {type(exc).__name__}") from None
    except httpx.HTTPError as exc:
        # str(exc) of a transport error names the failure, not our headers.
        raise ListingError(
            f"cannot reach provider: {_short(str(exc)) or type(exc).__name__}"
        ) from None
    unique = {m.model_id: m for m in models if m.model_id}
    return [unique[k] for k in sorted(unique)]


async def _dispatch(
    endpoint: Endpoint, client: httpx.AsyncClient, details: DetailCache
) -> list[ListedModel]:
    kind = endpoint.type
    if kind == pb.PROVIDER_TYPE_CUSTOM:
        return [ListedModel(model_id=model) for model in endpoint.declared_models]
    if kind in _OPENAI_WIRE:
        return await _openai(endpoint, client)
    if kind == pb.PROVIDER_TYPE_OLLAMA:
        return await _ollama(endpoint, client, details)
    if kind == pb.PROVIDER_TYPE_ANTHROPIC:
        return await _anthropic(endpoint, client)
    if kind == pb.PROVIDER_TYPE_GEMINI:
        return await _gemini(endpoint, client)
    known = kind in pb.ProviderType.values()
    name = pb.ProviderType.Name(pb.ProviderType.ValueType(kind)) if known else str(kind)
    raise ListingError(f"model listing is not supported for {name} providers yet")


def _timeout(endpoint: Endpoint) -> httpx.Timeout:
    return httpx.Timeout(
        connect=endpoint.connect_timeout,
        read=endpoint.read_timeout,
        write=endpoint.read_timeout,
        pool=endpoint.connect_timeout,
    )


async def _get_json(
    client: httpx.AsyncClient,
    endpoint: Endpoint,
    url: str,
    headers: Mapping[str, str],
    params: Mapping[str, str | int] | None = None,
) -> Any:
    merged = httpx.Headers({"accept": "application/json", **endpoint.headers})
    for name, value in headers.items():
        merged[name] = value  # ours replace an operator's header whatever its case
    response = await client.get(url, headers=merged, params=params, timeout=_timeout(endpoint))
    if response.status_code >= 400:
        raise ListingError(f"HTTP {response.status_code}: {_error_text(response)}")
    try:
        return response.json()
    except ValueError:
        raise ListingError("malformed response: body is not JSON") from None


def _error_text(response: httpx.Response) -> str:
    """The provider's own error message, from any of the common error shapes."""
    try:
        body = response.json()
    except ValueError:
        return _short(response.text) or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return _short(error["message"])
        if isinstance(error, str):
            return _short(error)
        if isinstance(body.get("message"), str):
            return _short(body["message"])
    return response.reason_phrase


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 1] + "…"


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _list_of_dicts(body: Any, key: str) -> list[dict[str, Any]]:
    if not isinstance(body, dict) or not isinstance(body.get(key), list):
        raise ListingError(f"malformed response: no {key!r} list")
    return [item for item in body[key] if isinstance(item, dict)]


async def _openai(endpoint: Endpoint, client: httpx.AsyncClient) -> list[ListedModel]:
    headers: dict[str, str] = {}
    if endpoint.credential:
        headers["authorization"] = f"Bearer {endpoint.credential}"
    if endpoint.organization:
        headers["openai-organization"] = endpoint.organization
    body = await _get_json(client, endpoint, f"{endpoint.base_url}/models", headers)
    official = endpoint.type == pb.PROVIDER_TYPE_OPENAI
    # llama.cpp and vLLM serve exactly what they list: it is in memory.
    loaded = endpoint.local and endpoint.type != pb.PROVIDER_TYPE_LM_STUDIO
    out = []
    for item in _list_of_dicts(body, "data"):
        model_id = item.get("id")
        if not isinstance(model_id, str) or (official and _OPENAI_NON_CHAT.match(model_id)):
            continue
        out.append(
            ListedModel(model_id, context_window=_int(item.get("max_model_len")), loaded=loaded)
        )
    return out


def ollama_root(base_url: str) -> str:
    """Ollama's root URL: operators often paste its OpenAI-compatible ``/v1``
    (or ``/api``) URL, but the native API hangs off the root."""
    return base_url.removesuffix("/v1").removesuffix("/api")


async def _ollama(
    endpoint: Endpoint, client: httpx.AsyncClient, details: DetailCache
) -> list[ListedModel]:
    root = ollama_root(endpoint.base_url)
    headers = {"authorization": f"Bearer {endpoint.credential}"} if endpoint.credential else {}
    body = await _get_json(client, endpoint, f"{root}/api/tags", headers)
    names, digests = [], []
    for item in _list_of_dicts(body, "models"):
        name = item.get("name") or item.get("model")
        if isinstance(name, str):
            names.append(name)
            digests.append(str(item.get("digest") or ""))
    loaded = await _ollama_loaded(endpoint, client, root, headers)
    gate = asyncio.Semaphore(_OLLAMA_SHOW_CONCURRENCY)

    async def context_of(name: str, digest: str) -> int:
        key = (root, name, digest)
        if digest and key in details:
            return details[key]
        found = await _ollama_context(endpoint, client, root, headers, name, gate)
        if digest and found:
            if len(details) >= _MAX_DETAILS:
                details.clear()  # bounded; refills as providers are listed
            details[key] = found
        return found

    contexts = await asyncio.gather(
        *(context_of(n, d) for n, d in zip(names, digests, strict=True))
    )
    out = []
    for name, context in zip(names, contexts, strict=True):
        size, vram = loaded.get(name, (0, 0))
        out.append(
            ListedModel(
                name,
                context_window=context,
                loaded=name in loaded,
                vram_bytes=vram,
                memory_bytes=size,
            )
        )
    return out


async def _ollama_loaded(
    endpoint: Endpoint, client: httpx.AsyncClient, root: str, headers: Mapping[str, str]
) -> dict[str, tuple[int, int]]:
    """Loaded models: name -> (size, size_vram) in bytes."""
    try:
        body = await _get_json(client, endpoint, f"{root}/api/ps", headers)
        return {
            str(item.get("name") or item.get("model")): (
                _int(item.get("size")),
                _int(item.get("size_vram")),
            )
            for item in _list_of_dicts(body, "models")
        }
    except (ListingError, httpx.HTTPError):
        return {}  # the listing itself worked; "loaded" is a hint


async def _ollama_context(
    endpoint: Endpoint,
    client: httpx.AsyncClient,
    root: str,
    headers: Mapping[str, str],
    name: str,
    gate: asyncio.Semaphore,
) -> int:
    """The model's trained context length from ``/api/show`` (0 when unknown)."""
    merged = httpx.Headers({"accept": "application/json", **endpoint.headers})
    for key, value in headers.items():
        merged[key] = value
    try:
        async with gate:
            response = await client.post(
                f"{root}/api/show", json={"model": name}, headers=merged, timeout=_timeout(endpoint)
            )
        info = response.json().get("model_info") if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError):
        return 0  # a hint, like /api/ps
    if not isinstance(info, dict):
        return 0
    return max(
        (_int(v) for k, v in info.items() if isinstance(k, str) and k.endswith(".context_length")),
        default=0,
    )


async def _anthropic(endpoint: Endpoint, client: httpx.AsyncClient) -> list[ListedModel]:
    base = endpoint.base_url
    url = f"{base}/models" if base.endswith("/v1") else f"{base}/v1/models"
    headers = {"anthropic-version": ANTHROPIC_VERSION}
    if endpoint.credential:
        headers["x-api-key"] = endpoint.credential
    out: list[ListedModel] = []
    params: dict[str, str | int] = {"limit": 1000}
    for _ in range(_MAX_PAGES):
        body = await _get_json(client, endpoint, url, headers, params)
        items = _list_of_dicts(body, "data")
        out.extend(ListedModel(i["id"]) for i in items if isinstance(i.get("id"), str))
        last_id = body.get("last_id")
        if body.get("has_more") is not True or not isinstance(last_id, str):
            return out
        params = {"limit": 1000, "after_id": last_id}
    raise ListingError(f"more than {_MAX_PAGES} pages of models")


async def _gemini(endpoint: Endpoint, client: httpx.AsyncClient) -> list[ListedModel]:
    base = endpoint.base_url
    versioned = re.search(r"/v1(beta|alpha)?$", base) is not None
    url = f"{base}/models" if versioned else f"{base}/v1beta/models"
    headers = {"x-goog-api-key": endpoint.credential} if endpoint.credential else {}
    out: list[ListedModel] = []
    params: dict[str, str | int] = {"pageSize": 1000}
    for _ in range(_MAX_PAGES):
        body = await _get_json(client, endpoint, url, headers, params)
        for item in _list_of_dicts(body, "models"):
            name = item.get("name")
            methods = item.get("supportedGenerationMethods") or []
            if not isinstance(name, str) or "generateContent" not in methods:
                continue
            out.append(
                ListedModel(
                    name.removeprefix("models/"),
                    context_window=_int(item.get("inputTokenLimit")),
                    max_output_tokens=_int(item.get("outputTokenLimit")),
                )
            )
        token = body.get("nextPageToken")
        if not isinstance(token, str) or not token:
            return out
        params = {"pageSize": 1000, "pageToken": token}
    raise ListingError(f"more than {_MAX_PAGES} pages of models")
