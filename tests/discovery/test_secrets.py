"""Credentials never leave discovery: not in responses, logs, errors or stored figures.

The upstream here is hostile on purpose: it echoes the credential and header
values it was sent in its error messages (real providers echo parts of keys),
so every path that repeats a provider's words is exercised.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import grpc
import pytest
from aiohttp import web
from google.protobuf import field_mask_pb2

from orchestra.discovery.v1 import discovery_service_pb2 as pb
from orchestra.discovery.v1 import discovery_service_pb2_grpc as pb_grpc
from services.common.catalog_view import ModelCatalogView
from services.common.crypto import scrub
from tests.discovery.conftest import SECRET, Handle

Start = Callable[..., Awaitable[Handle]]
AsCaller = Callable[..., list[tuple[str, str]]]

OTHER_SECRET = "sk-other-" + "Q" * 30
HEADER_SECRET = "hdr-secret-" + "H" * 24


class EchoingUpstream:
    """OpenAI wire; ``/v1/models`` lists one model unless ``refuse_listing``; chat
    always fails with 401, quoting the Authorization and X-Tenant-Token it got."""

    def __init__(self) -> None:
        self.refuse_listing = False
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.add_routes(
            [web.get("/v1/models", self._models), web.post("/v1/chat/completions", self._chat)]
        )
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/v1"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @staticmethod
    def _echo(request: web.Request) -> web.Response:
        sent = f"{request.headers.get('authorization')} {request.headers.get('x-tenant-token')}"
        message = f"Incorrect API key provided: {sent}"
        return web.json_response({"error": {"message": message, "type": "auth"}}, status=401)

    async def _models(self, request: web.Request) -> web.Response:
        if self.refuse_listing:
            return self._echo(request)
        return web.json_response({"object": "list", "data": [{"id": "gpt-4o-mini"}]})

    async def _chat(self, request: web.Request) -> web.Response:
        return self._echo(request)


@pytest.fixture
async def echoing() -> AsyncIterator[EchoingUpstream]:
    upstream = EchoingUpstream()
    await upstream.start()
    yield upstream
    await upstream.stop()


def test_scrub_replaces_secrets_with_their_hints() -> None:
    text = f"bad key {SECRET} and {HEADER_SECRET}; short 'abc'"
    cleaned = scrub(text, SECRET, HEADER_SECRET, "abc")
    assert SECRET not in cleaned and HEADER_SECRET not in cleaned
    assert f"{SECRET[:3]}…{SECRET[-4:]}" in cleaned
    assert "'abc'" in cleaned  # too short to be told from a word


async def test_credentials_never_appear_in_responses_logs_or_the_database(
    discovery: Start,
    echoing: EchoingUpstream,
    as_caller: AsCaller,
    pg_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    config = f"""
providers:
  - id: echo
    type: openai
    base_url: {echoing.url}
    credential: {SECRET}
    headers: {{X-Tenant-Token: {HEADER_SECRET}}}
"""
    handle = await discovery(config)
    operator = as_caller("acme", "operator")
    reader = as_caller("acme", "read")
    stub = handle.stub
    created = pb.Provider(
        provider_id="echo-two", type=pb.PROVIDER_TYPE_OPENAI_COMPATIBLE, base_url=echoing.url,
        credential=OTHER_SECRET, enabled=True,
    )  # fmt: skip
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{handle.running.port}")
    view = ModelCatalogView(
        pb_grpc.DiscoveryServiceStub(channel), metadata=as_caller("router", "internal")
    )
    view.start()
    try:
        assert await view.wait_ready(10)
        responses: list[Any] = [
            await stub.CreateProvider(
                pb.CreateProviderRequest(provider=created), metadata=operator
            ),
            await stub.UpdateProvider(
                pb.UpdateProviderRequest(
                    provider=pb.Provider(provider_id="echo-two", credential=OTHER_SECRET),
                    update_mask=field_mask_pb2.FieldMask(paths=["credential"]),
                ),
                metadata=operator,
            ),
        ]
        # Probes fail with the echoed key (chat always answers 401) three
        # times: the provider turns unhealthy with the error recorded.
        for _ in range(3):
            await handle.service.prober.run_once(force=True)
        responses.append(
            await stub.TestProvider(pb.TestProviderRequest(provider_id="echo"), metadata=operator)
        )
        # Now the listing fails too, echoing the key.
        echoing.refuse_listing = True
        responses += [
            await stub.RunDiscovery(pb.RunDiscoveryRequest(), metadata=operator),
            await stub.TestProvider(pb.TestProviderRequest(provider_id="echo"), metadata=operator),
            await stub.GetProvider(pb.GetProviderRequest(provider_id="echo"), metadata=reader),
            await stub.ListProviders(pb.ListProvidersRequest(), metadata=reader),
            await stub.ListModels(pb.ListModelsRequest(), metadata=reader),
            await stub.GetModel(pb.GetModelRequest(name="echo/gpt-4o-mini"), metadata=reader),
        ]
        watched = view.all()
    finally:
        await view.stop()
        await channel.close()

    # The errors did reach the responses (so the checks below can fail)…
    provider = responses[-4].provider
    assert provider.health.status == pb.HEALTH_STATUS_UNHEALTHY
    assert "Incorrect API key provided" in provider.health.last_error
    assert "Incorrect API key provided" in responses[-6].errors["echo"]
    assert any("Incorrect API key provided" in m.health.last_error for m in watched)
    # …but never a credential: in responses, in what routers watch, in any log
    # line. (Header values are configuration, shown by GetProvider, but an
    # echo of one is scrubbed from errors like a credential.)
    secrets = (SECRET, OTHER_SECRET)
    for item in [*responses, *watched]:
        wire = item.SerializeToString()
        for secret in secrets:
            assert secret.encode() not in wire, (secret, item)
    errors = [m.health.last_error for m in watched] + [provider.health.last_error]
    assert not any(HEADER_SECRET in e for e in errors)
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert "Incorrect API key provided" in logged  # the failures were logged
    for secret in (*secrets, HEADER_SECRET):
        assert secret not in logged
    # Nor in anything stored: errors, probe figures, or the sealed credential.
    conn = await asyncpg.connect(pg_url)
    try:
        dump = ""
        for table in ("providers", "models", "probe_stats"):
            rows = await conn.fetch(f"SELECT * FROM discovery.{table}")
            dump += repr([dict(r) for r in rows])
        stored_errors = await conn.fetch(
            "SELECT last_error FROM discovery.providers"
            " UNION ALL SELECT last_error FROM discovery.probe_stats"
        )
    finally:
        await conn.close()
    assert "Incorrect API key provided" in dump
    for secret in secrets:
        assert secret not in dump
    assert not any(HEADER_SECRET in r["last_error"] for r in stored_errors)
