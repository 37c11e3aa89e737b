"""Requests and tokens per minute, per tenant and per key, in the same atomic admission."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc
import pytest
import redis.asyncio as aioredis

from orchestra.budget.v1 import account_service_pb2 as account_pb
from orchestra.budget.v1 import budget_service_pb2 as pb
from orchestra.common.v1 import chat_pb2, identity_pb2
from services.budget import ratelimits
from services.common import errors
from tests.budget.conftest import Budget, Metadata, make_budget
from tests.budget.test_admission import _fails, _quota_subjects, status

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
    assert not await redis_client.exists("budget:hold:r3")
    assert int(await redis_client.get(_counter(f"tenants/acme/{RPM}"))) == 3
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
    assert int(await redis_client.get(_counter(f"tenants/acme/{RPM}"))) == 2
    assert int(await redis_client.get(_counter(f"tenants/acme/{TPM}"))) == 1_000
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
    assert int(await redis_client.get(_counter(f"tenants/acme/{RPM}"))) == 1


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
        (f"tenants/acme/{RPM}", 5, 1, f"budget:rl:tenants/acme/{RPM}:2"),
        (f"tenants/acme/apiKeys/k1/{TPM}", 7, 3, f"budget:rl:tenants/acme/apiKeys/k1/{TPM}:2"),
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
    assert int(await redis_client.get(_counter(f"tenants/acme/{TPM}"))) == 150
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
    assert int(await redis_client.get(_counter(f"tenants/acme/{TPM}"))) == 950
