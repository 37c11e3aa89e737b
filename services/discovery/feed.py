"""The in-process model feed behind WatchModels.

:class:`ModelFeed` holds the current catalog (name -> ``Model``). Whoever
changes the catalog (a discovery pass, a provider RPC, the periodic refresh)
hands it the complete new catalog with :meth:`ModelFeed.replace`; the feed
diffs it against what it holds and fans out one ``upserted`` or ``removed``
event per real change, each with the next revision. Changes that are not
material (only ``last_seen_time`` or the probe time moved) update the held
copy silently, so a steady pass does not wake every router.

Each watcher is a :class:`Subscription` with a bounded queue. A watcher that
falls more than ``queue_size`` events behind is cut off (:class:`Lagging`) and
resyncs from a new snapshot when it reconnects; one slow router never holds
back the others or grows memory without bound.

Revisions start at the process's start time in milliseconds and grow by one
per event, so they keep increasing across restarts of a replica. They are per
replica: a watcher that reconnects to another replica resyncs from its
snapshot. Other replicas' changes reach this feed through
:mod:`services.discovery.fanout` (PostgreSQL LISTEN/NOTIFY), which makes it
rebuild from the database.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from orchestra.discovery.v1 import discovery_service_pb2 as pb

DEFAULT_QUEUE_SIZE = 1000


class FeedError(Exception):
    """Base of the reasons a subscription ends."""


class Lagging(FeedError):
    """The watcher fell too far behind; it must resync."""


class FeedClosed(FeedError):
    """The feed is shutting down."""


def material(model: pb.Model) -> bytes:
    """The parts of a model whose change is worth an event."""
    copy = pb.Model()
    copy.CopyFrom(model)
    copy.ClearField("last_seen_time")
    copy.health.ClearField("last_probe_time")
    return copy.SerializeToString(deterministic=True)


class Subscription:
    """One watcher: the snapshot it started from, then the events since."""

    def __init__(self, feed: ModelFeed, snapshot: list[pb.Model], revision: int, size: int):
        self.snapshot = snapshot
        self.revision = revision
        self._feed = feed
        self._queue: asyncio.Queue[pb.WatchModelsResponse] = asyncio.Queue(size)
        self._error: FeedError | None = None
        self._wakeup = asyncio.Event()

    def _offer(self, event: pb.WatchModelsResponse) -> None:
        if self._error is not None:
            return
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self._end(Lagging("watcher fell behind; reconnect to resync"))
            return
        self._wakeup.set()

    def _end(self, error: FeedError) -> None:
        self._error = error
        self._wakeup.set()

    async def next(self, wait_seconds: float) -> pb.WatchModelsResponse | None:
        """The next event, or None if none came within ``wait_seconds``.

        Raises:
            Lagging: The watcher was cut off for falling behind.
            FeedClosed: The feed shut down.
        """
        if self._queue.empty() and self._error is None:
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), wait_seconds)
            except TimeoutError:
                return None
        if self._error is not None:
            raise self._error
        return self._queue.get_nowait()

    def close(self) -> None:
        """Stops receiving events."""
        self._feed._subscribers.discard(self)


class ModelFeed:
    """The current catalog and its watchers."""

    def __init__(self, *, queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        self._models: dict[str, pb.Model] = {}
        self._material: dict[str, bytes] = {}
        self._by_provider: dict[str, set[str]] = {}  # provider id -> model names
        self._subscribers: set[Subscription] = set()
        self._queue_size = queue_size
        self.revision = int(time.time() * 1000)
        # Set by the first replace(): a watcher must never get the empty
        # catalog of a server that has not loaded it yet as its snapshot.
        self.loaded = asyncio.Event()

    def get(self, name: str) -> pb.Model | None:
        """The model called ``name``, or None."""
        return self._models.get(name)

    def all(self) -> list[pb.Model]:
        """Every model, by name."""
        return [self._models[name] for name in sorted(self._models)]

    def replace(self, models: Iterable[pb.Model], *, provider_id: str | None = None) -> int:
        """Makes the catalog exactly ``models``; publishes what changed.

        Args:
            models: The new catalog, or with ``provider_id`` that provider's part.
            provider_id: Replace only this provider's models (names
                "<provider_id>/…"); the rest of the catalog stays as it is.

        Returns:
            The number of events published.
        """
        incoming = {m.name: m for m in models}
        if provider_id is None:
            held = set(self._models)
        else:
            held = set(self._by_provider.get(provider_id, ()))
        events: list[pb.WatchModelsResponse] = []
        for name in sorted(held - set(incoming)):
            owner = self._models[name].provider_id
            self._by_provider[owner].discard(name)
            del self._models[name], self._material[name]
            self.revision += 1
            events.append(pb.WatchModelsResponse(revision=self.revision, removed=name))
        for name in sorted(incoming):
            model = incoming[name]
            digest = material(model)
            changed = self._material.get(name) != digest
            self._models[name], self._material[name] = model, digest
            self._by_provider.setdefault(model.provider_id, set()).add(name)
            if changed:
                self.revision += 1
                events.append(pb.WatchModelsResponse(revision=self.revision, upserted=model))
        for subscriber in list(self._subscribers):
            for event in events:
                subscriber._offer(event)
        if provider_id is None:  # one provider's part is not a catalog to start from
            self.loaded.set()
        return len(events)

    def subscribe(self) -> Subscription:
        """A new watcher, starting from a snapshot of the current catalog."""
        subscription = Subscription(self, self.all(), self.revision, self._queue_size)
        self._subscribers.add(subscription)
        return subscription

    def close(self) -> None:
        """Ends every subscription (the server is stopping)."""
        for subscriber in list(self._subscribers):
            subscriber._end(FeedClosed("discovery is shutting down; reconnect"))
        self._subscribers.clear()
