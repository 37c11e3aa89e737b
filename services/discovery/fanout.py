"""Catalog changes between discovery replicas, by PostgreSQL LISTEN/NOTIFY.

Every replica serves WatchModels from its own in-process feed. When one
replica changes the catalog (a provider RPC, a discovery pass, a probe round)
it rebuilds its feed and, if anything was published, sends ``NOTIFY
orchestra_discovery_catalog, '<replica id> <provider id>'`` (no provider id:
the whole catalog). Every other replica LISTENs on a connection of its own
and, on a notification, rebuilds that provider's part of its feed from the
database, which publishes the same changes to its watchers.

The notification carries no data (the database is the truth), so a lost or
coalesced notification costs nothing but latency: a burst of them becomes
one rebuild per provider named, and after the listening connection is lost a
replica rebuilds the whole catalog once it is back. Nothing here is needed for correctness with one
replica, and with several the periodic pass remains a backstop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

log = logging.getLogger(__name__)

CHANNEL = "orchestra_discovery_catalog"
_RECONNECT_SECONDS = (0.2, 0.5, 1.0, 2.0, 5.0)


class CatalogFanout:
    """Announces this replica's catalog changes and applies the others'."""

    def __init__(
        self, pool: asyncpg.Pool, refresh: Callable[[str | None], Awaitable[object]]
    ) -> None:
        """Creates the fan-out; call :meth:`start`.

        Args:
            pool: The service's pool: NOTIFY goes through it, and one of its
                connections is held to LISTEN.
            refresh: Rebuilds this replica's feed, or one provider's part of
                it (None: all), from the database, without announcing (or
                replicas would echo each other).
        """
        self._pool = pool
        self._refresh = refresh
        self.replica_id = uuid.uuid4().hex
        self._wanted = asyncio.Event()
        self._pending: set[str | None] = set()  # provider ids to rebuild; None: all
        self._lost = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.received = 0  # notifications from other replicas, for tests and metrics

    async def start(self) -> None:
        """Starts listening (returns once the first LISTEN is in place, or failed)."""
        listening = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._listen(listening), name="discovery-fanout-listen"),
            asyncio.create_task(self._apply(), name="discovery-fanout-apply"),
        ]
        await listening.wait()

    async def stop(self) -> None:
        """Stops listening (idempotent)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def announce(self, provider_id: str | None = None) -> None:
        """Tells the other replicas that the catalog (or one provider's part) changed.

        Best effort: a failure is logged, and the others converge at their
        next pass.
        """
        payload = f"{self.replica_id} {provider_id or ''}".rstrip()
        try:
            await self._pool.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("could not announce a catalog change: %s", type(exc).__name__)

    def _notified(self, conn: Any, pid: int, channel: str, payload: object) -> None:
        sender, _, provider_id = str(payload).partition(" ")
        if sender != self.replica_id:
            self.received += 1
            self._want(provider_id or None)

    def _want(self, provider_id: str | None) -> None:
        self._pending.add(provider_id)
        self._wanted.set()

    def _terminated(self, conn: Any) -> None:
        self._lost.set()

    async def _listen(self, listening: asyncio.Event) -> None:
        failures = 0
        while True:
            try:
                async with self._pool.acquire() as conn:
                    self._lost.clear()
                    conn.add_termination_listener(self._terminated)
                    await conn.add_listener(CHANNEL, self._notified)
                    failures = 0
                    listening.set()
                    self._want(None)  # changes may have been missed while not listening
                    try:
                        await self._lost.wait()
                    finally:
                        with contextlib.suppress(Exception):
                            await conn.remove_listener(CHANNEL, self._notified)
                        conn.remove_termination_listener(self._terminated)
            except asyncio.CancelledError:
                raise
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                # Keep trying: fan-out must outlive a database blip.
                log.warning("catalog fan-out: listening failed: %s", type(exc).__name__)
            listening.set()  # start() must not wait forever on a database that is down
            await asyncio.sleep(_RECONNECT_SECONDS[min(failures, len(_RECONNECT_SECONDS) - 1)])
            failures += 1

    async def _apply(self) -> None:
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            pending, self._pending = self._pending, set()
            # One rebuild of the whole catalog covers every provider.
            todo: list[str | None] = [None]
            if None not in pending:
                todo = [p for p in sorted(p for p in pending if p)]
            try:
                for provider_id in todo:
                    await self._refresh(provider_id)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("catalog fan-out: rebuilding the catalog failed")
                await asyncio.sleep(1.0)
                self._want(None)
