"""Fault plumbing shared by the fake provider upstreams (OpenAI, Anthropic, Gemini, Ollama).

A provider fake subclasses :class:`FakeUpstream` and writes only the wire format: its
``routes()``, its error body (``fault_response()``) and the events of its stream. The
base class owns the rest:

* lifecycle: ``await fake.start(host, port=0)``, ``fake.url``, ``await fake.stop()``,
  ``async with fake:``; a real connect failure: ``await fake.refuse_connections()``
  drops every open connection and closes the listening socket (clients get
  ECONNREFUSED) until ``await fake.accept_connections()`` listens again on the same
  port; ``await fake.serve_forever(host, port)`` for a ``__main__`` (with
  :func:`add_knob_arguments` / :func:`knobs_from` for the shared flags);
* the scripted reply's :class:`Knobs`: ``reply_text``, ``chunks``,
  ``first_token_delay``, ``chunk_delay``, ``api_key`` (plain attributes);
* the request log: ``fake.requests``, a :class:`RecordedRequest` per HTTP request
  (path, headers, JSON body, the fault it got, status, how its stream ended);
* stream tracking: ``fake.open_streams``, ``await fake.wait_for_streams_closed()``
  and ``await fake.wait_for_requests(n)``, so a test can assert that cancelling a
  call closed the upstream stream;
* the fault plan: ``fake.set_fault(fault, model=None, times=None, endpoint="chat")``
  and ``fake.clear_faults(model=None)``. A rule for the request's model wins over a
  model-agnostic one, then first set, first used; ``times=None`` lasts until cleared.
  Endpoints are named alike in every fake: ``"chat"`` (generation) and ``"models"``.

Faults are :class:`Fault` values from its class methods (``Fault.rate_limit(
retry_after=2)``, ``Fault.stream_cut(after_chunks=3)``, ``Fault.timeout(delay=30)``...)
or a bare :class:`FaultKind` with default parameters. A handler calls
:meth:`FakeUpstream.take_fault` then :meth:`FakeUpstream.apply_fault` (error statuses,
dropped or hung connections, and the stream kinds for a request without a stream);
for a stream it hands its framed events to :meth:`FakeUpstream.write_stream`, which
applies the stream kinds and tracks the stream.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import contextlib
import enum
import itertools
import json
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Self, TypedDict, Unpack

from aiohttp import web
from aiohttp.log import access_logger
from multidict import CIMultiDict, CIMultiDictProxy

JsonDict = dict[str, Any]


class FaultKind(enum.StrEnum):
    """What goes wrong. K is ``Fault.after_chunks``, D is ``Fault.delay``."""

    RATE_LIMIT = "rate_limit"  # 429 with Retry-After
    SERVER_ERROR = "server_error"  # 500
    BAD_GATEWAY = "bad_gateway"  # 502
    UNAVAILABLE = "unavailable"  # 503
    HTTP_ERROR = "http_error"  # any status, given in Fault.status
    DISCONNECT = "disconnect"  # close the socket without answering
    TIMEOUT = "timeout"  # say nothing for D seconds, then close the socket
    STREAM_CUT = "stream_cut"  # close the socket after K stream events
    MALFORMED_CHUNK = "malformed_chunk"  # after K events, one that is not JSON
    STREAM_ERROR = "stream_error"  # after K events, the in-stream error event
    SLOW_FIRST_TOKEN = "slow_first_token"  # D more seconds before the first event


_STATUS = {
    FaultKind.RATE_LIMIT: 429,
    FaultKind.SERVER_ERROR: 500,
    FaultKind.BAD_GATEWAY: 502,
    FaultKind.UNAVAILABLE: 503,
}
_AFTER_CHUNKS = {
    FaultKind.STREAM_CUT: 2,
    FaultKind.MALFORMED_CHUNK: 1,
    FaultKind.STREAM_ERROR: 2,
}


@dataclass(frozen=True)
class Fault:
    """One injected failure; use the class methods rather than the constructor."""

    kind: FaultKind
    status: int = 0  # HTTP status of the error kinds
    retry_after: float | None = None  # seconds, sent as Retry-After
    after_chunks: int | None = None  # stream events sent before a stream fault fires
    delay: float = 0.0  # TIMEOUT: how long to hang; SLOW_FIRST_TOKEN: the extra delay
    message: str | None = None  # overrides the provider's default error message

    @classmethod
    def of(cls, kind: FaultKind) -> Fault:
        """The fault of ``kind`` with its default parameters."""
        if kind is FaultKind.HTTP_ERROR:
            raise ValueError("HTTP_ERROR needs a status: use Fault.http_error(status)")
        return cls(
            kind,
            status=_STATUS.get(kind, 0),
            after_chunks=_AFTER_CHUNKS.get(kind),
            delay=3600.0 if kind is FaultKind.TIMEOUT else 5.0,
            retry_after=1.0 if kind is FaultKind.RATE_LIMIT else None,
        )

    @classmethod
    def rate_limit(cls, retry_after: float | None = 1.0, message: str | None = None) -> Fault:
        return cls(FaultKind.RATE_LIMIT, status=429, retry_after=retry_after, message=message)

    @classmethod
    def http_error(cls, status: int, message: str | None = None) -> Fault:
        """A 5xx (or any) status: 500/502/503 map to their own kinds, others to HTTP_ERROR."""
        kind = {v: k for k, v in _STATUS.items()}.get(status, FaultKind.HTTP_ERROR)
        return cls(kind, status=status, message=message)

    @classmethod
    def disconnect(cls) -> Fault:
        return cls(FaultKind.DISCONNECT)

    @classmethod
    def timeout(cls, delay: float = 3600.0, after_chunks: int | None = None) -> Fault:
        """Hang ``delay`` seconds then drop: before the response, or after K stream events."""
        return cls(FaultKind.TIMEOUT, delay=delay, after_chunks=after_chunks)

    @classmethod
    def stream_cut(cls, after_chunks: int = 2) -> Fault:
        return cls(FaultKind.STREAM_CUT, after_chunks=after_chunks)

    @classmethod
    def malformed_chunk(cls, after_chunks: int = 1) -> Fault:
        return cls(FaultKind.MALFORMED_CHUNK, after_chunks=after_chunks)

    @classmethod
    def stream_error(cls, after_chunks: int = 2, message: str | None = None) -> Fault:
        return cls(FaultKind.STREAM_ERROR, after_chunks=after_chunks, message=message)

    @classmethod
    def slow_first_token(cls, delay: float = 5.0) -> Fault:
        return cls(FaultKind.SLOW_FIRST_TOKEN, delay=delay)

    @property
    def is_http_error(self) -> bool:
        return self.status >= 400

    def fires_after(self, sent: int) -> bool:
        """True when a stream fault is due, ``sent`` stream events having gone out."""
        return self.after_chunks is not None and sent == self.after_chunks


@dataclass
class _Rule:
    fault: Fault
    model: str | None
    endpoint: str | None
    remaining: int | None


class FaultPlan:
    """Which fault the next matching request gets."""

    def __init__(self) -> None:
        self._rules: list[_Rule] = []

    def add(
        self,
        fault: Fault | FaultKind,
        *,
        model: str | None = None,
        endpoint: str | None = "chat",
        times: int | None = None,
    ) -> None:
        """Queue ``fault`` for requests to ``model`` (any if None) on ``endpoint`` (any if None)."""
        if isinstance(fault, FaultKind):
            fault = Fault.of(fault)
        self._rules.append(_Rule(fault, model, endpoint, times))

    def clear(self, *, model: str | None = None) -> None:
        """Drop every rule, or only the rules for ``model``."""
        self._rules = [r for r in self._rules if model is not None and r.model != model]

    def take(self, *, model: str | None, endpoint: str) -> Fault | None:
        """The fault for this request, using up one of its ``times``."""
        candidates = [r for r in self._rules if r.endpoint in (None, endpoint)]
        specific = [r for r in candidates if r.model is not None and r.model == model]
        rule = next(iter(specific or [r for r in candidates if r.model is None]), None)
        if rule is None:
            return None
        if rule.remaining is not None:
            rule.remaining -= 1
            if rule.remaining <= 0:
                self._rules.remove(rule)
        return rule.fault


@dataclass
class RecordedRequest:
    """One request the fake received, and what became of it."""

    method: str
    path: str
    query: dict[str, str]
    headers: CIMultiDictProxy[str]
    raw_body: bytes
    body: JsonDict | None  # the JSON body when it is an object
    received_at: float = field(default_factory=time.monotonic)
    fault: Fault | None = None  # the fault this request was given
    status: int | None = None  # None when the connection was dropped before any response
    streamed: bool = False
    events_sent: int = 0  # stream events (SSE data lines, NDJSON lines) written
    completed: bool = False  # the response was written to its normal end
    client_disconnected: bool = False  # the client went away before the end
    closed_at: float | None = None
    peer: tuple[str, int] | None = None  # the client's (address, port): one per TCP connection


RECORD_KEY = web.RequestKey("fake_upstream_record", RecordedRequest)


class Knobs(TypedDict, total=False):
    """The scripted-reply settings every fake takes (and keeps as attributes)."""

    api_key: str | None  # when set, requests must carry it
    reply_text: str  # the answer, split into `chunks` deltas
    chunks: int
    first_token_delay: float  # seconds before the first stream event
    chunk_delay: float  # seconds between output deltas


def approx_tokens(text: str) -> int:
    """The fakes' token count for a piece of prompt text."""
    return len(text) // 4 + 1


