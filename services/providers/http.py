"""HTTP plumbing every adapter shares: the client, and failures as UpstreamError.

What differs between providers (paths, headers, the error body's shape) stays
in each adapter; what does not (timeouts, connection limits, how a status code
or a transport error maps to a FailureKind, Retry-After) is written once here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from types import TracebackType
from typing import Any

import httpx

from services.providers.base import Event, FailureKind, UpstreamError

ErrorOf = Callable[[int, bytes, httpx.Headers], UpstreamError]
"""Builds the failure for a non-200 answer from (status, body, headers)."""


def client(
    base_url: str,
    headers: Mapping[str, str],
    *,
    connect_timeout: float,
    read_timeout: float,
) -> httpx.AsyncClient:
    """A pooled client for one provider; ``read_timeout`` bounds each wait for bytes."""
    return httpx.AsyncClient(
        base_url=base_url.rstrip("/") + "/",
        headers=dict(headers),
        timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
        limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
    )


def retry_after(headers: httpx.Headers) -> float | None:
    """Seconds from a Retry-After header, or None (absent, or an HTTP date)."""
    value = headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date; rare from these APIs, treated as no hint


def status_failure(status: int, detail: str, wait: float | None) -> UpstreamError:
    """The failure for a non-200 answer: 429 and 5xx may succeed later, other 4xx not."""
    if status == 429:
        kind = FailureKind.RATE_LIMITED
    elif status >= 500:  # includes Anthropic's 529 overloaded_error
        kind = FailureKind.SERVER_ERROR
    else:
        kind = FailureKind.CLIENT_ERROR
    return UpstreamError(kind, f"HTTP {status}: {detail}", status=status, retry_after=wait)


def body_preview(body: bytes) -> str:
    """The start of an error body that is not the provider's documented JSON."""
    return body[:200].decode(errors="replace")


class TransportErrors:
    """Turns httpx's transport errors into UpstreamError inside a ``with`` block."""

    def __enter__(self) -> TransportErrors:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, httpx.ConnectError):
            raise UpstreamError(FailureKind.CONNECT, f"cannot connect: {exc}") from exc
        if isinstance(exc, httpx.TimeoutException):
            raise UpstreamError(FailureKind.TIMEOUT, f"timed out: {type(exc).__name__}") from exc
        if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError):
            raise UpstreamError(FailureKind.STREAM_BROKEN, f"connection lost: {exc}") from exc


async def post_stream(
    http_client: httpx.AsyncClient,
    path: str,
    parse: Callable[[httpx.Response], AsyncIterator[Event]],
    error_of: ErrorOf,
    **kwargs: Any,
) -> AsyncIterator[Event]:
    """POSTs a streaming request and yields ``parse``'s events as they arrive.

    A non-200 answer raises ``error_of(status, body, headers)``; transport
    failures raise UpstreamError (see :class:`TransportErrors`).

    Args:
        http_client: The provider's client (from :func:`client`).
        path: Relative to the client's base URL.
        parse: Turns the open response into events, incrementally.
        error_of: The provider's reading of its own error bodies.
        **kwargs: Passed to ``httpx.AsyncClient.stream`` (``json``, ``params``).
    """
    with TransportErrors():
        async with http_client.stream("POST", path, **kwargs) as response:
            if response.status_code != 200:
                body = await response.aread()
                raise error_of(response.status_code, body, response.headers)
            async for event in parse(response):
                yield event
