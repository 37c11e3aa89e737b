"""Requests and tokens per minute, per tenant and per key, in the same atomic admission."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import grpc
import pytest
import redis.asyncio as aioredis

from orchestra.budget.v1 import account_service_pb2 as account_pb
from orchestra.budget.v1 import budget_service_pb2 as pb
from orchestra.common.v1 import chat_pb2, identity_pb2
from services.budget import ratelimits
from services.common import errors
from tests.budget.conftest import Budget, Metadata, make_budget, make_tenant
from tests.budget.test_admission import _fails, _quota_subjects, status
from tests.budget.test_windows import FakeClock

RPM = "requests_per_minute"
TPM = "tokens_per_minute"


async def _steer_clear_of_minute_end() -> None:
    """Fixed windows: start a counting test well inside a minute."""
    left = ratelimits.seconds_until_next_window(time.time())
    if left < 8:
        await asyncio.sleep(left + 0.05)


async def _tenant(budget: Budget, operator: Metadata, rpm: int = 0, tpm: int = 0) -> None:
    await budget.accounts.CreateTenant(
        account_pb.CreateTenantRequest(
            tenant=account_pb.Tenant(
                tenant_id="acme",
                policy=account_pb.TenantPolicy(
                    rate_limit=identity_pb2.RateLimit(
                        requests_per_minute=rpm, tokens_per_minute=tpm
                    )
                ),
            )
        ),
        metadata=operator,
    )


async def _key(budget: Budget, metadata: Metadata, rpm: int = 0, tpm: int = 0) -> str:
    response = await budget.accounts.CreateApiKey(
        account_pb.CreateApiKeyRequest(
            api_key=account_pb.ApiKey(
                tenant_id="acme",
                scopes=[identity_pb2.SCOPE_CHAT],
                rate_limit=identity_pb2.RateLimit(requests_per_minute=rpm, tokens_per_minute=tpm),
            )
        ),
        metadata=metadata,
    )
    key_id: str = response.api_key.key_id
    return key_id


async def _reserve(
    budget: Budget, internal: Metadata, request_id: str, *, key_id: str = "k1", tokens: int = 100
) -> pb.ReserveResponse:
    response: pb.ReserveResponse = await budget.budgets.Reserve(
        pb.ReserveRequest(
            request_id=request_id,
            subject=pb.SpendSubject(tenant_id="acme", key_id=key_id),
            model="openai/gpt-4o",
            amount_micro_usd=100,
            tokens=tokens,
        ),
        metadata=internal,
    )
    return response


def _counter(name: str) -> str:
    return f"{ratelimits.PREFIX}{name}:{ratelimits.minute_of(time.time())}"


async def _count(redis_client: aioredis.Redis, name: str) -> int:
    """This minute's value of the counter ``name`` (which must exist)."""
    value = await redis_client.get(_counter(name))
    assert value is not None, name
    return int(value)


