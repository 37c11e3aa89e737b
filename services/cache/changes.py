"""The change stream: how replicas tell each other's semantic views what changed.

Every replica appends the entries it added to or deleted from the semantic
layer to one Redis stream (``cache:changes``, all tenants; see
:mod:`services.cache.keyspace`), and every replica's view
(:mod:`services.cache.semantic_view`) follows it, so the views converge. The
stream is trimmed to about :data:`CHANGES_MAXLEN` entries: a replica further
behind than that rebuilds from the entries themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis

from services.cache.keyspace import CHANGES
from services.cache.store import redis_errors
from services.common.stores import text

CHANGES_MAXLEN = 100_000  # a replica further behind than this rebuilds from the entries
_BATCH = 500  # changes read per call


class ChangeStream:
    """Publishes and reads the semantic adds and deletes of every replica."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis

    async def publish(self, op: str, tenant: str, entry_ids: Sequence[str]) -> None:
        """Tells every replica's semantic layer that these entries were added or deleted."""
        if not entry_ids:
            return
        async with redis_errors():
            pipe = self._redis.pipeline(transaction=False)
            for entry_id in entry_ids:
                pipe.xadd(
                    CHANGES,
                    {"op": op, "tenant": tenant, "id": entry_id},
                    maxlen=CHANGES_MAXLEN,
                    approximate=True,
                )
            await pipe.execute()

    async def latest(self) -> str:
        """The id of the newest change ("0-0" if none): where a fresh follower starts."""
        async with redis_errors():
            newest: Any = await self._redis.xrevrange(CHANGES, count=1)
        return text(newest[0][0]) if newest else "0-0"

    async def after(self, last_id: str, block_ms: int) -> list[tuple[str, str, str, str]]:
        """Changes after ``last_id`` as (id, op, tenant, entry id), waiting up to ``block_ms``.

        Connection errors propagate as redis-py's own: the follower treats
        them as a reason to rebuild, not as a failed request.
        """
        reply: Any = await self._redis.xread({CHANGES: last_id}, count=_BATCH, block=block_ms)
        out = []
        for _stream, messages in reply or []:
            for change_id, fields in messages:
                values = {text(k): text(v) for k, v in fields.items()}
                out.append((text(change_id), values["op"], values["tenant"], values["id"]))
        return out
