"""The shared plumbing: error mapping, identity tokens, page tokens, telemetry."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestra.cache.v1 import cache_service_pb2 as cache_pb2
from orchestra.cache.v1 import cache_service_pb2_grpc as cache_grpc
from orchestra.common.v1 import errors_pb2, identity_pb2
from services.common import clients, errors, outages, paging, telemetry
from services.common.identity import IdentitySigner, has_scope, tenant_of


class _Broken(cache_grpc.CacheServiceServicer):
    """A servicer whose RPCs fail in the ways the interceptor must handle."""

    async def Lookup(self, request: Any, context: Any) -> Any:
        raise errors.ResourceExhausted(
            errors_pb2.ERROR_REASON_RATE_LIMITED,
            "slow down",
            metadata={"limit": "10"},
            retry_after=1.5,
            field="key",
            quota_subject="tenant:acme",
        )

    async def Store(self, request: Any, context: Any) -> Any:
        raise RuntimeError("secret internals /etc/passwd")

    async def Invalidate(self, request: Any, context: Any) -> Any:
        raise NotImplementedError  # what the generated base raises for an RPC not written yet

    async def BatchStore(self, request: Any, context: Any) -> Any:
        # What asyncpg raises for a string with NUL that reached PostgreSQL.
        raise asyncpg.exceptions.CharacterNotInRepertoireError("invalid byte sequence: 0x00")

    async def LookupStream(self, requests: Any, context: Any) -> Any:
        async for _ in requests:
            yield cache_pb2.LookupResponse()

    async def GetCacheStats(self, request: Any, context: Any) -> Any:
        raise NotImplementedError


class _Service:
    name = "broken"

    def full_names(self) -> Sequence[str]:
        return ["orchestra.cache.v1.CacheService"]

    def register(self, server: grpc.aio.Server) -> None:
        cache_grpc.add_CacheServiceServicer_to_server(_Broken(), server)

    def interceptors(self) -> Sequence[grpc.aio.ServerInterceptor]:
        return []

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


async def _call(serve: Callable[..., Any], method: str) -> errors.ErrorDetails:
    running = await serve(_Service())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = cache_grpc.CacheServiceStub(channel)
        request = {
            "Lookup": cache_pb2.LookupRequest(),
            "Store": cache_pb2.StoreRequest(),
            "Invalidate": cache_pb2.InvalidateRequest(),
        }[method]
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await getattr(stub, method)(request)
    return errors.decode(raised.value)


async def test_domain_errors_carry_every_detail(serve: Callable[..., Any]) -> None:
    details = await _call(serve, "Lookup")
    assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details.reason == "RATE_LIMITED"
    assert details.metadata["limit"] == "10" and details.metadata["field"] == "key"
    assert details.retry_after == 1.5
    assert details.field_violations == {"key": "slow down"}


async def test_a_bug_is_internal_with_an_incident_id_and_no_internals(
    serve: Callable[..., Any],
) -> None:
    details = await _call(serve, "Store")
    assert details.code == grpc.StatusCode.INTERNAL and details.reason == "INTERNAL"
    assert details.metadata["incident_id"] in details.message
    assert "passwd" not in details.message and "Traceback" not in details.message


async def test_text_postgresql_cannot_store_is_invalid_argument(
    serve: Callable[..., Any],
) -> None:
    running = await serve(_Service())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await cache_grpc.CacheServiceStub(channel).BatchStore(cache_pb2.BatchStoreRequest())
    details = errors.decode(raised.value)
    assert (details.code, details.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD")


@pytest.mark.parametrize("body", [b"\xee\xea", b"\x0a\x05ab"], ids=["corrupt", "truncated"])
async def test_bytes_that_do_not_parse_are_malformed_request(
    serve: Callable[..., Any], body: bytes
) -> None:
    running = await serve(_Service())
    path = "/orchestra.cache.v1.CacheService/"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        raw: Any = channel
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await raw.unary_unary(path + "Lookup")(body)
        unary = errors.decode(raised.value)
        # A client stream: the good message is answered, the bad one refused.
        call = raw.stream_stream(path + "LookupStream")()
        await call.write(cache_pb2.LookupRequest().SerializeToString())
        assert cache_pb2.LookupResponse.FromString(await call.read()) == cache_pb2.LookupResponse()
        await call.write(body)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call.read()
        streamed = errors.decode(raised.value)
    for details in (unary, streamed):
        assert details.code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.reason == "MALFORMED_REQUEST" and details.metadata["error"]


def test_a_refusal_quotes_at_most_a_few_hundred_bytes_of_what_it_was_sent() -> None:
    value = "\u00e9" * 10_000
    refusal = errors.InvalidArgument(
        errors_pb2.ERROR_REASON_INVALID_FIELD, f"got {value!r}", metadata={"got": value}
    )
    status = refusal.to_rpc_status().SerializeToString()
    assert len(status) < 2_000  # was about 60 kB: over a client's 16 KiB metadata limit
    assert refusal.message.startswith("got '\u00e9") and refusal.message.endswith("...")
    short = errors.InvalidArgument(errors_pb2.ERROR_REASON_INVALID_FIELD, "got 'x'")
    assert short.message == "got 'x'"


async def test_an_rpc_not_offered_yet_is_unimplemented(serve: Callable[..., Any]) -> None:
    details = await _call(serve, "Invalidate")
    assert details.code == grpc.StatusCode.UNIMPLEMENTED


def test_identity_tokens_verify_and_refuse_forgery() -> None:
    signer = IdentitySigner(b"k" * 32)
    ident = identity_pb2.Identity(tenant_id="acme", key_id="k1", scopes=[identity_pb2.SCOPE_CHAT])
    token = signer.sign(ident, now=1000)
    assert signer.verify(token, now=1001) == ident
    version, body, expiry, mac = token.split(".")
    forged = [
        f"{version}.{body}.{int(expiry) + 999}.{mac}",  # extended expiry
        f"{version}.{body[:-2]}AA.{expiry}.{mac}",  # edited identity
        IdentitySigner(b"x" * 32).sign(ident, now=1000),  # another key
        "not-a-token",
    ]
    for bad in forged:
        with pytest.raises(errors.Unauthenticated):
            signer.verify(bad, now=1001)
    with pytest.raises(errors.Unauthenticated, match="expired"):
        signer.verify(token, now=10_000)


def test_scopes_imply_and_tenants_are_enforced() -> None:
    admin = identity_pb2.Identity(tenant_id="a", scopes=[identity_pb2.SCOPE_ADMIN])
    assert has_scope(admin, identity_pb2.SCOPE_READ)
    assert not has_scope(admin, identity_pb2.SCOPE_CHAT)
    assert not has_scope(admin, identity_pb2.SCOPE_INTERNAL)
    assert tenant_of(admin, "") == "a"
    with pytest.raises(errors.PermissionDenied):
        tenant_of(admin, "b")
    operator = identity_pb2.Identity(tenant_id="a", scopes=[identity_pb2.SCOPE_OPERATOR])
    assert tenant_of(operator, "b") == "b"


def test_page_tokens_are_bound_to_their_filters() -> None:
    token = paging.encode(41, {"tenant": "a"})
    assert paging.decode(token, {"tenant": "a"}) == 41
    assert paging.decode("", {"tenant": "a"}) is None
    for bad, filters in ((token, {"tenant": "b"}), ("garbage!", {"tenant": "a"})):
        with pytest.raises(errors.InvalidArgument) as raised:
            paging.decode(bad, filters)
        assert raised.value.reason == errors_pb2.ERROR_REASON_INVALID_PAGE_TOKEN
    assert paging.page_size(0) == paging.DEFAULT_PAGE_SIZE
    assert paging.page_size(10**6) == paging.MAX_PAGE_SIZE


def test_telemetry_is_off_until_switched_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(telemetry, "_enabled", False)
    telemetry.setup("test", "")
    assert telemetry.server_interceptors() == []
    telemetry.setup("test", "console")
    try:
        assert len(telemetry.server_interceptors()) == 1
    finally:  # leave the rest of the session uninstrumented
        from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient

        GrpcAioInstrumentorClient().uninstrument()  # type: ignore[no-untyped-call]
        monkeypatch.setattr(telemetry, "_enabled", False)


class _Counting(_Broken):
    """Answers Lookup with a miss and counts the calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def Lookup(self, request: Any, context: Any) -> Any:
        self.calls += 1
        return cache_pb2.LookupResponse()


