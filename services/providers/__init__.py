"""Provider adapters and listings: one module per wire format, and the choice among them."""

from __future__ import annotations

import httpx

from services.common.config_file import ProviderEntry
from services.providers import anthropic, gemini, listing, ollama, openai
from services.providers.anthropic import AnthropicAdapter
from services.providers.base import ProviderAdapter
from services.providers.custom import CustomAdapter
from services.providers.gemini import GeminiAdapter
from services.providers.listing import DetailCache, Endpoint, ListedModel, ListingError
from services.providers.ollama import OllamaAdapter
from services.providers.openai import OpenAIAdapter
from services.providers.types import OPENAI_WIRE, ProviderType

_NATIVE: dict[ProviderType, type[AnthropicAdapter | GeminiAdapter | OllamaAdapter]] = {
    ProviderType.ANTHROPIC: AnthropicAdapter,
    ProviderType.GEMINI: GeminiAdapter,
    ProviderType.OLLAMA: OllamaAdapter,
}

__all__ = [
    "OPENAI_WIRE",
    "AnthropicAdapter",
    "CustomAdapter",
    "GeminiAdapter",
    "OllamaAdapter",
    "OpenAIAdapter",
    "ProviderType",
    "adapter_base_url",
    "adapter_for",
    "list_models",
]


def adapter_for(entry: ProviderEntry) -> ProviderAdapter | None:
    """The adapter for a configured provider.

    Args:
        entry: The provider as configured.

    Returns:
        An adapter speaking the provider's wire format, or None for a type no
        adapter speaks.
    """
    kind = ProviderType.from_config(entry.type)
    if kind.speaks_openai:
        return OpenAIAdapter(
            entry.id,
            entry.base_url,
            credential=entry.credential,
            organization=entry.organization,
            headers=entry.headers,
            connect_timeout=entry.connect_timeout_seconds,
            read_timeout=entry.read_timeout_seconds,
        )
    if kind == ProviderType.CUSTOM and entry.custom is not None:
        return CustomAdapter(
            entry.id,
            entry.base_url,
            entry.custom,
            credential=entry.credential,
            headers=entry.headers,
            connect_timeout=entry.connect_timeout_seconds,
            read_timeout=entry.read_timeout_seconds,
        )
    native = _NATIVE.get(kind)
    if native is None:
        return None
    return native(
        entry.id,
        entry.base_url,
        credential=entry.credential,
        headers=entry.headers,
        connect_timeout=entry.connect_timeout_seconds,
        read_timeout=entry.read_timeout_seconds,
    )


def adapter_base_url(kind: ProviderType, base_url: str) -> str:
    """The base URL an adapter takes, from one as operators paste it.

    Listing accepts an Anthropic URL with ``/v1`` and Ollama's
    OpenAI-compatible ``/v1``; the adapters add their own path, so those
    suffixes are removed.
    """
    if kind == ProviderType.ANTHROPIC:
        return anthropic.api_root(base_url)
    if kind == ProviderType.OLLAMA:
        return ollama.api_root(base_url)
    return base_url


async def list_models(
    endpoint: Endpoint,
    client: httpx.AsyncClient,
    *,
    deadline: float = listing.DEFAULT_DEADLINE_SECONDS,
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
            something that is not its documented format, or its type has no
            listing.
    """
    return await listing.bounded(
        _list(endpoint, client, details if details is not None else {}), deadline
    )


async def _list(
    endpoint: Endpoint, client: httpx.AsyncClient, details: DetailCache
) -> list[ListedModel]:
    try:
        kind = ProviderType(endpoint.type)
    except ValueError:
        raise _unsupported(str(endpoint.type)) from None
    if kind == ProviderType.CUSTOM:
        return [ListedModel(model_id=model) for model in endpoint.declared_models]
    if kind.speaks_openai:
        return await openai.list_models(endpoint, client)
    if kind == ProviderType.OLLAMA:
        return await ollama.list_models(endpoint, client, details)
    if kind == ProviderType.ANTHROPIC:
        return await anthropic.list_models(endpoint, client)
    if kind == ProviderType.GEMINI:
        return await gemini.list_models(endpoint, client)
    raise _unsupported(f"PROVIDER_TYPE_{kind.name}")


def _unsupported(type_name: str) -> ListingError:
    return ListingError(f"model listing is not supported for {type_name} providers yet")
