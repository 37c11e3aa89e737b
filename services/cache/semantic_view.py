"""This replica's semantic view: a FAISS index per scope, kept in step with Redis.

The vector, the scope and the compared text are fields of the entry in Redis
(:mod:`services.cache.store`). On start a replica scans the entries and builds
its indexes (:class:`~services.cache.scope_index.ScopeIndex`, one per tenant
and scope); after that it follows the change stream
(:mod:`services.cache.changes`), where every replica announces the entries it
added and deleted, so replicas converge. An entry that expired or was deleted
without this replica hearing of it is found missing when fetched, which is a
miss, and is dropped from the view then. Losing the Redis connection makes the
follower rebuild from scratch once Redis answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

import numpy as np
from redis import exceptions as redis_exc

from services.cache.changes import ChangeStream
from services.cache.scope_index import ScopeIndex
from services.cache.store import EntryStore, SemanticFields
from services.common.errors import Unavailable

log = logging.getLogger(__name__)

_FOLLOW_BLOCK_MS = 1000
_RECONNECT_SECONDS = 1.0


class SemanticView:
    """The scopes' indexes of this replica, built from Redis and following its changes."""

    def __init__(
        self, store: EntryStore, changes: ChangeStream, *, dim: int, hnsw_from: int
    ) -> None:
        """Creates the view (empty until :meth:`start`).

        Args:
            store: The durable entries.
            changes: The change stream the replicas share.
            dim: The embedding dimension.
            hnsw_from: Entries in one scope from which its index is HNSW.
        """
        self._store = store
        self._changes = changes
        self._dim = dim
        self._hnsw_from = hnsw_from
        self._scopes: dict[tuple[str, str], ScopeIndex] = {}
        self._scope_of: dict[tuple[str, str], str] = {}  # (tenant, entry id) -> scope
        self._follower: asyncio.Task[None] | None = None
        self._stopping = False
        self._last_id = "0-0"

    @property
    def size(self) -> int:
        """Entries in this view."""
        return len(self._scope_of)

    def index(self, tenant: str, scope: str) -> ScopeIndex | None:
        """The index of ``tenant``'s ``scope`` (None: no entry of it here)."""
        return self._scopes.get((tenant, scope))

    async def start(self) -> None:
        """Builds the view from Redis, then follows the change stream.

        If Redis is not reachable yet the service still starts (lookups then
        fail with STORE_UNAVAILABLE anyway) and the view is built once it is.
        """
        try:
            await self._rebuild()
            ready = True
        except Unavailable:
            log.warning("semantic cache: Redis unreachable at start; building the view later")
            ready = False
        self._follower = asyncio.create_task(self._follow(ready), name="cache-semantic-follow")

    async def stop(self) -> None:
        """Stops following changes."""
        self._stopping = True
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
                await asyncio.wait_for(self._follower, 5)

    async def _rebuild(self) -> None:
        started = time.perf_counter()
        # Where to follow from is read first: a change made during the scan is
        # then both scanned and replayed, which is harmless (adds replace).
        latest = await self._changes.latest()
        self._scopes.clear()
        self._scope_of.clear()
        async for tenant, ids in self._store.scan_tenants():
            await self._load(tenant, ids)
        self._last_id = latest
        log.info(
            "semantic cache view built: %d entries in %d scopes in %.1f s",
            self.size,
            len(self._scopes),
            time.perf_counter() - started,
        )

    async def _load(self, tenant: str, entry_ids: Sequence[str]) -> None:
        now = now_ms()
        found = await self._store.semantic_fields(tenant, entry_ids)
        by_scope: dict[str, list[tuple[str, SemanticFields, int]]] = {}
        for entry_id, item in zip(entry_ids, found, strict=True):
            if item is None:
                self.drop(tenant, entry_id)
                continue
            fields, ttl_ms = item
            if len(fields.vector) != 4 * self._dim:
                continue  # stored by a replica with another embedding model
            expires = now + ttl_ms if ttl_ms > 0 else 0
            by_scope.setdefault(fields.scope, []).append((entry_id, fields, expires))
        for scope, items in by_scope.items():
            for entry_id, _, _ in items:
                previous = self._scope_of.get((tenant, entry_id))
                if previous is not None and previous != scope:
                    self.drop(tenant, entry_id)
            index = self._index_for(tenant, scope)
            vectors = np.frombuffer(b"".join(f.vector for _, f, _ in items), dtype=np.float32)
            index.extend(
                [entry_id for entry_id, _, _ in items],
                [f.text for _, f, _ in items],
                vectors.reshape(len(items), self._dim),
                [expires for _, _, expires in items],
            )
            for entry_id, _, _ in items:
                self._scope_of[(tenant, entry_id)] = scope

    async def _follow(self, ready: bool) -> None:
        if not ready:
            await self._rebuild_when_back()
        while not self._stopping:
            try:
                changes = await self._changes.after(self._last_id, _FOLLOW_BLOCK_MS)
                for change_id, op, tenant, entry_id in changes:
                    if op == "add":
                        await self._load(tenant, [entry_id])
                    elif op == "del":
                        self.drop(tenant, entry_id)
                    self._last_id = change_id
            except asyncio.CancelledError:
                raise
            except (redis_exc.ConnectionError, redis_exc.TimeoutError, OSError) as exc:
                log.warning("semantic cache lost Redis (%s); rebuilding when it is back", exc)
                await self._rebuild_when_back()
            except Exception:
                log.exception("semantic cache follower failed; rebuilding")
                await self._rebuild_when_back()

    async def _rebuild_when_back(self) -> None:
        while not self._stopping:
            await asyncio.sleep(_RECONNECT_SECONDS)
            try:
                await self._rebuild()
                return
            except Exception as exc:  # noqa: BLE001 - keep trying until Redis answers
                log.debug("semantic cache rebuild failed: %s", exc)

    def add(self, tenant: str, entry_id: str, fields: SemanticFields, expires_ms: int) -> None:
        """Files an entry under its scope (moving it if it was filed under another)."""
        previous = self._scope_of.get((tenant, entry_id))
        if previous is not None and previous != fields.scope:
            self.drop(tenant, entry_id)
        vector = np.frombuffer(fields.vector, dtype=np.float32)
        self._index_for(tenant, fields.scope).add(entry_id, fields.text, vector, expires_ms)
        self._scope_of[(tenant, entry_id)] = fields.scope

    def _index_for(self, tenant: str, scope: str) -> ScopeIndex:
        index = self._scopes.get((tenant, scope))
        if index is None:
            index = self._scopes[(tenant, scope)] = ScopeIndex(self._dim, self._hnsw_from)
        return index

    def drop(self, tenant: str, entry_id: str) -> None:
        """Forgets an entry (nothing if it is not here)."""
        scope = self._scope_of.pop((tenant, entry_id), None)
        if scope is None:
            return
        index = self._scopes.get((tenant, scope))
        if index is not None:
            index.remove(entry_id)
            if not len(index):
                del self._scopes[(tenant, scope)]


def now_ms() -> int:
    """The wall clock in Unix milliseconds (what entry expiries are compared with)."""
    return time.time_ns() // 1_000_000
