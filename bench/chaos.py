"""Chaos: each replica SIGKILLed in turn under steady chat traffic, then Redis and PostgreSQL.

A real ``orchestra up --replicas router=2,budget=2,cache=2,audit=2,discovery=2``
with the project's OpenAI-wire fake as the only provider; a few clients send
streaming chats through the edge without pause (unique prompts, and a few
repeated ones that the cache answers). For each fault the benchmark kills one
process of the suite with SIGKILL, waits until the supervisor has started it
again, and keeps the traffic going a little longer. Then it stops the
traffic, waits for the routers' outboxes to drain and compares what the
clients were told with what the suite recorded:

* per fault: chats attempted, answered, failed as the client saw them (gRPC
  status and ``ErrorInfo`` reason), and how many of the failures had already
  started answering (the only failures the goal allows: a stream on the
  killed router replica);
* the ledger against the costs the clients were told (every answered chat
  charged exactly what its ``ChatEnd`` said; a cache hit charges nothing);
* one audit record per answered chat;
* holds still open (left to the reaper, which charges them in full when they
  expire).

    .venv/bin/python bench/chaos.py            # every replica, then Redis and PostgreSQL
    .venv/bin/python bench/chaos.py --quick    # four faults, a short window each (CI)
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.overhead import CONFIG, KEY, MODEL  # noqa: E402
from bench.suite import Suite, start_fake_upstream, supervised, wait_idle_outbox  # noqa: E402
from orchestra.common.v1 import chat_pb2  # noqa: E402
from orchestra.router.v1 import chat_service_pb2 as chat_api  # noqa: E402
from orchestra.router.v1 import chat_service_pb2_grpc as chat_grpc  # noqa: E402
from services.common import errors  # noqa: E402

REPLICAS = "router=2,budget=2,cache=2,audit=2,discovery=2"
QUICK_FAULTS = ("router-2", "budget", "cache-2", "redis")
REPEATED = [f"What is {n} plus {n}?" for n in range(5)]  # answered from the cache after once
CHAT_DEADLINE = 30.0


@dataclasses.dataclass
class Chat:
    """One chat as its client saw it (``fault``: the fault under way when it ended)."""

    fault: str
    request_id: str = ""
    outcome: str = "ok"  # or "CODE/REASON"
    started: bool = False  # a start event or text had arrived
    cost: int = 0
    cache_hit: bool = False


class Traffic:
    """Clients sending streaming chats until stopped; every chat recorded."""

    def __init__(self, edge: str, clients: int) -> None:
        self._edge = edge
        self._clients = clients
        self.fault = "warm-up"
        self.chats: list[Chat] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(self._clients)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _client(self, index: int) -> None:
        metadata = (("authorization", f"Bearer {KEY}"),)
        async with grpc.aio.insecure_channel(self._edge) as channel:
            stub = chat_grpc.ChatServiceStub(channel)
            n = 0
            while not self._stop.is_set():
                n += 1
                text = (
                    REPEATED[n % len(REPEATED)]
                    if n % 4 == 0
                    else f"chaos {index} {n} {time.time()}"
                )
                await self._one(stub, metadata, text)

    async def _one(self, stub: Any, metadata: Any, text: str) -> None:
        chat = Chat(self.fault)
        self.chats.append(chat)
        request = chat_api.ChatRequest(
            messages=[
                chat_pb2.Message(role=chat_pb2.ROLE_USER, content=[chat_pb2.ContentPart(text=text)])
            ],
            generation=chat_pb2.GenerationConfig(max_tokens=32),
        )
        try:
            async for event in stub.ChatStream(request, metadata=metadata, timeout=CHAT_DEADLINE):
                kind = event.WhichOneof("event")
                if kind == "start":
                    chat.started, chat.request_id = True, event.start.request_id
                elif kind == "end":
                    chat.cost, chat.cache_hit = event.end.cost_micro_usd, event.end.cache_hit
        except grpc.aio.AioRpcError as exc:
            details = errors.decode(exc)
            chat.outcome = f"{details.code.name}/{details.reason or '-'}"
        chat.fault = self.fault  # counted where it ended: a kill fails the chats in flight


async def _inflict(state_dir: Path, name: str, after: float) -> float:
    """SIGKILLs ``name``; returns the seconds until the supervisor had it running again."""
    killed = int(supervised(state_dir)[name]["pid"])
    started = time.monotonic()
    os.kill(killed, signal.SIGKILL)
    while True:
        row = supervised(state_dir)[name]
        if row["state"] == "running" and int(row["pid"]) != killed:
            break
        if time.monotonic() - started > 120:
            raise RuntimeError(f"{name} did not come back: {row}")
        await asyncio.sleep(0.05)
    back = time.monotonic() - started
    await asyncio.sleep(after)
    return back


async def _database_url(state_dir: Path) -> str:
    suite = json.loads((state_dir / "suite.json").read_text())
    password = (state_dir / "postgres.password").read_text().strip()
    host_port = str(suite["postgres"]).split("@", 1)[1]  # the redacted URL keeps host:port/db
    return f"postgresql://postgres:{password}@{host_port}"


async def _recorded(state_dir: Path, chats: list[Chat]) -> dict[str, Any]:
    """What the ledger and the audit log hold for the clients' chats."""
    ids = [c.request_id for c in chats if c.request_id]
    conn = await asyncpg.connect(await _database_url(state_dir))
    try:
        ledger = {
            r["request_id"]: int(r["cost_micro_usd"])
            for r in await conn.fetch(
                "SELECT request_id, cost_micro_usd FROM budget.ledger"
                " WHERE request_id = ANY($1::text[])",
                ids,
            )
        }
        audited = {
            r["event_id"].removeprefix("chat:")
            for r in await conn.fetch(
                "SELECT event_id FROM audit.records WHERE event_id = ANY($1::text[])",
                [f"chat:{i}" for i in ids],
            )
        }
        open_holds = await conn.fetchval(
            "SELECT count(*) FROM budget.holds h WHERE NOT h.released AND NOT EXISTS"
            " (SELECT 1 FROM budget.ledger l WHERE l.request_id = h.request_id)"
        )
    finally:
        await conn.close()
    answered = [c for c in chats if c.outcome == "ok"]
    mismatched = [c for c in answered if ledger.get(c.request_id, 0) != c.cost]
    unaudited = [c for c in answered if c.request_id not in audited]
    failed = [c for c in chats if c.outcome != "ok" and ledger.get(c.request_id)]
    failed_charged = sum(ledger[c.request_id] for c in failed)
    return {
        "answered": len(answered),
        "ledger_matches": len(answered) - len(mismatched),
        "ledger_mismatched": [
            (c.request_id, c.cost, ledger.get(c.request_id)) for c in mismatched[:5]
        ],
        "audited": len(answered) - len(unaudited),
        "unaudited": [c.request_id for c in unaudited[:5]],
        "charged_for_failed_chats_micro_usd": failed_charged,
        "charged_failures": [
            (c.request_id, c.outcome, c.started, ledger[c.request_id]) for c in failed[:5]
        ],
        "open_holds": int(open_holds),
    }


