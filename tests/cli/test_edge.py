"""The Envoy edge: the rendered configuration, and real calls through Envoy.

One in-process grpc.aio server stands in for all five services: it serves a
bytes-in/bytes-out echo service under ``orchestra.router.v1``, health,
reflection, and the ext_authz ``Authorization/Check`` that budget implements.
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.cli.edge import (
    EdgeConfigError,
    envoy_spec,
    render_envoy_config,
    validate_envoy_config,
)
from services.cli.embedded import ChildFailed, Supervisor, free_port
from services.common import errors

live = pytest.mark.asyncio(loop_scope="module")

ECHO = "/orchestra.router.v1.EchoService/Echo"
COUNT = "/orchestra.router.v1.EchoService/Count"
SLOW = "/orchestra.router.v1.EchoService/Slow"
GOOD_KEY = (("authorization", "Bearer good"),)

# Raw bytes in, raw bytes out: the echo service has no .proto.
UnaryUnary = grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]
UnaryStream = grpc.aio.UnaryStreamMultiCallable[bytes, bytes]


def upstreams(address: tuple[str, int]) -> dict[str, Any]:
    return {name: address for name in ("router", "budget", "cache", "audit", "discovery")}


# -- rendering --------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "router", "::1"])
def test_rendered_config_passes_envoy_validation(tmp_path: Path, host: str) -> None:
    config = render_envoy_config(tmp_path / "envoy.yaml", **upstreams((host, 50051)))
    validate_envoy_config(config)


def test_cluster_type_follows_the_address(tmp_path: Path) -> None:
    addresses = upstreams(("127.0.0.1", 50051)) | {"cache": ("cache.orchestra.svc", 50053)}
    config = yaml.safe_load(render_envoy_config(tmp_path / "envoy.yaml", **addresses).read_text())
    types = {c["name"]: c["type"] for c in config["static_resources"]["clusters"]}
    assert types == {
        "router": "STATIC",
        "budget": "STATIC",
        "cache": "STRICT_DNS",
        "audit": "STATIC",
        "discovery": "STATIC",
    }
    for cluster in config["static_resources"]["clusters"]:
        assert cluster["health_checks"][0]["grpc_health_check"] == {"service_name": ""}


def test_replicas_become_endpoints_with_retries_and_outlier_detection(tmp_path: Path) -> None:
    addresses = upstreams(("127.0.0.1", 50051)) | {
        "router": [("127.0.0.1", 50051), ("127.0.0.1", 50056)],
        "cache": [("cache-0.cache", 50053), ("cache-1.cache", 50053)],
    }
    path = render_envoy_config(tmp_path / "envoy.yaml", **addresses)
    validate_envoy_config(path)
    config = yaml.safe_load(path.read_text())
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}

    def ports(name: str) -> list[tuple[str, int]]:
        endpoints = clusters[name]["load_assignment"]["endpoints"][0]["lb_endpoints"]
        return [
            (e["endpoint"]["address"]["socket_address"]["address"],
             e["endpoint"]["address"]["socket_address"]["port_value"])
            for e in endpoints
        ]  # fmt: skip

    assert ports("router") == [("127.0.0.1", 50051), ("127.0.0.1", 50056)]
    assert ports("cache") == [("cache-0.cache", 50053), ("cache-1.cache", 50053)]
    assert clusters["cache"]["type"] == "STRICT_DNS" and clusters["router"]["type"] == "STATIC"
    for cluster in clusters.values():
        assert cluster["outlier_detection"]["max_ejection_percent"] == 50
        assert "retry_budget" in cluster["circuit_breakers"]["thresholds"][0]
    http = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    retry = http["typed_config"]["route_config"]["virtual_hosts"][0]["retry_policy"]
    # Only failures before any response: never a stream that already answered.
    assert set(retry["retry_on"].split(",")) == {
        "connect-failure", "refused-stream", "reset", "unavailable"
    }  # fmt: skip
    with pytest.raises(EdgeConfigError, match="mix of IP addresses and DNS names"):
        render_envoy_config(
            tmp_path / "mixed.yaml",
            **addresses | {"router": [("127.0.0.1", 50051), ("router", 50051)]},
        )


@pytest.mark.parametrize(
    ("host", "port"), [("router; rm -rf /", 50051), ("router\n  x: y", 50051), ("router", 0)]
)
def test_bad_addresses_are_rejected(tmp_path: Path, host: str, port: int) -> None:
    with pytest.raises(EdgeConfigError):
        render_envoy_config(tmp_path / "envoy.yaml", **upstreams((host, port)))


def test_envoy_rejects_a_broken_config(tmp_path: Path) -> None:
    config = tmp_path / "envoy.yaml"
    config.write_text("static_resources: {clusters: [{name: x, type: NOPE}]}\n")
    with pytest.raises(EdgeConfigError, match="NOPE"):
        validate_envoy_config(config)


# -- a fake upstream for all five services ----------------------------------------


async def echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    """Returns the request and the identity the edge injected, as ``request|identity``."""
    identity = dict(context.invocation_metadata() or ()).get("x-orchestra-identity", "")
    return request + b"|" + str(identity).encode()


async def chat_echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    """What a ChatService call brings the router: ``identity|authorization``."""
    metadata = {k: str(v) for k, v in context.invocation_metadata() or ()}
    identity, key = metadata.get("x-orchestra-identity", ""), metadata.get("authorization", "")
    return f"{identity}|{key}".encode()


async def count(
    request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
) -> AsyncIterator[bytes]:
    for i in range(int(request)):
        yield str(i).encode()


async def slow(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    await asyncio.sleep(30)
    return request


DETAILS = "grpc-status-details-bin"
EXHAUSTED = status_pb2.Status(code=8, message="denied by budget")
EXHAUSTED.details.add().Pack(
    error_details_pb2.ErrorInfo(reason="BUDGET_EXHAUSTED", domain="orchestra.dev")
)
EXHAUSTED_B64 = base64.b64encode(EXHAUSTED.SerializeToString()).decode()


def header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


class Authorization(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """What budget does at the edge: API key in, identity header out."""

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: object
    ) -> external_auth_pb2.CheckResponse:
        key = request.attributes.request.http.headers.get("authorization", "")
        if key == "Bearer good":
            ok = external_auth_pb2.OkHttpResponse(headers=[header("x-orchestra-identity", "t1")])
            return external_auth_pb2.CheckResponse(status=status_pb2.Status(), ok_response=ok)
        if key == "Bearer anonymous":  # allowed, but no identity injected
            return external_auth_pb2.CheckResponse(
                status=status_pb2.Status(), ok_response=external_auth_pb2.OkHttpResponse()
            )
        code, headers = 401, []
        if key == "Bearer throttled":
            code = 429
        if key == "Bearer exhausted":  # a precise gRPC status, with details
            code, headers = 429, [header("grpc-status", "8"), header(DETAILS, EXHAUSTED_B64)]
        denied = external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=code), headers=headers, body="denied by budget"
        )
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=grpc.StatusCode.UNAUTHENTICATED.value[0]),
            denied_response=denied,
        )


async def start_upstream() -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "Count": grpc.unary_stream_rpc_method_handler(count),
        "Slow": grpc.unary_unary_rpc_method_handler(slow),
    }
    chat: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "ChatStream": grpc.unary_unary_rpc_method_handler(chat_echo)
    }
    server.add_generic_rpc_handlers((
        grpc.method_handlers_generic_handler("orchestra.router.v1.EchoService", handlers),
        grpc.method_handlers_generic_handler("orchestra.router.v1.ChatService", chat),
    ))  # fmt: skip
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(Authorization(), server)
    names = (
        "grpc.health.v1.Health",
        "envoy.service.auth.v3.Authorization",
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


@dataclass(frozen=True)
class Edge:
    target: str  # host:port of the Envoy listener
    url: str  # http://host:port, for gRPC-Web over HTTP/1.1


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def edge(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Edge]:
    server, port = await start_upstream()
    state_dir = tmp_path_factory.mktemp("edge")
    edge_port, admin_port = free_port(), free_port()
    config = render_envoy_config(
        state_dir / "envoy.yaml",
        edge_port=edge_port,
        admin_port=admin_port,
        **upstreams(("127.0.0.1", port)),
    )
    supervisor = Supervisor(state_dir)
    try:
        await supervisor.start(envoy_spec(config, admin_port, concurrency=1))
        yield Edge(f"127.0.0.1:{edge_port}", f"http://127.0.0.1:{edge_port}")
    finally:
        await supervisor.stop()
        await server.stop(None)


# -- through the edge ------------------------------------------------------------------


@live
async def test_unary_call_carries_the_identity_from_check(edge: Edge) -> None:
    async with grpc.aio.insecure_channel(edge.target) as channel:
        call: UnaryUnary = channel.unary_unary(ECHO)
        # A forged identity is replaced by the one the Check response sets ...
        forged = (*GOOD_KEY, ("x-orchestra-identity", "admin"))
        assert await call(b"hi", metadata=forged, timeout=5) == b"hi|t1"
        # ... and stripped when Check sets none.
        anonymous = (("authorization", "Bearer anonymous"), ("x-orchestra-identity", "admin"))
        assert await call(b"hi", metadata=anonymous, timeout=5) == b"hi|"


@live
async def test_chat_reaches_the_router_without_a_check(edge: Edge) -> None:
    """ChatService is authenticated by the router: the edge passes the key on,
    asks Check nothing (no identity is injected, even for a key Check would
    refuse) and still strips a forged identity."""
    async with grpc.aio.insecure_channel(edge.target) as channel:
        chat: UnaryUnary = channel.unary_unary("/orchestra.router.v1.ChatService/ChatStream")
        forged = (("authorization", "Bearer good"), ("x-orchestra-identity", "admin"))
        assert await chat(b"", metadata=forged, timeout=5) == b"|Bearer good"
        assert await chat(b"", metadata=(("authorization", "Bearer wrong"),), timeout=5) == (
            b"|Bearer wrong"
        )


@live
async def test_server_streaming_call(edge: Edge) -> None:
    async with grpc.aio.insecure_channel(edge.target) as channel:
        count: UnaryStream = channel.unary_stream(COUNT)
        call = count(b"5", metadata=GOOD_KEY, timeout=5)
        assert [m async for m in call] == [b"0", b"1", b"2", b"3", b"4"]


@live
async def test_health_needs_no_api_key(edge: Edge) -> None:
    async with grpc.aio.insecure_channel(edge.target) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


@live
async def test_grpcurl_lists_services_through_the_edge(edge: Edge) -> None:
    result = await asyncio.to_thread(
        subprocess.run,
        [str(Path(sys.executable).parent / "grpcurl"), "-plaintext", edge.target, "list"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 0, result.stderr
    assert {"grpc.health.v1.Health", "envoy.service.auth.v3.Authorization"} <= set(
        result.stdout.split()
    )


@live
@pytest.mark.parametrize(
    ("key", "code"),
    [
        (None, grpc.StatusCode.UNAUTHENTICATED),  # Check answered HTTP 401
        ("Bearer wrong", grpc.StatusCode.UNAUTHENTICATED),
        # HTTP 429 alone maps to UNAVAILABLE (gRPC's HTTP-to-status mapping) ...
        ("Bearer throttled", grpc.StatusCode.UNAVAILABLE),
        # ... a grpc-status header in the denial wins over the mapping.
        ("Bearer exhausted", grpc.StatusCode.RESOURCE_EXHAUSTED),
    ],
)
async def test_denied_calls(edge: Edge, key: str | None, code: grpc.StatusCode) -> None:
    metadata = () if key is None else (("authorization", key),)
    async with grpc.aio.insecure_channel(edge.target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            echo: UnaryUnary = channel.unary_unary(ECHO)
            await echo(b"hi", metadata=metadata, timeout=5)
    assert raised.value.code() == code
    assert raised.value.details() == "denied by budget"


@live
async def test_denial_carries_rich_error_details(edge: Edge) -> None:
    metadata = (("authorization", "Bearer exhausted"),)
    async with grpc.aio.insecure_channel(edge.target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            echo: UnaryUnary = channel.unary_unary(ECHO)
            await echo(b"hi", metadata=metadata, timeout=5)
    trailers = dict(raised.value.trailing_metadata() or ())
    status = status_pb2.Status.FromString(trailers[DETAILS])
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.reason == "BUDGET_EXHAUSTED"


@live
async def test_unknown_service_is_unimplemented(edge: Edge) -> None:
    async with grpc.aio.insecure_channel(edge.target) as channel:
        unknown: UnaryUnary = channel.unary_unary("/orchestra.nope.v1.Nope/Nope")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await unknown(b"", metadata=GOOD_KEY, timeout=5)
    error = errors.decode(raised.value)
    assert (error.code, error.reason) == (grpc.StatusCode.UNIMPLEMENTED, "RESOURCE_NOT_FOUND")
    assert raised.value.details() == "no such service or method at this edge"


def grpc_web_frame(message: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(message)) + message


@live
async def test_grpc_web_and_cors(edge: Edge) -> None:
    origin = "http://app.example"
    async with httpx.AsyncClient(base_url=edge.url, timeout=10) as client:
        preflight = await client.options(
            "/grpc.health.v1.Health/Check",
            headers={
                "origin": origin,
                "access-control-request-method": "POST",
                "access-control-request-headers": "content-type,x-grpc-web,authorization",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == origin

        reply = await client.post(
            "/grpc.health.v1.Health/Check",
            content=grpc_web_frame(b""),
            headers={"content-type": "application/grpc-web+proto", "origin": origin},
        )
    assert reply.status_code == 200
    assert reply.headers["content-type"] == "application/grpc-web+proto"
    assert reply.headers["access-control-allow-origin"] == origin
    serving = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
    assert reply.content.startswith(grpc_web_frame(serving.SerializeToString()))
    assert b"grpc-status:0" in reply.content


def curl_speaks_h2c() -> bool:
    curl = shutil.which("curl")
    if curl is None:
        return False
    return "HTTP2" in subprocess.run([curl, "--version"], capture_output=True, text=True).stdout


@live
@pytest.mark.skipif(not curl_speaks_h2c(), reason="needs curl with HTTP/2")
async def test_edge_enforces_the_grpc_timeout_header(edge: Edge, tmp_path: Path) -> None:
    # A gRPC request with a grpc-timeout header but no client-side deadline
    # (curl has none), so that only Envoy can end it.
    body = tmp_path / "request"
    body.write_bytes(grpc_web_frame(b"x"))  # gRPC and gRPC-Web frame data alike
    headers = ["content-type: application/grpc", "te: trailers", "grpc-timeout: 300m"]
    headers.append("authorization: Bearer good")
    command = ["curl", "-s", "-D", "-", "-o", "/dev/null", "--http2-prior-knowledge"]
    command += [arg for h in headers for arg in ("-H", h)]
    command += ["--data-binary", f"@{body}", f"{edge.url}{SLOW}"]
    result = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=20
    )
    assert "grpc-status: 4" in result.stdout  # DEADLINE_EXCEEDED


@live
async def test_edge_enforces_the_grpc_timeout_header_for_grpc_web(edge: Edge) -> None:
    async with httpx.AsyncClient(base_url=edge.url, timeout=20) as client:
        reply = await client.post(
            SLOW,
            content=grpc_web_frame(b"x"),
            headers={
                "content-type": "application/grpc-web+proto",
                "authorization": "Bearer good",
                "grpc-timeout": "300m",
            },
        )
    # Envoy forwards grpc-timeout, so two timers race for the same 300 ms: Envoy's
    # own (its grpc_web filter reports it as HTTP 504 / UNAVAILABLE) and the
    # upstream's gRPC deadline (a trailers-only DEADLINE_EXCEEDED, HTTP 200). Either
    # way the 30 s handler was cut at the deadline; ignoring it would make the
    # client time out after 20 s instead.
    outcome = (reply.status_code, reply.headers.get("grpc-status"), reply.headers["grpc-message"])
    assert outcome in {
        (504, "14", "downstream duration timeout"),
        (200, "4", "Deadline Exceeded"),
    }, (outcome, dict(reply.headers))
    assert reply.headers["grpc-message"] == "downstream duration timeout"


async def _refused_with_one_service_down(tmp_path: Path, down: str, path: str) -> grpc.RpcError:
    """The error of a call to ``path`` through an edge whose ``down`` service has no replica."""
    server, port = await start_upstream()
    edge_port, admin_port = free_port(), free_port()
    addresses = upstreams(("127.0.0.1", port)) | {down: ("127.0.0.1", free_port())}
    config = render_envoy_config(
        tmp_path / "envoy.yaml", edge_port=edge_port, admin_port=admin_port, **addresses
    )
    supervisor = Supervisor(tmp_path)
    try:
        await supervisor.start(envoy_spec(config, admin_port, concurrency=1))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{edge_port}") as channel:
            call: UnaryUnary = channel.unary_unary(path)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call(b"hi", metadata=GOOD_KEY, timeout=5)
        return raised.value
    finally:
        await supervisor.stop()
        await server.stop(None)


@pytest.mark.asyncio
async def test_fails_closed_when_budget_is_down(tmp_path: Path) -> None:
    error = errors.decode(await _refused_with_one_service_down(tmp_path, "budget", ECHO))
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "DEPENDENCY_UNAVAILABLE")
    assert error.metadata == {"dependency": "budget"}
    assert error.retry_after == 1.0


@pytest.mark.asyncio
async def test_a_service_with_no_replica_up_is_unavailable_with_a_reason(tmp_path: Path) -> None:
    chat = "/orchestra.router.v1.ChatService/Chat"
    raised = await _refused_with_one_service_down(tmp_path, "router", chat)
    error = errors.decode(raised)
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "DEPENDENCY_UNAVAILABLE")
    assert error.message == "the edge reached no healthy replica of the service"


async def test_envoy_start_failure_is_reported(tmp_path: Path) -> None:
    config = tmp_path / "envoy.yaml"
    config.write_text("static_resources: {clusters: [{name: x, type: NOPE}]}\n")
    supervisor = Supervisor(tmp_path)
    try:
        with pytest.raises(ChildFailed, match="envoy exited"):
            await supervisor.start(envoy_spec(config, free_port()))
    finally:
        await supervisor.stop()
