"""Request builders for the cache tests."""

from __future__ import annotations

from typing import Any

from orchestra.cache.v1 import cache_service_pb2
from orchestra.common.v1 import chat_pb2

SYSTEM = "You are a terse assistant."
QUESTION = "What is the capital of France?"


def text_message(role: chat_pb2.Role.ValueType, text: str) -> chat_pb2.Message:
    """A message with one text part."""
    return chat_pb2.Message(role=role, content=[chat_pb2.ContentPart(text=text)])


def conversation(question: str = QUESTION, system: str = SYSTEM) -> list[chat_pb2.Message]:
    """A system prompt and one user question."""
    return [
        text_message(chat_pb2.ROLE_SYSTEM, system),
        text_message(chat_pb2.ROLE_USER, question),
    ]


def key(
    tenant: str = "acme",
    model: str = "openai/gpt-4o-mini",
    messages: list[chat_pb2.Message] | None = None,
    **generation: Any,
) -> cache_service_pb2.CacheKey:
    """A cache key; keyword arguments are GenerationConfig fields (temperature 0 by default)."""
    generation.setdefault("temperature", 0.0)
    return cache_service_pb2.CacheKey(
        tenant_id=tenant,
        model=model,
        messages=messages if messages is not None else conversation(),
        generation=chat_pb2.GenerationConfig(**generation),
    )


def answer(text: str = "Paris.", **fields: Any) -> cache_service_pb2.CachedAnswer:
    """A complete, cacheable answer; keyword arguments override its fields."""
    values: dict[str, Any] = {
        "text": text,
        "finish_reason": chat_pb2.FINISH_REASON_STOP,
        "usage": chat_pb2.Usage(prompt_tokens=20, completion_tokens=3),
        "cost_micro_usd": 42,
        "model": "openai/gpt-4o-mini",
    }
    values.update(fields)
    return cache_service_pb2.CachedAnswer(**values)


def store_request(
    cache_key: cache_service_pb2.CacheKey | None = None,
    cached: cache_service_pb2.CachedAnswer | None = None,
    **fields: Any,
) -> cache_service_pb2.StoreRequest:
    """A StoreRequest for ``cache_key`` (default: ``key()``) and ``cached``."""
    fields.setdefault("request_id", "req-1")
    return cache_service_pb2.StoreRequest(
        key=cache_key if cache_key is not None else key(),
        answer=cached if cached is not None else answer(),
        **fields,
    )


def lookup_request(cache_key: cache_service_pb2.CacheKey) -> cache_service_pb2.LookupRequest:
    """An exact-only LookupRequest for ``cache_key``."""
    return cache_service_pb2.LookupRequest(key=cache_key, exact_only=True)