class _CountingService(_Service):
    def __init__(self) -> None:
        self.servicer = _Counting()

    def register(self, server: grpc.aio.Server) -> None:
        cache_grpc.add_CacheServiceServicer_to_server(self.servicer, server)


async def test_health_watch_answers_through_the_interceptors(serve: Callable[..., Any]) -> None:
    # Client-side health checking (the peers' channels) calls Watch, a
    # streaming handler written in the context.write style.
    running = await serve(_Service())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        first = await call.read()
        call.cancel()
    assert first.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_channel_to_replicas_balances_and_skips_one_not_serving(
    serve: Callable[..., Any],
) -> None:
    one, two = _CountingService(), _CountingService()
    first, second = await serve(one), await serve(two)
    channel = clients.channel(f"127.0.0.1:{first.port},127.0.0.1:{second.port}")
    try:
        stub = cache_grpc.CacheServiceStub(channel)
        for _ in range(20):
            await stub.Lookup(cache_pb2.LookupRequest(), timeout=5)
        assert one.servicer.calls > 0 and two.servicer.calls > 0
        assert one.servicer.calls + two.servicer.calls == 20

        await second.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # draining
        await asyncio.sleep(0.5)  # the Watch stream carries the change to the channel
        before = two.servicer.calls
        for _ in range(20):
            await stub.Lookup(cache_pb2.LookupRequest(), timeout=5)
        assert two.servicer.calls == before
    finally:
        await channel.close()


def test_a_replica_list_becomes_one_balanced_target() -> None:
    assert clients.target("127.0.0.1:1") == "127.0.0.1:1"
    assert clients.target("127.0.0.1:1, 127.0.0.1:2") == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert clients.target("[::1]:1,[::1]:2") == "ipv6:[::1]:1,[::1]:2"


async def test_a_connection_left_mid_protocol_by_a_postgres_restart_is_an_outage() -> None:
    @outages.postgres_outage
    async def query() -> None:
        raise asyncpg.InternalClientError(
            "cannot switch to state 12; another operation (2) is in progress"
        )

    with pytest.raises(errors.Unavailable) as raised:
        await query()
    assert raised.value.reason == errors_pb2.ERROR_REASON_STORE_UNAVAILABLE
    assert raised.value.metadata["store"] == "postgresql"
