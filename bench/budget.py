"""Reserve+settle throughput and latency of the budget service through gRPC.

Starts the budget service in-process on a free port, against embedded
PostgreSQL and Redis (``services.cli.embedded``) unless DATABASE_URL and
REDIS_URL are set, and measures, in the same run:

* the floor: a Redis PING round trip from this process, and a gRPC
  Health.Check on the same server (what the framework alone costs per RPC,
  client and server sharing this process);
* closed loop: reserve+settle pairs per second and pair p50/p99 latency with
  1, 16 and 64 callers each doing reserve then settle back to back;
* open loop: pair latency when pairs are started at a fixed rate (1,000/s by
  default), the issue's "p99 under 5 ms at 1,000 pairs/s";
* the router's way, against budget replicas in their own processes
  (``python -m services.budget``, 1 and 2 by default): each reservation goes
  as one message on a long-lived ``ReserveStream`` per replica
  (:class:`services.common.streams.Multiplexer`, what the router's peers use)
  and the settlements go as ``BatchSettle`` calls of up to 64 (what the
  router's outbox sends from one read); 64 callers at once. It gives pairs per
  second (all settled), the reservation's p50/p99, and the CPU each budget
  replica spends per pair (from ``/proc``), so the rate on N cores can be read
  off. PostgreSQL and Redis run beside them on the same cores.

The unary runs share one process between client and server; the router's way
does not. Each pair reserves on two budgets (tenant and key) and a tenant rate
limit, then settles. Prints a table; ``--json`` prints one JSON object as the
last line.

Usage: ``.venv/bin/python bench/budget.py [--pairs 3000] [--levels 1,16,64]
[--replicas 1,2] [--json]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.suite import proc_cpu  # noqa: E402
from orchestra.budget.v1 import account_service_pb2 as account_pb  # noqa: E402
from orchestra.budget.v1 import account_service_pb2_grpc, budget_service_pb2_grpc  # noqa: E402
from orchestra.budget.v1 import budget_service_pb2 as pb  # noqa: E402
from orchestra.common.v1 import chat_pb2, identity_pb2  # noqa: E402
from services.budget.server import build  # noqa: E402
from services.cli.embedded import free_port  # noqa: E402
from services.common import settings as settings_mod  # noqa: E402
from services.common.identity import HEADER, IdentitySigner  # noqa: E402
from services.common.server import start  # noqa: E402
from services.common.streams import Multiplexer  # noqa: E402

INTERNAL_KEY = "bench-internal-key-0123456789abcdef"
# Open loop: at most this many pairs in flight (a gRPC server cancels calls
# beyond 1,000 pending requests).
MAX_IN_FLIGHT = 256
# The router's way: settlements per BatchSettle (the outbox reads 64 jobs at a
# time) and callers at once.
SETTLE_BATCH = 64
ROUTER_CALLERS = 64


def _ms(seconds: list[float], q: float) -> float:
    ordered = sorted(seconds)
    return round(ordered[min(int(q * len(ordered)), len(ordered) - 1)] * 1000, 3)


def _summary(latencies: list[float], elapsed: float) -> dict[str, float]:
    return {
        "per_second": round(len(latencies) / elapsed, 1),
        "p50_ms": _ms(latencies, 0.50),
        "p99_ms": _ms(latencies, 0.99),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 3),
    }


@contextlib.asynccontextmanager
async def _stores() -> AsyncIterator[tuple[str, str]]:
    """DATABASE_URL / REDIS_URL from the environment, or embedded servers."""
    database_url, redis_url = os.environ.get("DATABASE_URL"), os.environ.get("REDIS_URL")
    if database_url and redis_url:
        yield database_url, redis_url
        return
    from services.cli.embedded import Supervisor, free_port, start_postgres, start_redis

    with tempfile.TemporaryDirectory(prefix="orchestra-bench-") as state:
        supervisor = Supervisor(Path(state))
        try:
            if not database_url:
                database_url = (await start_postgres(supervisor, Path(state))).url
            if not redis_url:
                redis_url = (await start_redis(supervisor, Path(state), free_port())).url
            yield database_url, redis_url
        finally:
            await supervisor.stop()


async def _redis_floor(url: str, count: int) -> dict[str, float]:
    client = aioredis.Redis.from_url(url)
    try:
        for _ in range(100):
            await client.ping()
        latencies = []
        began = time.perf_counter()
        for _ in range(count):
            t0 = time.perf_counter()
            await client.ping()
            latencies.append(time.perf_counter() - t0)
        return _summary(latencies, time.perf_counter() - began)
    finally:
        await client.aclose()


async def _grpc_floor(channel: grpc.aio.Channel, concurrency: int, total: int) -> dict[str, float]:
    """gRPC Health.Check on the same server: the framework's own cost per RPC."""
    stub = health_pb2_grpc.HealthStub(channel)
    latencies: list[float] = []

    async def worker() -> None:
        for _ in range(max(total // concurrency, 1)):
            t0 = time.perf_counter()
            await stub.Check(health_pb2.HealthCheckRequest())
            latencies.append(time.perf_counter() - t0)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"concurrency": concurrency, **_summary(latencies, time.perf_counter() - began)}


class Pairs:
    """Reserve+settle pairs against one tenant."""

    def __init__(self, channel: grpc.aio.Channel, metadata: list[tuple[str, str]], tenant: str):
        self._stub = budget_service_pb2_grpc.BudgetServiceStub(channel)
        self._metadata = metadata
        self._tenant = tenant
        self._run = uuid.uuid4().hex[:8]
        self._n = 0

    async def pair(self) -> float:
        """One reserve then settle; returns its latency in seconds."""
        self._n += 1
        request_id = f"bench-{self._run}-{self._n}"
        t0 = time.perf_counter()
        await self._stub.Reserve(
            _reserve_request(request_id, self._tenant), metadata=self._metadata
        )
        await self._stub.Settle(_settle_request(request_id), metadata=self._metadata)
        return time.perf_counter() - t0


async def _closed_loop(pairs: Pairs, concurrency: int, total: int) -> dict[str, float]:
    latencies: list[float] = []
    per_worker = max(total // concurrency, 1)

    async def worker() -> None:
        for _ in range(per_worker):
            latencies.append(await pairs.pair())

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"concurrency": concurrency, **_summary(latencies, time.perf_counter() - began)}


async def _open_loop(pairs: Pairs, rate: float, seconds: float) -> dict[str, float]:
    """Starts pairs at ``rate`` per second; a start is skipped (counted as
    ``skipped``) while ``MAX_IN_FLIGHT`` pairs are open, so an overloaded
    server shows as skips instead of an unbounded queue."""
    latencies: list[float] = []
    tasks: list[asyncio.Task[None]] = []
    in_flight = 0
    skipped = 0

    async def one() -> None:
        nonlocal in_flight
        in_flight += 1
        try:
            latencies.append(await pairs.pair())
        finally:
            in_flight -= 1

    began = time.perf_counter()
    for i in range(int(rate * seconds)):
        delay = began + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if in_flight >= MAX_IN_FLIGHT:
            skipped += 1
            continue
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    result = _summary(latencies, time.perf_counter() - began)
    return {"offered_per_second": rate, "skipped": skipped, **result}


def _reserve_request(request_id: str, tenant: str) -> pb.ReserveRequest:
    return pb.ReserveRequest(
        request_id=request_id,
        subject=pb.SpendSubject(tenant_id=tenant, key_id="bench-key"),
        model="openai/gpt-4o",
        amount_micro_usd=2_000,
        tokens=1_000,
    )


def _settle_request(request_id: str) -> pb.SettleRequest:
    return pb.SettleRequest(
        request_id=request_id,
        cost_micro_usd=1_234,
        usage=chat_pb2.Usage(prompt_tokens=200, completion_tokens=300),
    )


@contextlib.asynccontextmanager
async def _replicas(
    count: int, database_url: str, redis_url: str, logs: Path
) -> AsyncIterator[list[tuple[int, str]]]:
    """``count`` budget service processes; yields (pid, address) of each, once serving."""
    procs: list[tuple[asyncio.subprocess.Process, str]] = []
    try:
        for n in range(count):
            address = f"127.0.0.1:{free_port()}"
            env = {
                **os.environ,
                "ORCHESTRA_INTERNAL_KEY": INTERNAL_KEY,
                "DATABASE_URL": database_url,
                "REDIS_URL": redis_url,
                "ORCHESTRA_BUDGET_ADDR": address,
                "ORCHESTRA_LOG_LEVEL": "WARNING",
            }
            with (logs / f"budget-{n}.log").open("wb") as log:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "services.budget",
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=log,
                )
            procs.append((proc, address))
        for proc, address in procs:
            await _serving(address, proc)
        yield [(proc.pid, address) for proc, address in procs]
    finally:
        for proc, _ in procs:
            if proc.returncode is None:
                proc.terminate()
        for proc, _ in procs:
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()


