"""Builders of audit records for the tests."""

from __future__ import annotations

import datetime

from google.protobuf import struct_pb2, timestamp_pb2

from orchestra.audit.v1 import audit_service_pb2 as pb
from orchestra.common.v1 import chat_pb2

BASE_TIME = datetime.datetime(2026, 11, 23, 12, 0, tzinfo=datetime.UTC)


def at(minutes: float) -> timestamp_pb2.Timestamp:
    """A timestamp ``minutes`` after BASE_TIME."""
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(BASE_TIME + datetime.timedelta(minutes=minutes))
    return stamp


def chat(
    event_id: str,
    tenant: str = "acme",
    *,
    minute: float = 0,
    model: str = "openai/gpt-4o-mini",
    actor: str = "key-1",
    end_user: str = "user-1",
) -> pb.AuditRecord:
    """A chat record with every field of its body set."""
    return pb.AuditRecord(
        event_id=event_id,
        event_time=at(minute),
        tenant_id=tenant,
        actor=actor,
        kind=pb.RECORD_KIND_CHAT,
        chat=pb.ChatEvent(
            request_id=f"req-{event_id}",
            attribution=chat_pb2.Attribution(team="core", project="bot", end_user=end_user),
            model=model,
            provider="openai",
            routing_reason="cheapest adequate",
            usage=chat_pb2.Usage(prompt_tokens=12, completion_tokens=30),
            cost_micro_usd=420,
            latency_ms=812,
            prompt_digest="ab" * 32,
            response_digest="cd" * 32,
            fallbacks=["anthropic/claude-haiku"],
        ),
    )


def admin(
    event_id: str, tenant: str = "acme", *, minute: float = 0, actor: str = "admin-key"
) -> pb.AuditRecord:
    """An admin record whose details hold nested values (a Struct)."""
    details = struct_pb2.Struct()
    details.update({"revoked": True, "reason": "rotation", "scopes": ["chat", "read"], "n": 3})
    return pb.AuditRecord(
        event_id=event_id,
        event_time=at(minute),
        tenant_id=tenant,
        actor=actor,
        kind=pb.RECORD_KIND_ADMIN,
        admin=pb.AdminEvent(
            action="orchestra.budget.v1.AccountService/RevokeApiKey",
            resource=f"tenants/{tenant}/apiKeys/k1",
            details=details,
        ),
    )
