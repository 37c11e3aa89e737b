"""What the gateway adds to a chat: the same request through the whole suite and
straight to the upstream, in the same run.

The upstream is the project's OpenAI-wire fake (tests/fakes/openai_upstream.py)
in its own process with a fixed latency before the first token. The suite is a
real ``orchestra up`` (Envoy, ext_authz, the five services, embedded PostgreSQL
and Redis) configured with that fake as its only provider. For each concurrency
level the same number of streaming chats goes both ways; the table gives time
to first token and total latency (p50/p99) for each, and their difference.

    .venv/bin/python bench/overhead.py [--requests 200] [--concurrency 1,8,32]
                                       [--latency-ms 50] [--json] [--decision-only]

It also times the routing decision alone, in process (``policy.decide`` on a
six-model catalog, varied prompts): the plain policy (cost strategy, the
baseline), then the learned one (balanced strategy with a trained per-tenant
bandit: task analysis, prompt embedding, posterior for each model), with the
task analysis and the embedding on their own. ``--decision-only`` runs just
that part (no suite).

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


def _decision_models() -> list[object]:
    from orchestra.discovery.v1 import discovery_service_pb2 as discovery_pb2

    specs = [
        ("gpt-4o", 0.80, 2_500_000, 10_000_000), ("gpt-4o-mini", 0.62, 150_000, 600_000),
        ("gpt-4.1", 0.85, 2_000_000, 8_000_000), ("gpt-4.1-mini", 0.74, 400_000, 1_600_000),
        ("claude-sonnet", 0.84, 3_000_000, 15_000_000), ("llama-8b", 0.50, 50_000, 80_000),
    ]  # fmt: skip
    return [
        discovery_pb2.Model(
            name=f"p/{name}", provider_id="p", model_id=name, context_window=128_000,
            quality=quality, price_source=discovery_pb2.PRICE_SOURCE_CATALOG,
            pricing=discovery_pb2.Pricing(input_micro_usd_per_mtok=i, output_micro_usd_per_mtok=o),
        )
        for name, quality, i, o in specs
    ]  # fmt: skip


_DECISION_PROMPTS = [
    "What is the capital of {i}?",
    "Write a Python function that returns the {i}th Fibonacci number, with tests.",
    "A shop sells {i} pens at 3 dollars each and 2 notebooks at 5 dollars. What is the total?",
    "Summarize the following text in two sentences: the committee met on day {i} and agreed "
    "to postpone the vote until the budget report was published and reviewed by all members.",
    "Which of the following is true about enzyme {i}?\nA. It is a lipid\nB. It lowers "
    "activation energy\nC. It is consumed\nD. It raises entropy\nAnswer:",
]


def decision_times(n: int = 2000) -> dict[str, float]:
    """p50/p99 in ms of the routing decision and its parts, in process."""
    from orchestra.budget.v1 import account_service_pb2 as account_pb2
    from orchestra.common.v1 import identity_pb2
    from services.router import learning, policy, tasks

    models = _decision_models()
    learner = learning.Learner(None, seed=0)
    # A trained state: every model has rated answers on every kind of prompt.
    texts = [p.format(i=i) for i in range(40) for p in _DECISION_PROMPTS]
    xs = learner.featurize.many(texts, [tasks.analyze(t) for t in texts])
    rng = __import__("numpy").random.default_rng(0)
    for m in models:
        learner.train("bench", m.name, xs, rng.uniform(0, 1, len(texts)), m.quality)  # type: ignore[attr-defined]

    def request(i: int) -> chat_api.ChatRequest:
        text = _DECISION_PROMPTS[i % len(_DECISION_PROMPTS)].format(i=i)
        return chat_api.ChatRequest(
            messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER,
                                       content=[chat_pb2.ContentPart(text=text)])]
        )  # fmt: skip

    plain = account_pb2.TenantPolicy(routing_strategy=identity_pb2.ROUTING_STRATEGY_COST)
    learned = account_pb2.TenantPolicy(routing_strategy=identity_pb2.ROUTING_STRATEGY_BALANCED)
    cases = {
        "plain_policy": lambda r: policy.decide(
            r, models, plain, default_max_tokens=256, tenant_id="bench", learner=learner
        ),
        "learned_policy": lambda r: policy.decide(
            r, models, learned, default_max_tokens=256, tenant_id="bench", learner=learner
        ),
        "task_analysis": lambda r: tasks.analyze(tasks.prompt_text(r.messages)),
        "embedding": lambda r: learner.featurize.many(
            [tasks.prompt_text(r.messages)], [tasks.analyze("")]
        ),
    }
    requests = [request(i) for i in range(n)]
    out: dict[str, float] = {}
    for name, run in cases.items():
        for r in requests[:50]:
            run(r)  # warm up
        times = []
        for r in requests:
            started = time.perf_counter()
            run(r)
            times.append((time.perf_counter() - started) * 1000)
        out[f"{name}_p50_ms"] = round(_percentile(times, 0.5), 3)
        out[f"{name}_p99_ms"] = round(_percentile(times, 0.99), 3)
    out["added_by_learning_p50_ms"] = round(
        out["learned_policy_p50_ms"] - out["plain_policy_p50_ms"], 3
    )
    return out


def _print_decision(times: dict[str, float], n: int) -> None:
    print(f"\nRouting decision in process ({n} varied prompts, 6 models; ms p50 / p99):")
    for name in ("plain_policy", "learned_policy", "task_analysis", "embedding"):
        label = {
            "plain_policy": "plain policy (cost, baseline)",
            "learned_policy": "learned policy (balanced)",
        }.get(name, name.replace("_", " "))
        print(f"  {label:<32} {times[name + '_p50_ms']:.3f} / {times[name + '_p99_ms']:.3f}")
    print(f"  added by learning at p50: {times['added_by_learning_p50_ms']:.3f} ms (goal <= 1 ms)")


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
    parser.add_argument(
        "--decision-only", action="store_true", help="only time the routing decision in process"
    )
    parser.add_argument("--decisions", type=int, default=2000, help="decisions to time")
    args = parser.parse_args()
    decision = decision_times(args.decisions)
    if args.decision_only:
        _print_decision(decision, args.decisions)
        if args.json:
            print(json.dumps({"decision": decision}))
        return 0

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
    _print_decision(decision, args.decisions)
    if args.json:
        print(
            json.dumps(
                {"upstream_latency_ms": args.latency_ms, "levels": rows, "decision": decision}
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