async def _serving(address: str, proc: asyncio.subprocess.Process) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(300):
            if proc.returncode is not None:
                raise RuntimeError(f"the budget replica on {address} exited ({proc.returncode})")
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"the budget replica on {address} did not start")


async def _router_way(
    replicas: list[tuple[int, str]], metadata: list[tuple[str, str]], tenant: str, total: int
) -> dict[str, Any]:
    """Pairs the way the router makes them: reserve on a stream, settle in batches."""
    channels = [grpc.aio.insecure_channel(address) for _, address in replicas]
    stubs = [budget_service_pb2_grpc.BudgetServiceStub(c) for c in channels]

    def opener(stub: Any) -> Callable[[], Any]:
        return lambda: stub.ReserveStream(metadata=metadata)

    def item(call_id: int, request: pb.ReserveRequest) -> pb.ReserveStreamRequest:
        return pb.ReserveStreamRequest(call_id=call_id, request=request)

    streams: list[Multiplexer[pb.ReserveRequest, pb.ReserveResponse]] = [
        Multiplexer(opener(stub), item, "budget") for stub in stubs
    ]
    run = uuid.uuid4().hex[:8]
    settles: asyncio.Queue[str] = asyncio.Queue()
    latencies: list[float] = []
    failures = 0
    settled = 0
    numbers = iter(range(total))

    async def caller(n: int) -> None:
        for i in numbers:
            request_id = f"bench-{run}-{i}"
            t0 = time.perf_counter()
            await streams[i % len(streams)].call(_reserve_request(request_id, tenant), 5.0)
            latencies.append(time.perf_counter() - t0)
            settles.put_nowait(request_id)

    async def settler(stub: Any) -> None:
        nonlocal failures, settled
        while True:
            batch = [await settles.get()]
            while len(batch) < SETTLE_BATCH and not settles.empty():
                batch.append(settles.get_nowait())
            reply = await stub.BatchSettle(
                pb.BatchSettleRequest(requests=[_settle_request(r) for r in batch]),
                metadata=metadata,
                timeout=10,
            )
            failures += sum(r.WhichOneof("outcome") == "error" for r in reply.results)
            settled += len(batch)

    try:
        # Warm up: streams open, connections and caches filled.
        for i in range(64):
            await streams[i % len(streams)].call(_reserve_request(f"warm-{run}-{i}", tenant), 5.0)
        cpu_before = [proc_cpu(pid) for pid, _ in replicas]
        began = time.perf_counter()
        settlers = [asyncio.create_task(settler(stub)) for stub in stubs]
        await asyncio.gather(*(caller(n) for n in range(ROUTER_CALLERS)))
        while settled < total:
            if any(t.done() for t in settlers):
                [t.result() for t in settlers if t.done()]  # raises the settler's error
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - began
        cpu = [
            proc_cpu(pid) - before for (pid, _), before in zip(replicas, cpu_before, strict=True)
        ]
        for task in settlers:
            task.cancel()
    finally:
        for stream in streams:
            await stream.aclose()
        for channel in channels:
            await channel.close()
    return {
        "replicas": len(replicas),
        "failures": failures,
        "budget_cpu_ms_per_pair": round(sum(cpu) * 1000 / total, 3),
        **_summary(latencies, elapsed),
    }


