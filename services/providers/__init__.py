"""Provider adapters: one module per wire format, and the choice among them."""

from __future__ import annotations

from services.common.config_file import ProviderEntry
from services.providers.anthropic import AnthropicAdapter
from services.providers.base import ProviderAdapter
from services.providers.custom import CustomAdapter
from services.providers.gemini import GeminiAdapter
from services.providers.ollama import OllamaAdapter
from services.providers.openai import OpenAIAdapter

# Provider types that speak the OpenAI chat-completions format.
OPENAI_WIRE = frozenset({"openai", "vllm", "lm_studio", "openai_compatible"})
_NATIVE: dict[str, type[AnthropicAdapter | GeminiAdapter | OllamaAdapter]] = {
    "anthropic": AnthropicAdapter,
    "gemini": GeminiAdapter,
    "ollama": OllamaAdapter,
}

__all__ = [
    "OPENAI_WIRE",
    "AnthropicAdapter",
    "CustomAdapter",
    "GeminiAdapter",
    "OllamaAdapter",
    "OpenAIAdapter",
    "adapter_for",
]


def adapter_for(entry: ProviderEntry) -> ProviderAdapter | None:
    """The adapter for a configured provider.

    Args:
        entry: The provider as configured.

    Returns:
        An adapter speaking the provider's wire format, or None for a type no
        adapter speaks.
    """
    if entry.type in OPENAI_WIRE:
        return OpenAIAdapter(
            entry.id,
            entry.base_url,
            credential=entry.credential,
            organization=entry.organization,
            headers=entry.headers,
            connect_timeout=entry.connect_timeout_seconds,
            read_timeout=entry.read_timeout_seconds,
        )
    if entry.type == "custom" and entry.custom is not None:
        return CustomAdapter(
            entry.id,
            entry.base_url,
            entry.custom,
            credential=entry.credential,
            headers=entry.headers,
            connect_timeout=entry.connect_timeout_seconds,
            read_timeout=entry.read_timeout_seconds,
        )
    native = _NATIVE.get(entry.type)
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
