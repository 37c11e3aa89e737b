"""Stopping a service: SIGTERM drains behind NOT_SERVING, SIGINT stops at once."""

from __future__ import annotations

import asyncio
import os
import signal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.server import Running, serve_forever, start
from tests.common.test_common import _Service

_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _status(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=2
        )
    return int(reply.status)


async def _until_not_serving(port: int) -> None:
    for _ in range(100):
        if await _status(port) == _NOT_SERVING:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("health never turned NOT_SERVING")


async def _serving() -> tuple[Running, asyncio.Task[None]]:
    running = await start(_Service(), "127.0.0.1:0")
    task = asyncio.create_task(serve_forever(running, grace=1.0, drain=60.0))
    await asyncio.sleep(0.05)  # the signal handlers are in place
    return running, task


async def test_sigterm_turns_not_serving_and_keeps_answering_until_a_second_signal() -> None:
    running, task = await _serving()

    os.kill(os.getpid(), signal.SIGTERM)
    await _until_not_serving(running.port)
    # Draining: new calls are still answered (they come from peers that have
    # not seen NOT_SERVING yet), and the server has not stopped.
    for _ in range(3):
        assert await _status(running.port) == _NOT_SERVING
    assert not task.done()

    os.kill(os.getpid(), signal.SIGTERM)  # a second signal cuts the drain short
    await asyncio.wait_for(task, 10)
    try:
        await _status(running.port)
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAVAILABLE
    else:
        raise AssertionError("the stopped server still answered")


async def test_sigint_stops_without_draining() -> None:
    _, task = await _serving()

    os.kill(os.getpid(), signal.SIGINT)
    await asyncio.wait_for(task, 10)  # well before the 60 s drain

    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers removed
