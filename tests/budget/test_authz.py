"""The edge's key check: Envoy ext_authz ``Authorization/Check``."""

from __future__ import annotations

import base64
import urllib.parse
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from google.rpc import error_details_pb2, status_pb2

from orchestra.budget.v1 import account_service_pb2 as pb
from orchestra.common.v1 import identity_pb2
from services.common.identity import HEADER, IdentitySigner
from tests.budget.conftest import Budget, Metadata, make_tenant


def check_request(headers: dict[str, str], *, header_map: bool = False) -> Any:
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method="POST", path="/orchestra.router.v1.ChatService/Chat"
    )
    if header_map:
        for key, value in headers.items():
            http.header_map.headers.add(key=key, raw_value=value.encode())
    else:
        http.headers.update(headers)
    return external_auth_pb2.CheckRequest(
        attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http)
        )
    )


def headers_of(options: Any) -> dict[str, tuple[str, int]]:
    return {o.header.key: (o.header.value, o.append_action) for o in options}


async def _secret(budget: Budget, operator: Metadata, admin: Any, **fields: Any) -> str:
    await make_tenant(budget, operator, "acme")
    created = await budget.accounts.CreateApiKey(
        pb.CreateApiKeyRequest(
            api_key=pb.ApiKey(scopes=[identity_pb2.SCOPE_CHAT], display_name="app", **fields)
        ),
        metadata=admin("acme"),
    )
    secret: str = created.secret
    return secret


@pytest.mark.parametrize(
    ("headers", "header_map"),
    [
        ({"authorization": "Bearer {secret}"}, False),
        ({"authorization": "bearer   {secret}"}, False),
        ({"x-api-key": "{secret}"}, False),
        ({"authorization": "Bearer {secret}"}, True),
        ({"x-orchestra-identity": "forged", "x-api-key": "{secret}"}, False),
    ],
    ids=["bearer", "bearer-lowercase", "x-api-key", "header-map", "forged-identity"],
)
async def test_valid_key_gets_a_signed_identity(
    budget: Budget,
    operator: Metadata,
    admin: Any,
    signer: IdentitySigner,
    headers: dict[str, str],
    header_map: bool,
) -> None:
    secret = await _secret(budget, operator, admin)
    sent = {k: v.format(secret=secret) for k, v in headers.items()}
    response = await budget.authz.Check(check_request(sent, header_map=header_map))
    assert response.status.code == 0
    assert response.HasField("ok_response")
    value, action = headers_of(response.ok_response.headers)[HEADER]
    # Overwrite, so a client-sent copy can never survive next to ours.
    assert action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    identity = signer.verify(value)
    assert identity.tenant_id == "acme"
    assert list(identity.scopes) == [identity_pb2.SCOPE_CHAT]


def _reason(response: Any) -> tuple[int, str, str]:
    """(grpc-status, grpc-message, ErrorInfo reason) as a gRPC client behind Envoy sees them."""
    headers = {k: v for k, (v, _) in headers_of(response.denied_response.headers).items()}
    details = headers["grpc-status-details-bin"]
    status = status_pb2.Status()
    status.ParseFromString(base64.b64decode(details + "=" * (-len(details) % 4)))
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert status.code == int(headers["grpc-status"]) == response.status.code
    return int(headers["grpc-status"]), urllib.parse.unquote(headers["grpc-message"]), info.reason


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "API_KEY_MISSING"),
        ({"authorization": "Basic dXNlcjpwYXNz"}, "API_KEY_MISSING"),
        ({"authorization": "Bearer "}, "API_KEY_MISSING"),
        (
            {"authorization": "Bearer ok_nosuchkey_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"},
            "API_KEY_INVALID",
        ),
        ({"x-api-key": "garbage"}, "API_KEY_INVALID"),
        ({"x-api-key": "{secret}x"}, "API_KEY_INVALID"),
        ({"x-api-key": "{revoked}"}, "API_KEY_REVOKED"),
    ],
    ids=["none", "basic-auth", "empty-bearer", "unknown", "garbage", "wrong-secret", "revoked"],
)
async def test_refusal_carries_the_grpc_status_to_the_client(
    budget: Budget, operator: Metadata, admin: Any, headers: dict[str, str], reason: str
) -> None:
    secret = await _secret(budget, operator, admin)
    revoked = await budget.accounts.CreateApiKey(
        pb.CreateApiKeyRequest(api_key=pb.ApiKey()), metadata=admin("acme")
    )
    await budget.accounts.RevokeApiKey(
        pb.RevokeApiKeyRequest(key_id=revoked.api_key.key_id), metadata=admin("acme")
    )
    sent = {k: v.format(secret=secret, revoked=revoked.secret) for k, v in headers.items()}
    response = await budget.authz.Check(check_request(sent))
    assert response.status.code == 16  # UNAUTHENTICATED
    assert response.HasField("denied_response")
    assert response.denied_response.status.code == 401
    code, message, got = _reason(response)
    assert (code, got) == (16, reason)
    assert message == response.denied_response.body == response.status.message


async def test_revocation_reaches_the_check_cache_at_once(
    budget: Budget, operator: Metadata, admin: Any
) -> None:
    secret = await _secret(budget, operator, admin)
    request = check_request({"x-api-key": secret})
    assert (await budget.authz.Check(request)).status.code == 0  # cached now
    key_id = secret.split("_")[1]
    await budget.accounts.RevokeApiKey(
        pb.RevokeApiKeyRequest(key_id=key_id), metadata=admin("acme")
    )
    response = await budget.authz.Check(request)
    assert _reason(response)[2] == "API_KEY_REVOKED"


async def test_a_new_key_works_at_once_despite_earlier_misses(
    budget: Budget, operator: Metadata, admin: Any
) -> None:
    await make_tenant(budget, operator, "acme")
    # Misses are cached too; they must not shadow keys created afterwards.
    missing = await budget.authz.Check(check_request({"x-api-key": "ok_abc_" + "A" * 32}))
    assert _reason(missing)[2] == "API_KEY_INVALID"
    created = await budget.accounts.CreateApiKey(
        pb.CreateApiKeyRequest(api_key=pb.ApiKey()), metadata=admin("acme")
    )
    ok = await budget.authz.Check(check_request({"x-api-key": created.secret}))
    assert ok.status.code == 0
