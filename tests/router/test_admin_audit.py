"""Administrative changes made through the real services land in the real audit log."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
from google.protobuf import json_format

from orchestra.audit.v1 import audit_service_pb2 as audit_pb2
from orchestra.audit.v1 import audit_service_pb2_grpc as audit_grpc
from orchestra.budget.v1 import account_service_pb2 as account_pb2
from orchestra.budget.v1 import account_service_pb2_grpc as account_grpc
from orchestra.common.v1 import identity_pb2
from orchestra.discovery.v1 import discovery_service_pb2 as discovery_pb2
from orchestra.discovery.v1 import discovery_service_pb2_grpc as discovery_grpc
from tests.router.conftest import TENANT, Suite


async def _admin_records(
    to_audit: grpc.aio.Channel, metadata: list[tuple[str, str]], action: str
) -> list[audit_pb2.AuditRecord]:
    """The admin records of ``action``, polled (they are appended in the background)."""
    audit = audit_grpc.AuditServiceStub(to_audit)
    found: list[audit_pb2.AuditRecord] = []
    for _ in range(100):
        page = await audit.ListRecords(
            audit_pb2.ListRecordsRequest(kind=audit_pb2.RECORD_KIND_ADMIN, page_size=100),
            metadata=metadata,
        )
        found = [r for r in page.records if r.admin.action.endswith(action)]
        if found:
            break
        await asyncio.sleep(0.05)
    return found


async def test_creating_a_provider_is_audited_without_its_credential(
    suite: Suite, as_caller: Callable[..., list[tuple[str, str]]]
) -> None:
    operator = as_caller(TENANT, "operator", "read", key_id="ops-key")
    secret = "sk-live-do-not-log-me-0123456789"
    address = suite.settings.addrs
    async with (
        grpc.aio.insecure_channel(address["discovery"]) as to_discovery,
        grpc.aio.insecure_channel(address["audit"]) as to_audit,
    ):
        await discovery_grpc.DiscoveryServiceStub(to_discovery).CreateProvider(
            discovery_pb2.CreateProviderRequest(
                provider=discovery_pb2.Provider(
                    provider_id="audited",
                    type=discovery_pb2.PROVIDER_TYPE_OPENAI,
                    base_url="http://127.0.0.1:9",
                    credential=secret,
                    headers={"x-extra-token": secret},
                )
            ),
            metadata=operator,
        )
        found = await _admin_records(to_audit, operator, "/CreateProvider")

    assert len(found) == 1, "the provider creation was never audited"
    text = json_format.MessageToJson(found[0])
    assert "audited" in text
    assert secret not in text


async def test_creating_an_api_key_is_audited_without_its_secret(
    suite: Suite, as_caller: Callable[..., list[tuple[str, str]]]
) -> None:
    admin = as_caller(TENANT, "admin", "read", key_id="admin-key")
    address = suite.settings.addrs
    async with (
        grpc.aio.insecure_channel(address["budget"]) as to_budget,
        grpc.aio.insecure_channel(address["audit"]) as to_audit,
    ):
        created = await account_grpc.AccountServiceStub(to_budget).CreateApiKey(
            account_pb2.CreateApiKeyRequest(
                api_key=account_pb2.ApiKey(display_name="ci", scopes=[identity_pb2.SCOPE_CHAT])
            ),
            metadata=admin,
        )
        found = await _admin_records(to_audit, admin, "/CreateApiKey")

    assert len(found) == 1, "the key creation was never audited"
    record = found[0]
    assert (record.tenant_id, record.actor) == (TENANT, "admin-key")
    assert created.api_key.key_id in record.admin.resource + json_format.MessageToJson(record)
    assert created.secret not in json_format.MessageToJson(record)
