"""Input checks shared by the account and budget RPCs.

Each check raises INVALID_ARGUMENT (INVALID_FIELD) naming the request field, so
a client learns exactly what to fix.
"""

from __future__ import annotations

import re
import zoneinfo

from orchestra.budget.v1 import account_service_pb2, budget_service_pb2
from orchestra.common.v1 import errors_pb2
from services.common.errors import InvalidArgument

_TENANT_ID = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")
_CHILD_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
MAX_NAME_CHARS = 200
MAX_REQUEST_ID_CHARS = 200
MAX_SUBJECT_CHARS = 256


def invalid(field: str, message: str) -> InvalidArgument:
    """An INVALID_FIELD error about ``field``."""
    return InvalidArgument(errors_pb2.ERROR_REASON_INVALID_FIELD, message, field=field)


def tenant_id(value: str, field: str) -> str:
    """Checks a tenant id: ``[a-z0-9][a-z0-9-]{1,62}``."""
    if not _TENANT_ID.fullmatch(value):
        raise invalid(field, f"{field} must match [a-z0-9][a-z0-9-]{{1,62}}, got {value!r}")
    return value


def child_id(value: str, field: str) -> str:
    """Checks a team, project or key id: ``[a-z0-9][a-z0-9-]{0,62}``."""
    if not _CHILD_ID.fullmatch(value):
        raise invalid(field, f"{field} must match [a-z0-9][a-z0-9-]{{0,62}}, got {value!r}")
    return value


def _no_nul(value: str, field: str) -> None:
    # PostgreSQL text cannot hold NUL; stored, it would fail as INTERNAL.
    if "\x00" in value:
        raise invalid(field, f"{field} must not contain a NUL character")


def display_name(value: str, field: str) -> str:
    """Checks a display name's length (and that it holds no NUL)."""
    if len(value) > MAX_NAME_CHARS:
        raise invalid(field, f"{field} is longer than {MAX_NAME_CHARS} characters")
    _no_nul(value, field)
    return value


def required_text(value: str, field: str, max_chars: int) -> str:
    """Checks that a free-form identifier is present, not too long, without NUL."""
    if not value:
        raise invalid(field, f"{field} is required")
    if len(value) > max_chars:
        raise invalid(field, f"{field} is longer than {max_chars} characters")
    _no_nul(value, field)
    return value


def time_zone(value: str, field: str) -> zoneinfo.ZoneInfo:
    """The IANA time zone ``value`` names ("" is UTC)."""
    try:
        return zoneinfo.ZoneInfo(value or "UTC")
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise invalid(field, f"{field}: unknown IANA time zone {value!r}") from None


def policy(value: account_service_pb2.TenantPolicy, field: str = "tenant.policy") -> None:
    """Checks a tenant policy's ranges and time zone."""
    time_zone(value.time_zone, f"{field}.time_zone")
    if value.cache_ttl_seconds < 0:
        raise invalid(f"{field}.cache_ttl_seconds", "cache_ttl_seconds must not be negative")
    if value.retention_days < 0:
        raise invalid(f"{field}.retention_days", "retention_days must not be negative")
    if not 0.0 <= value.max_exploration_rate <= 1.0:
        raise invalid(f"{field}.max_exploration_rate", "max_exploration_rate must be in 0 to 1")
    if value.rate_limit.requests_per_minute < 0 or value.rate_limit.tokens_per_minute < 0:
        raise invalid(f"{field}.rate_limit", "rate limits must not be negative")
    weights = value.balanced_weights
    if min(weights.quality, weights.cost, weights.latency) < 0:
        raise invalid(f"{field}.balanced_weights", "weights must not be negative")
    for pattern in value.allowed_models:
        if not pattern:
            raise invalid(f"{field}.allowed_models", "allowed_models must not hold empty names")


def budget(value: budget_service_pb2.Budget, field: str = "budget") -> None:
    """Checks a budget's level, subject, window, limit and alerts."""
    if value.level not in budget_service_pb2.BudgetLevel.values() or value.level == 0:
        raise invalid(f"{field}.level", "level is required")
    if value.window not in budget_service_pb2.BudgetWindow.values() or value.window == 0:
        raise invalid(f"{field}.window", "window is required")
    subject_field = f"{field}.subject"
    if value.level == budget_service_pb2.BUDGET_LEVEL_TENANT:
        if value.subject:
            raise invalid(subject_field, "a tenant-level budget has no subject")
    elif value.level == budget_service_pb2.BUDGET_LEVEL_END_USER:
        required_text(value.subject, subject_field, MAX_SUBJECT_CHARS)
    else:
        child_id(value.subject, subject_field)
    if value.limit_micro_usd <= 0:
        raise invalid(f"{field}.limit_micro_usd", "limit_micro_usd must be greater than 0")
    alerts(value, field)


def alerts(value: budget_service_pb2.Budget, field: str = "budget") -> None:
    """Checks alert thresholds (1 to 100) and the webhook URL."""
    for percent in value.alert_thresholds_percent:
        if not 1 <= percent <= 100:
            raise invalid(
                f"{field}.alert_thresholds_percent", f"thresholds must be 1 to 100, got {percent}"
            )
    url = value.alert_webhook_url
    if url and not url.startswith(("http://", "https://")):
        raise invalid(f"{field}.alert_webhook_url", "the webhook URL must be http(s)")
