"""What the gateway adds to a chat, and the CPU each process of the suite spends on it.

The upstream is the project's OpenAI-wire fake (tests/fakes/openai_upstream.py)
in its own process, with a fixed latency before the first token and 16 content
chunks. The suite is a real ``orchestra up --no-local-model`` (Envoy, ext_authz for all but chat,
the five services, embedded PostgreSQL and Redis; :mod:`bench.suite`) with that
fake as its only provider. At each concurrency level:

* the same number of streaming chats goes straight to the upstream (the
  baseline) and through the suite, each with a unique prompt (a cache miss that
  is then stored, settled and audited), then as many asking one prompt already
  answered (cache hits); the latency table gives time to first token and total
  latency (p50/p99) of each, the difference, and chats per second;
* the CPU table gives, for each process of the suite, CPU milliseconds per chat
  (``/proc/<pid>/stat`` before and after the run, once the outbox has delivered
  every follow-up job, less what the suite spends idle over the same time).

``--baseline DIR`` measures the suite of another checkout in the same run (e.g.
``git worktree add /tmp/base <commit>``), so a change is judged against the code
before it under the same conditions. ``--profile DIR`` runs py-spy on every
service during the cache-miss runs and writes one flame graph per service and
level (CPU figures of a profiled run are inflated by the sampling), and prints
where each graph's samples went (:mod:`bench.flame`: self time by package and
by function; native code shows as the Python frame that called it).

    .venv/bin/python bench/overhead.py [--requests 200] [--concurrency 1,16,32]
        [--latency-ms 50] [--baseline DIR] [--profile DIR] [--json] [--decision-only]

It also times the routing decision alone, in process (``policy.decide`` on a
six-model catalog, varied prompts): the plain policy (cost strategy, the
baseline), then the learned one (balanced strategy with a trained per-tenant
bandit: task analysis, prompt embedding, posterior for each model), with the
task analysis and the embedding on their own. ``--decision-only`` runs just
that part (no suite).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import flame  # noqa: E402
from bench.suite import (  # noqa: E402
    PARTS,
    SERVICES,
    Suite,
    cpu_delta,
    cpu_seconds,
    grid,
    start_fake_upstream,
    wait_idle_outbox,
)
from orchestra.common.v1 import chat_pb2  # noqa: E402
from orchestra.router.v1 import chat_service_pb2 as chat_api  # noqa: E402
from orchestra.router.v1 import chat_service_pb2_grpc as chat_grpc  # noqa: E402

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


# One chat: (seconds to first token, seconds in all, whether it was a cache hit).
Call = Callable[[int], Awaitable[tuple[float, float, bool]]]
IDLE_SECONDS = 5.0


async def _direct(client: httpx.AsyncClient, url: str, prompt: str) -> tuple[float, float, bool]:
    started = time.perf_counter()
    first = 0.0
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 64,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with client.stream("POST", f"{url}/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not first and '"content"' in line:
                first = time.perf_counter() - started
    return first, time.perf_counter() - started, False


async def _gateway(stub: chat_grpc.ChatServiceStub, prompt: str) -> tuple[float, float, bool]:
    started = time.perf_counter()
    first = 0.0
    request = chat_api.ChatRequest(
        messages=[
            chat_pb2.Message(role=chat_pb2.ROLE_USER, content=[chat_pb2.ContentPart(text=prompt)])
        ],
        generation=chat_pb2.GenerationConfig(max_tokens=64, temperature=0),
    )
    hit = False
    async for event in stub.ChatStream(
        request, metadata=(("authorization", f"Bearer {KEY}"),), timeout=60
    ):
        kind = event.WhichOneof("event")
        if not first and kind == "text_delta":
            first = time.perf_counter() - started
        elif kind == "end":
            hit = event.end.cache_hit
    if not first:
        raise RuntimeError("the gateway streamed no text")
    return first, time.perf_counter() - started, hit


def _unique(i: int) -> str:
    return f"question {i} {time.time_ns()}"


async def _run_level(call: Call, requests: int, concurrency: int) -> dict[str, float]:
    semaphore = asyncio.Semaphore(concurrency)
    ttft: list[float] = []
    total: list[float] = []
    hits = 0

    async def one(i: int) -> None:
        nonlocal hits
        async with semaphore:
            first, whole, hit = await call(i)
            ttft.append(first * 1000)
            total.append(whole * 1000)
            hits += hit

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(requests)))
    elapsed = time.perf_counter() - started
    return {
        "ttft_p50_ms": round(_percentile(ttft, 0.5), 2),
        "ttft_p99_ms": round(_percentile(ttft, 0.99), 2),
        "total_p50_ms": round(_percentile(total, 0.5), 2),
        "total_p99_ms": round(_percentile(total, 0.99), 2),
        "rps": round(requests / elapsed, 1),
        "hit_share": hits / requests,
    }


class Profiler:
    """py-spy on every service of a suite while a run lasts (``--profile``)."""

    def __init__(self, out: Path | None, suite: Suite, name: str, rate: int) -> None:
        self._out, self._suite, self._name, self._rate = out, suite, name, rate
        self._spies: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Profiler:
        if self._out is None:
            return self
        self._out.mkdir(parents=True, exist_ok=True)
        spy = str(Path(sys.executable).parent / "py-spy")
        for part, pids in self._suite.pids().items():
            if part not in SERVICES:
                continue
            target = self._out / f"{self._suite.label}-{self._name}-{part}.svg"
            # fmt: off
            self._spies.append(subprocess.Popen(
                [spy, "record", "--pid", str(pids[0]), "--rate", str(self._rate),
                 "--nonblocking", "--format", "flamegraph", "--output", str(target)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))
            # fmt: on
        time.sleep(1.0)  # py-spy attaches
        return self

    def __exit__(self, *exc: object) -> None:
        for spy in self._spies:
            spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
        for spy in self._spies:
            spy.wait(timeout=60)


async def _idle_rates(suite: Suite) -> dict[str, float]:
    """CPU seconds per second each part spends with no requests (timers, probes)."""
    before = cpu_seconds(suite.pid)
    await asyncio.sleep(IDLE_SECONDS)
    spent = cpu_delta(before, cpu_seconds(suite.pid))
    return {part: spent[part] / IDLE_SECONDS for part in PARTS}


async def _measured(
    suite: Suite, call: Call, requests: int, level: int, idle: dict[str, float]
) -> tuple[dict[str, float], dict[str, float]]:
    """(latency figures, CPU ms per chat by part) of one run, follow-up work included."""
    before = cpu_seconds(suite.pid)
    started = time.perf_counter()
    latency = await _run_level(call, requests, level)
    await asyncio.to_thread(wait_idle_outbox, suite.redis_url)
    await asyncio.sleep(0.5)  # the last deliveries' own work (audit batches, checkpoints)
    elapsed = time.perf_counter() - started
    spent = cpu_delta(before, cpu_seconds(suite.pid))
    cpu = {
        part: round(max(0.0, spent[part] - idle[part] * elapsed) * 1000 / requests, 2)
        for part in PARTS
    }
    cpu["total"] = round(sum(cpu[p] for p in PARTS), 2)
    return latency, cpu


async def measure_suite(
    args: argparse.Namespace, suite: Suite, direct: dict[int, dict[str, float]]
) -> dict[str, Any]:
    """Every level's miss and hit runs through ``suite``."""
    result: dict[str, Any] = {"label": suite.label, "levels": []}
    async with grpc.aio.insecure_channel(suite.edge) as channel:
        stub = chat_grpc.ChatServiceStub(channel)
        for i in range(20):  # warm: connections, key and policy caches, the learner
            await _gateway(stub, _unique(i))
        await asyncio.to_thread(wait_idle_outbox, suite.redis_url)
        idle = await _idle_rates(suite)
        result["idle_cpu_ms_per_s"] = {p: round(v * 1000, 2) for p, v in idle.items()}
        for level in args.concurrency:
            row: dict[str, Any] = {"concurrency": level, "direct": direct[level]}
            with Profiler(args.profile, suite, f"miss-c{level}", args.profile_rate):
                row["miss"], row["miss_cpu"] = await _measured(
                    suite, lambda i: _gateway(stub, _unique(i)), args.requests, level, idle
                )
            answered = f"the answered question, level {level} {time.time_ns()}"
            await _gateway(stub, answered)
            await asyncio.to_thread(wait_idle_outbox, suite.redis_url)
            row["hit"], row["hit_cpu"] = await _measured(
                suite, lambda i, text=answered: _gateway(stub, text), args.requests, level, idle
            )
            result["levels"].append(row)
    return result


