"""Port and readiness probes: a free TCP port, and checks that a child serves.

A `Probe` is polled by the `Supervisor` until it returns True; each one here
answers False (never raises) while the server is not ready yet.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import asyncpg
import grpc
import httpx
import redis.asyncio
import redis.exceptions
from grpc_health.v1 import health_pb2, health_pb2_grpc

Probe = Callable[[], Awaitable[bool]]
"""A readiness check: returns True once the child serves; must not raise."""


def free_port(host: str = "127.0.0.1") -> int:
    """Returns a TCP port that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def tcp_probe(host: str, port: int) -> Probe:
    """Ready when a TCP connection to ``host:port`` succeeds."""

    async def probe() -> bool:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            return False
        writer.close()
        return True

    return probe


def http_probe(url: str) -> Probe:
    """Ready when ``GET url`` answers 200."""

    async def probe() -> bool:
        try:
            async with httpx.AsyncClient(timeout=2.0) as client:
                return (await client.get(url)).status_code == 200
        except httpx.HTTPError:
            return False

    return probe


def grpc_health_probe(target: str, service: str = "") -> Probe:
    """Ready when ``grpc.health.v1.Health/Check`` on ``target`` says SERVING."""

    async def probe() -> bool:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                reply = await stub.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=2.0
                )
            except grpc.aio.AioRpcError:
                return False
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    return probe


def postgres_probe(url: str) -> Probe:
    """Ready when PostgreSQL at ``url`` accepts a connection and answers a query."""

    async def probe() -> bool:
        try:
            conn = await asyncpg.connect(url, timeout=2.0)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            return False
        try:
            return bool(await conn.fetchval("SELECT 1") == 1)
        finally:
            await conn.close()

    return probe


def redis_probe(url: str) -> Probe:
    """Ready when Redis at ``url`` answers PING (not while loading its data)."""

    async def probe() -> bool:
        client = redis.asyncio.from_url(url, socket_connect_timeout=2.0)
        try:
            return bool(await client.ping())
        except (OSError, redis.exceptions.RedisError):
            return False
        finally:
            await client.aclose()

    return probe
