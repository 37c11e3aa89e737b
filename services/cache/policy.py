"""Which answers the cache stores, and for how long.

Store refuses (``stored=false`` with a ``skip_reason``) in this order:

* ``temperature``: the request asked for a temperature above
  ``ORCHESTRA_CACHE_MAX_TEMPERATURE`` (default 0.5). An explicit high
  temperature asks for variety; replaying one sample would defeat it.
  *Unset temperature is eligible* (``ORCHESTRA_CACHE_STORE_UNSET_TEMPERATURE``,
  default true). Strictly, unset means the provider's default (1.0 for
  OpenAI), but most clients never set it: treating unset as 1.0 would turn the
  cache off for nearly all traffic, the local demo included, while the
  clients that do care about variety are exactly those that set it. The unset
  value stays part of the key (it never matches an explicit 0 or 1), and an
  operator who wants the strict reading sets the variable to false, which
  skips such answers with ``temperature`` too.
* ``tool_calls``: the answer calls tools (or finished for that reason). Tool
  calls act on the world and their results change; replaying them is wrong.
* ``error``, ``cancelled``, ``content_filter``, ``finish_unknown``: only
  complete answers (finish reason STOP, or LENGTH, which the key's max_tokens
  reproduces) are cached; a partial, refused or unknown answer never is.
* ``empty_answer``: the answer's text is empty or only whitespace.
* ``too_large``: the serialised answer exceeds ``ORCHESTRA_CACHE_MAX_ENTRY_BYTES``.

Tenant policy (``cache_enabled``, ``cache_ttl_seconds``) lives with the
budget service and is applied by the router: it does not call Lookup/Store
for a tenant with the cache off, and passes the tenant's TTL in
``StoreRequest.ttl_seconds``. Zero there means this service's default.
"""

from __future__ import annotations

import enum

from orchestra.cache.v1 import cache_service_pb2
from orchestra.common.v1 import chat_pb2
from services.cache.config import CacheConfig

_STORABLE_FINISH = (chat_pb2.FINISH_REASON_STOP, chat_pb2.FINISH_REASON_LENGTH)

_FINISH_SKIPS = {
    chat_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
    chat_pb2.FINISH_REASON_ERROR: "error",
    chat_pb2.FINISH_REASON_CANCELLED: "cancelled",
    chat_pb2.FINISH_REASON_CONTENT_FILTER: "content_filter",
}


class SkipReason(enum.StrEnum):
    """Why Store did not store an answer (the wire form of ``skip_reason``)."""

    TEMPERATURE = "temperature"
    TOOL_CALLS = "tool_calls"
    ERROR = "error"
    CANCELLED = "cancelled"
    CONTENT_FILTER = "content_filter"
    FINISH_UNKNOWN = "finish_unknown"
    EMPTY_ANSWER = "empty_answer"
    TOO_LARGE = "too_large"


def skip_reason(
    generation: chat_pb2.GenerationConfig,
    answer: cache_service_pb2.CachedAnswer,
    answer_bytes: int,
    config: CacheConfig,
) -> SkipReason | None:
    """Returns why this answer must not be stored, or None if it may be.

    Args:
        generation: The parameters of the request that was answered.
        answer: The answer.
        answer_bytes: Size of the serialised answer.
        config: The eligibility settings.
    """
    if generation.HasField("temperature"):
        # float32 on the wire: 0.3 arrives as 0.30000001, which must not count as above 0.3.
        if round(generation.temperature, 6) > config.max_temperature:
            return SkipReason.TEMPERATURE
    elif not config.store_unset_temperature:
        return SkipReason.TEMPERATURE
    if answer.tool_calls:
        return SkipReason.TOOL_CALLS
    if answer.finish_reason not in _STORABLE_FINISH:
        return SkipReason(_FINISH_SKIPS.get(answer.finish_reason, SkipReason.FINISH_UNKNOWN))
    if not answer.text.strip():
        return SkipReason.EMPTY_ANSWER
    if answer_bytes > config.max_entry_bytes:
        return SkipReason.TOO_LARGE
    return None


def ttl_seconds(requested: int, config: CacheConfig) -> int:
    """The lifetime of a new entry: the request's, else the configured default."""
    return requested if requested > 0 else config.default_ttl_seconds
