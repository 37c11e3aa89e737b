"""Builds the router: peers, the outbox, the model catalog view, provider adapters.

:class:`RouterService` wires them into the engine and registers the two
servicers (:mod:`services.router.chat_service`,
:mod:`services.router.router_service`); its settings come from
:class:`services.router.config.RouterConfig`, read once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import grpc

from orchestra.discovery.v1 import discovery_service_pb2_grpc as discovery_grpc
from orchestra.router.v1 import (
    chat_service_pb2,
    chat_service_pb2_grpc,
    router_service_pb2,
    router_service_pb2_grpc,
)
from services.common.catalog_view import ModelCatalogView
from services.common.clients import ServiceToken, channel
from services.common.identity import IdentitySigner
from services.common.key_invalidation import Invalidations
from services.common.settings import Settings
from services.common.stores import connect_redis
from services.providers import adapter_for
from services.providers.base import ProviderAdapter
from services.router import learning
from services.router.batch_runner import BatchRunner
from services.router.batch_store import BatchStore
from services.router.breakers import Breakers
from services.router.chat_service import ChatServicer
from services.router.config import RouterConfig
from services.router.engine import Engine
from services.router.journal import Journal
from services.router.keyauth import RemoteKeys
from services.router.outbox import Outbox
from services.router.peers import Peers
from services.router.router_service import RouterServicer

log = logging.getLogger(__name__)


class RouterService:
    """The router process: ChatService and RouterService."""

    name = "router"

    def __init__(self, settings: Settings) -> None:
        config = RouterConfig.from_settings(settings)
        self._config = config
        signer = IdentitySigner(settings.internal_key)
        self.peers = Peers(settings, signer)
        redis = connect_redis(config.redis_url)
        self._redis = redis
        self.outbox = Outbox(
            redis,
            {
                "settle": self.peers.deliver_settle,
                "release": self.peers.deliver_release,
                "cache_store": self.peers.deliver_cache_store,
                "audit": self.peers.deliver_audit,
            },
            batch_handlers={
                "settle": self.peers.deliver_settle_many,
                "release": self.peers.deliver_release_many,
                "cache_store": self.peers.deliver_cache_store_many,
                "audit": self.peers.deliver_audit_many,
            },
        )
        self._discovery_channel = channel(settings.addrs["discovery"])
        self.catalog = ModelCatalogView(
            discovery_grpc.DiscoveryServiceStub(self._discovery_channel),
            metadata=ServiceToken(signer, "router").metadata,
        )
        adapters: dict[str, ProviderAdapter] = {}
        for entry in config.providers:
            adapter = adapter_for(entry)
            if adapter is None:
                log.warning(
                    "provider %s: no adapter speaks the %s wire format yet; "
                    "its models will not be routed to",
                    entry.id,
                    entry.type,
                )
            elif entry.enabled:
                adapters[entry.id] = adapter
        self._adapters = adapters
        self.learner = learning.Learner(redis)
        self.journal = Journal(redis, self.outbox.put)
        self.engine = Engine(
            config.engine,
            self.peers,
            self.outbox,
            self.catalog.all,
            adapters,
            Breakers(redis),
            self.learner,
            self.journal,
        )
        self.batches = BatchRunner(BatchStore(redis), self.engine)
        self._signer = signer
        self.keys = RemoteKeys(self.peers)
        self._key_invalidations = Invalidations(redis, self.keys)
        self._key_listener: asyncio.Task[None] | None = None

    def full_names(self) -> Sequence[str]:
        """See :class:`services.common.server.Service`."""
        return [
            chat_service_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name,
            router_service_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name,
        ]

    def interceptors(self) -> Sequence[grpc.aio.ServerInterceptor]:
        """None of its own (see :class:`services.common.server.Service`)."""
        return []

    def register(self, server: grpc.aio.Server) -> None:
        """See :class:`services.common.server.Service`."""
        chat_service_pb2_grpc.add_ChatServiceServicer_to_server(
            ChatServicer(self.engine, self._signer, self.keys), server
        )
        router_service_pb2_grpc.add_RouterServiceServicer_to_server(
            RouterServicer(self.engine, self._signer, self.learner, batches=self.batches),
            server,
        )

    async def start(self) -> None:
        """Starts the outbox, the journal and the catalog watch.

        Waits (briefly) for the first catalog snapshot so the router reports
        SERVING only once it knows some models; if discovery is down it starts
        anyway and catches up when discovery answers.
        """
        await self.outbox.start()
        self.journal.start()
        self._key_listener = asyncio.create_task(
            self._key_invalidations.listen(), name="router-key-invalidations"
        )
        self.catalog.start()
        if not await self.catalog.wait_ready(self._config.catalog_wait_seconds):
            log.warning("no model catalog from discovery yet; routing will refuse until it comes")
        self.batches.start()

    async def stop(self) -> None:
        """Hands in-flight accounting to the outbox, then closes everything."""
        await self.batches.stop()
        self._key_invalidations.stop()
        if self._key_listener is not None:
            self._key_listener.cancel()  # stop() alone ends it within a second
            await asyncio.wait([self._key_listener], timeout=2.0)
        await self.engine.aclose()
        await self.journal.stop()
        await self.outbox.stop()
        await self.catalog.stop()
        for adapter in self._adapters.values():
            await adapter.aclose()
        await self.peers.close()
        await self._discovery_channel.close()
        await self._redis.aclose()


async def build(settings: Settings) -> RouterService:
    """Creates the router from its settings."""
    return RouterService(settings)
