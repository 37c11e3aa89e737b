"""The DiscoveryService servicer: check the caller, decode, call the core, encode."""

# RPC methods carry the contract's CamelCase names.

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import grpc

from orchestra.common.v1 import errors_pb2, identity_pb2
from orchestra.discovery.v1 import discovery_service_pb2 as pb
from orchestra.discovery.v1 import discovery_service_pb2_grpc as pb_grpc
from services.common import paging
from services.common.crypto import CredentialCipher
from services.common.errors import InvalidArgument, NotFound, Unavailable
from services.common.identity import IdentitySigner, caller
from services.discovery import providers
from services.discovery.catalog import build_model
from services.discovery.discovery import Discovery, not_found
from services.discovery.feed import FeedError, ModelFeed
from services.discovery.health import to_health
from services.discovery.probes import Prober
from services.discovery.records import ProviderRecord
from services.discovery.store import DiscoveryStore, store_unavailable

log = logging.getLogger(__name__)

_Context = grpc.aio.ServicerContext[Any, Any]
# Providers serve the whole installation, so changing them is an operator's job.
_OPERATOR = identity_pb2.SCOPE_OPERATOR
_READ = identity_pb2.SCOPE_READ
_INTERNAL = identity_pb2.SCOPE_INTERNAL
# CreateProvider/UpdateProvider wait this long for the new provider's listing
# (their deadline is 10 s); a slower provider finishes in the background.
INLINE_DISCOVERY_SECONDS = 8.0
# TestProvider's timed request (its deadline is 30 s, listing included).
TEST_PROBE_SECONDS = 8.0
# Changing any of these may change what the provider lists.
_LISTING_PATHS = frozenset({"type", "base_url", "credential", "headers", "organization", "enabled"})


@contextlib.contextmanager
def _store_errors() -> Iterator[None]:
    """Maps a PostgreSQL outage to UNAVAILABLE (STORE_UNAVAILABLE)."""
    try:
        yield
    except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError) as exc:
        raise store_unavailable(exc) from exc


