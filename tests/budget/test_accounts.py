"""AccountService: tenants, teams, projects, keys, Authenticate and scope checks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2, timestamp_pb2

from orchestra.budget.v1 import account_service_pb2 as pb
from orchestra.common.v1 import identity_pb2
from services.common import errors
from tests.budget.conftest import Budget, Metadata, make_tenant

CHAT = identity_pb2.SCOPE_CHAT
READ = identity_pb2.SCOPE_READ
ADMIN = identity_pb2.SCOPE_ADMIN


async def _fails(call: Any) -> errors.ErrorDetails:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return errors.decode(caught.value)


async def _key(
    budget: Budget, metadata: Metadata, tenant: str = "", **fields: Any
) -> pb.CreateApiKeyResponse:
    fields.setdefault("scopes", [CHAT, READ])
    response: pb.CreateApiKeyResponse = await budget.accounts.CreateApiKey(
        pb.CreateApiKeyRequest(api_key=pb.ApiKey(tenant_id=tenant, **fields)), metadata=metadata
    )
    return response


async def test_tenant_lifecycle(budget: Budget, operator: Metadata) -> None:
    await make_tenant(budget, operator, "acme", "Europe/Paris")
    got = await budget.accounts.GetTenant(pb.GetTenantRequest(tenant_id="acme"), metadata=operator)
    assert (got.tenant.display_name, got.tenant.policy.time_zone) == ("Acme", "Europe/Paris")
    assert got.tenant.HasField("create_time")

    again = await _fails(
        budget.accounts.CreateTenant(
            pb.CreateTenantRequest(tenant=pb.Tenant(tenant_id="acme")), metadata=operator
        )
    )
    assert (again.code, again.reason) == (grpc.StatusCode.ALREADY_EXISTS, "RESOURCE_EXISTS")

    await budget.accounts.DeleteTenant(pb.DeleteTenantRequest(tenant_id="acme"), metadata=operator)
    # Idempotent: deleting again succeeds; the tenant is gone for readers.
    await budget.accounts.DeleteTenant(pb.DeleteTenantRequest(tenant_id="acme"), metadata=operator)
    gone = await _fails(
        budget.accounts.GetTenant(pb.GetTenantRequest(tenant_id="acme"), metadata=operator)
    )
    assert (gone.code, gone.reason) == (grpc.StatusCode.NOT_FOUND, "RESOURCE_NOT_FOUND")
    missing = await _fails(
        budget.accounts.DeleteTenant(pb.DeleteTenantRequest(tenant_id="nope"), metadata=operator)
    )
    assert missing.code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("tenant", "field"),
    [
        (pb.Tenant(tenant_id="A"), "tenant.tenant_id"),
        (pb.Tenant(tenant_id="x"), "tenant.tenant_id"),
        (pb.Tenant(tenant_id="ok-id", display_name="n" * 201), "tenant.display_name"),
        (
            pb.Tenant(tenant_id="ok-id", policy=pb.TenantPolicy(time_zone="Mars/Olympus")),
            "tenant.policy.time_zone",
        ),
        (
            pb.Tenant(tenant_id="ok-id", policy=pb.TenantPolicy(max_exploration_rate=1.5)),
            "tenant.policy.max_exploration_rate",
        ),
    ],
    ids=["uppercase", "too-short", "long-name", "bad-zone", "exploration"],
)
async def test_create_tenant_rejects_bad_fields(
    budget: Budget, operator: Metadata, tenant: pb.Tenant, field: str
) -> None:
    details = await _fails(
        budget.accounts.CreateTenant(pb.CreateTenantRequest(tenant=tenant), metadata=operator)
    )
    assert (details.code, details.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD")
    assert details.metadata["field"] == field


async def test_list_tenants_paginates(budget: Budget, operator: Metadata) -> None:
    for name in ("t-a", "t-b", "t-c", "t-d", "t-e"):
        await make_tenant(budget, operator, name)
    seen, token = [], ""
    while True:
        page = await budget.accounts.ListTenants(
            pb.ListTenantsRequest(page_size=2, page_token=token), metadata=operator
        )
        seen += [t.tenant_id for t in page.tenants]
        token = page.next_page_token
        if not token:
            break
    assert seen == ["t-a", "t-b", "t-c", "t-d", "t-e"]
    bad = await _fails(
        budget.accounts.ListTeams(
            pb.ListTeamsRequest(page_token=token or "bm9wZQ"), metadata=operator
        )
    )
    assert (bad.code, bad.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")


async def test_update_tenant_applies_only_the_mask(
    budget: Budget, operator: Metadata, admin: Callable[[str], Metadata]
) -> None:
    await make_tenant(budget, operator, "acme", "Europe/Paris")
    response = await budget.accounts.UpdateTenant(
        pb.UpdateTenantRequest(
            tenant=pb.Tenant(
                display_name="ignored",
                policy=pb.TenantPolicy(cache_enabled=True, time_zone="ignored"),
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["policy.cache_enabled"]),
        ),
        metadata=admin("acme"),
    )
    tenant = response.tenant
    assert (tenant.display_name, tenant.policy.time_zone) == ("Acme", "Europe/Paris")
    assert tenant.policy.cache_enabled
    bad = await _fails(
        budget.accounts.UpdateTenant(
            pb.UpdateTenantRequest(update_mask=field_mask_pb2.FieldMask(paths=["tenant_id"])),
            metadata=admin("acme"),
        )
    )
    assert (bad.code, bad.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "update_mask")


async def test_teams_and_projects(budget: Budget, operator: Metadata, admin: Any) -> None:
    await make_tenant(budget, operator, "acme")
    await budget.accounts.CreateTeam(
        pb.CreateTeamRequest(team=pb.Team(team_id="ml")), metadata=admin("acme")
    )
    await budget.accounts.CreateProject(
        pb.CreateProjectRequest(project=pb.Project(team_id="ml", project_id="chatbot")),
        metadata=admin("acme"),
    )
    no_team = await _fails(
        budget.accounts.CreateProject(
            pb.CreateProjectRequest(project=pb.Project(team_id="nope", project_id="p")),
            metadata=admin("acme"),
        )
    )
    assert (no_team.code, no_team.metadata["resource"]) == (grpc.StatusCode.NOT_FOUND, "team")
    dup = await _fails(
        budget.accounts.CreateTeam(
            pb.CreateTeamRequest(team=pb.Team(team_id="ml")), metadata=admin("acme")
        )
    )
    assert dup.code == grpc.StatusCode.ALREADY_EXISTS
    teams = await budget.accounts.ListTeams(pb.ListTeamsRequest(), metadata=admin("acme"))
    projects = await budget.accounts.ListProjects(
        pb.ListProjectsRequest(team_id="ml"), metadata=admin("acme")
    )
    assert [t.team_id for t in teams.teams] == ["ml"]
    assert [(p.team_id, p.project_id) for p in projects.projects] == [("ml", "chatbot")]


async def test_created_key_authenticates(
    budget: Budget, operator: Metadata, admin: Any, internal: Metadata, pg_url: str
) -> None:
    await make_tenant(budget, operator, "acme")
    created = await _key(budget, admin("acme"), display_name="ci")
    assert created.secret.startswith(f"ok_{created.api_key.key_id}_")
    assert len(created.secret) >= len(f"ok_{created.api_key.key_id}_") + 32
    who = await budget.accounts.Authenticate(
        pb.AuthenticateRequest(api_key=created.secret), metadata=internal
    )
    assert (who.identity.tenant_id, who.identity.key_id) == ("acme", created.api_key.key_id)
    assert list(who.identity.scopes) == [CHAT, READ]
    # Only the digest is stored, never the secret.
    conn = await asyncpg.connect(pg_url)
    try:
        dump = str(await conn.fetch("SELECT * FROM budget.api_keys"))
    finally:
        await conn.close()
    assert created.secret not in dump
    listed = await budget.accounts.ListApiKeys(pb.ListApiKeysRequest(), metadata=admin("acme"))
    assert [k.key_id for k in listed.api_keys] == [created.api_key.key_id]


async def test_authenticate_refusals_name_the_reason(
    budget: Budget, operator: Metadata, admin: Any, internal: Metadata
) -> None:
    await make_tenant(budget, operator, "acme")
    good = await _key(budget, admin("acme"))
    revoked = await _key(budget, admin("acme"))
    await budget.accounts.RevokeApiKey(
        pb.RevokeApiKeyRequest(key_id=revoked.api_key.key_id), metadata=admin("acme")
    )
    key_id = good.api_key.key_id
    cases = {
        "": "API_KEY_MISSING",
        good.secret[:-1] + ("A" if good.secret[-1] != "A" else "B"): "API_KEY_INVALID",
        f"ok_{key_id}": "API_KEY_INVALID",
        "ok_nosuchkey_abcdefghijklmnopqrstuvwxyz012345": "API_KEY_INVALID",
        "not-an-orchestra-key-at-all": "API_KEY_INVALID",
        revoked.secret: "API_KEY_REVOKED",
    }
    for secret, reason in cases.items():
        details = await _fails(
            budget.accounts.Authenticate(pb.AuthenticateRequest(api_key=secret), metadata=internal)
        )
        assert (details.code, details.reason) == (grpc.StatusCode.UNAUTHENTICATED, reason), secret


async def test_rotate_and_revoke_take_effect_at_once(
    budget: Budget, operator: Metadata, admin: Any, internal: Metadata
) -> None:
    await make_tenant(budget, operator, "acme")
    created = await _key(budget, admin("acme"))
    key_id = created.api_key.key_id
    auth = budget.accounts.Authenticate
    await auth(pb.AuthenticateRequest(api_key=created.secret), metadata=internal)  # now cached
    rotated = await budget.accounts.RotateApiKey(
        pb.RotateApiKeyRequest(key_id=key_id), metadata=admin("acme")
    )
    old = await _fails(auth(pb.AuthenticateRequest(api_key=created.secret), metadata=internal))
    assert old.reason == "API_KEY_INVALID"
    await auth(pb.AuthenticateRequest(api_key=rotated.secret), metadata=internal)
    first = await budget.accounts.RevokeApiKey(
        pb.RevokeApiKeyRequest(key_id=key_id), metadata=admin("acme")
    )
    again = await budget.accounts.RevokeApiKey(
        pb.RevokeApiKeyRequest(key_id=key_id), metadata=admin("acme")
    )
    assert first.api_key.revoke_time == again.api_key.revoke_time  # idempotent
    gone = await _fails(auth(pb.AuthenticateRequest(api_key=rotated.secret), metadata=internal))
    assert gone.reason == "API_KEY_REVOKED"
    rotate_revoked = await _fails(
        budget.accounts.RotateApiKey(pb.RotateApiKeyRequest(key_id=key_id), metadata=admin("acme"))
    )
    assert rotate_revoked.code == grpc.StatusCode.FAILED_PRECONDITION


async def test_deleting_a_tenant_revokes_its_keys(
    budget: Budget, operator: Metadata, admin: Any, internal: Metadata
) -> None:
    await make_tenant(budget, operator, "acme")
    created = await _key(budget, admin("acme"))
    await budget.accounts.DeleteTenant(pb.DeleteTenantRequest(tenant_id="acme"), metadata=operator)
    details = await _fails(
        budget.accounts.Authenticate(
            pb.AuthenticateRequest(api_key=created.secret), metadata=internal
        )
    )
    assert details.reason == "API_KEY_REVOKED"


async def test_expired_key_is_invalid(
    budget: Budget, operator: Metadata, admin: Any, internal: Metadata
) -> None:
    await make_tenant(budget, operator, "acme")
    past = timestamp_pb2.Timestamp(seconds=1_000_000_000)
    details = await _fails(_key(budget, admin("acme"), expire_time=past))
    assert details.metadata["field"] == "api_key.expire_time"
    created = await _key(budget, admin("acme"))
    # Expire it behind the API's back, as time passing would.
    conn = await asyncpg.connect(budget.pg_url)
    try:
        await conn.execute("UPDATE budget.api_keys SET expire_time = now() - interval '1 s'")
    finally:
        await conn.close()
    expired = await _fails(
        budget.accounts.Authenticate(
            pb.AuthenticateRequest(api_key=created.secret), metadata=internal
        )
    )
    assert (expired.code, expired.reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_INVALID")


async def test_key_binding_to_team_and_project(
    budget: Budget, operator: Metadata, admin: Any, as_caller: Any
) -> None:
    await make_tenant(budget, operator, "acme")
    await budget.accounts.CreateTeam(
        pb.CreateTeamRequest(team=pb.Team(team_id="ml")), metadata=admin("acme")
    )
    await budget.accounts.CreateProject(
        pb.CreateProjectRequest(project=pb.Project(team_id="ml", project_id="bot")),
        metadata=admin("acme"),
    )
    bound = await _key(budget, admin("acme"), project="bot")
    assert (bound.api_key.team, bound.api_key.project) == ("ml", "bot")
    missing = await _fails(_key(budget, admin("acme"), team="nope"))
    assert (missing.code, missing.metadata["resource"]) == (grpc.StatusCode.NOT_FOUND, "team")
    other_team = await _fails(_key(budget, admin("acme"), team="ml", project="zzz"))
    assert other_team.code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("scopes", "grantor", "code", "reason"),
    [
        ([identity_pb2.SCOPE_INTERNAL], "admin", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD"),
        ([identity_pb2.SCOPE_OPERATOR], "admin", grpc.StatusCode.PERMISSION_DENIED, "SCOPE_DENIED"),
        ([identity_pb2.SCOPE_OPERATOR], "operator", grpc.StatusCode.OK, ""),
        ([ADMIN], "chat", grpc.StatusCode.PERMISSION_DENIED, "SCOPE_DENIED"),
        ([CHAT], "read", grpc.StatusCode.PERMISSION_DENIED, "SCOPE_DENIED"),
    ],
    ids=["internal", "operator-by-admin", "operator-by-operator", "by-chat-key", "by-read-key"],
)
async def test_key_creation_scopes(
    budget: Budget,
    operator: Metadata,
    as_caller: Any,
    scopes: list[int],
    grantor: str,
    code: grpc.StatusCode,
    reason: str,
) -> None:
    await make_tenant(budget, operator, "acme")
    metadata = operator if grantor == "operator" else as_caller("acme", grantor)
    call = _key(budget, metadata, tenant="acme", scopes=scopes)
    if code == grpc.StatusCode.OK:
        assert list((await call).api_key.scopes) == scopes
        return
    details = await _fails(call)
    assert (details.code, details.reason) == (code, reason)


@pytest.mark.parametrize(
    ("method", "request_"),
    [
        ("GetTenant", pb.GetTenantRequest(tenant_id="other")),
        ("ListTeams", pb.ListTeamsRequest(tenant_id="other")),
        ("ListApiKeys", pb.ListApiKeysRequest(tenant_id="other")),
        ("CreateTeam", pb.CreateTeamRequest(team=pb.Team(tenant_id="other", team_id="x"))),
        ("CreateApiKey", pb.CreateApiKeyRequest(api_key=pb.ApiKey(tenant_id="other"))),
        ("UpdateTenant", pb.UpdateTenantRequest(tenant=pb.Tenant(tenant_id="other"))),
    ],
    ids=["get-tenant", "list-teams", "list-keys", "create-team", "create-key", "update-tenant"],
)
async def test_a_key_cannot_act_on_another_tenant(
    budget: Budget, operator: Metadata, admin: Any, method: str, request_: Any
) -> None:
    await make_tenant(budget, operator, "acme")
    await make_tenant(budget, operator, "other")
    call = getattr(budget.accounts, method)(request_, metadata=admin("acme"))
    details = await _fails(call)
    assert (details.code, details.reason) == (grpc.StatusCode.PERMISSION_DENIED, "SCOPE_DENIED")


async def test_key_of_another_tenant_cannot_be_revoked(
    budget: Budget, operator: Metadata, admin: Any
) -> None:
    await make_tenant(budget, operator, "acme")
    await make_tenant(budget, operator, "other")
    theirs = await _key(budget, admin("other"))
    details = await _fails(
        budget.accounts.RevokeApiKey(
            pb.RevokeApiKeyRequest(key_id=theirs.api_key.key_id), metadata=admin("acme")
        )
    )
    assert (details.code, details.reason) == (grpc.StatusCode.PERMISSION_DENIED, "SCOPE_DENIED")
    unknown = await _fails(
        budget.accounts.RevokeApiKey(
            pb.RevokeApiKeyRequest(key_id="nosuchkey"), metadata=admin("acme")
        )
    )
    assert (unknown.code, unknown.reason) == (grpc.StatusCode.NOT_FOUND, "RESOURCE_NOT_FOUND")


async def test_no_identity_is_unauthenticated(budget: Budget) -> None:
    details = await _fails(budget.accounts.GetTenant(pb.GetTenantRequest()))
    assert (details.code, details.reason) == (grpc.StatusCode.UNAUTHENTICATED, "IDENTITY_MISSING")


async def test_services_may_read_any_tenant(
    budget: Budget, operator: Metadata, internal: Metadata
) -> None:
    await make_tenant(budget, operator, "acme", "Europe/Paris")
    got = await budget.accounts.GetTenant(pb.GetTenantRequest(tenant_id="acme"), metadata=internal)
    assert got.tenant.policy.time_zone == "Europe/Paris"
    details = await _fails(budget.accounts.GetTenant(pb.GetTenantRequest(), metadata=internal))
    assert (details.code, details.metadata["field"]) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "tenant_id",
    )
