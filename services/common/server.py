"""Building and running a service's grpc.aio server, the same way for all five.

A service is a :class:`Service`: it registers its servicers on a server and
may run background work. :func:`start` adds health, reflection and the error
interceptor and binds; :func:`main` runs one until SIGTERM or SIGINT, when
health turns NOT_SERVING, the server keeps serving for ``drain_seconds`` (on
SIGTERM only, see :func:`serve_forever`) and then lets calls in flight finish
for ``grace_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import settings as settings_mod
from services.common import telemetry
from services.common.interceptors import ErrorInterceptor

log = logging.getLogger(__name__)

# Large enough for long conversations; the router enforces its own, smaller,
# configurable request limit with REQUEST_TOO_LARGE.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class Service(Protocol):
    """What a service package provides to be served."""

    name: str
    """Short name: "router", "budget", …"""

    def full_names(self) -> Sequence[str]:
        """Fully qualified gRPC service names it serves (for health/reflection)."""
        ...

    def register(self, server: grpc.aio.Server) -> None:
        """Adds its servicers to ``server``."""
        ...

    def interceptors(self) -> Sequence[grpc.aio.ServerInterceptor]:
        """Its own server interceptors (e.g. the admin-change audit), run inside
        the error interceptor; usually none."""
        ...

    async def start(self) -> None:
        """Starts background work (after the port is bound)."""
        ...

    async def stop(self) -> None:
        """Stops background work and closes connections."""
        ...


@dataclasses.dataclass
class Running:
    """A started server."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    service: Service

    async def stop(self, grace: float | None = 0) -> None:
        """Turns health NOT_SERVING, drains for ``grace`` seconds, stops work."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        await self.service.stop()


async def start(
    service: Service,
    address: str,
    *,
    reflection_names: Sequence[str] = (),
) -> Running:
    """Builds, binds and starts a server for ``service``.

    Args:
        service: The service to serve.
        address: host:port to bind; port 0 picks a free one (tests).
        reflection_names: Extra service names to list in reflection (the
            router lists every Orchestra service, since the edge sends
            reflection to it).
    """
    server = grpc.aio.server(
        interceptors=[
            ErrorInterceptor(),
            *telemetry.server_interceptors(),
            *service.interceptors(),
        ],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ],
    )
    service.register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(dict.fromkeys([*service.full_names(), *reflection_names]))
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection([*names, health_name, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind {address}")
    await server.start()
    await service.start()
    serving = health_pb2.HealthCheckResponse.SERVING
    for name in ["", *service.full_names()]:
        await health_servicer.set(name, serving)
    log.info("%s serving on port %d", service.name, port)
    return Running(server, health_servicer, port, service)


async def serve_forever(running: Running, grace: float, drain: float = 0.0) -> None:
    """Serves until SIGTERM or SIGINT, then stops gracefully.

    Either signal turns health NOT_SERVING at once. SIGTERM (what an
    orchestrator sends the one replica it stops) then drains: calls that still
    arrive are served for ``drain`` seconds, while the edge's health checks and
    the peers' health-watching channels move new calls to other replicas; a
    second signal cuts the drain short. SIGINT (Ctrl-C, and ``orchestra up``
    stopping the whole suite, where no other replica would take over) skips
    it. Then the server takes no new call and lets those in flight finish for
    up to ``grace`` seconds.
    """
    signals: asyncio.Queue[signal.Signals] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signals.put_nowait, sig)
    try:
        first = await signals.get()
        await running.health.enter_graceful_shutdown()
        if first == signal.SIGTERM and drain > 0:
            log.info("%s NOT_SERVING; draining for %.1fs", running.service.name, drain)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(signals.get(), drain)
        log.info("%s stopping; in-flight calls get up to %.1fs", running.service.name, grace)
        await running.stop(grace)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def main(name: str, build: Callable[[settings_mod.Settings], Awaitable[Service]]) -> None:
    """Entry point of a service process: settings, logging, telemetry, serve.

    Args:
        name: The service's short name ("budget").
        build: Creates the service (connects its stores) from the settings.
    """
    cfg = settings_mod.load()
    logging.basicConfig(
        level=cfg.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    telemetry.setup(name, cfg.otel)

    async def run() -> None:
        service = await build(cfg)
        # The edge sends reflection to the router, so it lists every service.
        names = all_service_names() if name == "router" else ()
        running = await start(service, cfg.listen_addr(name), reflection_names=names)
        await serve_forever(running, cfg.grace_seconds, cfg.drain_seconds)

    if cfg.event_loop == "uvloop":
        import uvloop

        uvloop.run(run())
    else:
        asyncio.run(run())


def all_service_names() -> list[str]:
    """Every Orchestra service's full name (from the generated descriptors)."""
    from orchestra.audit.v1 import audit_service_pb2
    from orchestra.budget.v1 import account_service_pb2, budget_service_pb2
    from orchestra.cache.v1 import cache_service_pb2
    from orchestra.discovery.v1 import discovery_service_pb2
    from orchestra.router.v1 import chat_service_pb2, router_service_pb2

    modules = [
        chat_service_pb2,
        router_service_pb2,
        account_service_pb2,
        budget_service_pb2,
        cache_service_pb2,
        audit_service_pb2,
        discovery_service_pb2,
    ]
    return [svc.full_name for m in modules for svc in m.DESCRIPTOR.services_by_name.values()]