async def measure_direct(args: argparse.Namespace, url: str) -> dict[int, dict[str, float]]:
    """The baseline: the same chats straight to the upstream, per level."""
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=256)) as client:
        for i in range(10):
            await _direct(client, url, _unique(i))
        return {
            level: await _run_level(
                lambda i: _direct(client, url, _unique(i)), args.requests, level
            )
            for level in args.concurrency
        }


def _pair(figures: dict[str, float], name: str) -> str:
    return f"{figures[name + '_p50_ms']:.1f} / {figures[name + '_p99_ms']:.1f}"


def _print_latency(result: dict[str, Any], latency_ms: int, requests: int) -> None:
    print(
        f"\n[{result['label']}] latency: {requests} streaming chats per level and kind, "
        f"upstream first token after {latency_ms} ms. Baseline = the same chat sent "
        "straight to the upstream. ms p50 / p99."
    )
    lines = []
    for r in result["levels"]:
        d = r["direct"]
        for kind in ("miss", "hit"):
            g = r[kind]
            added = {f"x_{q}_ms": g[f"ttft_{q}_ms"] - d[f"ttft_{q}_ms"] for q in ("p50", "p99")}
            lines.append((
                str(r["concurrency"]), kind, _pair(d, "ttft"), _pair(g, "ttft"), _pair(added, "x"),
                _pair(d, "total"), _pair(g, "total"),
                f"{d['rps']:.0f} / {g['rps']:.0f}", f"{100 * g['rps'] / d['rps']:.0f}%",
            ))  # fmt: skip
    header = (
        "conc", "chat", "direct TTFT", "gateway TTFT", "added TTFT", "direct total",
        "gateway total", "chats/s d / g", "g/d",
    )  # fmt: skip
    print(grid(header, lines))


