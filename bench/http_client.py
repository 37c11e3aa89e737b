"""CPU per streamed provider call: the router's client (aiohttp) against httpx, in one run.

The project's fake OpenAI upstream runs in its own process (5 ms to the first
token, 16 content chunks); this process streams chat completions from it and
reads its own CPU time (``getrusage``) around each batch, so the figure is the
client's cost alone: the request, the SSE parsing and each chunk's JSON.

* ``orchestra`` is :func:`services.providers.http.post_stream` with the OpenAI
  adapter's own parser: what the router runs per chat;
* ``httpx`` is the same request with ``httpx.AsyncClient.stream`` and
  ``aiter_lines`` (the client before), the baseline.

Usage: ``.venv/bin/python bench/http_client.py [--requests 400] [--levels 1,16] [--rounds 2]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestra.common.v1 import chat_pb2  # noqa: E402
from services.cli.embedded import free_port  # noqa: E402
from services.providers import OpenAIAdapter  # noqa: E402
from services.providers.base import UpstreamRequest  # noqa: E402

MODEL = "gpt-4o-mini"
BODY = {
    "model": MODEL,
    "stream": True,
    "stream_options": {"include_usage": True},
    "messages": [{"role": "user", "content": "What is 2+2?"}],
}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _per_request(one: Callable[[], Awaitable[None]], requests: int, level: int) -> float:
    """CPU milliseconds per request with ``level`` requests at once."""
    await asyncio.gather(*(one() for _ in range(level)))  # warm: connections open
    before = _cpu()
    for _ in range(max(requests // level, 1)):
        await asyncio.gather(*(one() for _ in range(level)))
    return (_cpu() - before) * 1000 / (max(requests // level, 1) * level)


async def run(args: argparse.Namespace, url: str) -> list[tuple[int, float, float]]:
    """(level, httpx ms, orchestra ms) per level and round, against the fake at ``url``."""
    adapter = OpenAIAdapter("fake", f"{url}/v1", credential="sk-bench")
    request = UpstreamRequest(
        model_id=MODEL,
        messages=[
            chat_pb2.Message(
                role=chat_pb2.ROLE_USER, content=[chat_pb2.ContentPart(text="What is 2+2?")]
            )
        ],
        tools=[],
        tool_choice=None,
        generation=chat_pb2.GenerationConfig(max_tokens=64),
        timeout=None,
    )
    rows = []
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            for _ in range(100):  # the fake is up when it answers
                try:
                    await client.get("/v1/models")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.1)

            async def with_httpx() -> None:
                async with client.stream("POST", "/v1/chat/completions", json=BODY) as answer:
                    async for line in answer.aiter_lines():
                        if line.startswith("data:") and line[5:].strip() != "[DONE]":
                            json.loads(line[5:])

            async def with_orchestra() -> None:
                async for _ in adapter.stream(request):
                    pass

            for level in args.levels:
                for _ in range(args.rounds):
                    before = await _per_request(with_httpx, args.requests, level)
                    after = await _per_request(with_orchestra, args.requests, level)
                    rows.append((level, before, after))
    finally:
        await adapter.aclose()
    return rows


def main(argv: list[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400, help="requests per level and client")
    parser.add_argument(
        "--levels",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 16],
        help="requests at once, comma-separated",
    )
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per level")
    args = parser.parse_args(argv)
    port = free_port()
    fake = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.openai_upstream", "--port", str(port),
         "--latency-ms", "5", "--chunks", "16", "--models", MODEL],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        rows = asyncio.run(run(args, f"http://127.0.0.1:{port}"))
    finally:
        fake.terminate()
        fake.wait()
    print("client CPU ms per streamed chat completion (16 chunks), this process only")
    print(f"{'at once':>8}{'httpx (baseline)':>18}{'orchestra (aiohttp)':>21}{'ratio':>8}")
    for level, before, after in rows:
        print(f"{level:>8}{before:>18.3f}{after:>21.3f}{after / before:>8.2f}")


if __name__ == "__main__":
    main()
