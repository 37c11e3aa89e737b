"""Discovery at scale: a full pass over 100 providers x 50 models, and how fast a
change upstream reaches every watching router.

In one process: fake upstreams (one aiohttp app listening on one port per
provider, each answering its provider type's listing format after a fixed
latency: OpenAI, vLLM, Anthropic, Gemini, Ollama with /api/ps and /api/show),
two discovery replicas on one PostgreSQL (embedded, or DATABASE_URL), and
several routers' ``ModelCatalogView`` split between the replicas. Measured in
the same run:

* baseline: the same 100 listings made directly with the listing code and no
  service, at the service's concurrency: cold (Ollama's /api/show for every
  model) and warm (details cached by digest, as passes after the first are);
* a full pass (RunDiscovery: 5,000 models stored and published), cold and warm;
* push: RunDiscovery for one provider after a model appeared upstream, to the
  moment every view has it (both replicas: LISTEN/NOTIFY fan-out);
* poll: a model appears upstream at a random moment; the time until every
  view has it through the periodic passes alone. The goal is one polling
  interval + 100 ms.

    .venv/bin/python bench/discovery.py [--providers 100] [--models 50]
        [--latency-ms 20] [--interval 2] [--views 6] [--trials 5] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestra.common.v1 import identity_pb2  # noqa: E402
from orchestra.discovery.v1 import discovery_service_pb2 as pb  # noqa: E402
from orchestra.discovery.v1 import discovery_service_pb2_grpc as pb_grpc  # noqa: E402
from services.common import settings as settings_mod  # noqa: E402
from services.common.catalog_view import ModelCatalogView  # noqa: E402
from services.common.identity import HEADER, IdentitySigner  # noqa: E402
from services.common.server import Running, start  # noqa: E402
from services.discovery.config import DiscoveryConfig, ProbeConfig  # noqa: E402
from services.discovery.discovery import _MAX_CONCURRENT_LISTINGS  # noqa: E402
from services.discovery.server import DiscoveryService, build  # noqa: E402
from services.providers import DetailCache, Endpoint, list_models  # noqa: E402

INTERNAL_KEY = "bench-internal-key-0123456789abcdef"
KINDS = ("openai", "vllm", "anthropic", "gemini", "ollama")


class Upstreams:
    """One aiohttp app on one port per provider; each port speaks one listing format."""

    def __init__(self, providers: int, models: int, latency: float) -> None:
        self.latency = latency
        self.kind_of_port: dict[int, str] = {}
        self.models_of_port: dict[int, list[str]] = {}
        self._count, self.per_provider = providers, models
        self._runner: web.AppRunner | None = None
        self.requests = 0

    async def start(self) -> None:
        app = web.Application()
        app.add_routes(
            [
                web.get("/v1/models", self._v1_models),
                web.get("/v1beta/models", self._gemini),
                web.get("/api/tags", self._tags),
                web.get("/api/ps", self._ps),
                web.post("/api/show", self._show),
            ]
        )
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        for i in range(self._count):
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            kind = KINDS[i % len(KINDS)]
            self.kind_of_port[port] = kind
            prefix = {"ollama": "llama", "gemini": "gemini", "anthropic": "claude"}.get(kind, "gpt")
            self.models_of_port[port] = [
                f"{prefix}-bench-{i}-{m}" for m in range(self.per_provider)
            ]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def base_url(self, port: int) -> str:
        kind = self.kind_of_port[port]
        return f"http://127.0.0.1:{port}" + ("/v1" if kind in ("openai", "vllm") else "")

    async def _listed(self, request: web.Request) -> list[str]:
        self.requests += 1
        await asyncio.sleep(self.latency)
        port = request.url.port
        return self.models_of_port[port]

    async def _v1_models(self, request: web.Request) -> web.Response:
        ids = await self._listed(request)
        port = request.url.port
        if self.kind_of_port[port] == "anthropic":
            data = [{"type": "model", "id": m, "display_name": m} for m in ids]
            return web.json_response({"data": data, "has_more": False, "last_id": ids[-1]})
        extra = {"max_model_len": 32768} if self.kind_of_port[port] == "vllm" else {}
        data = [{"id": m, "object": "model", "owned_by": "bench", **extra} for m in ids]
        return web.json_response({"object": "list", "data": data})

    async def _gemini(self, request: web.Request) -> web.Response:
        ids = await self._listed(request)
        models = [
            {
                "name": f"models/{m}",
                "inputTokenLimit": 1048576,
                "outputTokenLimit": 8192,
                "supportedGenerationMethods": ["generateContent", "countTokens"],
            }
            for m in ids
        ]
        return web.json_response({"models": models})

    async def _tags(self, request: web.Request) -> web.Response:
        ids = await self._listed(request)
        models = [{"name": m, "model": m, "digest": f"sha256-{m}"} for m in ids]
        return web.json_response({"models": models})

    async def _ps(self, request: web.Request) -> web.Response:
        ids = await self._listed(request)
        loaded = [{"name": m, "model": m, "size": 2 << 30, "size_vram": 2 << 30} for m in ids[:1]]
        return web.json_response({"models": loaded})

    async def _show(self, request: web.Request) -> web.Response:
        await self._listed(request)
        return web.json_response({"model_info": {"llama.context_length": 131072}})


@contextlib.asynccontextmanager
async def _database() -> AsyncIterator[str]:
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    from services.cli.embedded import Supervisor, start_postgres

    with tempfile.TemporaryDirectory(prefix="orchestra-bench-") as state:
        supervisor = Supervisor(Path(state))
        try:
            yield (await start_postgres(supervisor, Path(state))).url
        finally:
            await supervisor.stop()


def _config(upstreams: Upstreams) -> str:
    lines = ["providers:"]
    for i, port in enumerate(sorted(upstreams.kind_of_port)):
        kind = upstreams.kind_of_port[port]
        lines += [
            f"  - id: p{i:03d}",
            f"    type: {kind}",
            f"    base_url: {upstreams.base_url(port)}",
            f"    credential: sk-bench-{i:03d}-0123456789abcdef",
        ]
    return "\n".join(lines) + "\n"


async def _baseline(upstreams: Upstreams, details: DetailCache) -> float:
    """Lists every provider with the listing code alone, as a pass does; seconds."""
    gate = asyncio.Semaphore(_MAX_CONCURRENT_LISTINGS)
    kinds = {
        "openai": pb.PROVIDER_TYPE_OPENAI,
        "vllm": pb.PROVIDER_TYPE_VLLM,
        "anthropic": pb.PROVIDER_TYPE_ANTHROPIC,
        "gemini": pb.PROVIDER_TYPE_GEMINI,
        "ollama": pb.PROVIDER_TYPE_OLLAMA,
    }
    async with httpx.AsyncClient() as http:

        async def one(port: int) -> int:
            endpoint = Endpoint(
                kinds[upstreams.kind_of_port[port]], upstreams.base_url(port), credential="sk-x"
            )
            async with gate:
                return len(await list_models(endpoint, http, details=details))

        started = time.perf_counter()
        counts = await asyncio.gather(*(one(p) for p in upstreams.kind_of_port))
        elapsed = time.perf_counter() - started
    assert sum(counts) == len(upstreams.kind_of_port) * upstreams.per_provider, counts
    return elapsed


async def _until(check: Callable[[], bool], limit: float) -> float:
    """Seconds until ``check`` holds (polled every 2 ms); raises after ``limit``."""
    started = time.perf_counter()
    while not check():
        if time.perf_counter() - started > limit:
            raise TimeoutError("the change never reached every view")
        await asyncio.sleep(0.002)
    return time.perf_counter() - started


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the benchmark; returns the figures."""
    signer = IdentitySigner(INTERNAL_KEY.encode())

    def sign(scope: Any) -> list[tuple[str, str]]:
        ident = identity_pb2.Identity(tenant_id="bench", key_id="bench", scopes=[scope])
        return [(HEADER, signer.sign(ident))]

    upstreams = Upstreams(args.providers, args.models, args.latency_ms / 1000)
    await upstreams.start()
    result: dict[str, Any] = {
        "providers": args.providers,
        "models_per_provider": args.models,
        "upstream_latency_ms": args.latency_ms,
        "poll_interval_s": args.interval,
        "views": args.views,
        "database": "env" if os.environ.get("DATABASE_URL") else "embedded",
    }
    details: DetailCache = {}
    result["baseline_cold_s"] = round(await _baseline(upstreams, details), 3)
    result["baseline_warm_s"] = round(await _baseline(upstreams, details), 3)
    replicas: list[tuple[DiscoveryService, Running]] = []
    channels: list[grpc.aio.Channel] = []
    views: list[ModelCatalogView] = []
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "orchestra.yaml"
        config.write_text(_config(upstreams))
        async with _database() as database_url:
            settings = settings_mod.load(
                {
                    "ORCHESTRA_INTERNAL_KEY": INTERNAL_KEY,
                    "DATABASE_URL": database_url,
                    "ORCHESTRA_CONFIG": str(config),
                }
            )
            try:
                # Replica A runs no periodic passes yet: the first pass is the
                # timed RunDiscovery below. B never polls (it hears A).
                for _ in range(2):
                    options = DiscoveryConfig(
                        interval_seconds=3600,
                        probes=ProbeConfig(interval_seconds=3600, tick_seconds=3600),
                    )
                    service = await build(settings, options)
                    replicas.append((service, await start(service, "127.0.0.1:0")))
                for i in range(args.views):
                    port = replicas[i % 2][1].port
                    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
                    channels.append(channel)
                    view = ModelCatalogView(
                        pb_grpc.DiscoveryServiceStub(channel),
                        metadata=sign(identity_pb2.SCOPE_INTERNAL),
                    )
                    view.start()
                    views.append(view)
                stub = pb_grpc.DiscoveryServiceStub(channels[0])
                operator = sign(identity_pb2.SCOPE_OPERATOR)
                # The services listed at start (a first pass): wait for it, so
                # the passes timed below are comparable: both see every model.
                total = args.providers * args.models
                await _until(lambda: all(len(v.all()) == total for v in views), 120)

                for run_name in ("pass_cold", "pass_warm"):
                    if run_name == "pass_cold":
                        replicas[0][0].discovery._details.clear()  # /api/show again
                    started = time.perf_counter()
                    reply = await stub.RunDiscovery(
                        pb.RunDiscoveryRequest(), metadata=operator, timeout=120
                    )
                    result[f"{run_name}_s"] = round(time.perf_counter() - started, 3)
                    assert reply.models == total and not reply.errors, reply

                ports = sorted(upstreams.kind_of_port)
                push: list[float] = []
                for trial in range(args.trials):
                    i = random.randrange(len(ports))
                    name = f"push-{trial}"
                    upstreams.models_of_port[ports[i]].append(name)
                    full = f"p{i:03d}/{name}"
                    started = time.perf_counter()
                    await stub.RunDiscovery(
                        pb.RunDiscoveryRequest(provider_id=f"p{i:03d}"), metadata=operator
                    )
                    await _until(lambda: all(v.get(full) for v in views), 30)  # noqa: B023
                    push.append(time.perf_counter() - started)
                result["push_ms"] = _figures(push)

                # Now the polling schedule alone: A passes every `interval`.
                a = replicas[0][0]
                a._options = DiscoveryConfig(interval_seconds=args.interval)
                periodic = asyncio.create_task(a._periodic())
                poll: list[float] = []
                try:
                    for trial in range(args.trials):
                        await asyncio.sleep(random.uniform(0, args.interval))
                        i = random.randrange(len(ports))
                        name = f"poll-{trial}"
                        full = f"p{i:03d}/{name}"
                        started = time.perf_counter()
                        upstreams.models_of_port[ports[i]].append(name)
                        limit = 4 * args.interval + 30
                        await _until(lambda: all(v.get(full) for v in views), limit)  # noqa: B023
                        poll.append(time.perf_counter() - started)
                finally:
                    periodic.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await periodic
                result["poll_ms"] = _figures(poll)
                result["poll_goal_ms"] = round(args.interval * 1000 + 100)
            finally:
                for view in views:
                    await view.stop()
                for channel in channels:
                    await channel.close()
                for _, running in replicas:
                    await running.stop(0)
    await upstreams.stop()
    return result


