"""A router's local copy of the model catalog, kept fresh by WatchModels.

Usage::

    stub = discovery_service_pb2_grpc.DiscoveryServiceStub(channel)
    view = ModelCatalogView(stub)
    view.start()
    await view.wait_ready(5.0)
    model = view.get("openai/gpt-4o-mini")
    ...
    await view.stop()

The view applies the stream's snapshot (replacing everything it holds) and
then each ``upserted`` / ``removed`` event. On any error, or when the stream
ends, or when nothing (not even a heartbeat) arrives for ``idle_timeout``
seconds, it reconnects with exponential backoff and jitter; the new stream
starts with a snapshot, so it resyncs. While disconnected it keeps serving the
last catalog it had: a router routes on slightly stale data rather than on
none.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from orchestra.discovery.v1 import discovery_service_pb2 as pb
from orchestra.discovery.v1 import discovery_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

Metadata = Sequence[tuple[str, str]]

# Twice the contract's longest heartbeat interval (30 s) plus slack.
DEFAULT_IDLE_TIMEOUT = 75.0
STOP_WAIT_SECONDS = 5.0


class ModelCatalogView:
    """name -> Model, fed by DiscoveryService.WatchModels."""

    def __init__(
        self,
        stub: pb_grpc.DiscoveryServiceAsyncStub,
        *,
        metadata: Metadata | Callable[[], Metadata] | None = None,
        initial_backoff: float = 0.1,
        max_backoff: float = 10.0,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    ) -> None:
        """Creates the view; call :meth:`start` to connect.

        Args:
            stub: A DiscoveryService stub on an asyncio channel.
            metadata: Call metadata (e.g. a signed identity), or a function
                returning fresh metadata for each (re)connection. Not needed
                when the channel comes from ``services.common.clients.channel``.
            initial_backoff: First delay before reconnecting, seconds.
            max_backoff: Longest delay between reconnections, seconds.
            idle_timeout: Reconnect when no message arrives for this long.
        """
        self._stub = stub
        self._metadata = metadata
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._idle_timeout = idle_timeout
        self._models: dict[str, pb.Model] = {}
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._call: Any = None  # the WatchModels call under way
        self.revision = 0
        self.connected = False
        self.resyncs = 0

    def get(self, name: str) -> pb.Model | None:
        """The model called ``name``, or None if the catalog has none."""
        return self._models.get(name)

    def all(self) -> list[pb.Model]:
        """Every model, by name."""
        return [self._models[name] for name in sorted(self._models)]

    @property
    def ready(self) -> bool:
        """Whether a snapshot has been received at least once."""
        return self._ready.is_set()

    async def wait_ready(self, timeout: float) -> bool:  # noqa: ASYNC109 - the agreed API
        """Waits for the first snapshot.

        Args:
            timeout: Seconds to wait at most.

        Returns:
            True once a snapshot arrived; False if ``timeout`` passed first.
        """
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def start(self) -> None:
        """Starts watching in the background (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="model-catalog-view")

    async def stop(self) -> None:
        """Stops watching; the last catalog stays readable."""
        if self._call is not None:
            # Cancel the call first: a task blocked in read() on an intercepted
            # stream (service channels add identity by interceptor) does not
            # wake on task cancellation alone.
            self._call.cancel()
        if self._task is not None:
            self._task.cancel()
            # Bounded: a stop must never hang, even if a library swallows the
            # cancellation (grpc.aio and redis-py have both been seen to).
            done, _ = await asyncio.wait({self._task}, timeout=STOP_WAIT_SECONDS)
            if not done:
                log.warning("the WatchModels task did not stop in %ss", STOP_WAIT_SECONDS)
            self._task = None
        self.connected = False

    async def __aenter__(self) -> ModelCatalogView:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # --- the watch loop ----------------------------------------------------

    async def _run(self) -> None:
        backoff = self._initial_backoff
        while True:
            synced = False
            try:
                synced = await self._watch_once()
            except grpc.aio.AioRpcError as exc:
                log.warning("WatchModels failed (%s): %s", exc.code().name, exc.details())
            except TimeoutError:
                log.warning("WatchModels silent for %.0fs; reconnecting", self._idle_timeout)
            finally:
                self.connected = False
            # A stream that got as far as a snapshot was healthy: start over
            # with a short delay; repeated failures back off exponentially.
            backoff = self._initial_backoff if synced else min(backoff * 2, self._max_backoff)
            await asyncio.sleep(random.uniform(0.5, 1.0) * backoff)

    async def _watch_once(self) -> bool:
        """Follows one stream until it ends; returns whether it synced."""
        metadata = self._metadata() if callable(self._metadata) else self._metadata
        call = self._stub.WatchModels(pb.WatchModelsRequest(), metadata=metadata)
        self._call = call
        synced = False
        try:
            while True:
                message = await asyncio.wait_for(call.read(), self._idle_timeout)
                if message is grpc.aio.EOF:
                    log.info("WatchModels stream ended; reconnecting")
                    return synced
                assert isinstance(message, pb.WatchModelsResponse)
                synced = self._apply(message) or synced
        finally:
            call.cancel()
            self._call = None

    def _apply(self, message: pb.WatchModelsResponse) -> bool:
        kind = message.WhichOneof("event")
        if kind == "snapshot":
            self._models = {m.name: m for m in message.snapshot.models}
            self.resyncs += 1
            self.connected = True
            self._ready.set()
            self.revision = message.revision
            return True
        if kind == "upserted":
            self._models[message.upserted.name] = message.upserted
        elif kind == "removed":
            self._models.pop(message.removed, None)
        self.revision = max(self.revision, message.revision)
        return False
