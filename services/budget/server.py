"""Builds the budget service: stores, core objects, servicers, background tasks.

One process serves AccountService, BudgetService and Envoy's ext_authz
``Authorization`` API (the edge's key check).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

import asyncpg
import grpc
import redis.asyncio as aioredis
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from orchestra.budget.v1 import (
    account_service_pb2,
    account_service_pb2_grpc,
    budget_service_pb2,
    budget_service_pb2_grpc,
)
from services.budget.account_service import AccountServicer
from services.budget.accounts import AccountStore
from services.budget.admission import Admission
from services.budget.alerts import Alerts, AlertStore
from services.budget.authn import Authenticator
from services.budget.authz_service import AuthorizationServicer
from services.budget.bootstrap import Bootstrap
from services.budget.budget_service import BudgetServicer
from services.budget.budgets import BudgetStore
from services.budget.catalog import Catalog
from services.budget.config import (
    CLOSE_TIMEOUT_SECONDS,
    REAP_BATCH,
    REAP_INTERVAL_SECONDS,
    BudgetConfig,
)
from services.budget.counters import Counters
from services.budget.holds import HoldStore
from services.budget.keystore import KeyStore
from services.budget.ledger import Ledger
from services.budget.unheld import UnheldStore
from services.common.admin_audit import AdminAuditInterceptor
from services.common.audit_client import AdminAuditor
from services.common.errors import OrchestraError
from services.common.identity import IdentitySigner
from services.common.key_invalidation import Invalidations
from services.common.settings import Settings
from services.common.stores import connect_postgres, connect_redis, migrate

log = logging.getLogger(__name__)

_ACCOUNT_SERVICE = account_service_pb2.DESCRIPTOR.services_by_name["AccountService"].full_name
_BUDGET_SERVICE = budget_service_pb2.DESCRIPTOR.services_by_name["BudgetService"].full_name
# The RPCs that change something: each success appends an ADMIN audit record.
AUDITED_CHANGES = {
    _ACCOUNT_SERVICE: frozenset(
        {
            "CreateTenant",
            "UpdateTenant",
            "DeleteTenant",
            "CreateTeam",
            "CreateProject",
            "CreateApiKey",
            "RotateApiKey",
            "RevokeApiKey",
        }
    ),
    _BUDGET_SERVICE: frozenset({"CreateBudget", "UpdateBudget", "DeleteBudget"}),
}


class BudgetService:
    """The budget service as a :class:`services.common.server.Service`."""

    name = "budget"

    def __init__(
        self,
        pool: asyncpg.Pool,
        client: aioredis.Redis,
        signer: IdentitySigner,
        *,
        clock: Callable[[], float] = time.time,
        reap_interval_seconds: float = REAP_INTERVAL_SECONDS,
        reap_batch: int = REAP_BATCH,
    ) -> None:
        """Creates the stores and core objects.

        Args:
            pool: PostgreSQL.
            client: Redis.
            signer: Signs and checks the identity services pass on.
            clock: Epoch seconds now, for budget windows and hold expiry
                (tests pass a fake one).
            reap_interval_seconds: Time between two looks for expired holds.
            reap_batch: Expired holds released per query.
        """
        self._pool = pool
        self._reap_interval = reap_interval_seconds
        self._reap_batch = reap_batch
        self._redis = client
        self.accounts = AccountStore(pool)
        self.keys = KeyStore(pool)
        self.budgets = BudgetStore(pool)
        self.ledger = Ledger(pool)
        self.counters = Counters(client)
        self.catalog = Catalog(self.accounts, self.budgets, self.keys)
        self.unheld = UnheldStore(pool)
        self.holds = HoldStore(pool)
        self.alerts = Alerts(AlertStore(pool), self.catalog, self.counters, clock=clock)
        self.admission = Admission(
            self.catalog,
            self.counters,
            self.ledger,
            self.budgets,
            unheld=self.unheld,
            holds=self.holds,
            alerts=self.alerts,
            clock=clock,
        )
        self.authenticator = Authenticator(self.keys)
        self.invalidations = Invalidations(client, self.authenticator)
        self.bootstrap = Bootstrap(self.accounts, self.keys, self.budgets, self.admission)
        self._signer = signer
        self._tasks: list[asyncio.Task[None]] = []
        # Set by build(): appends admin-change records (None: not audited).
        self.auditor: AdminAuditor | None = None

    def full_names(self) -> Sequence[str]:
        """AccountService, BudgetService and ext_authz Authorization."""
        return [
            _ACCOUNT_SERVICE,
            _BUDGET_SERVICE,
            external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name,
        ]

    def register(self, server: grpc.aio.Server) -> None:
        """Adds the three servicers."""
        accounts = AccountServicer(
            self.accounts,
            self.keys,
            self.authenticator,
            self.invalidations,
            self.catalog,
            self._signer,
        )
        budgets = BudgetServicer(
            self.budgets, self.admission, self.catalog, self.ledger, self._signer
        )
        account_service_pb2_grpc.add_AccountServiceServicer_to_server(accounts, server)
        budget_service_pb2_grpc.add_BudgetServiceServicer_to_server(budgets, server)
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
            AuthorizationServicer(self.authenticator, self._signer), server
        )

    def interceptors(self) -> Sequence[grpc.aio.ServerInterceptor]:
        """Account and budget changes are audited (when an auditor is set)."""
        if self.auditor is None:
            return []
        return [AdminAuditInterceptor(self.auditor, self._signer, AUDITED_CHANGES)]

    async def start(self) -> None:
        """Starts the reaper, key invalidations, alerts and the admin audit outbox."""
        if self.auditor is not None:
            self.auditor.start()
        self._tasks = [
            asyncio.create_task(self._reap_forever(), name="budget-reaper"),
            asyncio.create_task(self.invalidations.listen(), name="budget-invalidations"),
            asyncio.create_task(self.alerts.send_forever(), name="budget-alerts"),
        ]

    async def stop(self) -> None:
        """Stops background work and closes the stores."""
        self.invalidations.stop()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=CLOSE_TIMEOUT_SECONDS)
        self._tasks = []
        if self.auditor is not None:
            await self.auditor.aclose()
        await self.alerts.close()
        await self._redis.aclose()
        try:
            # Bounded: a connection stuck in a dead query must not hang shutdown.
            await asyncio.wait_for(self._pool.close(), CLOSE_TIMEOUT_SECONDS)
        except TimeoutError:
            self._pool.terminate()

    async def _reap_forever(self) -> None:
        while True:
            handled = 0
            try:
                handled = await self.admission.reap(self._reap_batch)
            except OrchestraError as exc:
                log.warning("hold reaper: %s", exc.message)
            except Exception:  # the reaper must survive and retry
                log.exception("hold reaper failed")
            if handled < self._reap_batch:
                await asyncio.sleep(self._reap_interval)


async def build(settings: Settings, *, clock: Callable[[], float] = time.time) -> BudgetService:
    """Connects the stores, migrates, applies the config file and rebuilds counters.

    ``clock`` (epoch seconds now) drives budget windows and hold expiry.

    Raises:
        SettingsError: DATABASE_URL or REDIS_URL is missing.
        BootstrapError: The config file's tenants cannot be applied.
        Unavailable: A store does not answer.
    """
    config = BudgetConfig.from_settings(settings)
    pool = await connect_postgres(config.database_url)
    client = connect_redis(config.redis_url)
    signer = IdentitySigner(config.internal_key)
    app = BudgetService(
        pool,
        client,
        signer,
        clock=clock,
        reap_interval_seconds=config.reap_interval_seconds,
        reap_batch=config.reap_batch,
    )
    app.auditor = AdminAuditor.connect(config.audit_addr, signer, "budget", pool)
    try:
        await migrate(pool, "budget")
        report = await app.bootstrap.apply(list(config.tenants))
        if report.keys:
            await app.invalidations.publish(report.keys)
        await app.admission.ensure_ready()
    except BaseException:
        await client.aclose()
        await pool.close()
        raise
    return app
