"""HTTP plumbing every adapter shares: the client, the chat call, failures as UpstreamError.

What differs between providers stays in each adapter: the request path and
body, the stream parser, which header carries the credential and how the error
body reads. What does not is written once here: the pooled client and its
timeouts, putting the credential's header over the operator's headers, the
streaming POST, how a status code or a transport error maps to a FailureKind,
Retry-After, and the framing of SSE and NDJSON streams.

Chat calls go through aiohttp, whose HTTP parser is native code: streaming
one 16-chunk answer from the fake OpenAI upstream costs the caller about
0.5 ms of CPU at 16 at once (1.1-1.2 ms alone), against 2.2-3.0 ms with
httpx (``bench/http_client.py``). Model listing
(:mod:`services.providers.listing`), which runs off the chat path, still
uses httpx.
"""

from __future__ import annotations

import abc
import asyncio
import codecs
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Mapping
from types import TracebackType
from typing import Any, ClassVar, TypeVar

import aiohttp

from services.providers.base import Event, FailureKind, UpstreamError, UpstreamRequest

Headers = Mapping[str, str]
"""An answer's headers (aiohttp's are case-insensitive: ``headers.get("retry-after")``)."""

ErrorOf = Callable[[int, bytes, Headers], UpstreamError]
"""Builds the failure for a non-200 answer from (status, body, headers)."""

T = TypeVar("T")

MAX_CONNECTIONS = 200
"""Connections one provider's client opens at most (more chats wait for one)."""


def session(
    headers: Mapping[str, str], *, connect_timeout: float, read_timeout: float
) -> aiohttp.ClientSession:
    """A pooled client for one provider.

    ``connect_timeout`` bounds getting a connection (from the pool, or a new
    one); ``read_timeout`` bounds each wait for bytes. Must be called with an
    event loop running.
    """
    return aiohttp.ClientSession(
        headers=dict(headers),
        timeout=aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_read=read_timeout),
        connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS),
    )


def credential_header(name: str, credential: str, prefix: str = "") -> dict[str, str]:
    """The header carrying ``credential`` (``prefix`` first), or none without one."""
    return {name: f"{prefix}{credential}"} if credential else {}


def bearer(credential: str) -> dict[str, str]:
    """``Authorization: Bearer <credential>``, or none without a credential."""
    return credential_header("Authorization", credential, "Bearer ")


def retry_after(headers: Headers) -> float | None:
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
    headers: Headers,
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

MAX_LINE_CHARS = 16 * 1024 * 1024
"""A streamed line longer than this is not an answer (the stream is MALFORMED)."""


class Answer:
    """An open answer to a chat call: its status, headers and body.

    The body is read once, either whole (:meth:`read`) or as lines
    (:meth:`lines`: one iterator per answer, however often asked). Parsers
    stop at their end marker (``[DONE]``, ``message_stop``, ``"done": true``);
    sharing the one iterator lets :func:`post_stream` read the rest of the
    body afterwards (the chunked terminator, a trailing blank line), so the
    connection goes back to the pool instead of being closed: no new TCP (and
    TLS) handshake on the next chat.
    """

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self._lines: AsyncIterator[str] | None = None

    @property
    def status(self) -> int:
        """The HTTP status."""
        return self._response.status

    @property
    def headers(self) -> Headers:
        """The answer's headers."""
        return self._response.headers

    async def read(self) -> bytes:
        """The whole body."""
        return await self._response.read()

    def lines(self) -> AsyncIterator[str]:
        """The body's lines, split at LF, CRLF or CR, without their ends."""
        if self._lines is None:
            self._lines = _lines(self._response.content)
        return self._lines

    async def finish(self) -> None:
        """Reads what is left of a body its parser stopped reading (at most a few lines)."""
        if self._lines is None or self._response.content.at_eof():
            return
        left = MAX_TRAILING_LINES
        # The answer is complete; a server that keeps the body open after its
        # end marker must not hold it back: then the connection is closed instead.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(MAX_TRAILING_SECONDS):
                async for _ in self._lines:
                    left -= 1
                    if left <= 0:
                        return  # not a short tail: let the connection close rather than read on


