"""Administrative-change records: the builder and the helper other services call."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import asyncpg
import grpc
import pytest
from google.protobuf import struct_pb2

from orchestra.audit.v1 import audit_service_pb2 as pb
from orchestra.budget.v1 import account_service_pb2 as account_pb2
from orchestra.budget.v1 import account_service_pb2_grpc as account_grpc
from orchestra.common.v1 import identity_pb2
from services.audit.server import build
from services.audit.store import RecordFilter
from services.audit.verify import verify
from services.cli.embedded import free_port
from services.common.admin_audit import AdminAuditInterceptor
from services.common.admin_records import REDACTED, admin_record
from services.common.audit_client import AdminAuditor
from services.common.clients import ServiceToken, channel
from services.common.identity import IdentitySigner
from services.common.server import start
from services.common.stores import connect_postgres, migrate
from tests.audit.conftest import Audit, Metadata


def _revoke(event_id: str = "") -> pb.AuditRecord:
    return admin_record(
        tenant_id="acme",
        actor="admin-key",
        action="orchestra.budget.v1.AccountService/RevokeApiKey",
        resource="tenants/acme/apiKeys/k1",
        details={"revoked": True, "scopes": ["chat"]},
        event_id=event_id,
    )


def test_secrets_never_reach_the_details() -> None:
    record = admin_record(
        tenant_id="acme",
        actor="admin-key",
        action="orchestra.discovery.v1.DiscoveryService/UpdateProvider",
        resource="providers/openai",
        details={
            "base_url": "https://api.openai.com",
            "credential": "sk-live-123",
            "headers": {"Authorization": "Bearer x", "X-Org": "acme"},
            "api_key": "sk-2",
            "created": {"api_key": {"key_id": "k9", "secret": "ok_k9_x"}},
            "api_key_id": "k7",
            "rotated": [{"new_secret": "s", "key_id": "k1"}],
        },
        event_time=datetime.datetime(2026, 11, 23, tzinfo=datetime.UTC),
    )

    details = record.admin.details
    assert details["base_url"] == "https://api.openai.com"
    assert details["credential"] == REDACTED
    assert details["api_key"] == REDACTED
    assert details["api_key_id"] == "k7"
    created = cast(struct_pb2.Struct, details["created"])
    assert dict(cast(struct_pb2.Struct, created["api_key"])) == {"key_id": "k9", "secret": REDACTED}
    assert dict(cast(struct_pb2.Struct, details["headers"])) == {
        "Authorization": REDACTED,
        "X-Org": "acme",
    }
    rotated = cast(struct_pb2.ListValue, details["rotated"])
    assert dict(cast(struct_pb2.Struct, rotated[0])) == {"new_secret": REDACTED, "key_id": "k1"}
    assert "sk-" not in record.SerializeToString().decode("utf-8", "replace")
    assert record.kind == pb.RECORD_KIND_ADMIN
    assert record.event_id.startswith("admin:")
    assert record.event_time.seconds == 1795392000


async def test_the_auditor_appends_idempotently(
    audit: Audit, signer: IdentitySigner, reader: Callable[[str], Metadata]
) -> None:
    async with channel(f"127.0.0.1:{audit.port}") as chan:
        auditor = AdminAuditor(chan, ServiceToken(signer, "budget"))
        first = await auditor.record(_revoke("budget:revoke:k1"))
        again = await auditor.record(_revoke("budget:revoke:k1"))
        other = await auditor.record(_revoke())

    assert (first, again, other) == (0, 0, 1)
    listed = await audit.stub.ListRecords(pb.ListRecordsRequest(), metadata=reader("acme"))
    assert [r.actor for r in listed.records] == ["admin-key", "admin-key"]
    assert listed.records[0].admin.action == "orchestra.budget.v1.AccountService/RevokeApiKey"
    assert await verify(audit.service.store) is None


async def test_the_auditor_does_not_retry_a_bad_record(
    audit: Audit, signer: IdentitySigner
) -> None:
    bad = _revoke()
    bad.tenant_id = ""
    async with channel(f"127.0.0.1:{audit.port}") as chan:
        auditor = AdminAuditor(chan, ServiceToken(signer, "budget"), attempts=3)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await auditor.record(bad)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_the_auditor_waits_for_the_audit_service_to_come_back(
    pg_url: str, make_settings: Callable[..., Any], signer: IdentitySigner
) -> None:
    port = free_port()
    async with channel(f"127.0.0.1:{port}") as chan:
        auditor = AdminAuditor(
            chan, ServiceToken(signer, "budget"), attempts=30, first_backoff=0.05
        )
        pending = asyncio.create_task(auditor.record(_revoke("e1")))
        # Nothing listens yet: the first attempts fail with UNAVAILABLE.
        await asyncio.sleep(0.3)
        assert not pending.done()
        service = await build(make_settings(DATABASE_URL=pg_url))
        running = await start(service, f"127.0.0.1:{port}")
        try:
            assert await pending == 0
        finally:
            await running.stop(0)


@pytest.fixture
async def outbox(pg_url: str) -> AsyncIterator[asyncpg.Pool]:
    """The budget schema's PostgreSQL, holding budget.admin_outbox."""
    pool = await connect_postgres(pg_url)
    await migrate(pool, "budget")
    yield pool
    await pool.close()


