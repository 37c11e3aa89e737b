"""Builds the audit service: PostgreSQL pool, migrations, servicer."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg
import grpc

from orchestra.audit.v1 import audit_service_pb2, audit_service_pb2_grpc
from services.audit.service import AuditServicer
from services.audit.signing import Signer, load_signer
from services.audit.store import AuditStore
from services.audit.tree_store import TreeStore
from services.common.identity import IdentitySigner
from services.common.settings import Settings, require
from services.common.stores import connect_postgres, migrate


class AuditService:
    """The audit service as :func:`services.common.server.start` runs it."""

    name = "audit"

    def __init__(
        self, pool: asyncpg.Pool, signer: IdentitySigner, checkpoint_signer: Signer
    ) -> None:
        self._pool = pool
        self.store = AuditStore(pool, TreeStore(pool, checkpoint_signer))
        self._servicer = AuditServicer(self.store, signer)

    def full_names(self) -> Sequence[str]:
        """The gRPC service this serves."""
        return [audit_service_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name]

    def register(self, server: grpc.aio.Server) -> None:
        """Adds the servicer to ``server``."""
        audit_service_pb2_grpc.add_AuditServiceServicer_to_server(self._servicer, server)

    async def start(self) -> None:
        """Brings the Merkle tree and checkpoints up to the records already stored."""
        await self.store.catch_up()

    async def stop(self) -> None:
        """Closes the database pool."""
        await self._pool.close()


async def build(settings: Settings) -> AuditService:
    """Connects to PostgreSQL, applies the audit migrations, builds the service.

    Raises:
        SigningKeyError: The checkpoint signing key is misconfigured.
    """
    checkpoint_signer = load_signer(None, settings.internal_key)
    pool = await connect_postgres(require(settings.database_url, "DATABASE_URL", "audit"))
    try:
        await migrate(pool, "audit")
    except BaseException:
        await pool.close()
        raise
    return AuditService(pool, IdentitySigner(settings.internal_key), checkpoint_signer)
