"""Audit records of administrative changes (keys, budgets, providers, policies).

Services build one with :func:`admin_record` right after a change commits and
append it with :class:`services.common.audit_client.AdminAuditor`. ``details``
says what changed; values under secret-looking names are replaced by
``"[redacted]"`` so a credential never reaches the log, whose rows can never be
deleted.
"""

from __future__ import annotations

import datetime
import re
import uuid
from collections.abc import Mapping
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2

from orchestra.audit.v1 import audit_service_pb2 as pb

REDACTED = "[redacted]"

# Names of detail fields whose values are never logged, at any depth.
_SECRET = re.compile(
    r"(secret|password|passwd|credential|api_?key$|token|private_?key|authorization)", re.I
)


def redact(value: Any) -> Any:
    """``value`` with every secret-looking key's value replaced by REDACTED.

    A nested message under such a name (e.g. an ``api_key`` that is the key's
    public description) is kept and redacted field by field.
    """
    if isinstance(value, Mapping):
        return {
            str(k): redact(v) if isinstance(v, Mapping) or not _SECRET.search(str(k)) else REDACTED
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value


def admin_record(
    *,
    tenant_id: str,
    actor: str,
    action: str,
    resource: str,
    details: Mapping[str, Any] | None = None,
    event_id: str = "",
    event_time: datetime.datetime | None = None,
) -> pb.AuditRecord:
    """The record of one administrative change.

    Args:
        tenant_id: The tenant changed (an installation-wide change: the
            operator's tenant).
        actor: Who did it: the caller's API key id (``Identity.key_id``).
        action: The full RPC name, e.g.
            "orchestra.budget.v1.AccountService/RevokeApiKey".
        resource: The resource changed, e.g. "tenants/acme/apiKeys/k1".
        details: What changed: JSON-like values (numbers become doubles).
            Secret-looking keys are redacted.
        event_id: The idempotency key; pass a stable one (e.g. derived from
            the change's own id) when the caller may retry after a crash.
            Empty: a fresh "admin:<uuid>".
        event_time: When it happened; None: now.
    """
    stamp = timestamp_pb2.Timestamp()
    if event_time is None:
        stamp.GetCurrentTime()
    else:
        stamp.FromDatetime(event_time)
    body = struct_pb2.Struct()
    if details:
        body.update(redact(details))
    return pb.AuditRecord(
        event_id=event_id or f"admin:{uuid.uuid4().hex}",
        event_time=stamp,
        tenant_id=tenant_id,
        actor=actor,
        kind=pb.RECORD_KIND_ADMIN,
        admin=pb.AdminEvent(action=action, resource=resource, details=body),
    )
