"""Builds the discovery service: store, catalog, feed, servicer, periodic pass.

Its settings are read by :class:`services.discovery.config.DiscoveryConfig`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import asyncpg
import grpc
import httpx

from orchestra.discovery.v1 import discovery_service_pb2 as pb
from orchestra.discovery.v1 import discovery_service_pb2_grpc as pb_grpc
from services.common import stores
from services.common.admin_audit import AdminAuditInterceptor
from services.common.audit_client import AdminAuditor
from services.common.crypto import CredentialCipher
from services.common.identity import IdentitySigner
from services.common.settings import Settings, require
from services.discovery import providers
from services.discovery.catalog import Catalog
from services.discovery.config import DiscoveryConfig
from services.discovery.discovery import Discovery
from services.discovery.discovery_service import DiscoveryServicer
from services.discovery.fanout import CatalogFanout
from services.discovery.feed import ModelFeed
from services.discovery.probes import Prober
from services.discovery.store import DiscoveryStore

log = logging.getLogger(__name__)

# The RPCs that change something: each success appends an ADMIN audit record.
AUDITED_CHANGES = {
    pb.DESCRIPTOR.services_by_name["DiscoveryService"].full_name: frozenset(
        {"CreateProvider", "UpdateProvider", "DeleteProvider", "RunDiscovery"}
    )
}

FIRST_PASS_WAIT_SECONDS = 10.0
FULL_REFRESH_EVERY = 10  # passes
# A periodic pass starts its listings evenly over this share of the interval.
PASS_SPREAD = 0.5


class DiscoveryService:
    """The discovery service as :mod:`services.common.server` runs it."""

    name = "discovery"

    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        options: DiscoveryConfig,
        catalog: Catalog | None = None,
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._options = options
        self._cipher = CredentialCipher(settings.internal_key)
        self._signer = IdentitySigner(settings.internal_key)
        self._auditor = AdminAuditor.connect(
            settings.addrs["audit"], self._signer, "discovery", pool
        )
        self._store = DiscoveryStore(pool)
        self._feed = ModelFeed()
        # One client for every provider: pooled connections; timeouts per request.
        self._http = httpx.AsyncClient(follow_redirects=False)
        self.discovery = Discovery(
            self._store,
            self._cipher,
            catalog or Catalog.packaged(settings.config.prices),
            self._feed,
            self._http,
            listing_deadline=options.listing_deadline_seconds,
        )
        self.prober = Prober(self._store, self._cipher, options.probes, self.discovery.refresh)
        self.fanout = CatalogFanout(
            pool, lambda provider_id: self.discovery.refresh(provider_id, announce=False)
        )
        self.discovery.announcer = self.fanout.announce
        self._servicer = DiscoveryServicer(
            signer=self._signer,
            store=self._store,
            cipher=self._cipher,
            discovery=self.discovery,
            feed=self._feed,
            heartbeat_seconds=options.heartbeat_seconds,
            prober=self.prober,
        )
        self._loop: asyncio.Task[None] | None = None
        self._probes: asyncio.Task[None] | None = None
        self._first_pass = asyncio.Event()
        self._stopped = False

    def full_names(self) -> Sequence[str]:
        """The gRPC service it serves."""
        return [pb.DESCRIPTOR.services_by_name["DiscoveryService"].full_name]

    def register(self, server: grpc.aio.Server) -> None:
        """Adds the servicer."""
        pb_grpc.add_DiscoveryServiceServicer_to_server(self._servicer, server)

    def interceptors(self) -> Sequence[grpc.aio.ServerInterceptor]:
        """Provider changes are audited."""
        return [AdminAuditInterceptor(self._auditor, self._signer, AUDITED_CHANGES)]

    async def start(self) -> None:
        """Applies the config file's providers, loads the catalog, starts passes."""
        self._auditor.start()
        await self.apply_config()
        await self.fanout.start()  # listen before loading: no change falls in between
        await self.discovery.refresh()  # watchers start from the last known models
        self._loop = asyncio.create_task(self._periodic(), name="discovery-passes")
        self._probes = asyncio.create_task(self.prober.run_forever(), name="discovery-probes")
        # Let the first pass finish before reporting SERVING, so a fresh install
        # answers with its models rather than an empty catalog; a slow provider
        # only delays start by FIRST_PASS_WAIT_SECONDS, then completes in the background.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first_pass.wait(), FIRST_PASS_WAIT_SECONDS)

    async def stop(self) -> None:
        """Stops passes and watchers, closes connections (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        for task in (self._loop, self._probes):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.fanout.stop()
        await self._auditor.aclose()
        self._feed.close()
        await self._servicer.close()
        await self.prober.aclose()
        await self._http.aclose()
        await self._pool.close()

    async def apply_config(self) -> None:
        """Makes the providers declared in the config file exist as declared.

        Providers the file no longer declares are removed only when a file
        was given, so a replica started without one cannot wipe them.
        """
        entries = self._settings.config.providers
        records = [providers.from_config(e, self._cipher) for e in entries]
        written, deleted = await self._store.apply_config(
            records,
            prune=self._settings.config_path is not None,
            same_credential=providers.same_credential(self._cipher),
        )
        if written or deleted:
            log.info(
                "config providers: wrote %s; removed %s",
                ", ".join(written) or "none",
                ", ".join(deleted) or "none",
            )

    async def _periodic(self) -> None:
        # Fixed rate: a pass starts every interval (not an interval after the
        # last one ended), so each provider is listed every interval and a
        # change upstream is seen within one interval plus its listing.
        loop = asyncio.get_running_loop()
        next_start = loop.time()
        passes = 0
        while True:
            try:
                # The first pass lists everything at once (a fresh replica
                # should serve its catalog soon); later ones spread out.
                spread = self._options.interval_seconds * PASS_SPREAD if passes else 0.0
                result = await self.discovery.run(spread=spread)
                if result.errors:
                    log.warning("discovery pass: %d provider(s) failed", len(result.errors))
                passes += 1
                if passes % FULL_REFRESH_EVERY == 0:
                    # Passes publish per provider; now and then rebuild it all
                    # (a backstop for a fan-out notification that was lost).
                    await self.discovery.refresh(announce=False)
            except Exception:  # the schedule must survive a bad pass
                log.exception("discovery pass failed")
            self._first_pass.set()
            next_start += self._options.interval_seconds
            now = loop.time()
            if next_start < now:  # the pass took longer than the interval
                next_start = now
            await asyncio.sleep(next_start - now)


async def build(settings: Settings, options: DiscoveryConfig | None = None) -> DiscoveryService:
    """Connects PostgreSQL, applies migrations, and builds the service.

    Args:
        settings: The process settings (DATABASE_URL is required).
        options: Discovery's settings; read from the environment when omitted.
    """
    options = options or DiscoveryConfig.from_env()
    url = require(settings.database_url, "DATABASE_URL", "discovery")
    pool = await stores.connect_postgres(url)
    try:
        await stores.migrate(pool, "discovery")
    except BaseException:
        await pool.close()
        raise
    return DiscoveryService(settings, pool, options)