async def _setup(
    channel: grpc.aio.Channel, sign: Callable[..., list[tuple[str, str]]], tenant: str
) -> None:
    accounts = account_service_pb2_grpc.AccountServiceStub(channel)
    budgets = budget_service_pb2_grpc.BudgetServiceStub(channel)
    await accounts.CreateTenant(
        account_pb.CreateTenantRequest(
            tenant=account_pb.Tenant(
                tenant_id=tenant,
                policy=account_pb.TenantPolicy(
                    rate_limit=identity_pb2.RateLimit(requests_per_minute=10_000_000)
                ),
            )
        ),
        metadata=sign("ops", identity_pb2.SCOPE_OPERATOR),
    )
    for level, subject in ((pb.BUDGET_LEVEL_TENANT, ""), (pb.BUDGET_LEVEL_API_KEY, "bench-key")):
        await budgets.CreateBudget(
            pb.CreateBudgetRequest(
                budget=pb.Budget(
                    tenant_id=tenant,
                    level=level,
                    subject=subject,
                    window=pb.BUDGET_WINDOW_MONTH,
                    limit_micro_usd=10**15,
                )
            ),
            metadata=sign(tenant, identity_pb2.SCOPE_ADMIN),
        )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the benchmark; returns the figures."""
    signer = IdentitySigner(INTERNAL_KEY.encode())

    def sign(tenant: str, scope: Any) -> list[tuple[str, str]]:
        ident = identity_pb2.Identity(tenant_id=tenant, key_id="bench", scopes=[scope])
        return [(HEADER, signer.sign(ident))]

    async with _stores() as (database_url, redis_url):
        settings = settings_mod.load(
            {
                "ORCHESTRA_INTERNAL_KEY": INTERNAL_KEY,
                "DATABASE_URL": database_url,
                "REDIS_URL": redis_url,
            }
        )
        app = await build(settings)
        running = await start(app, "127.0.0.1:0")
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                tenant = f"bench-{uuid.uuid4().hex[:8]}"
                await _setup(channel, sign, tenant)
                pairs = Pairs(channel, sign("", identity_pb2.SCOPE_INTERNAL), tenant)
                await _closed_loop(pairs, 8, 400)  # warm up: connections, caches
                floor = await _redis_floor(redis_url, args.pings)
                grpc_floor = [await _grpc_floor(channel, c, args.pings) for c in (1, 16)]
                levels = [await _closed_loop(pairs, c, args.pairs) for c in args.levels]
                steady = await _open_loop(pairs, args.rate, args.seconds)
        finally:
            await running.stop(0)
        router_way = []
        with tempfile.TemporaryDirectory(prefix="orchestra-bench-logs-") as logs:
            for count in args.replicas:
                async with _replicas(count, database_url, redis_url, Path(logs)) as replicas:
                    internal = sign("", identity_pb2.SCOPE_INTERNAL)
                    router_way.append(await _router_way(replicas, internal, tenant, args.pairs))
    return {
        "redis_ping": floor,
        "grpc_health_check": grpc_floor,
        "closed_loop": levels,
        "open_loop": steady,
        "router_way": router_way,
        "cores": os.cpu_count(),
        "stores": "env" if os.environ.get("DATABASE_URL") else "embedded",
    }


def _table(result: dict[str, Any]) -> str:
    def row(name: str, figures: dict[str, float]) -> str:
        per_second, p50, p99 = figures["per_second"], figures["p50_ms"], figures["p99_ms"]
        return f"{name:<24}{per_second:>10}{p50:>10}{p99:>10}"

    rows = [f"{'run':<24}{'per s':>10}{'p50 ms':>10}{'p99 ms':>10}"]
    rows.append(row("redis PING (floor)", result["redis_ping"]))
    for level in result["grpc_health_check"]:
        rows.append(row(f"grpc Health.Check, c={level['concurrency']}", level))
    for level in result["closed_loop"]:
        rows.append(row(f"pairs, concurrency {level['concurrency']}", level))
    steady = result["open_loop"]
    rows.append(row(f"pairs offered {steady['offered_per_second']:g}/s", steady))
    if steady["skipped"]:
        rows.append(f"  (open loop: {steady['skipped']} starts skipped, {MAX_IN_FLIGHT} in flight)")
    rows.append("")
    rows.append(
        f"The router's way ({ROUTER_CALLERS} callers; ReserveStream, BatchSettle of up to "
        f"{SETTLE_BATCH}; {result['cores']} cores; p50/p99 of the reservation):"
    )
    rows.append(
        f"{'budget replicas':<24}{'pairs/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'CPU ms/pair':>13}"
    )
    for level in result["router_way"]:
        cpu = level["budget_cpu_ms_per_pair"]
        rows.append(row(f"{level['replicas']}", level) + f"{cpu:>13}")
        if level["failures"]:
            rows.append(f"  ({level['failures']} settlements failed)")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3000, help="pairs per concurrency level")
    parser.add_argument(
        "--levels",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 16, 64],
        help="concurrency levels, comma-separated",
    )
    parser.add_argument(
        "--replicas",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 2],
        help="budget replica counts for the router's way, comma-separated",
    )
    parser.add_argument("--pings", type=int, default=2000, help="Redis PINGs for the floor")
    parser.add_argument("--rate", type=float, default=1000.0, help="open-loop pairs per second")
    parser.add_argument("--seconds", type=float, default=3.0, help="open-loop duration")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args(argv)
    result = asyncio.run(run(args))
    print(_table(result))
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
