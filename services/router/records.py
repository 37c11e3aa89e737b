"""Builds the messages the router sends to budget, cache and audit.

Kept apart from the engine so the flow reads as a flow. Outbox payloads are
serialised request messages; each is idempotent at its target (request id for
budget, cache key for the cache, event id for audit).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from google.protobuf import timestamp_pb2

from orchestra.audit.v1 import audit_service_pb2 as audit_pb2
from orchestra.budget.v1 import account_service_pb2 as account_pb2
from orchestra.budget.v1 import budget_service_pb2 as budget_pb2
from orchestra.cache.v1 import cache_service_pb2 as cache_pb2
from orchestra.common.v1 import chat_pb2, identity_pb2
from orchestra.router.v1 import chat_service_pb2 as chat_api
from services.common.body_transit import BodyTransit
from services.router.decision import Decision


def subject(
    identity: identity_pb2.Identity, request: chat_api.ChatRequest
) -> budget_pb2.SpendSubject:
    """Who pays: the key's team/project win over the request's attribution."""
    return budget_pb2.SpendSubject(
        tenant_id=identity.tenant_id,
        team=identity.team or request.attribution.team,
        project=identity.project or request.attribution.project,
        key_id=identity.key_id,
        end_user=request.attribution.end_user,
    )


def reserve_request(
    rid: str,
    identity: identity_pb2.Identity,
    request: chat_api.ChatRequest,
    decision: Decision,
    hold_micro_usd: int,
) -> budget_pb2.ReserveRequest:
    """The hold for the worst case across the whole fallback chain."""
    return budget_pb2.ReserveRequest(
        request_id=rid,
        subject=subject(identity, request),
        model=decision.model.name,
        amount_micro_usd=hold_micro_usd,
        tokens=decision.prompt_tokens + decision.max_tokens,
    )


def cache_key(
    identity: identity_pb2.Identity, request: chat_api.ChatRequest, decision: Decision
) -> cache_pb2.CacheKey:
    """The cache scope: tenant, model, conversation, parameters, tools."""
    generation = chat_pb2.GenerationConfig()
    generation.CopyFrom(request.generation)
    generation.max_tokens = decision.max_tokens
    return cache_pb2.CacheKey(
        tenant_id=identity.tenant_id,
        model=decision.model.name,
        messages=request.messages,
        generation=generation,
        tools=request.tools,
    )


def lookup_request(
    identity: identity_pb2.Identity, request: chat_api.ChatRequest, decision: Decision
) -> cache_pb2.LookupRequest:
    """A lookup for the chosen model's scope."""
    return cache_pb2.LookupRequest(key=cache_key(identity, request, decision))


def store_payload(
    rid: str,
    identity: identity_pb2.Identity,
    request: chat_api.ChatRequest,
    decision: Decision,
    model: str,
    text: str,
    tool_calls: list[chat_pb2.ToolCall],
    finish: chat_pb2.FinishReason.ValueType,
    usage: chat_pb2.Usage,
    cost_micro_usd: int,
    *,
    ttl_seconds: int,
    explored_entry_id: str = "",
) -> bytes:
    """A cache Store for a completed answer, under the chosen model's scope."""
    return cache_pb2.StoreRequest(
        key=cache_key(identity, request, decision),
        answer=cache_pb2.CachedAnswer(
            text=text,
            tool_calls=tool_calls,
            finish_reason=finish,
            usage=usage,
            cost_micro_usd=cost_micro_usd,
            model=model,
        ),
        request_id=rid,
        end_user=request.attribution.end_user,
        ttl_seconds=ttl_seconds,
        explored_entry_id=explored_entry_id,
    ).SerializeToString()


def settle_payload(rid: str, cost: int, usage: chat_pb2.Usage, *, partial: bool) -> bytes:
    """A Settle for what was produced."""
    return budget_pb2.SettleRequest(
        request_id=rid, cost_micro_usd=cost, usage=usage, partial=partial
    ).SerializeToString()


def release_payload(rid: str) -> bytes:
    """A Release of the whole hold."""
    return budget_pb2.ReleaseRequest(request_id=rid).SerializeToString()


def _digest(salt: bytes, tenant: str, text: str) -> str:
    return hmac.new(salt, f"{tenant}\x00{text}".encode(), hashlib.sha256).hexdigest()


def _prompt_text(request: chat_api.ChatRequest) -> str:
    return request.SerializeToString(deterministic=True).hex()


def audit_payload(
    rid: str,
    identity: identity_pb2.Identity,
    request: chat_api.ChatRequest,
    salt: bytes,
    *,
    model: str,
    provider: str,
    reason: str,
    cache_hit: bool,
    usage: chat_pb2.Usage,
    cost_micro_usd: int,
    status_code: int,
    error_reason: str,
    latency_ms: int,
    answer_text: str,
    fallbacks: list[str],
    tool_calls: Sequence[chat_pb2.ToolCall] = (),
    body_mode: account_pb2.AuditBodyMode.ValueType = account_pb2.AUDIT_BODY_MODE_UNSPECIFIED,
    retention_days: int = 0,
    transit: BodyTransit,
) -> bytes:
    """The audit record of one chat, with its bodies as the tenant's policy says.

    ``body_mode`` and ``retention_days`` come from the tenant's policy.
    HASH (and UNSPECIFIED) keeps salted digests of the prompt and answer in the
    record; ENCRYPTED sends the body beside the record, sealed by ``transit``
    for the audit service (the outbox never holds the plaintext), which seals
    it again under the subject's key; and no digests (they would outlive an
    erasure); NONE keeps neither.
    """
    now = timestamp_pb2.Timestamp()
    now.GetCurrentTime()
    attribution = chat_pb2.Attribution()
    attribution.CopyFrom(request.attribution)
    attribution.team = identity.team or attribution.team
    attribution.project = identity.project or attribution.project
    hashed = body_mode in (
        account_pb2.AUDIT_BODY_MODE_UNSPECIFIED,
        account_pb2.AUDIT_BODY_MODE_HASH,
    )
    record = audit_pb2.AuditRecord(
        event_id=f"chat:{rid}",
        event_time=now,
        tenant_id=identity.tenant_id,
        actor=identity.key_id,
        kind=audit_pb2.RECORD_KIND_CHAT,
        chat=audit_pb2.ChatEvent(
            request_id=rid,
            attribution=attribution,
            model=model,
            provider=provider,
            routing_reason=reason,
            cache_hit=cache_hit,
            usage=usage,
            cost_micro_usd=cost_micro_usd,
            status_code=status_code,
            error_reason=error_reason,
            latency_ms=latency_ms,
            prompt_digest=_digest(salt, identity.tenant_id, _prompt_text(request))
            if hashed
            else "",
            response_digest=_digest(salt, identity.tenant_id, answer_text) if hashed else "",
            fallbacks=fallbacks,
        ),
    )
    append = audit_pb2.AppendRecordRequest(record=record)
    if body_mode == account_pb2.AUDIT_BODY_MODE_ENCRYPTED:
        body = audit_pb2.ChatBody(
            messages=request.messages, answer_text=answer_text, tool_calls=tool_calls
        )
        append.body.CopyFrom(
            audit_pb2.RecordBody(
                sealed_chat=transit.seal(record.event_id, body),
                retention_days=max(retention_days, 0),
            )
        )
    return append.SerializeToString()