def _print_cpu(results: list[dict[str, Any]], requests: int) -> None:
    print(
        f"\nCPU ms per chat, by process ({requests} chats per run; /proc/<pid>/stat, "
        "follow-up work included, idle spending subtracted):"
    )
    header = ("suite", "conc", "chat", *PARTS, "total")
    lines = []
    for result in results:
        for r in result["levels"]:
            for kind in ("miss", "hit"):
                cpu = r[f"{kind}_cpu"]
                lines.append((
                    result["label"], str(r["concurrency"]), kind,
                    *(f"{cpu[p]:.2f}" for p in PARTS), f"{cpu['total']:.2f}",
                ))  # fmt: skip
    print(grid(header, lines))
    for result in results:
        idle = result["idle_cpu_ms_per_s"]
        print(f"  idle ({result['label']}), CPU ms per second: " + ", ".join(
            f"{p} {idle[p]:.1f}" for p in PARTS if idle[p] >= 0.05
        ))  # fmt: skip
        shares = ", ".join(
            f"c{r['concurrency']} {r['hit']['hit_share']:.0%}" for r in result["levels"]
        )
        print(f"  cache-hit runs ({result['label']}) that were hits: {shares}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="chats per level and kind")
    parser.add_argument(
        "--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 32]
    )
    parser.add_argument("--latency-ms", type=int, default=50, help="upstream time to first token")
    parser.add_argument(
        "--baseline", type=Path, help="another checkout whose suite is measured in the same run"
    )
    parser.add_argument("--profile", type=Path, help="write py-spy flame graphs to this folder")
    parser.add_argument("--profile-rate", type=int, default=250, help="py-spy samples per second")
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

    upstream, upstream_url = start_fake_upstream(args.latency_ms, 16, MODEL)
    config = CONFIG.format(url=upstream_url, key=KEY)
    checkouts = [(args.baseline, "baseline")] if args.baseline else []
    checkouts.append((ROOT, "this"))
    results = []
    try:
        time.sleep(1.0)
        direct = asyncio.run(measure_direct(args, upstream_url))
        for checkout, label in checkouts:
            suite = Suite(checkout, config, label)
            try:
                suite.start()
                results.append(asyncio.run(measure_suite(args, suite, direct)))
            finally:
                suite.stop()
    finally:
        upstream.terminate()
        upstream.wait(timeout=10)
    for result in results:
        _print_latency(result, args.latency_ms, args.requests)
    _print_cpu(results, args.requests)
    _print_decision(decision, args.decisions)
    if args.profile:
        print(f"\nWhere the profiled samples went (self time; flame graphs in {args.profile}):")
        for graph in sorted(args.profile.glob("*.svg")):
            print(flame.summary(graph, top=8))
    if args.json:
        print(json.dumps({"upstream_latency_ms": args.latency_ms, "suites": results,
                          "decision": decision}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
