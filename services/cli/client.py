"""``orchestra chat``, ``models`` and ``status``: the suite seen from a client.

They talk to the edge like any application would: generated stubs, an API key
in the ``authorization`` metadata. The key comes from ``--api-key``,
``ORCHESTRA_API_KEY``, or the state directory of ``orchestra up``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestra.budget.v1 import budget_service_pb2 as budget_pb2
from orchestra.budget.v1 import budget_service_pb2_grpc as budget_grpc
from orchestra.common.v1 import chat_pb2
from orchestra.discovery.v1 import discovery_service_pb2 as discovery_pb2
from orchestra.discovery.v1 import discovery_service_pb2_grpc as discovery_grpc
from orchestra.router.v1 import chat_service_pb2 as chat_api
from orchestra.router.v1 import chat_service_pb2_grpc as chat_grpc
from services.cli import embedded, up
from services.common import errors


class CliError(Exception):
    """A failure to report to the user in one line (exit code 1)."""


def api_key(explicit: str | None, state_dir: Path) -> str:
    """The API key to send, from the flag, the environment or the state directory."""
    key = explicit or os.environ.get("ORCHESTRA_API_KEY")
    if key:
        return key
    path = state_dir / up.API_KEY_FILE
    if path.exists():
        return path.read_text().strip()
    raise CliError(
        f"no API key: pass --api-key, set ORCHESTRA_API_KEY, or run `orchestra up` "
        f"(which writes one to {path})"
    )


def _metadata(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def describe(error: grpc.RpcError) -> str:
    """One line for a failed call: code, ErrorInfo reason, message."""
    details = errors.decode(error)
    reason = f" {details.reason}" if details.reason else ""
    return f"{details.code.name}{reason}: {details.message}"


async def chat(
    edge: str,
    key: str,
    prompt: str,
    *,
    model: str = "",
    system: str = "",
    max_tokens: int | None = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> None:
    """Streams an answer to ``out`` as it arrives, then a summary line to ``err``."""
    messages = []
    if system:
        messages.append(
            chat_pb2.Message(role=chat_pb2.ROLE_SYSTEM, content=[chat_pb2.ContentPart(text=system)])
        )
    messages.append(
        chat_pb2.Message(role=chat_pb2.ROLE_USER, content=[chat_pb2.ContentPart(text=prompt)])
    )
    request = chat_api.ChatRequest(model=model, messages=messages)
    if max_tokens is not None:
        request.generation.max_tokens = max_tokens
    started = time.monotonic()
    async with grpc.aio.insecure_channel(edge) as channel:
        stub = chat_grpc.ChatServiceStub(channel)
        start: chat_api.ChatStart | None = None
        end: chat_api.ChatEnd | None = None
        try:
            async for event in stub.ChatStream(request, metadata=_metadata(key)):
                kind = event.WhichOneof("event")
                if kind == "start":
                    start = event.start
                elif kind == "text_delta":
                    out.write(event.text_delta.text)
                    out.flush()
                elif kind == "end":
                    end = event.end
        except grpc.aio.AioRpcError as exc:
            out.write("\n")
            raise CliError(describe(exc)) from None
    out.write("\n")
    if start is not None and end is not None:
        usage = end.usage
        estimated = " (estimated)" if usage.estimated else ""
        err.write(
            f"[{start.model}{' · cache hit' if end.cache_hit else ''}] "
            f"tokens {usage.prompt_tokens} in / {usage.completion_tokens} out{estimated} · "
            f"cost ${end.cost_micro_usd / 1e6:.6f} · "
            f"first token {end.time_to_first_token_ms} ms · "
            f"total {int((time.monotonic() - started) * 1000)} ms\n"
        )


def _price(micro_per_mtok: int, source: int) -> str:
    if source == discovery_pb2.PRICE_SOURCE_UNSPECIFIED:
        return "unpriced"
    return f"${micro_per_mtok / 1e6:.2f}"


async def models(edge: str, key: str, out: TextIO = sys.stdout) -> None:
    """Prints every model discovery knows: provider type, price, context,
    capabilities, health, latency and, for local servers, what is loaded."""
    found: list[discovery_pb2.Model] = []
    async with grpc.aio.insecure_channel(edge) as channel:
        stub = discovery_grpc.DiscoveryServiceStub(channel)
        token = ""
        while True:
            try:
                page = await stub.ListModels(
                    discovery_pb2.ListModelsRequest(page_token=token),
                    metadata=_metadata(key),
                    timeout=10,
                )
            except grpc.aio.AioRpcError as exc:
                raise CliError(describe(exc)) from None
            found.extend(page.models)
            token = page.next_page_token
            if not token:
                break
    _table(model_rows(found), out)


def model_rows(found: Sequence[discovery_pb2.Model]) -> list[tuple[str, ...]]:
    """The ``orchestra models`` table: a header, then one row per model."""
    header = (
        "MODEL", "TYPE", "CONTEXT", "IN/MTOK", "OUT/MTOK", "CAPABILITIES",
        "HEALTH", "TTFT", "TOK/S", "ERRORS", "LOADED",
    )  # fmt: skip
    rows: list[tuple[str, ...]] = [header]
    for m in found:
        caps = [
            name
            for name, on in (
                ("tools", m.capabilities.tools),
                ("vision", m.capabilities.vision),
                ("json", m.capabilities.json_mode),
            )
            if on
        ]
        health = m.health
        probed = health.probe_count > 0
        if m.loaded:
            loaded = f"yes ({m.vram_bytes / 2**30:.1f} GiB)" if m.vram_bytes else "yes"
        else:
            loaded = "-"
        rows.append(
            (
                m.name,
                discovery_pb2.ProviderType.Name(m.provider_type)
                .removeprefix("PROVIDER_TYPE_")
                .lower(),
                str(m.context_window or "?"),
                _price(m.pricing.input_micro_usd_per_mtok, m.price_source),
                _price(m.pricing.output_micro_usd_per_mtok, m.price_source),
                ",".join(caps) or "-",
                discovery_pb2.HealthStatus.Name(health.status)
                .removeprefix("HEALTH_STATUS_")
                .lower()
                .replace("unspecified", "unknown"),
                f"{health.ttft_p50_ms} ms" if health.ttft_p50_ms else "-",
                f"{health.tokens_per_second:.0f}" if health.tokens_per_second else "-",
                f"{health.error_rate:.0%}" if probed else "-",
                loaded,
            )
        )
    return rows


async def budget_status(
    edge: str,
    key: str,
    subject: budget_pb2.SpendSubject,
    out: TextIO = sys.stdout,
) -> None:
    """Prints every budget that applies to ``subject`` in its current window:
    limit, spent, held, remaining and the month-end projection, in USD."""
    async with grpc.aio.insecure_channel(edge) as channel:
        try:
            reply = await budget_grpc.BudgetServiceStub(channel).GetBudgetStatus(
                budget_pb2.GetBudgetStatusRequest(subject=subject),
                metadata=_metadata(key),
                timeout=10,
            )
        except grpc.aio.AioRpcError as exc:
            raise CliError(describe(exc)) from None
    _table(budget_rows(reply.statuses), out)


def budget_rows(statuses: Sequence[budget_pb2.BudgetStatus]) -> list[tuple[str, ...]]:
    """The ``orchestra budget`` table: a header, then one row per budget."""
    header = (
        "LEVEL", "SUBJECT", "WINDOW", "KIND", "LIMIT", "SPENT", "HELD", "REMAINING", "PROJECTED",
    )  # fmt: skip
    rows: list[tuple[str, ...]] = [header]

    def usd(micro: int) -> str:
        return f"${micro / 1e6:,.4f}"

    for status in statuses:
        budget = status.budget
        rows.append(
            (
                budget_pb2.BudgetLevel.Name(budget.level).removeprefix("BUDGET_LEVEL_").lower(),
                budget.subject or budget.tenant_id,
                budget_pb2.BudgetWindow.Name(budget.window).removeprefix("BUDGET_WINDOW_").lower(),
                "soft" if budget.soft else "hard",
                usd(budget.limit_micro_usd),
                usd(status.spent_micro_usd),
                usd(status.reserved_micro_usd),
                usd(status.remaining_micro_usd),
                usd(status.projected_micro_usd) if status.projected_micro_usd else "-",
            )
        )
    return rows


def _table(rows: Sequence[tuple[str, ...]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        out.write("\n")


async def _grpc_health(target: str) -> str:
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2
            )
    except grpc.aio.AioRpcError as exc:
        return f"DOWN ({exc.code().name})"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


async def _http_ok(url: str) -> str:
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            response = await client.get(url)
    except httpx.HTTPError as exc:
        return f"DOWN ({type(exc).__name__})"
    return "SERVING" if response.status_code == 200 else f"DOWN (HTTP {response.status_code})"


async def status(state_dir: Path, out: TextIO = sys.stdout) -> bool:
    """Prints each component's health; returns whether all are serving."""
    suite = up.read_suite_file(state_dir)
    if suite is None:
        raise CliError(f"no suite recorded in {state_dir}; start one with `orchestra up`")
    services = suite.get("replicas") or {
        name: [addr]
        for name, addr in dict(suite["services"]).items()  # type: ignore[call-overload]
    }
    assert isinstance(services, dict)
    checks: dict[str, asyncio.Future[str] | asyncio.Task[str]] = {
        f"{name} ({addr})": asyncio.ensure_future(_grpc_health(str(addr)))
        for name, addrs in services.items()
        for addr in addrs
    }
    checks[f"edge ({suite['edge']})"] = asyncio.ensure_future(_grpc_health(str(suite["edge"])))
    checks[f"envoy admin ({suite['admin']})"] = asyncio.ensure_future(
        _http_ok(f"{suite['admin']}/ready")
    )
    if suite.get("local_model"):
        checks[f"local model ({suite['local_model']})"] = asyncio.ensure_future(
            _http_ok(f"{suite['local_model']}/models")
        )
    results = {name: await future for name, future in checks.items()}
    rows = [("COMPONENT", "STATUS")] + [(name, state) for name, state in results.items()]
    rows.append((f"postgres ({suite['postgres']})", "used by budget, audit, discovery"))
    rows.append((f"redis ({suite['redis']})", "used by budget, cache, router"))
    _table(rows, out)
    processes = _processes(state_dir)
    if processes:
        out.write("\n")
        _table(processes, out)
    return all(state == "SERVING" for state in results.values())


def _processes(state_dir: Path, now: float | None = None) -> list[tuple[str, ...]]:
    """The supervisor's children: state, restarts and last exit (empty: none recorded)."""
    try:
        recorded = json.loads((state_dir / embedded.PROCESSES_FILE).read_text())
    except (OSError, ValueError):
        return []
    now = time.time() if now is None else now
    supervisor = int(recorded.get("supervisor", 0))
    alive = supervisor > 0 and _pid_exists(supervisor)
    rows: list[tuple[str, ...]] = [("PROCESS", "PID", "STATE", "RESTARTS", "LAST EXIT")]
    for child in recorded.get("processes", []):
        last = child.get("last_exit")
        exit_text = f"{last['reason']}, {_ago(now - float(last['at']))} ago" if last else "-"
        state = str(child["state"]) if alive else "not running (supervisor gone)"
        rows.append(
            (str(child["name"]), str(child["pid"]), state, str(child["restarts"]), exit_text)
        )
    return rows


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{max(seconds, 0):.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"