def _outboxed(chan: grpc.aio.Channel, signer: IdentitySigner, pool: asyncpg.Pool) -> AdminAuditor:
    token = ServiceToken(signer, "budget")
    return AdminAuditor(chan, token, pool, table="budget.admin_outbox", first_backoff=0.05)


async def test_outbox_records_wait_for_the_audit_service_in_order(
    pg_url: str,
    make_settings: Callable[..., Any],
    signer: IdentitySigner,
    outbox: asyncpg.Pool,
) -> None:
    port = free_port()
    async with channel(f"127.0.0.1:{port}") as chan:
        auditor = _outboxed(chan, signer, outbox)
        auditor.start()
        for i in range(3):
            await auditor.submit(_revoke(f"e{i}"))
        await asyncio.sleep(0.3)
        assert await auditor.pending() == 3  # nothing listens yet
        service = await build(make_settings(DATABASE_URL=pg_url))
        running = await start(service, f"127.0.0.1:{port}")
        try:
            await auditor.flush()
            assert await auditor.pending() == 0
            listed = await service.store.find(RecordFilter(tenant_id="acme"), None, 10)
            assert [row.event_id for row in listed] == ["e0", "e1", "e2"]
        finally:
            await auditor.aclose()
            await running.stop(0)


async def test_outbox_records_outlive_the_service_that_wrote_them(
    pg_url: str,
    make_settings: Callable[..., Any],
    signer: IdentitySigner,
    outbox: asyncpg.Pool,
) -> None:
    port = free_port()
    async with channel(f"127.0.0.1:{port}") as chan:
        first = _outboxed(chan, signer, outbox)
        first.start()
        await first.submit(_revoke("before-crash"))
        await first.submit(_revoke("before-crash"))  # a retried submit: one row
        await first.aclose()  # the service stops while the audit service is away
    service = await build(make_settings(DATABASE_URL=pg_url))
    running = await start(service, f"127.0.0.1:{port}")
    try:
        async with channel(f"127.0.0.1:{port}") as chan:
            second = _outboxed(chan, signer, outbox)  # the next start, or another replica
            assert await second.pending() == 1
            second.start()
            await second.flush()
            await second.aclose()
        listed = await service.store.find(RecordFilter(tenant_id="acme"), None, 10)
        assert [row.event_id for row in listed] == ["before-crash"]
    finally:
        await running.stop(0)


async def test_a_refused_record_is_kept_and_the_next_one_appended(
    audit: Audit, signer: IdentitySigner, outbox: asyncpg.Pool
) -> None:
    bad = _revoke("bad")
    bad.tenant_id = ""
    async with channel(f"127.0.0.1:{audit.port}") as chan:
        auditor = _outboxed(chan, signer, outbox)
        auditor.start()
        await auditor.submit(bad)
        await auditor.submit(_revoke("good"))
        await auditor.flush()
        await auditor.aclose()

    kept = await outbox.fetch("SELECT event_id, refused FROM budget.admin_outbox")
    assert [(row["event_id"], row["refused"].split(":")[0]) for row in kept] == [
        ("bad", "INVALID_ARGUMENT")
    ]
    listed = await audit.service.store.find(RecordFilter(tenant_id="acme"), None, 10)
    assert [row.event_id for row in listed] == ["good"]


