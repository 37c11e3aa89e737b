"""The cache step of a chat: whether to look the prompt up, and replaying a hit.

The lookup runs beside the budget reservation (see
:meth:`services.router.engine.Engine.stream`); a hit is replayed to the client
as a stream, in the same events a provider's answer would produce; what was
played (:class:`Replayed`) is then released and audited in one outbox write
(:meth:`services.router.accounting.Accountant.account_hit`), also when the
client went away half way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

from orchestra.cache.v1 import cache_service_pb2 as cache_pb2
from orchestra.common.v1 import chat_pb2
from orchestra.router.v1 import chat_service_pb2 as chat_api
from services.router import records
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


@dataclasses.dataclass
class Replayed:
    """What a hit's replay sent, for its audit record.

    Attributes:
        answer: The cached answer.
        reason: The routing reason sent to the client.
        usage: The usage sent to the client.
        latency_ms: Milliseconds from the request to the end event (or to the
            client's cancellation).
        finished: Whether the end event was sent.
    """

    answer: cache_pb2.CachedAnswer
    reason: str
    usage: chat_pb2.Usage
    latency_ms: int = 0
    finished: bool = False


def replayed(hit: cache_pb2.LookupResponse) -> Replayed:
    """The record of ``hit``'s replay, before anything is sent."""
    answer = hit.answer
    kind = cache_pb2.MatchKind.Name(hit.match_kind).removeprefix("MATCH_KIND_").lower()
    usage = chat_pb2.Usage(prompt_tokens=answer.usage.prompt_tokens, completion_tokens=0)
    return Replayed(answer=answer, reason=f"cache hit ({kind})", usage=usage)


async def replay(
    ctx: RequestContext, played: Replayed
) -> AsyncIterator[chat_api.ChatStreamResponse]:
    """Streams a cache hit as the events of an answer, noting progress in ``played``."""
    answer = played.answer
    try:
        yield chat_api.ChatStreamResponse(
            start=chat_api.ChatStart(
                request_id=ctx.request_id,
                model=answer.model,
                routing_reason=played.reason,
                cache_hit=True,
            )
        )
        first_token_ms = ctx.elapsed_ms()
        text = answer.text
        for i in range(0, len(text), CACHE_REPLAY_CHUNK_CHARS):
            yield chat_api.ChatStreamResponse(
                text_delta=chat_api.TextDelta(text=text[i : i + CACHE_REPLAY_CHUNK_CHARS])
            )
        yield chat_api.ChatStreamResponse(usage=played.usage)
        played.latency_ms = ctx.elapsed_ms()
        played.finished = True
        yield chat_api.ChatStreamResponse(
            end=chat_api.ChatEnd(
                finish_reason=answer.finish_reason,
                usage=played.usage,
                cost_micro_usd=0,
                cache_hit=True,
                time_to_first_token_ms=first_token_ms,
                latency_ms=played.latency_ms,
            )
        )
    finally:
        if not played.finished:
            played.latency_ms = ctx.elapsed_ms()