def split_text(text: str, pieces: int) -> list[str]:
    """``text`` in ``pieces`` contiguous, roughly equal, non-empty parts (fewer if short)."""
    n = max(1, min(pieces, len(text)))
    if not text:
        return [""]
    bounds = [round(i * len(text) / n) for i in range(n + 1)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def add_knob_arguments(parser: argparse.ArgumentParser, *, default_port: int) -> None:
    """The command-line flags every fake's ``__main__`` shares (see :func:`knobs_from`)."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=default_port, help="0 picks a free port")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="before the first token")
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0, help="between deltas")
    parser.add_argument("--chunks", type=int, default=8, help="deltas in a reply")
    parser.add_argument("--reply-text", default="Hello from the fake upstream.")
    parser.add_argument("--api-key", default=None, help="require this key")


def knobs_from(args: argparse.Namespace) -> Knobs:
    return Knobs(
        api_key=args.api_key,
        reply_text=args.reply_text,
        chunks=args.chunks,
        first_token_delay=args.latency_ms / 1000,
        chunk_delay=args.chunk_delay_ms / 1000,
    )


def json_response(
    body: JsonDict, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps(body),
        content_type="application/json",
        headers=headers,
    )


def drop_connection(request: web.Request) -> None:
    """Close the client's socket now, mid-response or before any response."""
    if request.transport is not None:
        request.transport.close()


def record(request: web.Request) -> RecordedRequest:
    return request[RECORD_KEY]


class FakeUpstream(abc.ABC):
    """Server lifecycle, request log, stream tracking and fault plan for a provider fake."""

    def __init__(self, **knobs: Unpack[Knobs]) -> None:
        self.api_key = knobs.get("api_key")
        self.reply_text = knobs.get("reply_text", "Hello from the fake upstream.")
        self.chunks = knobs.get("chunks", 8)
        self.first_token_delay = knobs.get("first_token_delay", 0.0)
        self.chunk_delay = knobs.get("chunk_delay", 0.0)
        self.faults = FaultPlan()
        self.requests: list[RecordedRequest] = []
        self.host = "127.0.0.1"
        self.port = 0
        self.access_log = False  # log each request to aiohttp.access (set before start)
        self._runner: web.AppRunner | None = None
        self._inflight: set[asyncio.Transport] = set()  # sockets with a request under way
        self._open_streams = 0
        self._changed = asyncio.Event()  # set on every new request or closed stream

    # -- to implement -------------------------------------------------------------
    @abc.abstractmethod
    def routes(self) -> list[web.RouteDef]:
        """The provider's HTTP routes."""

    @abc.abstractmethod
    def fault_response(self, fault: Fault, model: str | None) -> web.Response:
        """The provider's error response for an HTTP error fault."""

    # -- lifecycle ----------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port
        self._changed = asyncio.Event()  # bound to this event loop
        await self.accept_connections()

    async def stop(self) -> None:
        await self.refuse_connections()

    async def accept_connections(self) -> None:
        """Listen (again) on ``host``/``port``; the port is kept across restarts."""
        if self._runner is not None:
            return
        app = web.Application(middlewares=[self._recorder])
        app.add_routes(self.routes())
        log = access_logger if self.access_log else None
        runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5, access_log=log)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        await site.start()
        self._runner = runner
        self.port = runner.addresses[0][1]

    async def refuse_connections(self) -> None:
        """Drop every connection and stop listening: new connects are refused."""
        if self._runner is None:
            return
        runner, self._runner = self._runner, None
        for transport in list(self._inflight):
            transport.close()
        await runner.cleanup()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The base URL a client of this provider is given."""
        return self.base_url

    async def serve_forever(self, host: str, port: int) -> None:
        """Serve until SIGINT or SIGTERM; print the URL first (for a parent process)."""
        await self.start(host, port)
        print(f"{type(self).__name__} listening on {self.url}", flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await self.stop()

    async def __aenter__(self) -> Self:
        if self._runner is None:
            await self.start(self.host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- faults -------------------------------------------------------------------
    def set_fault(
        self,
        fault: Fault | FaultKind,
        *,
        model: str | None = None,
        times: int | None = None,
        endpoint: str | None = "chat",
    ) -> None:
        self.faults.add(fault, model=model, endpoint=endpoint, times=times)

    def clear_faults(self, *, model: str | None = None) -> None:
        self.faults.clear(model=model)

    def take_fault(self, request: web.Request, *, model: str | None, endpoint: str) -> Fault | None:
        fault = self.faults.take(model=model, endpoint=endpoint)
        if fault is not None:
            record(request).fault = fault
        return fault

    async def apply_fault(
        self, request: web.Request, fault: Fault, model: str | None, *, streaming: bool
    ) -> web.Response | None:
        """Act on ``fault`` before the normal response; None means "go on answering".

        Error kinds get :meth:`fault_response`; DISCONNECT drops the socket; TIMEOUT
        hangs then drops. For a streaming request the stream kinds are left to the
        stream writer. Without a stream they mean: STREAM_CUT drops the socket,
        TIMEOUT (any K) hangs then drops, STREAM_ERROR is a 500, MALFORMED_CHUNK is a
        200 whose JSON body is cut short, SLOW_FIRST_TOKEN delays the answer.
        """
        kind = fault.kind
        if fault.is_http_error:
            return self.fault_response(fault, model)
        if streaming and kind is not FaultKind.DISCONNECT and fault.after_chunks is not None:
            return None
        if kind is FaultKind.TIMEOUT:
            await asyncio.sleep(fault.delay)
        if kind in (FaultKind.DISCONNECT, FaultKind.TIMEOUT, FaultKind.STREAM_CUT):
            drop_connection(request)
            return web.Response()
        if kind is FaultKind.STREAM_ERROR:
            return self.fault_response(Fault.http_error(500, fault.message), model)
        if kind is FaultKind.MALFORMED_CHUNK:
            return web.Response(text='{"id": "trunc', content_type="application/json")
        if kind is FaultKind.SLOW_FIRST_TOKEN and not streaming:
            await asyncio.sleep(fault.delay)
        return None

    # -- streams and the request log ----------------------------------------------
    @property
    def open_streams(self) -> int:
        return self._open_streams

    async def write_stream(
        self,
        request: web.Request,
        response: web.StreamResponse,
        events: Sequence[tuple[float, bytes]],
        *,
        malformed: bytes,
        error_event: bytes,
    ) -> web.StreamResponse:
        """Send the headers, then each framed event after its delay, applying stream faults.

        The first event also waits a SLOW_FIRST_TOKEN fault's delay. When the request's
        fault fires (:meth:`Fault.fires_after` the events sent so far): MALFORMED_CHUNK
        writes ``malformed`` and goes on, STREAM_ERROR writes ``error_event`` and ends the
        body there, STREAM_CUT drops the socket, TIMEOUT hangs for its delay then drops
        it. The stream counts in :attr:`open_streams` until it ends; a client that left
        early is recorded as ``client_disconnected``.
        """
        rec = record(request)
        fault, rec.streamed = rec.fault, True
        self._open_streams += 1
        try:
            await response.prepare(request)
            rec.status = response.status
            for index, (delay, data) in enumerate(events):
                if index == 0 and fault is not None and fault.kind is FaultKind.SLOW_FIRST_TOKEN:
                    delay += fault.delay
                if delay > 0:
                    await asyncio.sleep(delay)
                if fault is not None and fault.fires_after(rec.events_sent):
                    if fault.kind is FaultKind.MALFORMED_CHUNK:
                        await response.write(malformed)
                    elif fault.kind is FaultKind.STREAM_ERROR:
                        await response.write(error_event)
                        return response
                    else:  # STREAM_CUT, or TIMEOUT mid-stream
                        if fault.kind is FaultKind.TIMEOUT:
                            await asyncio.sleep(fault.delay)
                        drop_connection(request)
                        return response
                await response.write(data)
                rec.events_sent += 1
            rec.completed = True
        except asyncio.CancelledError:  # the client left (aiohttp cancels the handler)
            rec.client_disconnected = True
            raise
        except ConnectionError:
            rec.client_disconnected = True
        finally:
            self._open_streams -= 1
            self._changed.set()
            rec.closed_at = time.monotonic()
        return response

    async def wait_for_streams_closed(self, within: float = 5.0) -> bool:
        """Wait until no stream is open; False if one still is after ``within`` seconds."""
        return await self._wait_until(lambda: self._open_streams == 0, within)

    async def wait_for_requests(self, count: int, within: float = 5.0) -> bool:
        """Wait until ``count`` requests have arrived; False if not within ``within`` s."""
        return await self._wait_until(lambda: len(self.requests) >= count, within)

    async def _wait_until(self, condition: Callable[[], bool], within: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while not condition():
                    self._changed.clear()
                    if not condition():
                        await self._changed.wait()
        return condition()

    @web.middleware
    async def _recorder(self, request: web.Request, handler: Any) -> web.StreamResponse:
        raw = await request.read()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        rec = RecordedRequest(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers=CIMultiDictProxy(CIMultiDict(request.headers)),
            raw_body=raw,
            body=parsed if isinstance(parsed, dict) else None,
        )
        self.requests.append(rec)
        self._changed.set()
        request[RECORD_KEY] = rec
        transport = request.transport
        if transport is not None:
            self._inflight.add(transport)
            peer = transport.get_extra_info("peername")
            rec.peer = (str(peer[0]), int(peer[1])) if peer else None
        try:
            response: web.StreamResponse = await handler(request)
            if transport is not None and not transport.is_closing():
                rec.status = response.status
                rec.completed = rec.completed or not rec.streamed
            return response
        finally:
            if transport is not None:
                self._inflight.discard(transport)
