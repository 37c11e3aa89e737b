"""The real budget service behind a real Envoy edge: ext_authz end to end.

Envoy asks budget's Check for every call, then routes ``orchestra.budget.v1``
calls to budget itself, which accepts them only with the identity Check
injected. A refused key must reach the gRPC client as UNAUTHENTICATED with the
ErrorInfo reason intact.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from orchestra.budget.v1 import account_service_pb2 as pb
from orchestra.budget.v1 import account_service_pb2_grpc
from services.cli.edge import envoy_spec, render_envoy_config
from services.cli.embedded import Supervisor, free_port
from services.common import errors
from tests.budget.conftest import Budget

SECRET = "ok_app_0123456789abcdefghijklmnopqrstuv"
CONFIG = f"""
tenants:
  - id: acme
    display_name: Acme
    api_keys:
      - id: app
        secret: {SECRET}
        scopes: [chat, read]
"""


async def test_keys_are_checked_at_the_edge(
    start_budget: Callable[..., Awaitable[Budget]],
    config_file: Callable[[str], str],
    tmp_path: Path,
) -> None:
    budget = await start_budget(ORCHESTRA_CONFIG=config_file(CONFIG))
    edge_port, admin_port = free_port(), free_port()
    address = ("127.0.0.1", budget.port)
    config = render_envoy_config(
        tmp_path / "envoy.yaml",
        edge_port=edge_port,
        admin_port=admin_port,
        router=address,
        budget=address,
        cache=address,
        audit=address,
        discovery=address,
    )
    supervisor = Supervisor(tmp_path / "edge")
    try:
        await supervisor.start(envoy_spec(config, admin_port, concurrency=1))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{edge_port}") as channel:
            stub = account_service_pb2_grpc.AccountServiceStub(channel)
            # A forged identity is stripped; the one Check injects is verified.
            forged = (("authorization", f"Bearer {SECRET}"), ("x-orchestra-identity", "forged"))
            accepted: list[tuple[tuple[str, str], ...]] = [(("x-api-key", SECRET),), forged]
            for metadata in accepted:
                got = await stub.GetTenant(pb.GetTenantRequest(), metadata=metadata, timeout=10)
                assert got.tenant.tenant_id == "acme"
            refusals: dict[tuple[tuple[str, str], ...], str] = {
                (): "API_KEY_MISSING",
                (("authorization", "Bearer ok_app_wrong-secret-0123456789abcdef"),): (
                    "API_KEY_INVALID"
                ),
            }
            for metadata, reason in refusals.items():
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.GetTenant(pb.GetTenantRequest(), metadata=metadata, timeout=10)
                details = errors.decode(caught.value)
                assert (details.code, details.reason) == (grpc.StatusCode.UNAUTHENTICATED, reason)
                assert details.message.startswith("the API key is") or reason == "API_KEY_MISSING"
    finally:
        await supervisor.stop()
