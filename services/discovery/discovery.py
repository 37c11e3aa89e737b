"""Discovery passes: list providers, store what they serve, publish the catalog.

A pass lists every enabled provider (or one named provider) concurrently. A
provider that answers gets exactly its listed models stored and turns
HEALTHY; one that fails keeps its last known models (a blip upstream must not
empty the router's catalog) and turns UNHEALTHY with the error recorded. After
the pass the catalog is rebuilt from the database and handed to the feed,
which publishes what changed to WatchModels.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging

import httpx

from orchestra.common.v1 import errors_pb2
from orchestra.discovery.v1 import discovery_service_pb2 as pb
from services.common.errors import NotFound
from services.discovery import listing, providers
from services.discovery.catalog import Catalog, build_model
from services.discovery.crypto import CredentialCipher, CredentialError
from services.discovery.feed import ModelFeed
from services.discovery.records import ProviderRecord
from services.discovery.store import DiscoveryStore, ModelChanges

log = logging.getLogger(__name__)

_MAX_CONCURRENT_LISTINGS = 8


@dataclasses.dataclass(frozen=True)
class PassResult:
    """What a discovery pass did."""

    providers: int = 0
    models: int = 0
    added: int = 0
    removed: int = 0
    errors: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Probe:
    """What listing one provider found, without storing anything."""

    reachable: bool
    models: list[listing.ListedModel]
    error: str
    probe_time: datetime.datetime


def not_found(provider_id: str) -> NotFound:
    """The error for an unknown provider id."""
    return NotFound(
        errors_pb2.ERROR_REASON_RESOURCE_NOT_FOUND,
        f"no provider {provider_id!r}",
        metadata={"resource": "provider", "name": provider_id},
    )


class Discovery:
    """Runs discovery passes and keeps the feed in step with the database."""

    def __init__(
        self,
        store: DiscoveryStore,
        cipher: CredentialCipher,
        catalog: Catalog,
        feed: ModelFeed,
        http: httpx.AsyncClient,
        *,
        listing_deadline: float = listing.DEFAULT_DEADLINE_SECONDS,
    ) -> None:
        self._store = store
        self._cipher = cipher
        self._catalog = catalog
        self._feed = feed
        self._http = http
        self._deadline = listing_deadline
        self._provider_locks: dict[str, asyncio.Lock] = {}
        self._refresh_lock = asyncio.Lock()
        self._listings = asyncio.Semaphore(_MAX_CONCURRENT_LISTINGS)

    async def refresh(self) -> int:
        """Rebuilds the catalog from the database and publishes the changes.

        Serialised, so a slow read can never overwrite a newer one.

        Returns:
            The number of events published.
        """
        async with self._refresh_lock:
            rows = await self._store.load_models()
            return self._feed.replace(build_model(m, p, self._catalog) for m, p in rows)

    async def run(self, provider_id: str = "") -> PassResult:
        """One pass over every enabled provider, or over ``provider_id`` only.

        A named provider is listed even when disabled (its models stay hidden
        from the catalog until it is enabled).

        Raises:
            NotFound: RESOURCE_NOT_FOUND for an unknown ``provider_id``.
        """
        if provider_id:
            record = await self._store.get_provider(provider_id)
            if record is None:
                raise not_found(provider_id)
            records = [record]
        else:
            records = await self._store.list_providers(enabled_only=True)
        outcomes = await asyncio.gather(*(self._discover(r) for r in records))
        await self.refresh()
        errors = {pid: error for pid, error, _ in outcomes if error}
        changes = [c for _, error, c in outcomes if not error]
        return PassResult(
            providers=len(records),
            models=sum(c.seen for c in changes),
            added=sum(c.added for c in changes),
            removed=sum(c.removed for c in changes),
            errors=errors,
        )

    async def probe(self, record: ProviderRecord) -> Probe:
        """Lists ``record``'s models now; stores nothing."""
        now = datetime.datetime.now(datetime.UTC)
        try:
            endpoint = providers.endpoint(record, self._cipher)
            async with self._listings:
                models = await listing.list_models(endpoint, self._http, deadline=self._deadline)
        except (listing.ListingError, CredentialError) as exc:
            return Probe(False, [], str(exc), now)
        return Probe(True, models, "", now)

    async def _discover(self, record: ProviderRecord) -> tuple[str, str, ModelChanges]:
        lock = self._provider_locks.setdefault(record.provider_id, asyncio.Lock())
        async with lock:
            try:
                probe = await self.probe(record)
            except Exception:  # a bug for one provider must not stop the pass
                log.exception("discovery of provider %s failed", record.provider_id)
                probe = Probe(
                    False,
                    [],
                    "internal error while listing (see discovery logs)",
                    datetime.datetime.now(datetime.UTC),
                )
            if not probe.reachable:
                log.warning("provider %s: %s", record.provider_id, probe.error)
                await self._store.set_health(
                    record.provider_id, pb.HEALTH_STATUS_UNHEALTHY, probe.error, probe.probe_time
                )
                return record.provider_id, probe.error, ModelChanges(0, 0, 0)
            changes = await self._store.replace_models(
                record.provider_id, probe.models, probe.probe_time
            )
            await self._store.set_health(
                record.provider_id, pb.HEALTH_STATUS_HEALTHY, "", probe.probe_time
            )
            return record.provider_id, "", changes
