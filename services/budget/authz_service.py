"""Envoy's ext_authz gRPC API (``envoy.service.auth.v3.Authorization/Check``).

The edge calls Check for every request but health, reflection and
``orchestra.router.v1.ChatService`` (the router authenticates chats itself,
through ``AccountService.Authenticate``, and keeps the answer). A valid key gets an OK response that
sets ``x-orchestra-identity`` (overwriting any value) to the signed identity.
A refusal is a denied response that Envoy turns into the client's reply:

* Envoy answers a gRPC request with a trailers-only response (HTTP 200,
  ``content-type: application/grpc``) and copies the denied response's
  headers into it; a ``grpc-status`` header given there is kept (otherwise
  it maps the HTTP status, 401 -> 16), and ``grpc-message`` is set from the
  percent-encoded body. So the denied response carries ``grpc-status``,
  ``grpc-message`` and ``grpc-status-details-bin`` (base64 of the
  ``google.rpc.Status`` with its ErrorInfo) and the client decodes the reason
  exactly as if the service had refused the call itself. (Envoy source:
  ``ext_authz.cc`` ``onComplete`` -> ``sendLocalReply``, and
  ``Http::Utility::sendLocalReply`` for gRPC requests.)
* Plain HTTP clients get the HTTP status (401, 503 …) and the message as body.

Note that the identity header is not listed in ``headers_to_remove``: Envoy
applies removals after additions, which would drop the header just set. The
edge strips any client-sent copy before any filter runs (early header
mutation), and the overwrite replaces whatever might remain.
"""

from __future__ import annotations

import base64
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import status_pb2

from services.budget.authn import Authenticator
from services.common import keycache
from services.common.errors import OrchestraError
from services.common.identity import HEADER, IdentitySigner

_HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
}
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def api_key_of(http: Any) -> str:
    """The API key in a checked request's headers ("" if none).

    Envoy sends lower-cased names in ``headers``, or in ``header_map`` when
    configured to; `keycache.api_key_of` picks the key from them.
    """
    pairs: list[tuple[str, str | bytes]] = list(http.headers.items())
    pairs += [(entry.key, entry.value or entry.raw_value) for entry in http.header_map.headers]
    return keycache.api_key_of(pairs)


def percent_encode(message: str) -> str:
    """A grpc-message value: bytes outside printable ASCII and '%' as %XX."""
    out = []
    for byte in message.encode():
        out.append(chr(byte) if 0x20 <= byte <= 0x7E and byte != 0x25 else f"%{byte:02X}")
    return "".join(out)


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value), append_action=_OVERWRITE
    )


def allowed(identity_token: str) -> external_auth_pb2.CheckResponse:
    """An OK response that sets the identity header for the upstream service."""
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=0),
        ok_response=external_auth_pb2.OkHttpResponse(headers=[_header(HEADER, identity_token)]),
    )


def denied(error: OrchestraError) -> external_auth_pb2.CheckResponse:
    """A denied response carrying ``error`` as the client's gRPC status."""
    grpc_status = error.to_status()
    raw = dict(grpc_status.trailing_metadata).get("grpc-status-details-bin", b"")
    details = raw.encode() if isinstance(raw, str) else raw
    status = status_pb2.Status()
    status.ParseFromString(details)
    code = status.code
    headers = [
        _header("grpc-status", str(code)),
        _header("grpc-message", percent_encode(error.message)),
        _header("grpc-status-details-bin", base64.b64encode(details).decode().rstrip("=")),
    ]
    if error.code == grpc.StatusCode.UNAUTHENTICATED:
        headers.append(_header("www-authenticate", 'Bearer realm="orchestra"'))
    return external_auth_pb2.CheckResponse(
        status=status,
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=_HTTP_STATUS.get(error.code, 500)),
            headers=headers,
            body=error.message,
        ),
    )


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """Authenticates edge requests by API key."""

    def __init__(self, authenticator: Authenticator, signer: IdentitySigner) -> None:
        self._authenticator = authenticator
        self._signer = signer

    async def Check(
        self,
        request: external_auth_pb2.CheckRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> external_auth_pb2.CheckResponse:
        """Allows a request with a valid key, denying anything else."""
        try:
            principal = await self._authenticator.authenticate(
                api_key_of(request.attributes.request.http)
            )
        except OrchestraError as exc:
            return denied(exc)
        return allowed(self._signer.sign(principal.identity))
