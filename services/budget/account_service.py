"""The AccountService servicer: tenants, teams, projects and API keys.

Thin: each RPC checks the caller's scope and tenant, validates the request,
calls the store and encodes the answer.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import field_mask_pb2

from orchestra.budget.v1 import account_service_pb2 as pb
from orchestra.budget.v1 import account_service_pb2_grpc
from orchestra.common.v1 import errors_pb2, identity_pb2
from services.budget import keys, validation
from services.budget.accounts import AccountStore, not_found
from services.budget.authn import Authenticator
from services.budget.catalog import Catalog
from services.budget.keystore import KeyStore
from services.common import paging
from services.common.errors import PermissionDenied
from services.common.identity import IdentitySigner, caller, has_scope, tenant_of
from services.common.key_invalidation import ALL, Invalidations

Context = grpc.aio.ServicerContext[Any, Any]

OPERATOR = identity_pb2.SCOPE_OPERATOR
ADMIN = identity_pb2.SCOPE_ADMIN
READ = identity_pb2.SCOPE_READ
INTERNAL = identity_pb2.SCOPE_INTERNAL
_GRANTABLE = {identity_pb2.SCOPE_CHAT, READ, ADMIN, OPERATOR}
_TENANT_MASK_ROOTS = ("display_name", "policy")


def _tenant_mask(mask: field_mask_pb2.FieldMask) -> field_mask_pb2.FieldMask:
    paths = list(mask.paths) or list(_TENANT_MASK_ROOTS)
    result = field_mask_pb2.FieldMask(paths=paths)
    if not result.IsValidForDescriptor(pb.Tenant.DESCRIPTOR) or any(
        p.split(".")[0] not in _TENANT_MASK_ROOTS for p in paths
    ):
        raise validation.invalid(
            "update_mask", "update_mask may name display_name, policy and policy.<field> only"
        )
    return result


def _denied(message: str, **metadata: str) -> PermissionDenied:
    return PermissionDenied(errors_pb2.ERROR_REASON_SCOPE_DENIED, message, metadata=metadata)


class AccountServicer(account_service_pb2_grpc.AccountServiceServicer):
    """orchestra.budget.v1.AccountService."""

    def __init__(
        self,
        accounts: AccountStore,
        keystore: KeyStore,
        authenticator: Authenticator,
        invalidations: Invalidations,
        catalog: Catalog,
        signer: IdentitySigner,
    ) -> None:
        self._accounts = accounts
        self._keys = keystore
        self._authenticator = authenticator
        self._invalidations = invalidations
        self._catalog = catalog
        self._signer = signer

    # --- tenants --------------------------------------------------------------

    async def CreateTenant(
        self, request: pb.CreateTenantRequest, context: Context
    ) -> pb.CreateTenantResponse:
        caller(context, self._signer, OPERATOR)
        tenant = request.tenant
        validation.tenant_id(tenant.tenant_id, "tenant.tenant_id")
        validation.display_name(tenant.display_name, "tenant.display_name")
        validation.policy(tenant.policy)
        return pb.CreateTenantResponse(tenant=await self._accounts.create_tenant(tenant))

    async def GetTenant(
        self, request: pb.GetTenantRequest, context: Context
    ) -> pb.GetTenantResponse:
        # INTERNAL too: the router reads the tenant's policy on every request.
        tenant = tenant_of(caller(context, self._signer, READ, INTERNAL), request.tenant_id)
        if not tenant:  # a service has no tenant of its own
            raise validation.invalid("tenant_id", "tenant_id is required for a service caller")
        return pb.GetTenantResponse(tenant=await self._accounts.get_tenant(tenant))

    async def ListTenants(
        self, request: pb.ListTenantsRequest, context: Context
    ) -> pb.ListTenantsResponse:
        caller(context, self._signer, OPERATOR)
        page = paging.Page.of(request, {"rpc": "ListTenants"})
        found = await self._accounts.list_tenants(page.after, page.fetch)
        items, token = page.cut(found, lambda t: t.tenant_id)
        return pb.ListTenantsResponse(tenants=items, next_page_token=token)

    async def UpdateTenant(
        self, request: pb.UpdateTenantRequest, context: Context
    ) -> pb.UpdateTenantResponse:
        tenant_id = tenant_of(caller(context, self._signer, ADMIN), request.tenant.tenant_id)
        mask = _tenant_mask(request.update_mask)

        def apply(tenant: pb.Tenant) -> None:
            mask.MergeMessage(
                request.tenant, tenant, replace_message_field=True, replace_repeated_field=True
            )
            validation.display_name(tenant.display_name, "tenant.display_name")
            validation.policy(tenant.policy)

        updated = await self._accounts.update_tenant(tenant_id, apply)
        self._catalog.invalidate(tenant_id)
        # Cached identities carry the policy; drop them everywhere.
        await self._invalidations.publish([ALL])
        return pb.UpdateTenantResponse(tenant=updated)

    async def DeleteTenant(
        self, request: pb.DeleteTenantRequest, context: Context
    ) -> pb.DeleteTenantResponse:
        caller(context, self._signer, OPERATOR)
        validation.required_text(request.tenant_id, "tenant_id", 63)
        revoked = await self._accounts.delete_tenant(request.tenant_id)
        self._catalog.invalidate(request.tenant_id)
        await self._invalidations.publish(revoked)
        return pb.DeleteTenantResponse()

    # --- teams and projects ---------------------------------------------------

    async def CreateTeam(
        self, request: pb.CreateTeamRequest, context: Context
    ) -> pb.CreateTeamResponse:
        team = pb.Team()
        team.CopyFrom(request.team)
        team.tenant_id = tenant_of(caller(context, self._signer, ADMIN), team.tenant_id)
        validation.child_id(team.team_id, "team.team_id")
        validation.display_name(team.display_name, "team.display_name")
        return pb.CreateTeamResponse(team=await self._accounts.create_team(team))

    async def ListTeams(
        self, request: pb.ListTeamsRequest, context: Context
    ) -> pb.ListTeamsResponse:
        tenant = tenant_of(caller(context, self._signer, READ), request.tenant_id)
        page = paging.Page.of(request, {"rpc": "ListTeams", "tenant": tenant})
        found = await self._accounts.list_teams(tenant, page.after, page.fetch)
        items, token = page.cut(found, lambda t: t.team_id)
        return pb.ListTeamsResponse(teams=items, next_page_token=token)

    async def CreateProject(
        self, request: pb.CreateProjectRequest, context: Context
    ) -> pb.CreateProjectResponse:
        project = pb.Project()
        project.CopyFrom(request.project)
        project.tenant_id = tenant_of(caller(context, self._signer, ADMIN), project.tenant_id)
        validation.child_id(project.project_id, "project.project_id")
        validation.child_id(project.team_id, "project.team_id")
        validation.display_name(project.display_name, "project.display_name")
        return pb.CreateProjectResponse(project=await self._accounts.create_project(project))

    async def ListProjects(
        self, request: pb.ListProjectsRequest, context: Context
    ) -> pb.ListProjectsResponse:
        tenant = tenant_of(caller(context, self._signer, READ), request.tenant_id)
        page = paging.Page.of(
            request, {"rpc": "ListProjects", "tenant": tenant, "team": request.team_id}
        )
        found = await self._accounts.list_projects(tenant, request.team_id, page.after, page.fetch)
        items, token = page.cut(found, lambda p: p.project_id)
        return pb.ListProjectsResponse(projects=items, next_page_token=token)

    # --- API keys -------------------------------------------------------------

    async def CreateApiKey(
        self, request: pb.CreateApiKeyRequest, context: Context
    ) -> pb.CreateApiKeyResponse:
        identity = caller(context, self._signer, ADMIN)
        wanted = request.api_key
        key = pb.ApiKey(
            tenant_id=tenant_of(identity, wanted.tenant_id),
            key_id=keys.new_key_id(),
            display_name=validation.display_name(wanted.display_name, "api_key.display_name"),
            scopes=self._scopes(identity, wanted.scopes),
            rate_limit=wanted.rate_limit,
        )
        key.team, key.project = await self._binding(identity, key.tenant_id, wanted)
        if wanted.HasField("expire_time"):
            if wanted.expire_time.ToMicroseconds() <= int(time.time() * 1e6):
                raise validation.invalid("api_key.expire_time", "expire_time must be in the future")
            key.expire_time.CopyFrom(wanted.expire_time)
        limit = wanted.rate_limit
        if limit.requests_per_minute < 0 or limit.tokens_per_minute < 0:
            raise validation.invalid("api_key.rate_limit", "rate limits must not be negative")
        secret = keys.new_secret(key.key_id)
        created = await self._keys.create_key(key, keys.digest(secret))
        return pb.CreateApiKeyResponse(api_key=created, secret=secret)

    @staticmethod
    def _scopes(
        identity: identity_pb2.Identity, requested: Sequence[int]
    ) -> list[identity_pb2.Scope.ValueType]:
        scopes = set(requested) or {identity_pb2.SCOPE_CHAT, READ}
        if not scopes <= _GRANTABLE:
            raise validation.invalid(
                "api_key.scopes",
                "scopes may be SCOPE_CHAT, SCOPE_READ, SCOPE_ADMIN, SCOPE_OPERATOR",
            )
        if OPERATOR in scopes and not has_scope(identity, OPERATOR):
            raise _denied("only an operator may grant SCOPE_OPERATOR", scope="SCOPE_OPERATOR")
        return sorted(identity_pb2.Scope.ValueType(s) for s in scopes)

    async def _binding(
        self, identity: identity_pb2.Identity, tenant_id: str, wanted: pb.ApiKey
    ) -> tuple[str, str]:
        """The (team, project) a new key is bound to, checked to exist."""
        team, project = wanted.team, wanted.project
        if project:
            validation.child_id(project, "api_key.project")
            found = await self._accounts.find_project(tenant_id, project)
            if found is None:
                raise not_found("project", project)
            if team and team != found.team_id:
                raise validation.invalid(
                    "api_key.team", f"project {project!r} belongs to team {found.team_id!r}"
                )
            team = found.team_id
        elif team:
            validation.child_id(team, "api_key.team")
            if not await self._accounts.team_exists(tenant_id, team):
                raise not_found("team", team)
        # A team- or project-bound admin cannot mint keys beyond its own reach.
        if not has_scope(identity, OPERATOR):
            if identity.team and team != identity.team:
                raise _denied("a team-bound key may create keys of its own team only")
            if identity.project and project != identity.project:
                raise _denied("a project-bound key may create keys of its own project only")
        return team, project

    async def ListApiKeys(
        self, request: pb.ListApiKeysRequest, context: Context
    ) -> pb.ListApiKeysResponse:
        tenant = tenant_of(caller(context, self._signer, READ), request.tenant_id)
        page = paging.Page.of(
            request, {"rpc": "ListApiKeys", "tenant": tenant, "revoked": request.show_revoked}
        )
        found = await self._keys.list_keys(tenant, request.show_revoked, page.after, page.fetch)
        items, token = page.cut(found, lambda k: k.key_id)
        return pb.ListApiKeysResponse(api_keys=items, next_page_token=token)

    async def _own_key(self, context: Context, key_id: str) -> None:
        identity = caller(context, self._signer, ADMIN)
        validation.required_text(key_id, "key_id", 63)
        tenant_of(identity, (await self._keys.get_key(key_id)).tenant_id)

    async def RotateApiKey(
        self, request: pb.RotateApiKeyRequest, context: Context
    ) -> pb.RotateApiKeyResponse:
        await self._own_key(context, request.key_id)
        secret = keys.new_secret(request.key_id)
        rotated = await self._keys.rotate_key(request.key_id, keys.digest(secret))
        await self._invalidations.publish([request.key_id])
        return pb.RotateApiKeyResponse(api_key=rotated, secret=secret)

    async def RevokeApiKey(
        self, request: pb.RevokeApiKeyRequest, context: Context
    ) -> pb.RevokeApiKeyResponse:
        await self._own_key(context, request.key_id)
        revoked = await self._keys.revoke_key(request.key_id)
        await self._invalidations.publish([request.key_id])
        return pb.RevokeApiKeyResponse(api_key=revoked)

    async def Authenticate(
        self, request: pb.AuthenticateRequest, context: Context
    ) -> pb.AuthenticateResponse:
        caller(context, self._signer, INTERNAL)
        principal = await self._authenticator.authenticate(request.api_key.strip())
        response = pb.AuthenticateResponse(
            identity=principal.identity,
            policy=principal.policy,
            key_rate_limit=principal.key_rate_limit,
        )
        if principal.expire_at is not None:
            response.expire_time.FromMicroseconds(round(principal.expire_at * 1e6))
        return response
