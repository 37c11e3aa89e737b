"""Fixtures: a real audit service on a fresh database, and callers' metadata."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import grpc
import pytest

from orchestra.audit.v1 import audit_service_pb2_grpc
from services.audit.server import AuditService, build

Metadata = list[tuple[str, str]]


@dataclasses.dataclass
class Audit:
    """A running audit service and what the tests reach it with."""

    stub: audit_service_pb2_grpc.AuditServiceAsyncStub
    service: AuditService
    pg_url: str
    port: int


@pytest.fixture
async def audit(
    pg_url: str, make_settings: Callable[..., Any], serve: Callable[..., Any]
) -> AsyncIterator[Audit]:
    """The audit service, migrated on an empty database, served on port 0."""
    service = await build(make_settings(DATABASE_URL=pg_url))
    running = await serve(service)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield Audit(audit_service_pb2_grpc.AuditServiceStub(channel), service, pg_url, running.port)


@pytest.fixture
async def superuser(audit: Audit) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection to the audit database as the tests' superuser."""
    conn = await asyncpg.connect(audit.pg_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
def internal(as_caller: Callable[..., Metadata]) -> Metadata:
    """Metadata of a service (the router) appending records."""
    return as_caller("", "internal", key_id="service:router")


@pytest.fixture
def reader(as_caller: Callable[..., Metadata]) -> Callable[[str], Metadata]:
    """Metadata of a tenant's key with SCOPE_READ."""
    return lambda tenant: as_caller(tenant, "read")


@pytest.fixture
def operator(as_caller: Callable[..., Metadata]) -> Metadata:
    """Metadata of the installation's operator (tenant "ops")."""
    return as_caller("ops", "operator")
