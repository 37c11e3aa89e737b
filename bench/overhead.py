"""What the gateway adds to a chat: the same request through the whole suite and
straight to the upstream, in the same run.

The upstream is the project's OpenAI-wire fake (tests/fakes/openai_upstream.py)
in its own process with a fixed latency before the first token. The suite is a
real ``orchestra up`` (Envoy, ext_authz, the five services, embedded PostgreSQL
and Redis) configured with that fake as its only provider. For each concurrency
level the same number of streaming chats goes both ways; the table gives time
to first token and total latency (p50/p99) for each, and their difference.

    .venv/bin/python bench/overhead.py [--requests 200] [--concurrency 1,8,32]
                                       [--latency-ms 50] [--json]

Cache lookups are made (the request path is the real one) but every request
asks CACHE_MODE_DISABLED... no: it sends a unique prompt, so each is a miss.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestra.common.v1 import chat_pb2  # noqa: E402
from orchestra.router.v1 import chat_service_pb2 as chat_api  # noqa: E402
from orchestra.router.v1 import chat_service_pb2_grpc as chat_grpc  # noqa: E402
from services.cli.embedded import free_port  # noqa: E402

MODEL = "gpt-4o-mini"  # a catalog model, so it is priced and routable
KEY = "ok_bench_0123456789abcdefghijklmnop"
CONFIG = """
providers:
  - id: fake
    type: openai_compatible
    base_url: {url}
tenants:
  - id: bench
    policy: {{cache_enabled: true}}
    api_keys:
      - {{id: bench, secret: {key}, scopes: [chat, read]}}
    budgets:
      - {{level: tenant, window: month, limit_usd: 1000000}}
routing:
  default_max_tokens: 64
