"""API keys: reading one from a request, and a short cache of what it resolved to.

Two services resolve keys. Budget looks them up in PostgreSQL (for the
``AccountService.Authenticate`` RPC and the edge's ext_authz ``Check``); the
router asks budget's ``Authenticate`` for the ChatService calls it
authenticates itself. Both keep the outcome, good or bad, in a `KeyCache` for a
few seconds, keyed by the SHA-256 of the secret (never the secret itself), so a
hit costs microseconds. Revoking or rotating a key drops its entries at once
through `services.common.key_invalidation`; the TTL bounds staleness should a
notification be lost.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import time
from collections.abc import Callable, Iterable

from orchestra.budget.v1 import account_service_pb2 as account_pb2
from orchestra.common.v1 import errors_pb2, identity_pb2
from services.common.errors import Unauthenticated

DEFAULT_TTL_SECONDS = 5.0
DEFAULT_MAX_ENTRIES = 10_000
MAX_SECRET_CHARS = 512


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who a valid key belongs to.

    Attributes:
        identity: The identity the key acts as (never with SCOPE_INTERNAL).
        policy: The tenant's policy.
        key_rate_limit: The key's own rate limit.
        expire_at: When the key stops working (epoch seconds), if ever.
    """

    identity: identity_pb2.Identity
    policy: account_pb2.TenantPolicy
    key_rate_limit: identity_pb2.RateLimit
    expire_at: float | None


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What a secret resolved to: a principal, or the refusal to repeat.

    Attributes:
        principal: The key's owner; None when the key is refused.
        reason: The refusal's reason (API_KEY_INVALID or API_KEY_REVOKED).
        message: The refusal's message.
    """

    principal: Principal | None
    reason: errors_pb2.ErrorReason.ValueType = errors_pb2.ERROR_REASON_UNSPECIFIED
    message: str = ""

    def refusal(self) -> Unauthenticated:
        """The refusal as a fresh exception (a cached one would grow tracebacks)."""
        return Unauthenticated(self.reason, self.message)


def digest(secret: str) -> bytes:
    """SHA-256 of a secret: what is stored and what caches are keyed by."""
    return hashlib.sha256(secret.encode()).digest()


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


def refused(error: Unauthenticated) -> Outcome:
    """An outcome that repeats ``error``."""
    return Outcome(None, error.reason, error.message)


def api_key_of(headers: Iterable[tuple[str, str | bytes]]) -> str:
    """The API key in request headers or gRPC metadata ("" if none).

    ``authorization: Bearer <key>`` wins over ``x-api-key``; names are matched
    without regard to case.
    """
    found: dict[str, str] = {}
    for name, value in headers:
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        found.setdefault(name.lower(), text)
    scheme, _, token = found.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return found.get("x-api-key", "").strip()


@dataclasses.dataclass(frozen=True)
class _Entry:
    until: float
    outcome: Outcome


class KeyCache(abc.ABC):
    """Resolves secrets with `_resolve`, keeping each outcome for a few seconds.

    Subclasses say where a secret is resolved: budget's store, or budget's
    Authenticate RPC. `invalidate` and `clear` are what
    `services.common.key_invalidation.KeyInvalidations` calls.
    """

    def __init__(
        self,
        *,
        ttl_seconds: float = DEFAULT_TTL_SECONDS,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._ttl = ttl_seconds
        self._max = max_entries
        self._clock = clock
        self._wall = wall_clock
        self._cache: dict[bytes, _Entry] = {}
        self._by_key: dict[str, set[bytes]] = {}
        # Bumped by every invalidation, so that a lookup that started before a
        # revocation does not cache its (now stale) result.
        self._generation = 0

    @abc.abstractmethod
    async def _resolve(self, secret: str, secret_digest: bytes) -> Outcome:
        """Resolves a secret that is not cached.

        Returns a refusal as an `Outcome`, to be cached; raises for a failure
        that must not be cached (the store or the peer is unreachable).
        """

    async def authenticate(self, secret: str) -> Principal:
        """The principal of ``secret``.

        Raises:
            Unauthenticated: API_KEY_MISSING, API_KEY_INVALID or API_KEY_REVOKED.
            OrchestraError: whatever `_resolve` raises (UNAVAILABLE, typically).
        """
        if not secret:
            raise missing_key()
        if len(secret) > MAX_SECRET_CHARS:
            raise invalid_key("malformed")
        secret_digest = digest(secret)
        entry = self._cache.get(secret_digest)
        if entry is None or entry.until <= self._clock():
            generation = self._generation
            until = self._clock() + self._ttl
            entry = _Entry(until, await self._resolve(secret, secret_digest))
            if generation == self._generation:
                self._remember(secret_digest, entry)
        principal = entry.outcome.principal
        if principal is None:
            raise entry.outcome.refusal()
        if principal.expire_at is not None and principal.expire_at <= self._wall():
            raise invalid_key("expired")
        return principal

    def _remember(self, secret_digest: bytes, entry: _Entry) -> None:
        if len(self._cache) >= self._max:
            self._forget(next(iter(self._cache)))
        self._cache[secret_digest] = entry
        if entry.outcome.principal is not None:
            key_id = entry.outcome.principal.identity.key_id
            self._by_key.setdefault(key_id, set()).add(secret_digest)

    def _forget(self, secret_digest: bytes) -> None:
        entry = self._cache.pop(secret_digest, None)
        if entry is not None and entry.outcome.principal is not None:
            key_id = entry.outcome.principal.identity.key_id
            digests = self._by_key.get(key_id, set())
            digests.discard(secret_digest)
            if not digests:
                self._by_key.pop(key_id, None)

    def invalidate(self, key_ids: list[str]) -> None:
        """Drops what is cached about these keys (revoked, rotated, tenant changed)."""
        self._generation += 1
        for key_id in key_ids:
            for secret_digest in list(self._by_key.get(key_id, ())):
                self._forget(secret_digest)

    def clear(self) -> None:
        """Drops the whole cache (e.g. after missing invalidation messages)."""
        self._generation += 1
        self._cache.clear()
        self._by_key.clear()
