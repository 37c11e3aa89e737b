"""The caller's identity as it travels between the edge and the services.

The edge's ext_authz check (the budget service) resolves the API key and adds
an ``x-orchestra-identity`` header: the ``Identity`` protobuf, an expiry, and an
HMAC-SHA256 over both under the suite's internal key (``ORCHESTRA_INTERNAL_KEY``).
Envoy strips any client-sent copy of that header first, and services accept the
identity only if the MAC verifies, so a tenant can never be claimed, only proven.
Services calling each other sign an identity of their own with SCOPE_INTERNAL.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Iterable
from typing import Any

import grpc

from orchestra.common.v1 import errors_pb2, identity_pb2
from services.common.errors import PermissionDenied, Unauthenticated

HEADER = "x-orchestra-identity"
_VERSION = "v1"
DEFAULT_TTL_SECONDS = 300

Scope = identity_pb2.Scope
Identity = identity_pb2.Identity

# Scopes that imply others: an operator may do anything, an admin may read.
_IMPLIES: dict[int, set[int]] = {
    identity_pb2.SCOPE_OPERATOR: {
        identity_pb2.SCOPE_ADMIN,
        identity_pb2.SCOPE_READ,
        identity_pb2.SCOPE_CHAT,
    },
    identity_pb2.SCOPE_ADMIN: {identity_pb2.SCOPE_READ},
}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class IdentitySigner:
    """Signs and verifies identity tokens with the suite's internal key."""

    def __init__(self, key: bytes, ttl_seconds: int = DEFAULT_TTL_SECONDS) -> None:
        if len(key) < 16:
            raise ValueError("ORCHESTRA_INTERNAL_KEY must be at least 16 bytes")
        self._key = key
        self._ttl = ttl_seconds

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode(), hashlib.sha256).digest()[:24])

    def sign(self, identity: identity_pb2.Identity, now: float | None = None) -> str:
        """Returns the header value carrying ``identity`` for the next TTL seconds."""
        expiry = int((now if now is not None else time.time()) + self._ttl)
        payload = f"{_VERSION}.{_b64(identity.SerializeToString(deterministic=True))}.{expiry}"
        return f"{payload}.{self._mac(payload)}"

    def verify(self, token: str, now: float | None = None) -> identity_pb2.Identity:
        """Returns the identity in ``token``.

        Raises:
            Unauthenticated: IDENTITY_MISSING if the token is malformed, forged
                or expired.
        """
        try:
            version, body, expiry, mac = token.split(".")
        except ValueError:
            raise _missing("malformed identity token") from None
        payload = f"{version}.{body}.{expiry}"
        if version != _VERSION or not hmac.compare_digest(mac, self._mac(payload)):
            raise _missing("identity token signature does not verify")
        if int(expiry) < (now if now is not None else time.time()):
            raise _missing("identity token expired")
        identity = identity_pb2.Identity()
        identity.ParseFromString(_unb64(body))
        return identity


def _missing(message: str) -> Unauthenticated:
    return Unauthenticated(errors_pb2.ERROR_REASON_IDENTITY_MISSING, message)


def service_identity(service: str) -> identity_pb2.Identity:
    """The identity a service uses when it calls another service."""
    return identity_pb2.Identity(key_id=f"service:{service}", scopes=[identity_pb2.SCOPE_INTERNAL])


def has_scope(identity: identity_pb2.Identity, scope: identity_pb2.Scope.ValueType) -> bool:
    """Whether ``identity`` holds ``scope``, directly or by implication."""
    held: set[int] = set(identity.scopes)
    for granted in list(held):
        held |= _IMPLIES.get(granted, set())
    return scope in held


def caller(
    context: grpc.aio.ServicerContext[Any, Any],
    signer: IdentitySigner,
    *scopes: identity_pb2.Scope.ValueType,
) -> identity_pb2.Identity:
    """Returns the verified caller of an RPC, requiring one of ``scopes``.

    Args:
        context: The RPC's context.
        signer: The suite's signer.
        *scopes: Any one of these suffices; none given means any caller.

    Raises:
        Unauthenticated: No valid identity header.
        PermissionDenied: SCOPE_DENIED when the caller holds none of ``scopes``.
    """
    token = signed_identity(context.invocation_metadata() or ())
    if token is None:
        raise _missing("request did not come through the authenticated edge")
    identity = signer.verify(token)
    require_scope(identity, *scopes)
    return identity


def require_scope(identity: identity_pb2.Identity, *scopes: identity_pb2.Scope.ValueType) -> None:
    """Checks that ``identity`` holds one of ``scopes`` (none given: any identity).

    Raises:
        PermissionDenied: SCOPE_DENIED.
    """
    if scopes and not any(has_scope(identity, s) for s in scopes):
        names = ", ".join(identity_pb2.Scope.Name(s) for s in scopes)
        raise PermissionDenied(
            errors_pb2.ERROR_REASON_SCOPE_DENIED,
            f"this call needs one of: {names}",
            metadata={"scope": names},
        )


def tenant_of(identity: identity_pb2.Identity, requested: str = "") -> str:
    """The tenant an RPC acts on: the caller's own, or ``requested`` if allowed.

    Raises:
        PermissionDenied: A non-operator named another tenant.
    """
    if not requested or requested == identity.tenant_id:
        return identity.tenant_id
    if has_scope(identity, identity_pb2.SCOPE_OPERATOR) or has_scope(
        identity, identity_pb2.SCOPE_INTERNAL
    ):
        return requested
    raise PermissionDenied(
        errors_pb2.ERROR_REASON_SCOPE_DENIED,
        "a key may act only on its own tenant",
        metadata={"tenant_id": requested},
    )


def signed_identity(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The identity token in a call's metadata, unverified (None: there is none)."""
    for key, value in metadata:
        if key == HEADER:
            return value.decode() if isinstance(value, bytes) else value
    return None
