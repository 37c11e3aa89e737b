"""Group commit: concurrent writes of the same kind go to PostgreSQL together.

Each ledger or hold row used to be its own INSERT and its own commit (a WAL
flush). A :class:`Batcher` sends the first item at once; items that arrive
while that write is in flight wait and go together as the next write, one
statement and one commit for all of them. So a lone request pays no extra
latency, and under load the commits per second stop being the limit.
:class:`CoalescedScript` does the same for a Redis Lua script: concurrent
calls go in one pipeline, one round trip.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError

T = TypeVar("T")
R = TypeVar("R")

MAX_BATCH = 256


class Batcher(Generic[T, R]):
    """Coalesces concurrent :meth:`submit` calls into calls of ``flush``.

    ``flush`` gets a list of items and returns one result per item, in order;
    if it raises, every caller of that batch gets the exception.
    """

    def __init__(
        self, flush: Callable[[Sequence[T]], Awaitable[Sequence[R]]], max_batch: int = MAX_BATCH
    ) -> None:
        self._flush = flush
        self._max = max_batch
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._draining = False
        self._task: asyncio.Task[None] | None = None  # keeps the drain task alive

    async def submit(self, item: T) -> R:
        """Writes ``item`` with whatever else is waiting; returns its result."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if not self._draining:
            self._draining = True
            self._task = asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending[: self._max], self._pending[self._max :]
                try:
                    results = await self._flush([item for item, _ in batch])
                except BaseException as exc:  # every waiter of the batch gets it
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    if not isinstance(exc, Exception):  # cancelled: fail the rest too
                        for _, future in self._pending:
                            future.set_exception(exc)
                        self._pending = []
                        raise
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._draining = False


_ScriptCall = tuple[Sequence[str], Sequence[str | int]]


class CoalescedScript:
    """One Lua script whose concurrent calls go to Redis together, in one pipeline.

    A call made while others are on their way waits for them and goes with the
    next group (:class:`Batcher`): a lone call costs one round trip as before,
    and a thousand concurrent ones a few. Each script still runs atomically, in
    the order of the calls; a script's error is raised to its own caller only.
    """

    def __init__(self, client: aioredis.Redis, script: str) -> None:
        self._client = client
        self._script = client.register_script(script)
        self._batcher: Batcher[_ScriptCall, Any] = Batcher(self._run)

    async def __call__(self, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        """The script's reply to this call (its error, raised)."""
        reply = await self._batcher.submit((keys, args))
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def _run(self, calls: Sequence[_ScriptCall]) -> list[Any]:
        if len(calls) == 1:
            keys, args = calls[0]
            return [await self._script(keys=keys, args=args)]
        async with self._client.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                pipe.evalsha(self._script.sha, len(keys), *keys, *args)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        for i, reply in enumerate(replies):
            if isinstance(reply, NoScriptError):  # Redis restarted or flushed its scripts
                keys, args = calls[i]
                try:
                    replies[i] = await self._script(keys=keys, args=args)  # loads it again
                except ResponseError as exc:  # this call's own error, for its caller
                    replies[i] = exc
        return replies
