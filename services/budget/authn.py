"""Resolving an API key secret to the caller's identity, against the account store.

The edge asks for every request (ext_authz ``Check``) and the router for every
chat it authenticates itself (``AccountService.Authenticate``), so outcomes are
kept in a `services.common.keycache.KeyCache` for a few seconds.
"""

from __future__ import annotations

from orchestra.common.v1 import identity_pb2
from services.budget import keys
from services.budget.keystore import KeyRecord, KeyStore
from services.common.keycache import (
    DEFAULT_MAX_ENTRIES,
    DEFAULT_TTL_SECONDS,
    KeyCache,
    Outcome,
    Principal,
    invalid_key,
    missing_key,
    refused,
    revoked_key,
)

__all__ = ["Authenticator", "Principal", "invalid_key", "missing_key", "revoked_key"]


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


class Authenticator(KeyCache):
    """Checks API key secrets against the account store, with a cache."""

    def __init__(
        self,
        store: KeyStore,
        *,
        ttl_seconds: float = DEFAULT_TTL_SECONDS,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        super().__init__(ttl_seconds=ttl_seconds, max_entries=max_entries)
        self._store = store

    async def _resolve(self, secret: str, secret_digest: bytes) -> Outcome:
        key_id = keys.key_id_of(secret)
        if key_id is not None:
            record = await self._store.find_key_by_id(key_id)
        else:
            # Operator-chosen secrets from the config file need not name their id.
            record = await self._store.find_key_by_digest(secret_digest)
        if record is None or not keys.matches(secret_digest, record.secret_sha256):
            return refused(invalid_key())
        if record.key.HasField("revoke_time") or record.tenant_deleted:
            return refused(revoked_key())
        return Outcome(_principal(record))
