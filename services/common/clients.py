"""Channels from one service to another, carrying a signed service identity.

Service-to-service calls go straight to the peer (not through the edge) and
authenticate with an identity token the calling service signs itself with
SCOPE_INTERNAL. The token is re-signed well before it expires.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import grpc

from services.common.identity import HEADER, IdentitySigner, service_identity

# Retries transient failures of idempotent internal calls (all of ours are).
_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


class _IdentityInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor
):
    """Adds the calling service's signed identity to every call."""

    def __init__(self, token: Callable[[], str]) -> None:
        self._token = token

    def _with_identity(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        if not any(key == HEADER for key, _ in metadata):
            metadata.add(HEADER, self._token())
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_identity(details), request)

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_identity(details), request)


class ServiceToken:
    """A service's own identity token, re-signed at half its lifetime."""

    def __init__(self, signer: IdentitySigner, service: str) -> None:
        self._signer = signer
        self._identity = service_identity(service)
        self._token = ""
        self._renew_at = 0.0

    def __call__(self) -> str:
        now = time.time()
        if now >= self._renew_at:
            self._token = self._signer.sign(self._identity, now)
            self._renew_at = now + 120
        return self._token


def channel(address: str, token: Callable[[], str]) -> grpc.aio.Channel:
    """An insecure channel to a peer service that sends ``token()`` as identity.

    The channel is for the suite's private network (or a mesh that adds mTLS).
    """
    return grpc.aio.insecure_channel(
        address,
        options=[
            ("grpc.service_config", _SERVICE_CONFIG),
            ("grpc.enable_retries", 1),
            ("grpc.keepalive_time_ms", 30_000),
        ],
        interceptors=[_IdentityInterceptor(token)],
    )
