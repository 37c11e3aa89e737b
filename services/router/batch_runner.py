"""The batch runner: each router replica runs queued batch items in the background.

Every replica's runner claims items from the same Redis queues
(:mod:`services.router.batch_store`), best batches first, up to ``slots`` at
once, and answers each one through the engine as a unary chat would. The
store's Lua scripts keep a batch under its ``max_concurrency`` across
replicas and count each result once; an item whose replica dies is queued
again when its lease expires, under the same request id, so it is charged
once however many times it runs. A stopping replica lets running items finish
for a grace period, then queues them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis.exceptions import RedisError

from orchestra.common.v1 import errors_pb2, identity_pb2
from orchestra.router.v1 import router_service_pb2 as router_api
from services.common.errors import Internal, OrchestraError, reason_name
from services.router.batch_store import ITEM_DEADLINE_SECONDS, BatchStore, Claimed
from services.router.engine import Engine

log = logging.getLogger(__name__)


class BatchRunner:
    """Runs queued batch items through the engine, in the background of a router.

    Args:
        store: The batches.
        engine: Answers each item as a unary chat would.
        slots: Items this replica runs at once, over all batches.
        poll: Seconds between looks for work when there was none.
    """

    def __init__(
        self, store: BatchStore, engine: Engine, *, slots: int = 8, poll: float = 1.0
    ) -> None:
        self.store = store
        self._engine = engine
        self._slots = slots
        self._poll = poll
        self._wake = asyncio.Event()
        self._running: dict[asyncio.Task[None], Claimed] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        """Starts looking for work."""
        self._stopping = False
        self._loop_task = asyncio.create_task(self._loop())

    async def create(
        self, identity: identity_pb2.Identity, request: router_api.CreateBatchRequest
    ) -> router_api.Batch:
        """Queues a batch (see :meth:`BatchStore.create`) and starts on it."""
        batch = await self.store.create(identity, request, self._engine.max_request_bytes)
        self._wake.set()
        return batch

    async def stop(self, grace: float = 5.0) -> None:
        """Stops claiming; lets running items finish for ``grace`` seconds, then re-queues them."""
        # The loop is asked to stop rather than cancelled: a Redis call cancelled
        # while its connection is being set up can leave the client waiting.
        self._stopping = True
        self._wake.set()
        if self._loop_task is not None:
            done, _ = await asyncio.wait({self._loop_task}, timeout=grace)
            if not done:
                self._loop_task.cancel()
        if self._running:
            await asyncio.wait(list(self._running), timeout=grace)
        for task, item in list(self._running.items()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            with contextlib.suppress(RedisError):
                await self.store.release(item)

    async def _loop(self) -> None:
        while not self._stopping:
            try:
                claimed = await self._fill()
            except RedisError as exc:
                log.warning("batch runner: Redis unavailable (%s); retrying", exc)
                claimed = False
            if self._stopping:
                return
            if not claimed or len(self._running) >= self._slots:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._poll)

    async def _fill(self) -> bool:
        """Claims items into free slots, best batches first; True if any was claimed."""
        claimed = False
        for ref in await self.store.ready():
            while len(self._running) < self._slots and not self._stopping:
                item = await self.store.claim(ref)
                if isinstance(item, str):
                    break
                task = asyncio.create_task(self._run(item))
                self._running[task] = item
                task.add_done_callback(self._done)
                claimed = True
            if len(self._running) >= self._slots:
                break
        return claimed

    def _done(self, task: asyncio.Task[None]) -> None:
        self._running.pop(task, None)
        self._wake.set()  # a slot is free

    async def _run(self, item: Claimed) -> None:
        identity = await self.store.identity(item.ref)
        # A re-run (item.attempts > 0) keeps the item's request id, so budget
        # sees the same request: its Reserve returns the earlier attempt's
        # hold, and the settle charges the item once (a hold the reaper
        # charged in full is corrected to the real cost; a settled one stays).
        request = item.request
        result = router_api.BatchResult(custom_id=item.custom_id)
        cost = 0
        try:
            response = await self._engine.chat(identity, request, ITEM_DEADLINE_SECONDS)
            result.response.CopyFrom(response)
            cost = response.cost_micro_usd
        except OrchestraError as exc:
            result.error.CopyFrom(_item_error(exc))
        except Exception:
            log.exception("batch %s item %s failed", item.ref, item.custom_id)
            result.error.CopyFrom(
                _item_error(Internal(errors_pb2.ERROR_REASON_INTERNAL, "internal error"))
            )
        await self.store.finish(item, result, cost)


def _item_error(error: OrchestraError) -> router_api.BatchItemError:
    """The item's failure as the result shows it: the status a unary chat would get."""
    return router_api.BatchItemError(
        code=error.status_number, reason=reason_name(error.reason), message=error.message
    )
