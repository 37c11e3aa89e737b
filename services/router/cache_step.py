"""The cache step of a chat: whether to look the prompt up, and replaying a hit.

The lookup runs beside the budget reservation (see
:meth:`services.router.engine.Engine.stream`); a hit is replayed to the client
as a stream, in the same events a provider's answer would produce, and audited.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from orchestra.cache.v1 import cache_service_pb2 as cache_pb2
from orchestra.common.v1 import chat_pb2
from orchestra.router.v1 import chat_service_pb2 as chat_api
from services.router import records
from services.router.accounting import Accountant
from services.router.context import RequestContext

# A hit's text goes in deltas of this many characters: the whole answer is at
# hand, so a few large messages (one per 16 KiB) cost the router, Envoy and the
# client far less than many small ones; each is well under gRPC's 4 MiB limit.
CACHE_REPLAY_CHUNK_CHARS = 16_384
_LOOKUP_MODES = (chat_api.CACHE_MODE_UNSPECIFIED, chat_api.CACHE_MODE_NO_STORE)


def lookup_request(ctx: RequestContext) -> cache_pb2.LookupRequest | None:
    """The cache lookup for this request, or None when the cache may not answer it."""
    request = ctx.request
    if not ctx.cacheable or request.cache.mode not in _LOOKUP_MODES:
        return None
    lookup = records.lookup_request(ctx.identity, request, ctx.decision)
    if request.cache.exact_only:
        lookup.exact_only = True
    return lookup


async def replay(
    ctx: RequestContext, hit: cache_pb2.LookupResponse, accountant: Accountant
) -> AsyncIterator[chat_api.ChatStreamResponse]:
    """Streams a cache hit as the events of an answer, then audits it."""
    answer = hit.answer
    kind = cache_pb2.MatchKind.Name(hit.match_kind).removeprefix("MATCH_KIND_").lower()
    reason = f"cache hit ({kind})"
    yield chat_api.ChatStreamResponse(
        start=chat_api.ChatStart(
            request_id=ctx.request_id, model=answer.model, routing_reason=reason, cache_hit=True
        )
    )
    first_token_ms = ctx.elapsed_ms()
    text = answer.text
    for i in range(0, len(text), CACHE_REPLAY_CHUNK_CHARS):
        yield chat_api.ChatStreamResponse(
            text_delta=chat_api.TextDelta(text=text[i : i + CACHE_REPLAY_CHUNK_CHARS])
        )
    usage = chat_pb2.Usage(prompt_tokens=answer.usage.prompt_tokens, completion_tokens=0)
    yield chat_api.ChatStreamResponse(usage=usage)
    latency_ms = ctx.elapsed_ms()
    yield chat_api.ChatStreamResponse(
        end=chat_api.ChatEnd(
            finish_reason=answer.finish_reason,
            usage=usage,
            cost_micro_usd=0,
            cache_hit=True,
            time_to_first_token_ms=first_token_ms,
            latency_ms=latency_ms,
        )
    )
    await accountant.audit_hit(ctx, answer, reason, usage, latency_ms)
