"""Who is calling ChatService: the router authenticates chats itself.

The edge runs no ext_authz Check on ``orchestra.router.v1.ChatService`` (that
hop cost each chat a round trip through budget before the router saw it).
Instead the router reads the API key from the call's metadata
(``authorization: Bearer <key>`` or ``x-api-key``) and asks budget's
``AccountService.Authenticate``, keeping the answer, good or bad, for a few
seconds in a `RemoteKeys` cache. Budget publishes every revocation, rotation
and tenant change on the key invalidation channel, which the router listens to
(`services.common.key_invalidation`), so a revoked key stops working at once;
the TTL bounds what a lost message costs, and a key's expiry is checked on
every call.

A call that carries a signed identity instead (another service, or a test that
signs one as the edge would) is verified exactly as every other RPC's is; the
edge strips client-sent identities, so through the edge only a key works.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from orchestra.common.v1 import errors_pb2, identity_pb2
from services.common.errors import OrchestraError
from services.common.identity import IdentitySigner, require_scope, signed_identity
from services.common.keycache import KeyCache, Outcome, Principal, api_key_of
from services.router.peers import Peers

# Refusals that are the key's fault (always UNAUTHENTICATED), cached as budget
# caches them; anything else (budget unreachable, say) is raised and not kept.
_KEY_REFUSALS = (errors_pb2.ERROR_REASON_API_KEY_INVALID, errors_pb2.ERROR_REASON_API_KEY_REVOKED)


class RemoteKeys(KeyCache):
    """API keys resolved by budget's Authenticate, cached in the router."""

    def __init__(self, peers: Peers, **options: Any) -> None:
        """``options``: the `KeyCache` options (TTL, size, clocks)."""
        super().__init__(**options)
        self._peers = peers

    async def _resolve(self, secret: str, secret_digest: bytes) -> Outcome:
        try:
            reply = await self._peers.authenticate(secret)
        except OrchestraError as exc:
            if exc.reason in _KEY_REFUSALS:
                return Outcome(None, exc.reason, exc.message)
            raise
        expire_at = (
            reply.expire_time.ToMicroseconds() / 1e6 if reply.HasField("expire_time") else None
        )
        return Outcome(Principal(reply.identity, reply.policy, reply.key_rate_limit, expire_at))


async def chat_caller(
    metadata: Iterable[tuple[str, str | bytes]], signer: IdentitySigner, keys: RemoteKeys
) -> identity_pb2.Identity:
    """The verified caller of a ChatService RPC, which must hold SCOPE_CHAT.

    Args:
        metadata: The call's invocation metadata.
        signer: The suite's signer, for a call that carries a signed identity.
        keys: The router's key cache, for a call that carries an API key.

    Raises:
        Unauthenticated: API_KEY_MISSING, API_KEY_INVALID, API_KEY_REVOKED, or
            IDENTITY_MISSING for a signed identity that does not verify.
        PermissionDenied: SCOPE_DENIED.
        Unavailable: DEPENDENCY_UNAVAILABLE when budget cannot be asked.
    """
    metadata = tuple(metadata)
    token = signed_identity(metadata)
    if token is not None:
        identity = signer.verify(token)
    else:
        identity = (await keys.authenticate(api_key_of(metadata))).identity
    require_scope(identity, identity_pb2.SCOPE_CHAT)
    return identity