def _table(chats: list[Chat], back: dict[str, float]) -> list[dict[str, Any]]:
    rows = []
    for fault in ["warm-up", *back]:
        mine = [c for c in chats if c.fault == fault]
        failures = collections.Counter(c.outcome for c in mine if c.outcome != "ok")
        rows.append(
            {
                "fault": fault,
                "back_after_s": round(back.get(fault, 0.0), 2),
                "attempted": len(mine),
                "answered": sum(c.outcome == "ok" for c in mine),
                "failed": dict(failures),
                "failed_after_start": sum(c.outcome != "ok" and c.started for c in mine),
            }
        )
    return rows


async def run(suite: Suite, faults: list[str], clients: int, after: float) -> dict[str, Any]:
    traffic = Traffic(suite.edge, clients)
    traffic.start()
    await asyncio.sleep(after)
    back: dict[str, float] = {}
    try:
        for name in faults:
            traffic.fault = f"kill {name}"
            back[traffic.fault] = await _inflict(suite.state_dir, name, after)
    finally:
        await traffic.stop()
    wait_idle_outbox(suite.redis_url, timeout=120)
    await asyncio.sleep(2.0)  # the last deliveries' writes
    return {
        "faults": _table(traffic.chats, back),
        **await _recorded(suite.state_dir, traffic.chats),
    }


def _all_faults(state_dir: Path) -> list[str]:
    names = list(supervised(state_dir))
    services = [
        n for n in names if n.split("-")[0] in ("router", "budget", "cache", "audit", "discovery")
    ]
    return [*services, "redis", "postgres"]


def _print(result: dict[str, Any]) -> None:
    print(
        "fault               back after  attempted  answered  failed after start"
        "  failed (status/reason)"
    )
    for row in result["faults"]:
        failed = ", ".join(f"{k} x{v}" for k, v in sorted(row["failed"].items())) or "-"
        print(
            f"{row['fault']:<20}{row['back_after_s']:>9.2f}s{row['attempted']:>11}"
            f"{row['answered']:>10}{row['failed_after_start']:>20}  {failed}"
        )
    print(
        f"\nanswered chats: {result['answered']}; ledger equals the cost told: "
        f"{result['ledger_matches']}; audited: {result['audited']}"
    )
    if result["ledger_mismatched"]:
        print(f"  mismatched (request id, told, ledger): {result['ledger_mismatched']}")
    if result["unaudited"]:
        print(f"  unaudited: {result['unaudited']}")
    if result["charged_failures"]:
        print(f"  failed but charged (id, status, started, µUSD): {result['charged_failures']}")
    charged = result["charged_for_failed_chats_micro_usd"]
    print(
        f"charged for chats the client saw fail: {charged} µUSD; holds still open"
        f" (the reaper charges them in full at expiry): {result['open_holds']}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK_FAULTS)}")
    parser.add_argument("--clients", type=int, default=6, help="concurrent chat clients")
    parser.add_argument(
        "--after", type=float, default=3.0, help="seconds of traffic after each fault"
    )
    parser.add_argument("--latency-ms", type=int, default=20, help="upstream time to first token")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = parser.parse_args(argv)
    upstream, upstream_url = start_fake_upstream(args.latency_ms, 8, MODEL)
    suite = Suite(ROOT, CONFIG.format(url=upstream_url, key=KEY), "chaos", REPLICAS)
    try:
        suite.start()
        faults = list(QUICK_FAULTS) if args.quick else _all_faults(suite.state_dir)
        after = min(args.after, 1.5) if args.quick else args.after
        result = asyncio.run(run(suite, faults, args.clients, after))
    finally:
        suite.stop()
        upstream.terminate()
        upstream.wait(timeout=10)
    if args.json:
        print(json.dumps(result))
    else:
        _print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
