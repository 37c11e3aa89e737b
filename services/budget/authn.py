"""Resolving an API key secret to the caller's identity, with a short cache.

The edge asks for every request (ext_authz ``Check``), so a hit must cost
microseconds: outcomes, good and bad, are cached in process for a few seconds,
keyed by the SHA-256 of the secret. Revoking or rotating a key drops its
entries at once here and, through Redis pub/sub, on every other replica; the
TTL bounds staleness should a notification be lost.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from orchestra.budget.v1 import account_service_pb2 as pb
from orchestra.common.v1 import errors_pb2, identity_pb2
from services.budget import keys
from services.budget.keystore import KeyRecord, KeyStore
from services.common.errors import Unauthenticated

DEFAULT_TTL_SECONDS = 5.0
DEFAULT_MAX_ENTRIES = 10_000


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who a valid key belongs to.

    Attributes:
        identity: The identity the edge signs (never with SCOPE_INTERNAL).
        policy: The tenant's policy.
        key_rate_limit: The key's own rate limit.
        expire_at: When the key stops working (epoch seconds), if ever.
    """

    identity: identity_pb2.Identity
    policy: pb.TenantPolicy
    key_rate_limit: identity_pb2.RateLimit
    expire_at: float | None


def missing_key() -> Unauthenticated:
    """API_KEY_MISSING."""
    return Unauthenticated(
        errors_pb2.ERROR_REASON_API_KEY_MISSING,
        "no API key: send it as 'authorization: Bearer <key>' or 'x-api-key: <key>'",
    )


def invalid_key(why: str = "unknown or malformed") -> Unauthenticated:
    """API_KEY_INVALID (unknown, malformed or expired)."""
    return Unauthenticated(errors_pb2.ERROR_REASON_API_KEY_INVALID, f"the API key is {why}")


def revoked_key() -> Unauthenticated:
    """API_KEY_REVOKED."""
    return Unauthenticated(errors_pb2.ERROR_REASON_API_KEY_REVOKED, "the API key was revoked")


@dataclasses.dataclass(frozen=True)
class _Entry:
    until: float
    principal: Principal | None
    refusal: str  # "invalid" or "revoked" when principal is None


def _principal(record: KeyRecord) -> Principal:
    key = record.key
    scopes = [s for s in key.scopes if s != identity_pb2.SCOPE_INTERNAL]
    identity = identity_pb2.Identity(
        tenant_id=key.tenant_id,
        key_id=key.key_id,
        team=key.team,
        project=key.project,
        scopes=scopes,
    )
    expire_at = key.expire_time.ToMicroseconds() / 1e6 if key.HasField("expire_time") else None
    return Principal(identity, record.policy, key.rate_limit, expire_at)


class Authenticator:
    """Checks API key secrets against the account store, with a cache."""

    def __init__(
        self,
        store: KeyStore,
        *,
        ttl_seconds: float = DEFAULT_TTL_SECONDS,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._ttl = ttl_seconds
        self._max = max_entries
        self._clock = clock
        self._wall = wall_clock
        self._cache: dict[bytes, _Entry] = {}
        self._by_key: dict[str, set[bytes]] = {}
        # Bumped by every invalidation, so that a lookup that started before a
        # revocation does not cache its (now stale) result.
        self._generation = 0

    async def authenticate(self, secret: str) -> Principal:
        """The principal of ``secret``.

        Raises:
            Unauthenticated: API_KEY_MISSING, API_KEY_INVALID or API_KEY_REVOKED.
            Unavailable: STORE_UNAVAILABLE when PostgreSQL cannot be reached.
        """
        if not secret:
            raise missing_key()
        if len(secret) > keys.MAX_SECRET_CHARS:
            raise invalid_key("malformed")
        digest = keys.digest(secret)
        entry = self._cache.get(digest)
        if entry is None or entry.until <= self._clock():
            generation = self._generation
            entry = await self._resolve(secret, digest)
            if generation == self._generation:
                self._remember(digest, entry)
        return self._outcome(entry)

    def _outcome(self, entry: _Entry) -> Principal:
        if entry.principal is None:
            raise revoked_key() if entry.refusal == "revoked" else invalid_key()
        expire_at = entry.principal.expire_at
        if expire_at is not None and expire_at <= self._wall():
            raise invalid_key("expired")
        return entry.principal

    async def _resolve(self, secret: str, digest: bytes) -> _Entry:
        until = self._clock() + self._ttl
        key_id = keys.key_id_of(secret)
        if key_id is not None:
            record = await self._store.find_key_by_id(key_id)
        else:
            # Operator-chosen secrets from the config file need not name their id.
            record = await self._store.find_key_by_digest(digest)
        if record is None or not keys.matches(digest, record.secret_sha256):
            return _Entry(until, None, "invalid")
        if record.key.HasField("revoke_time") or record.tenant_deleted:
            return _Entry(until, None, "revoked")
        return _Entry(until, _principal(record), "")

    def _remember(self, digest: bytes, entry: _Entry) -> None:
        if len(self._cache) >= self._max:
            oldest = next(iter(self._cache))
            self._forget(oldest)
        self._cache[digest] = entry
        if entry.principal is not None:
            self._by_key.setdefault(entry.principal.identity.key_id, set()).add(digest)

    def _forget(self, digest: bytes) -> None:
        entry = self._cache.pop(digest, None)
        if entry is not None and entry.principal is not None:
            key_id = entry.principal.identity.key_id
            digests = self._by_key.get(key_id, set())
            digests.discard(digest)
            if not digests:
                self._by_key.pop(key_id, None)

    def invalidate(self, key_ids: list[str]) -> None:
        """Drops what is cached about these keys (revoked, rotated, tenant deleted)."""
        self._generation += 1
        for key_id in key_ids:
            for digest in list(self._by_key.get(key_id, ())):
                self._forget(digest)

    def clear(self) -> None:
        """Drops the whole cache (e.g. after missing invalidation messages)."""
        self._generation += 1
        self._cache.clear()
        self._by_key.clear()
