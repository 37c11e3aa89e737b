"""Group commit: concurrent writes of the same kind go to PostgreSQL together.

Each ledger or hold row used to be its own INSERT and its own commit (a WAL
flush). A :class:`Batcher` sends the first item at once; items that arrive
while that write is in flight wait and go together as the next write, one
statement and one commit for all of them. So a lone request pays no extra
latency, and under load the commits per second stop being the limit. The
same coalescing sends concurrent releases of hold rows as one UPDATE
(:mod:`services.budget.holds`), concurrent ledger reads as one SELECT
(:mod:`services.budget.ledger`) and concurrent reads of Redis hold records as
one pipeline (:mod:`services.budget.counters`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

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
