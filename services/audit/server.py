"""Builds the audit service: PostgreSQL pool, migrations, servicer."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import Sequence

import asyncpg
import grpc

from orchestra.audit.v1 import audit_service_pb2, audit_service_pb2_grpc
from services.audit.audit_service import AuditServicer
from services.audit.bodies import KeyWrapper
from services.audit.body_store import BodyStore
from services.audit.config import RETENTION_SWEEP_SECONDS, AuditConfig
from services.audit.role import WRITER, provision_writer, writer_password
from services.audit.signing import Signer, load_signer
from services.audit.store import AuditStore
from services.audit.tree_store import TreeStore
from services.common.body_transit import BodyTransit
from services.common.errors import Unavailable
from services.common.identity import IdentitySigner
from services.common.settings import Settings
from services.common.stores import connect_postgres, migrate

log = logging.getLogger(__name__)


class AuditService:
    """The audit service as :func:`services.common.server.start` runs it."""

    name = "audit"

    def __init__(
        self,
        pool: asyncpg.Pool,
        signer: IdentitySigner,
        checkpoint_signer: Signer,
        internal_key: bytes,
        *,
        retention_sweep_seconds: float = RETENTION_SWEEP_SECONDS,
    ) -> None:
        self._pool = pool
        self._sweep_seconds = retention_sweep_seconds
        self.store = AuditStore(pool, TreeStore(pool, checkpoint_signer))
        self.bodies = BodyStore(pool, KeyWrapper(internal_key))
        self._servicer = AuditServicer(self.store, signer, self.bodies, BodyTransit(internal_key))
        self._retention: asyncio.Task[None] | None = None

    def full_names(self) -> Sequence[str]:
        """The gRPC service this serves."""
        return [audit_service_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name]

    def interceptors(self) -> Sequence[grpc.aio.ServerInterceptor]:
        """None of its own (see :class:`services.common.server.Service`)."""
        return []

    def register(self, server: grpc.aio.Server) -> None:
        """Adds the servicer to ``server``."""
        audit_service_pb2_grpc.add_AuditServiceServicer_to_server(self._servicer, server)

    async def start(self) -> None:
        """Brings the tree up to the stored records; starts the retention sweep."""
        await self.store.catch_up()
        self._retention = asyncio.create_task(self._sweep(), name="audit-retention")

    async def _sweep(self) -> None:
        """Drops sealed bodies past their tenant's retention, every sweep interval."""
        while True:
            try:
                dropped = await self.bodies.drop_expired(datetime.datetime.now(datetime.UTC))
                if dropped:
                    log.info("retention dropped %d audit bodies", dropped)
            except Unavailable as exc:
                log.warning("retention sweep skipped: %s", exc.message)
            await asyncio.sleep(self._sweep_seconds)

    async def stop(self) -> None:
        """Stops the retention sweep; closes the database pool."""
        if self._retention is not None:
            self._retention.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retention
        await self._pool.close()


async def build(settings: Settings) -> AuditService:
    """Applies the audit migrations as the owner, then connects as the writer role.

    See :mod:`services.audit.role` for what the writer may do.

    Raises:
        SigningKeyError: The checkpoint signing key is misconfigured.
    """
    config = AuditConfig.from_settings(settings)
    checkpoint_signer = load_signer(config.signing_env, config.internal_key)
    owner = await connect_postgres(config.database_url)
    try:
        await migrate(owner, "audit")
        restricted = await provision_writer(owner, config.internal_key)
    except BaseException:
        await owner.close()
        raise
    if restricted:
        await owner.close()
        pool = await connect_postgres(
            config.database_url, user=WRITER, password=writer_password(config.internal_key)
        )
    else:
        pool = owner
    return AuditService(
        pool,
        IdentitySigner(config.internal_key),
        checkpoint_signer,
        config.internal_key,
        retention_sweep_seconds=config.retention_sweep_seconds,
    )
