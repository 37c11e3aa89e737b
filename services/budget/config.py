"""The budget service's own settings, read once at start and frozen.

They come from the suite's :class:`~services.common.settings.Settings` (the
environment and the config file), never from the environment directly:

| setting | source | default | meaning |
| --- | --- | --- | --- |
| ``database_url`` | ``DATABASE_URL`` / ``server.database_url`` | required | tenants, keys, budgets, the ledger |
| ``redis_url`` | ``REDIS_URL`` / ``server.redis_url`` | required | live spend counters, key invalidations |
| ``audit_addr`` | ``ORCHESTRA_AUDIT_ADDR`` | 127.0.0.1:50054 | where admin-change records go |
| ``tenants`` | ``tenants:`` | none | tenants, keys and budgets applied at start |
"""  # noqa: E501 - a table reads better unwrapped

from __future__ import annotations

import dataclasses

from services.common.config_file import TenantEntry
from services.common.settings import Settings, require

# How often expired holds are looked for, and how many are released per query.
REAP_INTERVAL_SECONDS = 1.0
REAP_BATCH = 200
# Bound on shutdown: background tasks and the pool get this long to close.
CLOSE_TIMEOUT_SECONDS = 5.0


@dataclasses.dataclass(frozen=True)
class BudgetConfig:
    """Everything the budget process reads from its settings.

    Attributes:
        database_url: The budget service's PostgreSQL.
        redis_url: The budget service's Redis.
        internal_key: Signs and checks the identities services pass on.
        audit_addr: The audit service, for admin-change records.
        tenants: The config file's tenants, applied at start.
        reap_interval_seconds: Time between two looks for expired holds.
        reap_batch: Expired holds released per query.
    """

    database_url: str
    redis_url: str
    internal_key: bytes
    audit_addr: str
    tenants: tuple[TenantEntry, ...] = ()
    reap_interval_seconds: float = REAP_INTERVAL_SECONDS
    reap_batch: int = REAP_BATCH

    @classmethod
    def from_settings(cls, settings: Settings) -> BudgetConfig:
        """Reads the budget service's part of ``settings``.

        Raises:
            SettingsError: DATABASE_URL or REDIS_URL is not set.
        """
        return cls(
            database_url=require(settings.database_url, "DATABASE_URL", "budget"),
            redis_url=require(settings.redis_url, "REDIS_URL", "budget"),
            internal_key=settings.internal_key,
            audit_addr=settings.addrs["audit"],
            tenants=tuple(settings.config.tenants),
        )
