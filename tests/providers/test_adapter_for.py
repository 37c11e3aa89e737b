"""``adapter_for`` picks the adapter of each provider type."""

from __future__ import annotations

from typing import get_args

import pytest

from services.common.config_file import ProviderEntry, ProviderTypeName
from services.providers import (
    AnthropicAdapter,
    CustomAdapter,
    GeminiAdapter,
    OllamaAdapter,
    OpenAIAdapter,
    adapter_for,
)

EXPECTED: dict[str, type | None] = {
    "openai": OpenAIAdapter,
    "vllm": OpenAIAdapter,
    "lm_studio": OpenAIAdapter,
    "openai_compatible": OpenAIAdapter,
    "anthropic": AnthropicAdapter,
    "gemini": GeminiAdapter,
    "ollama": OllamaAdapter,
    "custom": CustomAdapter,
}
CUSTOM = {"models": ["m1"], "request": {"q": "{{prompt}}"}, "response": {"text": "answer"}}


def test_every_configurable_type_is_decided() -> None:
    assert set(get_args(ProviderTypeName)) == set(EXPECTED)


@pytest.mark.parametrize(("kind", "expected"), EXPECTED.items())
async def test_adapter_for(kind: str, expected: type | None) -> None:
    entry = ProviderEntry.model_validate(
        {"id": "p1", "type": kind, "base_url": "http://127.0.0.1:1", "credential": "k"}
        | ({"custom": CUSTOM} if kind == "custom" else {})
    )
    adapter = adapter_for(entry)
    if expected is None:
        assert adapter is None
        return
    assert adapter is not None and isinstance(adapter, expected)
    assert adapter.provider_id == "p1"
    await adapter.aclose()
