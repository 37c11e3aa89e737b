"""Requests- and tokens-per-minute limits, checked inside the Reserve script.

Limits apply per tenant (policy), per API key and per provider (the
provider's own quota, passed by the router from discovery and shared by every
tenant: ``{budget}:rl:providers/<provider>/<rpm|tpm>:<minute>``).

Windows are fixed calendar minutes (UTC epoch minute). Each limit has one
Redis counter per minute, ``{budget}:rl:<scope>:<id>:<rpm|tpm>:<minute>``, that
the Reserve script increments together with the budget holds, all or nothing.
The key carries the minute, so nothing is ever reset: the counter of a past
minute simply expires a little after it ends.

* RPM counts admitted requests (a retry with the same request id is answered
  from the existing hold before any counting, so it never counts twice).
* TPM counts the worst-case tokens the request reserved (``ReserveRequest.tokens``)
  at admission; Settle gives back what it did not use (reserved minus prompt
  plus completion tokens, when usage is reported) to the minute it was
  counted in.
* A limit of 0 means unlimited. Fixed windows admit at most twice the limit
  across a window boundary, the usual trade-off of the fixed-window scheme.
"""

from __future__ import annotations

import dataclasses

from orchestra.common.v1 import identity_pb2

PREFIX = "{budget}:rl:"  # the hash tag of services.budget.counters.PREFIX
REQUESTS_PER_MINUTE = "requests_per_minute"
TOKENS_PER_MINUTE = "tokens_per_minute"
WINDOW_SECONDS = 60
# Counters outlive their minute by this much (clock skew between replicas).
COUNTER_GRACE_SECONDS = 60


@dataclasses.dataclass(frozen=True)
class RateCheck:
    """One rate limit a Reserve must pass.

    Attributes:
        name: What is limited, e.g. "tenants/acme/requests_per_minute"; the
            QuotaFailure subject when it refuses.
        limit: The most the window may count.
        increment: What this request adds (1 request, or its tokens).
        counter: The window's Redis counter key.
        counter_expiry: Epoch second after which the counter may vanish.
    """

    name: str
    limit: int
    increment: int
    counter: str
    counter_expiry: int


def minute_of(now: float) -> int:
    """The epoch minute containing ``now``."""
    return int(now // WINDOW_SECONDS)


def seconds_until_next_window(now: float) -> float:
    """Seconds from ``now`` until its minute window ends (when a limit frees)."""
    return (minute_of(now) + 1) * WINDOW_SECONDS - now


def rate_checks(
    now: float,
    tenant_id: str,
    tenant_limit: identity_pb2.RateLimit,
    key_id: str,
    key_limit: identity_pb2.RateLimit | None,
    tokens: int,
    provider: str = "",
    provider_limit: identity_pb2.RateLimit | None = None,
) -> list[RateCheck]:
    """The rate limits a request of ``tokens`` tokens must pass at ``now``.

    Args:
        now: Epoch seconds.
        tenant_id: The tenant.
        tenant_limit: The tenant policy's rate limit.
        key_id: The API key ("" if none).
        key_limit: That key's rate limit (None if unknown).
        tokens: The request's worst-case tokens.
        provider: The provider ("" if none): its limit is shared by all tenants.
        provider_limit: That provider's own rate limit (None if none).
    """
    minute = minute_of(now)
    expiry = (minute + 1) * WINDOW_SECONDS + COUNTER_GRACE_SECONDS
    scopes: list[tuple[str, identity_pb2.RateLimit]] = [(f"tenants/{tenant_id}", tenant_limit)]
    if key_id and key_limit is not None:
        scopes.append((f"tenants/{tenant_id}/apiKeys/{key_id}", key_limit))
    if provider and provider_limit is not None:
        scopes.append((f"providers/{provider}", provider_limit))
    checks = []
    for scope, limit in scopes:
        for kind, value, increment in (
            (REQUESTS_PER_MINUTE, limit.requests_per_minute, 1),
            (TOKENS_PER_MINUTE, limit.tokens_per_minute, tokens),
        ):
            if value <= 0:
                continue
            checks.append(
                RateCheck(
                    f"{scope}/{kind}",
                    value,
                    increment,
                    f"{PREFIX}{scope}/{kind}:{minute}",
                    expiry,
                )
            )
    return checks
