"""HTTP plumbing every adapter shares: the client, the chat call, failures as UpstreamError.

What differs between providers stays in each adapter: the request path and
body, the stream parser, which header carries the credential and how the error
body reads. What does not is written once here: the pooled client and its
timeouts, putting the credential's header over the operator's headers, the
streaming POST, how a status code or a transport error maps to a FailureKind,
Retry-After, and the framing of SSE and NDJSON streams.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Mapping
from types import TracebackType
from typing import Any, ClassVar

import httpx

from services.providers.base import Event, FailureKind, UpstreamError, UpstreamRequest

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


def credential_header(name: str, credential: str, prefix: str = "") -> dict[str, str]:
    """The header carrying ``credential`` (``prefix`` first), or none without one."""
    return {name: f"{prefix}{credential}"} if credential else {}


def bearer(credential: str) -> dict[str, str]:
    """``Authorization: Bearer <credential>``, or none without a credential."""
    return credential_header("Authorization", credential, "Bearer ")


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


def json_error(
    status: int,
    body: bytes,
    headers: httpx.Headers,
    detail: Callable[[Any], str | None],
    hint: Callable[[Any], float | None] | None = None,
) -> UpstreamError:
    """The failure for a non-200 answer whose body is the provider's JSON error.

    Args:
        status: The HTTP status.
        body: The answer's body.
        headers: The answer's headers (Retry-After).
        detail: Reads the message from the parsed body; may raise KeyError,
            TypeError or AttributeError (or return None) for a body of
            another shape, which is then quoted as it is.
        hint: Reads a retry delay from the parsed body when there is no
            Retry-After header.
    """
    try:
        parsed = json.loads(body)
        text = detail(parsed)
    except (ValueError, KeyError, TypeError, AttributeError):
        parsed, text = None, None
    wait = retry_after(headers)
    if wait is None and hint is not None and text is not None:
        wait = hint(parsed)
    return status_failure(status, text if text is not None else body_preview(body), wait)


def decode(text: str, what: str) -> Any:
    """One streamed JSON payload.

    Raises:
        UpstreamError: MALFORMED, naming ``what`` (``"chunk"``, ``"line"`` …).
    """
    try:
        return json.loads(text)
    except ValueError:
        raise UpstreamError(FailureKind.MALFORMED, f"{what} is not JSON: {text[:80]!r}") from None


def decode_object(text: str, what: str) -> dict[str, Any]:
    """One streamed JSON object (see :func:`decode`)."""
    value = decode(text, what)
    if not isinstance(value, dict):
        raise UpstreamError(FailureKind.MALFORMED, f"{what} is not an object: {text[:80]!r}")
    return value


MAX_TRAILING_LINES = 64
"""Lines read after a parser's end marker to finish the body (more: the connection is dropped)."""
MAX_TRAILING_SECONDS = 0.25
"""How long the rest of a body may take after the end marker (longer: the connection is dropped)."""

_LINES = "orchestra.lines"


def body_lines(response: httpx.Response) -> AsyncIterator[str]:
    """The lines of ``response``'s body: one iterator per response, however often asked.

    httpx reads a streamed body once. Parsers stop at their end marker
    (``[DONE]``, ``message_stop``, ``"done": true``); sharing the one iterator
    lets :func:`post_stream` read the rest of the body afterwards (the chunked
    terminator, a trailing blank line), so the connection goes back to the pool
    instead of being closed: no new TCP (and TLS) handshake on the next chat.
    """
    lines = response.extensions.get(_LINES)
    if lines is None:
        lines = response.extensions[_LINES] = response.aiter_lines()
    result: AsyncIterator[str] = lines
    return result


async def sse_data(response: httpx.Response) -> AsyncIterator[str]:
    """The payload of each ``data:`` line of a server-sent event stream.

    Event names, comments (``: ping``) and blank separators are skipped.
    """
    async for line in body_lines(response):
        if line.startswith("data:"):
            yield line[5:].strip()


async def ndjson_lines(response: httpx.Response) -> AsyncIterator[str]:
    """The non-blank lines of a newline-delimited JSON stream."""
    async for line in body_lines(response):
        if line.strip():
            yield line


async def _finish_body(response: httpx.Response) -> None:
    """Reads what is left of a body its parser stopped reading (at most a few lines)."""
    lines = response.extensions.get(_LINES)
    if lines is None or response.is_closed:
        return
    left = MAX_TRAILING_LINES
    # The answer is complete; a server that keeps the body open after its end
    # marker must not hold it back: then the connection is closed instead.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(MAX_TRAILING_SECONDS):
            async for _ in lines:
                left -= 1
                if left <= 0:
                    return  # not a short tail: let the connection close rather than read on


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
            await _finish_body(response)


class HttpAdapter(abc.ABC):
    """A provider adapter over HTTP: a subclass says only what its provider does differently.

    Every request is a streaming POST of :meth:`_body` to :meth:`_path`;
    :meth:`_events` parses the answer and :meth:`_error` reads a non-200 one.
    :meth:`_auth` names the header that carries the credential.

    Attributes:
        provider_id: The provider's id.
        defaults: The provider's own headers (an API version); the operator's
            win over them.
        params: Query parameters of every chat request (None: none).
    """

    defaults: ClassVar[Mapping[str, str]] = {}
    params: ClassVar[Mapping[str, str] | None] = None

    def __init__(
        self,
        provider_id: str,
        base_url: str,
        *,
        credential: str = "",
        headers: Mapping[str, str] | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
    ) -> None:
        """Opens the provider's pooled client.

        Args:
            provider_id: The provider's id.
            base_url: The URL the paths are relative to.
            credential: The API credential ("" for none); its header wins
                over the operator's.
            headers: The operator's headers for every request.
            connect_timeout: Seconds to wait for a connection.
            read_timeout: Seconds to wait between bytes.
        """
        self.provider_id = provider_id
        self.base_url = base_url.rstrip("/")
        sent = {**self.defaults, **(headers or {}), **self._auth(credential)}
        self._client = client(
            self.base_url, sent, connect_timeout=connect_timeout, read_timeout=read_timeout
        )

    async def stream(self, request: UpstreamRequest) -> AsyncIterator[Event]:
        """See :meth:`ProviderAdapter.stream`."""
        async for event in post_stream(
            self._client,
            self._path(request),
            self._events,
            self._error,
            params=self.params,
            json=self._body(request),
        ):
            yield event

    async def aclose(self) -> None:
        """See :meth:`ProviderAdapter.aclose`."""
        await self._client.aclose()

    @abc.abstractmethod
    def _auth(self, credential: str) -> Mapping[str, str]:
        """The header(s) that carry ``credential`` (none when it is "")."""

    @abc.abstractmethod
    def _path(self, request: UpstreamRequest) -> str:
        """The chat request's path, relative to the base URL."""

    @abc.abstractmethod
    def _body(self, request: UpstreamRequest) -> Any:
        """The chat request's JSON body."""

    @abc.abstractmethod
    def _events(self, response: httpx.Response) -> AsyncIterator[Event]:
        """The events of an open 200 answer, as they arrive."""

    @abc.abstractmethod
    def _error(self, status: int, body: bytes, headers: httpx.Headers) -> UpstreamError:
        """The failure a non-200 answer means."""