async def _lines(content: aiohttp.StreamReader) -> AsyncIterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    async for chunk in content.iter_any():
        text = pending + decoder.decode(chunk)
        # A CR at the end may be the first half of a CRLF: keep it for the next chunk.
        cut = len(text) - 1 if text.endswith("\r") else len(text)
        parts = text[:cut].replace("\r\n", "\n").replace("\r", "\n").split("\n")
        pending = parts.pop() + text[cut:]
        if len(pending) > MAX_LINE_CHARS:
            raise UpstreamError(FailureKind.MALFORMED, "a streamed line is too long")
        for line in parts:
            yield line
    pending += decoder.decode(b"", final=True)
    if pending.rstrip("\r"):
        yield pending.rstrip("\r")


async def sse_data(answer: Answer) -> AsyncIterator[str]:
    """The payload of each ``data:`` line of a server-sent event stream.

    Event names, comments (``: ping``) and blank separators are skipped.
    """
    async for line in answer.lines():
        if line.startswith("data:"):
            yield line[5:].strip()


async def ndjson_lines(answer: Answer) -> AsyncIterator[str]:
    """The non-blank lines of a newline-delimited JSON stream."""
    async for line in answer.lines():
        if line.strip():
            yield line


class TransportErrors:
    """Turns aiohttp's transport errors into UpstreamError inside a ``with`` block."""

    def __enter__(self) -> TransportErrors:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, aiohttp.ClientConnectorError):
            raise UpstreamError(FailureKind.CONNECT, f"cannot connect: {exc}") from exc
        if isinstance(exc, TimeoutError):  # aiohttp's timeouts are TimeoutErrors too
            raise UpstreamError(FailureKind.TIMEOUT, f"timed out: {type(exc).__name__}") from exc
        if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ClientConnectionError):
            raise UpstreamError(FailureKind.STREAM_BROKEN, f"connection lost: {exc}") from exc


async def post_stream(
    http_client: aiohttp.ClientSession,
    url: str,
    parse: Callable[[Answer], AsyncIterator[T]],
    error_of: ErrorOf,
    **kwargs: Any,
) -> AsyncIterator[T]:
    """POSTs a streaming request and yields ``parse``'s events as they arrive.

    A non-200 answer raises ``error_of(status, body, headers)``; transport
    failures raise UpstreamError (see :class:`TransportErrors`).

    Args:
        http_client: The provider's client (from :func:`session`).
        url: The request's URL.
        parse: Turns the open answer into events, incrementally.
        error_of: The provider's reading of its own error bodies.
        **kwargs: Passed to ``aiohttp.ClientSession.post`` (``json``, ``params``).
    """
    with TransportErrors():
        async with http_client.post(url, **kwargs) as response:
            answer = Answer(response)
            if answer.status != 200:
                raise error_of(answer.status, await answer.read(), answer.headers)
            async for event in parse(answer):
                yield event
            await answer.finish()


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
        self._headers = {**self.defaults, **(headers or {}), **self._auth(credential)}
        self._timeouts = (connect_timeout, read_timeout)
        self._session: aiohttp.ClientSession | None = None  # opened on the first call

    async def stream(self, request: UpstreamRequest) -> AsyncIterator[Event]:
        """See :meth:`ProviderAdapter.stream`."""
        if self._session is None:
            connect, read = self._timeouts
            self._session = session(self._headers, connect_timeout=connect, read_timeout=read)
        async for event in post_stream(
            self._session,
            f"{self.base_url}/{self._path(request)}",
            self._events,
            self._error,
            params=self.params,
            json=self._body(request),
        ):
            yield event

    async def aclose(self) -> None:
        """See :meth:`ProviderAdapter.aclose`."""
        if self._session is not None:
            await self._session.close()

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
    def _events(self, answer: Answer) -> AsyncIterator[Event]:
        """The events of an open 200 answer, as they arrive."""

    @abc.abstractmethod
    def _error(self, status: int, body: bytes, headers: Headers) -> UpstreamError:
        """The failure a non-200 answer means."""