async def test_tenant_requests_per_minute(
    budget: Budget,
    operator: Metadata,
    admin: Callable[[str], Metadata],
    internal: Metadata,
    redis_client: aioredis.Redis,
) -> None:
    await _tenant(budget, operator, rpm=3)
    limit = await make_budget(budget, admin("acme"), "acme", 1_000_000)
    await _steer_clear_of_minute_end()
    for i in range(3):
        await _reserve(budget, internal, f"r{i}")
    # A retry of an admitted request is answered from its hold, not counted.
    await _reserve(budget, internal, "r0")
    details, error = await _fails(_reserve(budget, internal, "r3"))
    assert (details.code, details.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
    assert details.metadata["limit"] == RPM
    assert _quota_subjects(error) == [f"tenants/acme/{RPM}"]
    assert details.retry_after is not None and 0 < details.retry_after <= 60
    # Nothing written for the refused request.
    assert not await redis_client.exists("{budget}:hold:r3")
    assert await _count(redis_client, f"tenants/acme/{RPM}") == 3
    assert (await status(budget, admin("acme")))[limit.budget_id].reserved_micro_usd == 300


async def test_key_tokens_per_minute_and_all_or_nothing(
    budget: Budget,
    operator: Metadata,
    admin: Callable[[str], Metadata],
    internal: Metadata,
    redis_client: aioredis.Redis,
) -> None:
    await _tenant(budget, operator, rpm=100, tpm=100_000)
    limited = await _key(budget, admin("acme"), tpm=1_000)
    free = await _key(budget, admin("acme"))
    await _steer_clear_of_minute_end()
    await _reserve(budget, internal, "a", key_id=limited, tokens=400)
    await _reserve(budget, internal, "b", key_id=limited, tokens=600)
    details, error = await _fails(_reserve(budget, internal, "c", key_id=limited, tokens=1))
    assert details.reason == "RATE_LIMITED"
    assert _quota_subjects(error) == [f"tenants/acme/apiKeys/{limited}/{TPM}"]
    # The tenant's counters did not count the refused request either.
    assert await _count(redis_client, f"tenants/acme/{RPM}") == 2
    assert await _count(redis_client, f"tenants/acme/{TPM}") == 1_000
    # Another key of the tenant is not limited by that key's limit.
    await _reserve(budget, internal, "d", key_id=free, tokens=5_000)


async def test_a_budget_refusal_counts_nothing(
    budget: Budget,
    operator: Metadata,
    admin: Callable[[str], Metadata],
    internal: Metadata,
    redis_client: aioredis.Redis,
) -> None:
    await _tenant(budget, operator, rpm=10)
    await make_budget(budget, admin("acme"), "acme", 150)
    await _steer_clear_of_minute_end()
    await _reserve(budget, internal, "a")
    details, _ = await _fails(_reserve(budget, internal, "b"))
    assert details.reason == "BUDGET_EXHAUSTED"
    assert await _count(redis_client, f"tenants/acme/{RPM}") == 1


async def test_concurrent_requests_never_exceed_the_rate(
    budget: Budget, operator: Metadata, internal: Metadata
) -> None:
    await _tenant(budget, operator, rpm=50)
    await _steer_clear_of_minute_end()
    results = await asyncio.gather(
        *(_reserve(budget, internal, f"c{i}") for i in range(200)), return_exceptions=True
    )
    admitted = [r for r in results if isinstance(r, pb.ReserveResponse)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(admitted) == 50 and len(refused) == 150
    assert {errors.decode(r).reason for r in refused} == {"RATE_LIMITED"}


@pytest.mark.parametrize(
    ("now", "left"), [(120.0, 60.0), (179.5, 0.5), (150.25, 29.75)], ids=["start", "end", "mid"]
)
def test_windows_are_calendar_minutes(now: float, left: float) -> None:
    checks = ratelimits.rate_checks(
        now,
        "acme",
        identity_pb2.RateLimit(requests_per_minute=5),
        "k1",
        identity_pb2.RateLimit(tokens_per_minute=7),
        tokens=3,
    )
    assert [(c.name, c.limit, c.increment, c.counter) for c in checks] == [
        (f"tenants/acme/{RPM}", 5, 1, f"{{budget}}:rl:tenants/acme/{RPM}:2"),
        (f"tenants/acme/apiKeys/k1/{TPM}", 7, 3, f"{{budget}}:rl:tenants/acme/apiKeys/k1/{TPM}:2"),
    ]
    assert all(c.counter_expiry == 180 + ratelimits.COUNTER_GRACE_SECONDS for c in checks)
    assert ratelimits.seconds_until_next_window(now) == pytest.approx(left)


async def test_settle_gives_back_unused_tokens(
    budget: Budget,
    operator: Metadata,
    internal: Metadata,
    redis_client: aioredis.Redis,
) -> None:
    await _tenant(budget, operator, tpm=1_000)
    await _steer_clear_of_minute_end()
    await _reserve(budget, internal, "a", tokens=800)
    details, _ = await _fails(_reserve(budget, internal, "b", tokens=800))
    assert details.reason == "RATE_LIMITED"
    await budget.budgets.Settle(
        pb.SettleRequest(
            request_id="a",
            cost_micro_usd=10,
            usage=chat_pb2.Usage(prompt_tokens=100, completion_tokens=50),
        ),
        metadata=internal,
    )
    assert await _count(redis_client, f"tenants/acme/{TPM}") == 150
    await _reserve(budget, internal, "b", tokens=800)
    # A repeated settle gives nothing back twice.
    await budget.budgets.Settle(
        pb.SettleRequest(
            request_id="a",
            cost_micro_usd=10,
            usage=chat_pb2.Usage(prompt_tokens=100, completion_tokens=50),
        ),
        metadata=internal,
    )
    assert await _count(redis_client, f"tenants/acme/{TPM}") == 950


async def test_provider_limits_are_shared_by_all_tenants(
    start_budget: Callable[..., Awaitable[Budget]],
    operator: Metadata,
    admin: Callable[[str], Metadata],
    internal: Metadata,
) -> None:
    # A fake clock inside a minute (in the future, where the counters' expiry lies).
    start = (int(time.time()) // 60 + 24 * 60) * 60 + 10
    clock = FakeClock(start)
    budget = await start_budget(clock=clock)
    for tenant in ("acme", "beta"):
        await make_tenant(budget, operator, tenant)
    beta_budget = await make_budget(budget, admin("beta"), "beta", 1_000_000)
    openai = identity_pb2.RateLimit(requests_per_minute=3, tokens_per_minute=1_000)

    def reserve(
        request_id: str, tenant: str, model: str, tokens: int = 100
    ) -> grpc.aio.UnaryUnaryCall[pb.ReserveRequest, pb.ReserveResponse]:
        return budget.budgets.Reserve(
            pb.ReserveRequest(
                request_id=request_id,
                subject=pb.SpendSubject(tenant_id=tenant, key_id="k1"),
                model=model,
                amount_micro_usd=100,
                tokens=tokens,
                provider_rate_limit=openai,
            ),
            metadata=internal,
        )

    await reserve("a1", "acme", "openai/gpt-4o")
    await reserve("a2", "acme", "openai/gpt-4o-mini")
    await reserve("b1", "beta", "openai/gpt-4o")
    # The provider's quota is used up by both tenants together.
    details, error = await _fails(reserve("b2", "beta", "openai/gpt-4o"))
    assert (details.code, details.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
    assert _quota_subjects(error) == [f"providers/openai/{RPM}"]
    assert details.metadata["subject"] == "providers/openai"
    # All or nothing: the refused request holds nothing on beta's budget.
    state = await status(budget, admin("beta"), tenant="beta")
    assert state[beta_budget.budget_id].reserved_micro_usd == 100
    # Another provider has its own counter.
    await reserve("b3", "beta", "anthropic/claude")
    # Tokens per minute too, in the next minute.
    clock.now = start + 60
    await reserve("t1", "acme", "openai/gpt-4o", tokens=900)
    details, error = await _fails(reserve("t2", "beta", "openai/gpt-4o", tokens=200))
    assert _quota_subjects(error) == [f"providers/openai/{TPM}"]


@pytest.mark.parametrize(
    ("model", "limit", "field"),
    [
        ("gpt-4o", identity_pb2.RateLimit(requests_per_minute=1), "model"),
        ("openai/gpt-4o", identity_pb2.RateLimit(tokens_per_minute=-1), "provider_rate_limit"),
    ],
    ids=["no-provider", "negative"],
)
async def test_provider_limit_input_is_checked(
    budget: Budget,
    operator: Metadata,
    internal: Metadata,
    model: str,
    limit: identity_pb2.RateLimit,
    field: str,
) -> None:
    await make_tenant(budget, operator, "acme")
    details, _ = await _fails(
        budget.budgets.Reserve(
            pb.ReserveRequest(
                request_id="r1",
                subject=pb.SpendSubject(tenant_id="acme"),
                model=model,
                amount_micro_usd=1,
                provider_rate_limit=limit,
            ),
            metadata=internal,
        )
    )
    assert (details.code, details.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD")
    assert details.metadata["field"] == field
