"""What every provider's model listing shares: its input, its answer, its HTTP and errors.

Each vendor module lists its own provider's models in its own wire format
(``list_models`` in :mod:`~services.providers.openai`,
:mod:`~services.providers.ollama`, :mod:`~services.providers.anthropic` and
:mod:`~services.providers.gemini`); :func:`services.providers.list_models`
picks one by type. They share a client (timeouts are set per request, from
the provider's own) and :func:`get_json`.

Errors become :class:`ListingError` with a short message fit for an operator
(status, the provider's own error text): never a credential or header value.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any

import httpx

DEFAULT_DEADLINE_SECONDS = 20.0
MAX_PAGES = 20  # a provider with more than 20 pages of models is misbehaving
_MAX_ERROR_CHARS = 300

DetailCache = dict[tuple[str, str, str], int]
"""(server root, model name, digest) -> context length, from Ollama's /api/show."""


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


async def bounded(listing: Awaitable[list[ListedModel]], deadline: float) -> list[ListedModel]:
    """``listing``'s models, sorted by id, without duplicates, within ``deadline`` seconds.

    Raises:
        ListingError: The deadline passed, or the provider was unreachable
            (besides the listing's own ListingErrors).
    """
    try:
        async with asyncio.timeout(deadline):
            models = await listing
    except TimeoutError:
        raise ListingError(f"listing did not finish within {deadline:g}s") from None
    except httpx.TimeoutException as exc:
        raise ListingError(f"timed out: {type(exc).__name__}") from None
    except httpx.HTTPError as exc:
        # str(exc) of a transport error names the failure, not our headers.
        raise ListingError(
            f"cannot reach provider: {short(str(exc)) or type(exc).__name__}"
        ) from None
    unique = {m.model_id: m for m in models if m.model_id}
    return [unique[k] for k in sorted(unique)]


def timeout(endpoint: Endpoint) -> httpx.Timeout:
    """The provider's own timeouts, for one request on the shared client."""
    return httpx.Timeout(
        connect=endpoint.connect_timeout,
        read=endpoint.read_timeout,
        write=endpoint.read_timeout,
        pool=endpoint.connect_timeout,
    )


def request_headers(endpoint: Endpoint, headers: Mapping[str, str]) -> httpx.Headers:
    """The operator's headers with ``headers`` (the provider's own) over them."""
    merged = httpx.Headers({"accept": "application/json", **endpoint.headers})
    for name, value in headers.items():
        merged[name] = value  # ours replace an operator's header whatever its case
    return merged


async def get_json(
    client: httpx.AsyncClient,
    endpoint: Endpoint,
    url: str,
    headers: Mapping[str, str],
    params: Mapping[str, str | int] | None = None,
) -> Any:
    """GETs ``url`` and parses its JSON.

    Raises:
        ListingError: An error status (with the provider's message), or a
            body that is not JSON.
    """
    response = await client.get(
        url, headers=request_headers(endpoint, headers), params=params, timeout=timeout(endpoint)
    )
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
        return short(response.text) or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return short(error["message"])
        if isinstance(error, str):
            return short(error)
        if isinstance(body.get("message"), str):
            return short(body["message"])
    return response.reason_phrase


def short(text: str) -> str:
    """``text`` on one line, cut to a length fit for an error message."""
    text = " ".join(text.split())
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 1] + "…"


def positive_int(value: object) -> int:
    """``value`` if it is a positive whole number, else 0 (the provider did not say)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def list_of_dicts(body: Any, key: str) -> list[dict[str, Any]]:
    """The objects in ``body[key]``.

    Raises:
        ListingError: ``body`` has no such list.
    """
    if not isinstance(body, dict) or not isinstance(body.get(key), list):
        raise ListingError(f"malformed response: no {key!r} list")
    return [item for item in body[key] if isinstance(item, dict)]
