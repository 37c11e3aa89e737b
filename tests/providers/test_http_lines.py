"""How a streamed body is split into lines, whatever the chunks it arrives in.

A real aiohttp server writes the body in the chunks each case gives, flushing
between them, so line ends and multi-byte characters fall across chunk
boundaries the way they can on the wire.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import aiohttp
import pytest
from aiohttp import web

from services.providers import http
from services.providers.base import FailureKind, UpstreamError
from services.providers.http import Answer
from tests.providers.local_app import serve


async def _serve(chunks: Sequence[bytes]) -> tuple[web.AppRunner, str]:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for chunk in chunks:
            await response.write(chunk)
            await asyncio.sleep(0.01)  # its own TCP segment
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/chat", handler)
    runner, port = await serve(app)
    return runner, f"http://127.0.0.1:{port}/chat"


async def _lines(chunks: Sequence[bytes]) -> list[str]:
    runner, url = await _serve(chunks)

    async def every_line(answer: Answer) -> AsyncIterator[str]:
        async for line in answer.lines():
            yield line

    def refuse(status: int, body: bytes, headers: http.Headers) -> UpstreamError:
        raise AssertionError(f"HTTP {status}")

    session = http.session({}, connect_timeout=5, read_timeout=5)
    try:
        return [line async for line in http.post_stream(session, url, every_line, refuse)]
    finally:
        await session.close()
        await runner.cleanup()


@pytest.mark.parametrize(
    ("chunks", "lines"),
    [
        ([b"data: a\n\ndata: b\n\n"], ["data: a", "", "data: b", ""]),
        ([b"data: a\r", b"\ndata: b\r\n"], ["data: a", "data: b"]),  # CRLF split in two
        ([b"data: a\rdata: b\r", b"data: c"], ["data: a", "data: b", "data: c"]),  # bare CRs
        ([b"data: \xc3", b"\xa9t\xc3\xa9\n"], ["data: été"]),  # a character split in two
        ([b"da", b"ta: a", b"\n", b"data: b"], ["data: a", "data: b"]),  # no final newline
        ([b"data: \xff\n"], ["data: \ufffd"]),  # not UTF-8: replaced, as a provider's typo
    ],
)
async def test_lines_across_chunks(chunks: list[bytes], lines: list[str]) -> None:
    assert await _lines(chunks) == lines


async def test_an_endless_line_is_malformed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http, "MAX_LINE_CHARS", 1000)
    with pytest.raises(UpstreamError) as caught:
        await _lines([b"x" * 600, b"x" * 600, b"\n"])
    assert caught.value.kind is FailureKind.MALFORMED


async def test_a_refused_connection_is_a_connect_failure() -> None:
    session = http.session({}, connect_timeout=5, read_timeout=5)

    async def nothing(answer: Answer) -> AsyncIterator[str]:
        yield ""

    def refuse(status: int, body: bytes, headers: http.Headers) -> UpstreamError:
        raise AssertionError(f"HTTP {status}")

    try:
        with pytest.raises(UpstreamError) as caught:
            async for _ in http.post_stream(session, "http://127.0.0.1:1/chat", nothing, refuse):
                pass
    finally:
        await session.close()
    assert caught.value.kind is FailureKind.CONNECT
    assert isinstance(caught.value.__cause__, aiohttp.ClientConnectorError)