class DiscoveryServicer(pb_grpc.DiscoveryServiceServicer):
    """Implements orchestra.discovery.v1.DiscoveryService."""

    def __init__(
        self,
        *,
        signer: IdentitySigner,
        store: DiscoveryStore,
        cipher: CredentialCipher,
        discovery: Discovery,
        feed: ModelFeed,
        heartbeat_seconds: float,
        prober: Prober | None = None,
    ) -> None:
        self._signer = signer
        self._store = store
        self._cipher = cipher
        self._discovery = discovery
        self._catalog = discovery._catalog
        self._feed = feed
        self._heartbeat = heartbeat_seconds
        self._prober = prober
        self._background: set[asyncio.Task[Any]] = set()

    async def close(self) -> None:
        """Cancels listings still running in the background."""
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    # --- providers -------------------------------------------------------

    async def CreateProvider(
        self, request: pb.CreateProviderRequest, context: _Context
    ) -> pb.CreateProviderResponse:
        caller(context, self._signer, _OPERATOR)
        if not request.HasField("provider"):
            raise InvalidArgument(
                errors_pb2.ERROR_REASON_INVALID_FIELD, "provider is required", field="provider"
            )
        record = providers.from_create(request.provider, self._cipher)
        with _store_errors():
            record = await self._store.insert_provider(record)
            if record.enabled:
                record = await self._discover_inline(record.provider_id) or record
        log.info("provider %s created", record.provider_id)
        return pb.CreateProviderResponse(provider=providers.to_proto(record))

    async def GetProvider(
        self, request: pb.GetProviderRequest, context: _Context
    ) -> pb.GetProviderResponse:
        caller(context, self._signer, _READ, _INTERNAL)
        provider_id = providers.validate_id(request.provider_id)
        with _store_errors():
            record = await self._store.get_provider(provider_id)
            if record is None:
                raise not_found(provider_id)
            stats = await self._store.load_probe_stats(provider_id)
        return pb.GetProviderResponse(provider=providers.to_proto(record, stats))

    async def ListProviders(
        self, request: pb.ListProvidersRequest, context: _Context
    ) -> pb.ListProvidersResponse:
        caller(context, self._signer, _READ, _INTERNAL)
        size = paging.page_size(request.page_size)
        after = paging.decode(request.page_token)
        with _store_errors():
            records = await self._store.list_providers(after=after, limit=size + 1)
            stats = await self._store.load_probe_stats()
        page = records[:size]
        token = paging.encode(page[-1].provider_id) if len(records) > size else ""
        return pb.ListProvidersResponse(
            providers=[providers.to_proto(r, stats) for r in page], next_page_token=token
        )

    async def UpdateProvider(
        self, request: pb.UpdateProviderRequest, context: _Context
    ) -> pb.UpdateProviderResponse:
        caller(context, self._signer, _OPERATOR)
        provider_id = providers.validate_id(request.provider.provider_id, "provider.provider_id")
        paths = providers.mask_paths(request.provider, request.update_mask)
        with _store_errors():
            existing = await self._store.get_provider(provider_id)
            if existing is None:
                raise not_found(provider_id)
            wanted = providers.apply_update(existing, request.provider, paths, self._cipher)
            record = await self._store.update_provider(wanted)
            if record is None:
                raise not_found(provider_id)
            # Enabling, disabling or re-typing changes the catalog even
            # before the provider is listed again.
            await self._discovery.refresh(provider_id)
            if record.enabled and _LISTING_PATHS.intersection(paths):
                record = await self._discover_inline(provider_id) or record
        log.info("provider %s updated (%s)", provider_id, ", ".join(paths) or "no change")
        return pb.UpdateProviderResponse(provider=providers.to_proto(record))

    async def DeleteProvider(
        self, request: pb.DeleteProviderRequest, context: _Context
    ) -> pb.DeleteProviderResponse:
        caller(context, self._signer, _OPERATOR)
        provider_id = providers.validate_id(request.provider_id)
        with _store_errors():
            if not await self._store.delete_provider(provider_id):
                raise not_found(provider_id)
            await self._discovery.refresh(provider_id)
        log.info("provider %s deleted", provider_id)
        return pb.DeleteProviderResponse()

    async def TestProvider(
        self, request: pb.TestProviderRequest, context: _Context
    ) -> pb.TestProviderResponse:
        caller(context, self._signer, _OPERATOR)
        provider_id = providers.validate_id(request.provider_id)
        with _store_errors():
            record = await self._store.get_provider(provider_id)
        if record is None:
            raise not_found(provider_id)
        probe = await self._discovery.probe(record)
        health = pb.Health(
            status=pb.HEALTH_STATUS_HEALTHY if probe.reachable else pb.HEALTH_STATUS_UNHEALTHY,
            last_error=probe.error,
            error_rate=0.0 if probe.reachable else 1.0,
        )
        health.last_probe_time.FromDatetime(probe.probe_time)
        error = probe.error
        if probe.reachable and probe.models and self._prober is not None:
            # Listing worked: time a tiny request to its first model too. The
            # probe counts like a scheduled one (it is a real observation).
            with _store_errors():
                probed = await self._prober.probe(
                    record, probe.models[0].model_id, limit=TEST_PROBE_SECONDS
                )
                await self._discovery.refresh(provider_id)
            if probed is not None:
                outcome, stats = probed
                health = to_health(stats)
                error = outcome.error
        return pb.TestProviderResponse(
            reachable=probe.reachable,
            model_count=len(probe.models),
            health=health,
            error=error,
        )

    async def RunDiscovery(
        self, request: pb.RunDiscoveryRequest, context: _Context
    ) -> pb.RunDiscoveryResponse:
        caller(context, self._signer, _OPERATOR)
        provider_id = request.provider_id
        if provider_id:
            providers.validate_id(provider_id)
        with _store_errors():
            result = await self._discovery.run(provider_id)
        return pb.RunDiscoveryResponse(
            providers=result.providers,
            models=result.models,
            added=result.added,
            removed=result.removed,
            errors=result.errors,
        )

    # --- models ----------------------------------------------------------

    async def GetModel(self, request: pb.GetModelRequest, context: _Context) -> pb.GetModelResponse:
        caller(context, self._signer, _READ, _INTERNAL)
        if not request.name:
            raise InvalidArgument(
                errors_pb2.ERROR_REASON_INVALID_FIELD, "name is required", field="name"
            )
        with _store_errors():
            rows = await self._store.load_models(name=request.name)
            stats = await self._store.load_probe_stats(rows[0][1].provider_id) if rows else {}
        if not rows:
            raise NotFound(
                errors_pb2.ERROR_REASON_MODEL_NOT_FOUND,
                f"no model {request.name!r}",
                metadata={"model": request.name},
            )
        stored, provider = rows[0]
        return pb.GetModelResponse(model=build_model(stored, provider, self._catalog, stats))

    async def ListModels(
        self, request: pb.ListModelsRequest, context: _Context
    ) -> pb.ListModelsResponse:
        caller(context, self._signer, _READ, _INTERNAL)
        if request.provider_id:
            providers.validate_id(request.provider_id)
        size = paging.page_size(request.page_size)
        filters = {"provider_id": request.provider_id}
        after = paging.decode(request.page_token, filters)
        with _store_errors():
            rows = await self._store.load_models(
                provider_id=request.provider_id or None, after=after, limit=size + 1
            )
            stats = await self._store.load_probe_stats(request.provider_id or None)
        page = rows[:size]
        token = paging.encode(page[-1][0].name, filters) if len(rows) > size else ""
        return pb.ListModelsResponse(
            models=[build_model(m, p, self._catalog, stats) for m, p in page],
            next_page_token=token,
        )

    async def WatchModels(
        self, request: pb.WatchModelsRequest, context: _Context
    ) -> AsyncIterator[pb.WatchModelsResponse]:
        caller(context, self._signer, _READ, _INTERNAL)
        # The server answers before start() has loaded the catalog.
        await self._feed.loaded.wait()
        subscription = self._feed.subscribe()
        try:
            yield pb.WatchModelsResponse(
                revision=subscription.revision,
                snapshot=pb.ModelSnapshot(models=subscription.snapshot),
            )
            while True:
                try:
                    event = await subscription.next(self._heartbeat)
                except FeedError as exc:
                    # The watcher lagged or the server is stopping: UNAVAILABLE
                    # makes routers reconnect, and a reconnect resyncs.
                    raise Unavailable(
                        errors_pb2.ERROR_REASON_DEPENDENCY_UNAVAILABLE,
                        str(exc),
                        metadata={"resync": "true"},
                        retry_after=0.5,
                    ) from None
                if event is None:
                    heartbeat = pb.Heartbeat()
                    heartbeat.send_time.FromDatetime(datetime.datetime.now(datetime.UTC))
                    event = pb.WatchModelsResponse(
                        revision=self._feed.revision, heartbeat=heartbeat
                    )
                yield event
        finally:
            subscription.close()

    # --- helpers ---------------------------------------------------------

    async def _discover_inline(self, provider_id: str) -> ProviderRecord | None:
        """Lists a provider, waiting a bounded time; returns its fresh row."""
        task = asyncio.create_task(self._discovery.run(provider_id))
        self._background.add(task)
        task.add_done_callback(self._finished)
        done, _ = await asyncio.wait({task}, timeout=INLINE_DISCOVERY_SECONDS)
        if not done:
            log.info("provider %s: listing continues in the background", provider_id)
        return await self._store.get_provider(provider_id)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("background discovery failed: %s", exc)