async def test_the_auditor_gives_up_with_the_last_error(signer: IdentitySigner) -> None:
    async with channel(f"127.0.0.1:{free_port()}") as chan:
        auditor = AdminAuditor(chan, ServiceToken(signer, "budget"), attempts=2, first_backoff=0)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await auditor.record(_revoke())

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


class _AuditedAccounts:
    """The real budget service with only its AccountService, audited by the interceptor."""

    name = "budget"

    def __init__(self, app: Any, auditor: AdminAuditor, signer: IdentitySigner) -> None:
        self._app = app
        self._auditor = auditor
        self._signer = signer

    def full_names(self) -> list[str]:
        return [SERVICE]

    def register(self, server: grpc.aio.Server) -> None:
        from services.budget.account_service import AccountServicer

        app = self._app
        servicer = AccountServicer(
            app.accounts, app.keys, app.authenticator, app.invalidations, app.catalog, self._signer
        )
        account_grpc.add_AccountServiceServicer_to_server(servicer, server)

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        changes = {SERVICE: {"CreateTenant", "CreateApiKey", "RevokeApiKey"}}
        return [AdminAuditInterceptor(self._auditor, self._signer, changes)]

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        await self._app.stop()


SERVICE = "orchestra.budget.v1.AccountService"


async def test_audited_changes_of_a_real_service_are_logged_without_secrets(
    audit: Audit,
    make_settings: Callable[..., Any],
    redis_url: str,
    serve: Callable[..., Any],
    signer: IdentitySigner,
    as_caller: Callable[..., Metadata],
    operator: Metadata,
) -> None:
    from services.budget.server import build as build_budget

    outbox = await connect_postgres(audit.pg_url)

    app = await build_budget(make_settings(DATABASE_URL=audit.pg_url, REDIS_URL=redis_url))
    async with channel(f"127.0.0.1:{audit.port}") as to_audit:
        auditor = _outboxed(to_audit, signer, outbox)
        auditor.start()
        running = await serve(_AuditedAccounts(app, auditor, signer))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as chan:
            accounts = account_grpc.AccountServiceStub(chan)
            await accounts.CreateTenant(
                account_pb2.CreateTenantRequest(
                    tenant=account_pb2.Tenant(tenant_id="initech", display_name="Initech")
                ),
                metadata=as_caller("ops", "operator", key_id="op-key"),
            )
            admin = as_caller("initech", "admin", key_id="boss")
            created = await accounts.CreateApiKey(
                account_pb2.CreateApiKeyRequest(
                    api_key=account_pb2.ApiKey(display_name="ci", scopes=[identity_pb2.SCOPE_CHAT])
                ),
                metadata=admin,
            )
            key_id = created.api_key.key_id
            await accounts.RevokeApiKey(
                account_pb2.RevokeApiKeyRequest(key_id=key_id), metadata=admin
            )
            with pytest.raises(grpc.aio.AioRpcError):
                await accounts.RevokeApiKey(
                    account_pb2.RevokeApiKeyRequest(key_id="no-such-key"), metadata=admin
                )
        await auditor.flush()
        await auditor.aclose()
    await outbox.close()

    listed = await audit.stub.ListRecords(
        pb.ListRecordsRequest(tenant_id="initech"), metadata=operator
    )
    assert [(r.actor, r.admin.action.rsplit("/", 1)[1]) for r in listed.records] == [
        ("op-key", "CreateTenant"),
        ("boss", "CreateApiKey"),
        ("boss", "RevokeApiKey"),
    ]
    create_key = listed.records[1].admin
    assert create_key.resource == f"key_id={key_id},tenant_id=initech"
    assert cast(struct_pb2.Struct, create_key.details["response"])["secret"] == REDACTED
    assert created.secret not in str(listed)
    assert await verify(audit.service.store) is None
