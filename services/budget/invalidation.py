"""Telling every replica to forget cached keys (revoke, rotate, tenant changes).

A change drops the local cache entries at once and is published on a Redis
channel that every replica listens to. Pub/sub may lose a message while a
replica is disconnected, so a replica clears its whole cache whenever it
(re)subscribes, and the cache's short TTL bounds what a lost message costs.
"""

from __future__ import annotations

import asyncio
import json
import logging

import redis.asyncio as aioredis
import redis.exceptions

from services.budget.authn import Authenticator

log = logging.getLogger(__name__)

CHANNEL = "budget:keys:invalidate"
ALL = "*"


class Invalidations:
    """Publishes and applies key cache invalidations."""

    def __init__(self, client: aioredis.Redis, authenticator: Authenticator) -> None:
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