"""


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _direct(client: httpx.AsyncClient, url: str, i: int) -> tuple[float, float]:
    started = time.perf_counter()
    first = 0.0
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"question {i} {time.time_ns()}"}],
        "max_tokens": 64,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with client.stream("POST", f"{url}/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not first and '"content"' in line:
                first = time.perf_counter() - started
    return first, time.perf_counter() - started


async def _gateway(stub: chat_grpc.ChatServiceStub, i: int) -> tuple[float, float]:
    started = time.perf_counter()
    first = 0.0
    request = chat_api.ChatRequest(
        messages=[
            chat_pb2.Message(
                role=chat_pb2.ROLE_USER,
                content=[chat_pb2.ContentPart(text=f"question {i} {time.time_ns()}")],
            )
        ],
        generation=chat_pb2.GenerationConfig(max_tokens=64, temperature=0),
    )
    async for event in stub.ChatStream(
        request, metadata=(("authorization", f"Bearer {KEY}"),), timeout=60
    ):
        if not first and event.WhichOneof("event") == "text_delta":
            first = time.perf_counter() - started
    return first, time.perf_counter() - started


async def _run_level(
    call: object, requests: int, concurrency: int
) -> tuple[list[float], list[float], float]:
    semaphore = asyncio.Semaphore(concurrency)
    ttft: list[float] = []
    total: list[float] = []

    async def one(i: int) -> None:
        async with semaphore:
            first, whole = await call(i)  # type: ignore[operator]
            ttft.append(first * 1000)
            total.append(whole * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(requests)))
    return ttft, total, requests / (time.perf_counter() - started)


async def measure(args: argparse.Namespace, upstream_url: str, edge: str) -> list[dict[str, float]]:
    rows = []
    async with (
        httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=256)) as client,
        grpc.aio.insecure_channel(edge) as channel,
    ):
        stub = chat_grpc.ChatServiceStub(channel)
        # Warm both paths (connections, caches of policy and keys).
        for i in range(10):
            await _direct(client, upstream_url, i)
            await _gateway(stub, i)
        for level in args.concurrency:
            d_ttft, d_total, d_rps = await _run_level(
                lambda i: _direct(client, upstream_url, i), args.requests, level
            )
            g_ttft, g_total, g_rps = await _run_level(
                lambda i: _gateway(stub, i), args.requests, level
            )
            row = {"concurrency": level}
            for name, values in (
                ("direct_ttft", d_ttft), ("gateway_ttft", g_ttft),
                ("direct_total", d_total), ("gateway_total", g_total),
            ):  # fmt: skip
                row[f"{name}_p50_ms"] = round(_percentile(values, 0.5), 2)
                row[f"{name}_p99_ms"] = round(_percentile(values, 0.99), 2)
            for q in ("p50", "p99"):
                row[f"added_ttft_{q}_ms"] = round(
                    row[f"gateway_ttft_{q}_ms"] - row[f"direct_ttft_{q}_ms"], 2
                )
                row[f"added_total_{q}_ms"] = round(
                    row[f"gateway_total_{q}_ms"] - row[f"direct_total_{q}_ms"], 2
                )
            row["direct_rps"] = round(d_rps, 1)
            row["gateway_rps"] = round(g_rps, 1)
            rows.append(row)
    return rows


def _print_table(rows: list[dict[str, float]], latency_ms: int, requests: int) -> None:
    print(
        f"\nGateway overhead: {requests} streaming chats per level, upstream first-token "
        f"latency {latency_ms} ms. Baseline = the same request sent straight to the upstream."
    )
    header = (
        "conc", "direct TTFT p50/p99", "gateway TTFT p50/p99", "added TTFT p50/p99",
        "direct total p50/p99", "gateway total p50/p99", "added total p50/p99", "rps d/g",
    )  # fmt: skip
    lines = [header]
    for r in rows:
        lines.append((
            str(int(r["concurrency"])),
            f"{r['direct_ttft_p50_ms']:.1f} / {r['direct_ttft_p99_ms']:.1f}",
            f"{r['gateway_ttft_p50_ms']:.1f} / {r['gateway_ttft_p99_ms']:.1f}",
            f"{r['added_ttft_p50_ms']:.1f} / {r['added_ttft_p99_ms']:.1f}",
            f"{r['direct_total_p50_ms']:.1f} / {r['direct_total_p99_ms']:.1f}",
            f"{r['gateway_total_p50_ms']:.1f} / {r['gateway_total_p99_ms']:.1f}",
            f"{r['added_total_p50_ms']:.1f} / {r['added_total_p99_ms']:.1f}",
            f"{r['direct_rps']:.0f} / {r['gateway_rps']:.0f}",
        ))  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)))
    print("(all times in ms)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="chats per level and path")
    parser.add_argument(
        "--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32]
    )
    parser.add_argument("--latency-ms", type=int, default=50, help="upstream time to first token")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="orchestra-bench-"))
    upstream_port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.openai_upstream", "--port", str(upstream_port),
         "--latency-ms", str(args.latency_ms), "--chunks", "16", "--models", MODEL],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    upstream_url = f"http://127.0.0.1:{upstream_port}/v1"
    config = work / "orchestra.yaml"
    config.write_text(CONFIG.format(url=upstream_url, key=KEY))
    edge_port = free_port()
    base = 52000 + os.getpid() % 1000 * 5
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    suite = subprocess.Popen(
        [str(Path(sys.executable).parent / "orchestra"), "up", "--no-local-model",
         "--state-dir", str(work / "state"), "--config", str(config),
         "--edge-port", str(edge_port), "--admin-port", str(free_port()),
         "--service-port-base", str(base), "--redis-port", str(free_port())],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        assert suite.stdout is not None
        for line in suite.stdout:
            if "Orchestra is up" in line:
                break
        else:
            print("orchestra up failed", file=sys.stderr)
            return 1
        rows = asyncio.run(measure(args, upstream_url, f"127.0.0.1:{edge_port}"))
    finally:
        suite.send_signal(signal.SIGTERM)
        suite.wait(timeout=60)
        upstream.terminate()
        upstream.wait(timeout=10)
    _print_table(rows, args.latency_ms, args.requests)
    if args.json:
        print(json.dumps({"upstream_latency_ms": args.latency_ms, "levels": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
