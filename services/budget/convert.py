"""Conversions between stored rows, config entries and the contract's messages."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from typing import Any

from google.protobuf import json_format, timestamp_pb2

from orchestra.budget.v1 import account_service_pb2, budget_service_pb2
from orchestra.common.v1 import identity_pb2
from services.common.config_file import BudgetEntry, PolicyEntry

# Scopes as stored in the database and written in the config file.
SCOPE_NAMES: dict[int, str] = {
    identity_pb2.SCOPE_CHAT: "chat",
    identity_pb2.SCOPE_READ: "read",
    identity_pb2.SCOPE_ADMIN: "admin",
    identity_pb2.SCOPE_OPERATOR: "operator",
}
_SCOPE_VALUES = {name: value for value, name in SCOPE_NAMES.items()}

_STRATEGIES = {
    "cost": identity_pb2.ROUTING_STRATEGY_COST,
    "latency": identity_pb2.ROUTING_STRATEGY_LATENCY,
    "quality": identity_pb2.ROUTING_STRATEGY_QUALITY,
    "balanced": identity_pb2.ROUTING_STRATEGY_BALANCED,
}
_LEVELS = {
    "tenant": budget_service_pb2.BUDGET_LEVEL_TENANT,
    "team": budget_service_pb2.BUDGET_LEVEL_TEAM,
    "project": budget_service_pb2.BUDGET_LEVEL_PROJECT,
    "api_key": budget_service_pb2.BUDGET_LEVEL_API_KEY,
    "end_user": budget_service_pb2.BUDGET_LEVEL_END_USER,
}
_WINDOWS = {
    "day": budget_service_pb2.BUDGET_WINDOW_DAY,
    "month": budget_service_pb2.BUDGET_WINDOW_MONTH,
    "request": budget_service_pb2.BUDGET_WINDOW_REQUEST,
    "total": budget_service_pb2.BUDGET_WINDOW_TOTAL,
}
MICRO_PER_USD = 1_000_000


def scope_names(scopes: Iterable[int]) -> list[str]:
    """Stored names of ``scopes`` (unknown values are dropped), sorted."""
    return sorted({SCOPE_NAMES[s] for s in scopes if s in SCOPE_NAMES})


def scope_values(names: Iterable[str]) -> list[identity_pb2.Scope.ValueType]:
    """Enum values of stored scope names, in enum order."""
    return sorted(identity_pb2.Scope.ValueType(_SCOPE_VALUES[n]) for n in names)


def timestamp(value: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    """A protobuf Timestamp for ``value`` (None stays None)."""
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def from_timestamp(stamp: timestamp_pb2.Timestamp) -> dt.datetime:
    """An aware UTC datetime for a protobuf Timestamp."""
    return stamp.ToDatetime(tzinfo=dt.UTC)


def policy_to_json(policy: account_service_pb2.TenantPolicy) -> str:
    """The JSON stored for a policy (proto3 JSON, field names as in the proto)."""
    return json.dumps(json_format.MessageToDict(policy, preserving_proto_field_name=True))


def policy_from_json(text: str | dict[str, Any]) -> account_service_pb2.TenantPolicy:
    """The policy stored as ``text`` (unknown fields from newer versions ignored)."""
    data = json.loads(text) if isinstance(text, str) else text
    policy = account_service_pb2.TenantPolicy()
    json_format.ParseDict(data, policy, ignore_unknown_fields=True)
    return policy


def policy_from_entry(entry: PolicyEntry) -> account_service_pb2.TenantPolicy:
    """The policy a config file's ``policy:`` section declares."""
    return account_service_pb2.TenantPolicy(
        allowed_models=entry.allowed_models,
        routing_strategy=_STRATEGIES[entry.routing_strategy],
        cache_enabled=entry.cache_enabled,
        cache_ttl_seconds=entry.cache_ttl_seconds,
        retention_days=entry.retention_days,
        time_zone=entry.time_zone,
        fail_open=entry.fail_open,
        rate_limit=identity_pb2.RateLimit(
            requests_per_minute=entry.requests_per_minute,
            tokens_per_minute=entry.tokens_per_minute,
        ),
    )


def budget_from_entry(tenant_id: str, entry: BudgetEntry) -> budget_service_pb2.Budget:
    """The budget a config file entry declares (no id yet)."""
    return budget_service_pb2.Budget(
        tenant_id=tenant_id,
        level=_LEVELS[entry.level],
        subject=entry.subject,
        window=_WINDOWS[entry.window],
        limit_micro_usd=round(entry.limit_usd * MICRO_PER_USD),
        soft=entry.soft,
        alert_thresholds_percent=entry.alert_thresholds_percent,
        alert_webhook_url=entry.alert_webhook_url,
    )
