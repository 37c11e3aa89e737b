"""Channels from one service to another, and the identity their calls carry.

Service-to-service calls go straight to the peer (not through the edge) and
authenticate with an identity token the calling service signs itself with
SCOPE_INTERNAL. The token is re-signed well before it expires.
"""

from __future__ import annotations

import json
import time

import grpc

from services.common.identity import HEADER, IdentitySigner, service_identity

# Retries transient failures of idempotent internal calls (all of ours are);
# spreads calls over every address of the target (replicas given as a list,
# or a DNS name with several addresses), skipping one whose health check does
# not answer SERVING (a replica draining on SIGTERM).
_SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": ""},
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
        ],
    }
)


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

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata carrying the token: pass as ``metadata=`` on every call."""
        return ((HEADER, self()),)


def target(address: str) -> str:
    """The gRPC target for an ORCHESTRA_<SERVICE>_ADDR value: one host:port as
    is, a comma-separated list of IP:port as one ``ipv4:`` (or ``ipv6:``)
    target whose addresses the channel balances over."""
    entries = [a.strip() for a in address.split(",") if a.strip()]
    if len(entries) == 1:
        return entries[0]
    scheme = "ipv6" if entries[0].startswith("[") else "ipv4"
    return f"{scheme}:{','.join(entries)}"


def channel(address: str) -> grpc.aio.Channel:
    """An insecure channel to a peer service (or its replicas), retrying UNAVAILABLE.

    The channel is for the suite's private network (or a mesh that adds mTLS).
    Calls carry the caller's identity explicitly (``ServiceToken.metadata()``):
    grpc.aio client interceptors would do it implicitly, but a task cancelled
    while awaiting an intercepted call does not finish cancelling.

    Args:
        address: host:port, or IP:port entries separated by commas (see `target`).
    """
    return grpc.aio.insecure_channel(
        target(address),
        options=[
            ("grpc.service_config", _SERVICE_CONFIG),
            ("grpc.enable_retries", 1),
            ("grpc.keepalive_time_ms", 30_000),
        ],
    )
