"""Many small calls over one long-lived bidirectional stream.

``BudgetService.ReserveStream`` and ``CacheService.LookupStream`` carry the
requests of a unary RPC, each tagged with a ``call_id``, and answer each with
that id and either the unary RPC's response or the ``google.rpc.Status`` it
would have failed with. A unary gRPC call in Python costs about twice the
CPU of one message on an open stream (call setup, metadata, the identity
check, a handler task on the server), and the router makes two on every chat
before the provider is called.

`serve` is the server side: it runs each item through the unary RPC's own
code path, concurrently, and answers items as they finish. `Multiplexer` is
the client side: one stream per peer, futures keyed by ``call_id``, a fresh
stream every `RENEW_SECONDS` (so that the identity token is re-verified and a
mesh or Envoy can spread streams over replicas). When the stream cannot carry
an item (the peer is an older replica without the RPC, or the stream broke
before the item was answered) `Multiplexer.call` raises `StreamUnusable` and
the caller sends that item as a unary call, which the channel retries.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Generic, TypeVar

import grpc

from services.common import batches
from services.common.errors import dependency_unavailable, from_rpc_status

log = logging.getLogger(__name__)

Q = TypeVar("Q")
R = TypeVar("R")
M = TypeVar("M")

RENEW_SECONDS = 60.0
"""A stream takes new items for this long; then the next item opens a new one."""
UNIMPLEMENTED_RETRY_SECONDS = 60.0
"""After a peer answered UNIMPLEMENTED, items go unary for this long."""


# --- server side --------------------------------------------------------------


async def serve(
    items: AsyncIterator[Any],
    handle: Callable[[Any], Awaitable[Any]],
    method: str,
    result: Callable[..., M],
) -> AsyncIterator[M]:
    """Answers every item of a request stream as ``handle`` finishes it.

    Args:
        items: The stream's messages, each with ``call_id`` and ``request``.
        handle: The unary RPC's code path for one request.
        method: The RPC's name, for the log of an unexpected error.
        result: The answer message class, built with ``call_id`` and either
            ``response`` or ``error`` (`batches.outcome`).

    Yields:
        One answer per item, in the order they finish. The stream ends once
        the caller has stopped sending and every item is answered.
    """
    answers: asyncio.Queue[M | None] = asyncio.Queue()
    running: set[asyncio.Task[None]] = set()

    async def one(call_id: int, request: Any) -> None:
        answers.put_nowait(await batches.outcome(request, handle, method, result, call_id=call_id))

    async def read() -> None:
        try:
            async for item in items:
                task = asyncio.create_task(one(item.call_id, item.request))
                running.add(task)
                task.add_done_callback(running.discard)
            if running:
                await asyncio.wait(set(running))
        finally:
            answers.put_nowait(None)

    reader = asyncio.create_task(read())
    try:
        while (answer := await answers.get()) is not None:
            yield answer
        await reader  # a failure to read the stream ends the call with it
    finally:
        reader.cancel()
        for task in list(running):
            task.cancel()


# --- client side --------------------------------------------------------------


class StreamUnusable(Exception):
    """The stream could not carry this item; send it as a unary call instead."""


class _Stream:
    """One open call and the items waiting for its answers."""

    def __init__(self, call: Any, opened: float) -> None:
        self.call = call
        self.opened = opened
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.write_lock = asyncio.Lock()
        self.reader: asyncio.Task[None] | None = None
        self.closer: asyncio.Task[None] | None = None  # half-closes a retired stream


class Multiplexer(Generic[Q, R]):
    """Unary-like calls to a peer over one long-lived bidirectional stream.

    Args:
        open_stream: Opens the stream RPC (the stub's method, with the call's
            metadata bound).
        item: Builds a stream message from a call id and a request.
        dependency: The peer's name, for errors.
        clock: Monotonic seconds (tests pass their own).
    """

    def __init__(
        self,
        open_stream: Callable[[], Any],
        item: Callable[[int, Q], Any],
        dependency: str,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._open = open_stream
        self._item = item
        self._dependency = dependency
        self._clock = clock
        self._ids = itertools.count(1)
        self._stream: _Stream | None = None
        self._unary_until = 0.0

    async def call(self, request: Q, deadline_seconds: float) -> R:
        """The peer's response to ``request``.

        Raises:
            StreamUnusable: The item was not answered on the stream; the
                caller should send it as a unary call.
            OrchestraError: The peer refused or failed the item (its status,
                forwarded), or gave no answer within ``deadline_seconds``
                (UNAVAILABLE DEPENDENCY_UNAVAILABLE, as for a unary call).
        """
        if self._clock() < self._unary_until:
            raise StreamUnusable("the peer does not offer the stream")
        stream = self._current()
        call_id = next(self._ids)
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        stream.pending[call_id] = answer
        try:
            async with stream.write_lock:
                if stream.call.done():  # ended while this item waited to be written
                    raise StreamUnusable("the stream has ended")
                await stream.call.write(self._item(call_id, request))
            outcome = await asyncio.wait_for(answer, deadline_seconds)
        except TimeoutError:
            raise dependency_unavailable(self._dependency, "DEADLINE_EXCEEDED") from None
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            await self._settled(stream)
            raise StreamUnusable(str(exc)) from None
        except StreamUnusable:
            await self._settled(stream)
            raise
        finally:
            stream.pending.pop(call_id, None)
        if outcome.WhichOneof("outcome") == "error":
            raise from_rpc_status(outcome.error, dependency=self._dependency)
        response: R = outcome.response
        return response

    async def _settled(self, stream: _Stream) -> None:
        """Lets the reader of an ended stream record how it ended (UNIMPLEMENTED
        sends the next items unary) before the caller falls back."""
        if stream.reader is not None and stream.call.done():
            await asyncio.wait([stream.reader], timeout=1.0)

    def _current(self) -> _Stream:
        now = self._clock()
        stream = self._stream
        if stream is not None and now - stream.opened >= RENEW_SECONDS:
            self._retire(stream)
            stream = None
        if stream is None:
            stream = _Stream(self._open(), now)
            stream.reader = asyncio.create_task(self._read(stream), name="stream-reader")
            self._stream = stream
        return stream

    def _retire(self, stream: _Stream) -> None:
        """Takes no new items on ``stream``; it ends once its answers are in."""
        if self._stream is stream:
            self._stream = None
        if stream.closer is None:
            stream.closer = asyncio.create_task(self._done_writing(stream))

    async def _done_writing(self, stream: _Stream) -> None:
        try:
            async with stream.write_lock:
                if not stream.call.done():
                    await stream.call.done_writing()
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            pass  # already ended; the reader fails what is left

    async def _read(self, stream: _Stream) -> None:
        failure: BaseException = StreamUnusable("the stream ended before answering")
        try:
            async for outcome in stream.call:
                waiter = stream.pending.get(outcome.call_id)
                if waiter is not None and not waiter.done():
                    waiter.set_result(outcome)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                self._unary_until = self._clock() + UNIMPLEMENTED_RETRY_SECONDS
            elif exc.code() != grpc.StatusCode.CANCELLED:
                log.warning("%s stream lost: %s", self._dependency, exc.code().name)
            failure = StreamUnusable(f"{exc.code().name}: {exc.details()}")
        except asyncio.CancelledError:
            failure = StreamUnusable("the stream was closed")
            raise
        finally:
            self._retire(stream)
            for waiter in stream.pending.values():
                if not waiter.done():
                    waiter.set_exception(failure)

    async def aclose(self) -> None:
        """Ends the current stream; items still waiting go unary."""
        stream = self._stream
        if stream is None:
            return
        self._retire(stream)
        stream.call.cancel()
        if stream.reader is not None:
            await asyncio.wait([stream.reader], timeout=1.0)


__all__ = ["RENEW_SECONDS", "Multiplexer", "StreamUnusable", "serve"]
