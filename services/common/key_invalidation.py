"""Telling every key cache to forget keys (revoke, rotate, tenant changes).

Budget commits a change, drops its own cache entries at once and publishes the
key ids on a Redis channel; every budget replica and every router (which keeps
the ``Authenticate`` answers of its ChatService callers) listens to it.
Pub/sub may lose a message while a listener is disconnected, so it clears its
whole cache whenever it (re)subscribes, and the cache's short TTL bounds what
a lost message costs.
"""

from __future__ import annotations

import asyncio
import json
import logging

import redis.asyncio as aioredis
import redis.exceptions

from services.common.keycache import KeyCache

log = logging.getLogger(__name__)

CHANNEL = "budget:keys:invalidate"
ALL = "*"


class Invalidations:
    """Publishes and applies key cache invalidations for one `KeyCache`."""

    def __init__(self, client: aioredis.Redis, authenticator: KeyCache) -> None:
        self._redis = client
        self._authenticator = authenticator
        self._stopping = False

    def _apply(self, key_ids: list[str]) -> None:
        if ALL in key_ids:
            self._authenticator.clear()
        else:
            self._authenticator.invalidate(key_ids)

    async def publish(self, key_ids: list[str]) -> None:
        """Forgets ``key_ids`` here and on every replica ([ALL]: everything)."""
        self._apply(key_ids)
        try:
            await self._redis.publish(CHANNEL, json.dumps(key_ids))
        except (OSError, redis.exceptions.RedisError) as exc:
            # The change itself is committed; other replicas catch up within the TTL.
            log.warning("could not publish key invalidation: %s", exc)

    def stop(self) -> None:
        """Makes :meth:`listen` return within a second.

        Cancelling alone is not enough: redis-py's ``get_message`` can swallow
        a cancellation that lands right after SUBSCRIBE.
        """
        self._stopping = True

    async def listen(self) -> None:
        """Applies invalidations published by any replica, until stopped."""
        while not self._stopping:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANNEL)
                self._authenticator.clear()  # whatever was missed while away
                while not self._stopping:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self._apply(_key_ids(message["data"]))
            except (OSError, redis.exceptions.RedisError) as exc:
                log.warning("key invalidation channel lost (%s); resubscribing", exc)
                await asyncio.sleep(1.0)
            finally:
                await pubsub.aclose()


def _key_ids(data: bytes | str) -> list[str]:
    try:
        value = json.loads(data)
    except ValueError:
        return [ALL]
    if not isinstance(value, list):
        return [ALL]
    return [str(v) for v in value]
