"""Declarative bootstrap: the config file's tenants, keys and budgets at start."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import grpc
import pytest

from orchestra.budget.v1 import account_service_pb2 as pb
from orchestra.budget.v1 import budget_service_pb2
from orchestra.common.v1 import identity_pb2
from services.budget.bootstrap import BootstrapError
from services.budget.server import build
from services.common import errors
from tests.budget.conftest import Budget, Metadata

CI_SECRET = "ok_ci_0123456789abcdefghijklmnopqrstuv"
OPS_SECRET = "an-operator-chosen-secret-of-any-shape"

CONFIG = """
tenants:
  - id: acme
    display_name: Acme Corp
    policy:
      time_zone: Europe/Paris
      allowed_models: ["openai/*"]
    api_keys:
      - id: ci
        secret: {ci_secret}
        team: ml
        project: chatbot
      - id: ops
        secret: {ops_secret}
        scopes: [chat, read, admin, operator]
    budgets:
      - level: tenant
        window: month
        limit_usd: 1.5
      - level: team
        subject: ml
        window: day
        limit_usd: 0.25
        soft: true
"""

TABLES = ("tenants", "teams", "projects", "api_keys", "budgets")


async def _snapshot(pg_url: str) -> dict[str, list[Any]]:
    conn = await asyncpg.connect(pg_url)
    try:
        return {
            table: [
                dict(r) for r in await conn.fetch(f"SELECT * FROM budget.{table} ORDER BY 1, 2")
            ]
            for table in TABLES
        }
    finally:
        await conn.close()


async def _who(budget: Budget, internal: Metadata, secret: str) -> Any:
    return await budget.accounts.Authenticate(
        pb.AuthenticateRequest(api_key=secret), metadata=internal
    )


async def test_config_is_applied_and_a_second_start_changes_nothing(
    start_budget: Callable[..., Awaitable[Budget]],
    config_file: Callable[[str], str],
    internal: Metadata,
    as_caller: Any,
    pg_url: str,
) -> None:
    path = config_file(CONFIG.format(ci_secret=CI_SECRET, ops_secret=OPS_SECRET))
    budget = await start_budget(ORCHESTRA_CONFIG=path)
    ci = await _who(budget, internal, CI_SECRET)
    assert (ci.identity.tenant_id, ci.identity.team, ci.identity.project) == (
        "acme",
        "ml",
        "chatbot",
    )
    assert (ci.policy.time_zone, list(ci.policy.allowed_models)) == ("Europe/Paris", ["openai/*"])
    ops = await _who(budget, internal, OPS_SECRET)
    assert identity_pb2.SCOPE_OPERATOR in ops.identity.scopes
    listed = await budget.budgets.ListBudgets(
        budget_service_pb2.ListBudgetsRequest(), metadata=as_caller("acme", "read")
    )
    limits = sorted((b.limit_micro_usd, b.soft) for b in listed.budgets)
    assert limits == [(250_000, True), (1_500_000, False)]

    before = await _snapshot(pg_url)
    again = await start_budget(ORCHESTRA_CONFIG=path)
    assert await _snapshot(pg_url) == before
    await _who(again, internal, CI_SECRET)


async def test_a_changed_secret_replaces_the_old_one(
    start_budget: Callable[..., Awaitable[Budget]],
    config_file: Callable[[str], str],
    internal: Metadata,
) -> None:
    await start_budget(
        ORCHESTRA_CONFIG=config_file(CONFIG.format(ci_secret=CI_SECRET, ops_secret=OPS_SECRET))
    )
    new_secret = "ok_ci_ZYXWVUTSRQPONMLKJIHGFEDCBA987654"
    path = config_file(CONFIG.format(ci_secret=new_secret, ops_secret=OPS_SECRET))
    budget = await start_budget(ORCHESTRA_CONFIG=path)
    await _who(budget, internal, new_secret)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _who(budget, internal, CI_SECRET)
    assert errors.decode(caught.value).reason == "API_KEY_INVALID"


async def test_a_key_revoked_through_the_api_stays_revoked(
    start_budget: Callable[..., Awaitable[Budget]],
    config_file: Callable[[str], str],
    internal: Metadata,
    as_caller: Any,
) -> None:
    path = config_file(CONFIG.format(ci_secret=CI_SECRET, ops_secret=OPS_SECRET))
    budget = await start_budget(ORCHESTRA_CONFIG=path)
    await budget.accounts.RevokeApiKey(
        pb.RevokeApiKeyRequest(key_id="ci"), metadata=as_caller("acme", "admin")
    )
    restarted = await start_budget(ORCHESTRA_CONFIG=path)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _who(restarted, internal, CI_SECRET)
    assert errors.decode(caught.value).reason == "API_KEY_REVOKED"


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        (
            "- {id: k1, secret: 'x-secret-of-twenty-chars', project: p}",
            "tenants[0].api_keys[0].team",
        ),
        ("- {id: k1, secret: 'ok_k2_abcdefghijklmnopqrstuvwxyz'}", "tenants[0].api_keys[0].secret"),
    ],
    ids=["project-without-team", "secret-names-another-key"],
)
async def test_an_inconsistent_config_fails_the_start_naming_the_field(
    budget_settings: Callable[..., Any], config_file: Callable[[str], str], entry: str, field: str
) -> None:
    path = config_file(f"tenants:\n  - id: acme\n    api_keys:\n      {entry}\n")
    with pytest.raises(BootstrapError, match=field.replace("[", r"\[").replace("]", r"\]")):
        await build(budget_settings(ORCHESTRA_CONFIG=path))