def _figures(seconds: list[float]) -> dict[str, float]:
    return {
        "p50": round(statistics.median(seconds) * 1000, 1),
        "max": round(max(seconds) * 1000, 1),
        "n": len(seconds),
    }


def _table(r: dict[str, Any]) -> str:
    n = r["providers"] * r["models_per_provider"]
    rows = [
        f"{r['providers']} providers x {r['models_per_provider']} models ({n} models), "
        f"upstream latency {r['upstream_latency_ms']} ms, {r['views']} router views "
        f"on 2 replicas, database {r['database']}",
        f"{'measure':<52}{'value':>18}",
        f"{'baseline: listing code alone, cold (+/api/show)':<52}{r['baseline_cold_s']:>16} s",
        f"{'baseline: listing code alone, warm':<52}{r['baseline_warm_s']:>16} s",
        f"{'full pass, cold (RunDiscovery, goal < 10 s)':<52}{r['pass_cold_s']:>16} s",
        f"{'full pass, warm (RunDiscovery, goal < 10 s)':<52}{r['pass_warm_s']:>16} s",
        f"{'push: RunDiscovery(one) -> every view, p50 / max':<52}"
        f"{r['push_ms']['p50']:>8} / {r['push_ms']['max']} ms",
        f"{'poll: upstream change -> every view, p50 / max':<52}"
        f"{r['poll_ms']['p50']:>8} / {r['poll_ms']['max']} ms",
        f"{'  goal: poll interval + 100 ms':<52}{r['poll_goal_ms']:>15} ms",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--providers", type=int, default=100)
    parser.add_argument("--models", type=int, default=50, help="models per provider")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="upstream latency")
    parser.add_argument("--interval", type=float, default=2.0, help="polling interval, seconds")
    parser.add_argument("--views", type=int, default=6, help="router views (split on 2 replicas)")
    parser.add_argument("--trials", type=int, default=5, help="changes timed, push and poll")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args(argv)
    result = asyncio.run(run(args))
    print(_table(result))
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
