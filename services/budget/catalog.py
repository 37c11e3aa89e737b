"""What admission needs to know about a tenant, cached for a moment.

Reserve runs on every chat request with a 100 ms deadline, so it must not
query PostgreSQL each time: a tenant's time zone and budgets are cached for a
couple of seconds. Changes made through this replica invalidate the entry at
once; other replicas see them within the TTL.
"""

from __future__ import annotations

import dataclasses
import time
import zoneinfo
from collections.abc import Callable

from orchestra.budget.v1 import account_service_pb2, budget_service_pb2
from orchestra.common.v1 import identity_pb2
from services.budget.accounts import AccountStore
from services.budget.budgets import BudgetStore
from services.budget.keystore import KeyStore
from services.budget.validation import time_zone
from services.common.errors import InvalidArgument, NotFound

DEFAULT_TTL_SECONDS = 2.0
MAX_CACHED_KEYS = 100_000


@dataclasses.dataclass(frozen=True)
class TenantContext:
    """A live tenant as admission sees it.

    Attributes:
        tenant_id: The tenant.
        policy: Its policy.
        tz: Its time zone (for day and month windows).
        budgets: All of its budgets.
    """

    tenant_id: str
    policy: account_service_pb2.TenantPolicy
    tz: zoneinfo.ZoneInfo
    budgets: tuple[budget_service_pb2.Budget, ...]


class Catalog:
    """A short-lived cache of tenant contexts and API keys' rate limits."""

    def __init__(
        self,
        accounts: AccountStore,
        budgets: BudgetStore,
        keys: KeyStore | None = None,
        *,
        ttl_seconds: float = DEFAULT_TTL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._accounts = accounts
        self._budgets = budgets
        self._ttl = ttl_seconds
        self._clock = clock
        self._entries: dict[str, tuple[float, TenantContext]] = {}
        self._keys = keys
        self._key_limits: dict[str, tuple[float, identity_pb2.RateLimit | None]] = {}

    async def tenant(self, tenant_id: str) -> TenantContext:
        """The context of a live tenant.

        Raises:
            NotFound: RESOURCE_NOT_FOUND if the tenant does not exist or was deleted.
        """
        cached = self._entries.get(tenant_id)
        if cached is not None and cached[0] > self._clock():
            return cached[1]
        tenant = await self._accounts.get_tenant(tenant_id)
        budgets = await self._budgets.for_tenant(tenant_id)
        # A stored zone that no longer exists (tzdata update) falls back to UTC
        # rather than blocking the tenant's requests.
        try:
            tz = time_zone(tenant.policy.time_zone, "policy.time_zone")
        except InvalidArgument:
            tz = zoneinfo.ZoneInfo("UTC")
        context = TenantContext(tenant_id, tenant.policy, tz, tuple(budgets))
        self._entries[tenant_id] = (self._clock() + self._ttl, context)
        return context

    def invalidate(self, tenant_id: str) -> None:
        """Forgets a tenant after a change to it or its budgets."""
        self._entries.pop(tenant_id, None)

    async def key_rate_limit(self, tenant_id: str, key_id: str) -> identity_pb2.RateLimit | None:
        """The rate limit of API key ``key_id`` of ``tenant_id`` (None: no such key).

        Cached like tenants, so a changed limit applies within the TTL.
        """
        if self._keys is None or not key_id:
            return None
        cached = self._key_limits.get(key_id)
        if cached is not None and cached[0] > self._clock():
            return cached[1]
        try:
            key = await self._keys.get_key(key_id)
        except NotFound:
            limit = None
        else:
            limit = key.rate_limit if key.tenant_id == tenant_id else None
        if len(self._key_limits) > MAX_CACHED_KEYS:
            self._key_limits.clear()  # bounded; refills from PostgreSQL
        self._key_limits[key_id] = (self._clock() + self._ttl, limit)
        return limit
