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
from collections.abc import Awaitable, Callable

import httpx

from orchestra.common.v1 import errors_pb2
from orchestra.discovery.v1 import discovery_service_pb2 as pb
from services.common.crypto import CredentialCipher, CredentialError, scrub
from services.common.errors import NotFound
from services.discovery import providers
from services.discovery.catalog import Catalog, build_model
from services.discovery.feed import ModelFeed
from services.discovery.records import ProviderRecord
from services.discovery.store import DiscoveryStore, ModelChanges
from services.providers import list_models
from services.providers.listing import (
    DEFAULT_DEADLINE_SECONDS,
    DetailCache,
    ListedModel,
    ListingError,
)

log = logging.getLogger(__name__)

# Listings in flight at once: each is one provider (usually its own host), and
# mostly waiting on the network.
_MAX_CONCURRENT_LISTINGS = 32


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
    models: list[ListedModel]
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
        listing_deadline: float = DEFAULT_DEADLINE_SECONDS,
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
        self._details: DetailCache = {}
        # Called after a rebuild that published something (the fan-out's announce).
        self.announcer: Callable[[str | None], Awaitable[None]] | None = None

    async def refresh(self, provider_id: str | None = None, *, announce: bool = True) -> int:
        """Rebuilds the catalog (or one provider's part) from the database
        and publishes the changes.

        Serialised, so a slow read can never overwrite a newer one.

        Args:
            provider_id: Only this provider's models (what one listing, probe
                or RPC changed: a fraction of the work of the whole catalog).
            announce: When something changed, tell the other replicas (see
                :mod:`services.discovery.fanout`); False when this rebuild
                answers their announcement.

        Returns:
            The number of events published.
        """
        async with self._refresh_lock:
            rows = await self._store.load_models(provider_id=provider_id)
            stats = await self._store.load_probe_stats(provider_id)
            events = self._feed.replace(
                (build_model(m, p, self._catalog, stats) for m, p in rows),
                provider_id=provider_id,
            )
        if events and announce and self.announcer is not None:
            await self.announcer(provider_id)
        return events

    async def run(self, provider_id: str = "", *, spread: float = 0.0) -> PassResult:
        """One pass over every enabled provider, or over ``provider_id`` only.

        A named provider is listed even when disabled (its models stay hidden
        from the catalog until it is enabled).

        Args:
            provider_id: Only this provider.
            spread: Start the listings evenly over this many seconds, in
                provider id order, instead of all at once. Passes started at a
                fixed rate then list each provider at the same point of every
                interval, so a change upstream is seen within one interval
                (plus one listing), and the load on the database is smooth.

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
        # Each provider's changes are published as soon as it is listed.
        step = spread / len(records) if records else 0.0
        outcomes = await asyncio.gather(
            *(self._discover(r, delay=i * step) for i, r in enumerate(records))
        )
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
                models = await list_models(
                    endpoint, self._http, deadline=self._deadline, details=self._details
                )
        except CredentialError as exc:
            return Probe(False, [], str(exc), now)
        except ListingError as exc:
            # The provider's own error text may echo what it was sent.
            secrets = (endpoint.credential, *endpoint.headers.values())
            return Probe(False, [], scrub(str(exc), *secrets), now)
        return Probe(True, models, "", now)

    async def _discover(
        self, record: ProviderRecord, *, delay: float = 0.0
    ) -> tuple[str, str, ModelChanges]:
        if delay > 0:
            await asyncio.sleep(delay)
        outcome, changed = await self._list_and_store(record)
        if changed:  # a steady pass rebuilds and publishes nothing
            await self.refresh(record.provider_id)
        return outcome

    async def _list_and_store(
        self, record: ProviderRecord
    ) -> tuple[tuple[str, str, ModelChanges], bool]:
        """Lists and stores; returns the outcome and whether the catalog changed."""
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
                changed = (record.health_status, record.last_error) != (
                    pb.HEALTH_STATUS_UNHEALTHY,
                    probe.error,
                )
                return (record.provider_id, probe.error, ModelChanges(0, 0, 0)), changed
            changes = await self._store.replace_models(
                record.provider_id, probe.models, probe.probe_time
            )
            await self._store.set_health(
                record.provider_id, pb.HEALTH_STATUS_HEALTHY, "", probe.probe_time
            )
            changed = bool(changes.added or changes.removed or changes.updated) or (
                record.health_status,
                record.last_error,
            ) != (pb.HEALTH_STATUS_HEALTHY, "")
            return (record.provider_id, "", changes), changed
