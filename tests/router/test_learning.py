"""The learned routing policy against a real Redis: shared state, bounded
exploration, and feedback that changes the choice."""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import pytest
import redis.asyncio as aioredis

from orchestra.budget.v1 import account_service_pb2 as account_pb2
from orchestra.common.v1 import chat_pb2, identity_pb2
from orchestra.discovery.v1 import discovery_service_pb2 as discovery_pb2
from orchestra.router.v1 import chat_service_pb2 as chat_api
from services.common.stores import connect_redis
from services.router import features, learning, policy, tasks

TENANT = "acme"
CHEAP, DEAR = "p/cheap", "p/dear"


def _model(name: str, quality: float, price: int) -> discovery_pb2.Model:
    return discovery_pb2.Model(
        name=name,
        provider_id="p",
        model_id=name.removeprefix("p/"),
        context_window=100_000,
        quality=quality,
        price_source=discovery_pb2.PRICE_SOURCE_CATALOG,
        pricing=discovery_pb2.Pricing(
            input_micro_usd_per_mtok=price, output_micro_usd_per_mtok=price
        ),
    )


# Balanced, cost weighted lightly: cheap wins on price (0.70 + 0.2 * 0.9 > 0.75).
MODELS = [_model(CHEAP, 0.70, 1_000_000), _model(DEAR, 0.75, 10_000_000)]


def _policy(rate: float) -> account_pb2.TenantPolicy:
    return account_pb2.TenantPolicy(
        routing_strategy=identity_pb2.ROUTING_STRATEGY_BALANCED,
        balanced_weights=account_pb2.BalancedWeights(quality=1.0, cost=0.2, latency=0.5),
        max_exploration_rate=rate,
    )


def _request(text: str) -> chat_api.ChatRequest:
    return chat_api.ChatRequest(
        messages=[
            chat_pb2.Message(role=chat_pb2.ROLE_USER, content=[chat_pb2.ContentPart(text=text)])
        ]
    )


def _prompt(i: int) -> str:
    return f"A train travels {40 + i} miles in {2 + i % 3} hours. How many miles per hour is that?"


def _decide(learner: learning.Learner, text: str, rate: float = 1e-9) -> policy.Decision:
    return policy.decide(
        _request(text),
        MODELS,
        _policy(rate),
        default_max_tokens=100,
        tenant_id=TENANT,
        learner=learner,
    )


def _features(learner: learning.Learner, text: str) -> np.ndarray:
    return learner.featurize(text, tasks.analyze(text))


async def _teach(learner: learning.Learner, n: int) -> None:
    """n answers from each model on math prompts: cheap's rated 0, dear's rated 1."""
    for i in range(n):
        for name, quality, score in ((CHEAP, 0.70, 0.0), (DEAR, 0.75, 1.0)):
            rid = f"{name}-{i}"
            text = _prompt(i)
            await learner.record(
                TENANT, rid, name, quality, _features(learner, text), ok=True, ttft_ms=100,
                cost_micro_usd=10,
            )  # fmt: skip
            assert await learner.feedback(TENANT, rid, score)


@pytest.fixture
async def clients(redis_url: str) -> AsyncIterator[tuple[aioredis.Redis, aioredis.Redis]]:
    """Two Redis clients, as two router replicas would have."""
    one = connect_redis(redis_url)
    two = connect_redis(redis_url)
    yield one, two
    await one.aclose()
    await two.aclose()


async def test_feedback_on_one_replica_moves_the_choice_on_another(
    clients: tuple[aioredis.Redis, aioredis.Redis],
) -> None:
    replica_a = learning.Learner(clients[0], seed=1)
    replica_b = learning.Learner(clients[1], seed=2)
    probe = _prompt(100)
    before = _decide(replica_b, probe)
    assert before.model.name == CHEAP
    assert "learned quality" in before.reason and "math task" in before.reason

    await _teach(replica_a, 5)
    assert _decide(replica_a, probe).model.name == DEAR

    await replica_b.refresh(TENANT)
    after = _decide(replica_b, probe)
    assert after.model.name == DEAR
    assert after.expected_quality > 0.75  # learned: above dear's catalog quality
    x = _features(replica_a, probe)
    arms = [(CHEAP, 0.70), (DEAR, 0.75)]
    a, b = replica_a.estimates(TENANT, x, arms), replica_b.estimates(TENANT, x, arms)
    for name, _ in arms:
        assert a[name].quality == pytest.approx(b[name].quality)
        assert a[name].spread == pytest.approx(b[name].spread)
    assert a[CHEAP].quality < 0.70 < 0.75 < a[DEAR].quality


async def test_later_feedback_for_a_request_replaces_the_earlier(
    clients: tuple[aioredis.Redis, aioredis.Redis],
) -> None:
    learner = learning.Learner(clients[0])
    x = _features(learner, _prompt(1))
    await learner.record(TENANT, "r1", CHEAP, 0.7, x, ok=True, ttft_ms=50, cost_micro_usd=3)
    assert await learner.feedback(TENANT, "r1", 0.0)
    low = learner.estimates(TENANT, x, [(CHEAP, 0.7)])[CHEAP]
    assert await learner.feedback(TENANT, "r1", 1.0)
    high = learner.estimates(TENANT, x, [(CHEAP, 0.7)])[CHEAP]
    assert high.observations == 1.0  # replaced, not added
    assert low.quality < 0.7 < high.quality
    assert high.success_rate == 1.0 and high.mean_ttft_ms == 50.0


async def test_feedback_for_an_unknown_or_foreign_request_is_refused(
    clients: tuple[aioredis.Redis, aioredis.Redis],
) -> None:
    learner = learning.Learner(clients[0])
    x = _features(learner, _prompt(1))
    await learner.record(TENANT, "r1", CHEAP, 0.7, x, ok=True, ttft_ms=50, cost_micro_usd=3)
    await learner.record(TENANT, "r2", CHEAP, 0.7, x, ok=False, ttft_ms=0, cost_micro_usd=0)
    assert not await learner.feedback(TENANT, "nope", 0.5)
    assert not await learner.feedback("other-tenant", "r1", 0.5)
    assert not await learner.feedback(TENANT, "r2", 0.5)  # failed: nothing to rate
    assert await learner.feedback(TENANT, "r1", 0.5)
    await learner.refresh(TENANT)
    assert learner.state(TENANT).counts[CHEAP].success_rate == pytest.approx(2 / 3)


async def test_exploration_stays_within_the_tenants_bound() -> None:
    learner = learning.Learner(None, seed=7)
    decisions = [_decide(learner, _prompt(i), rate=0.1) for i in range(300)]
    explored = sum(d.explored for d in decisions)
    assert learner.state(TENANT).explored == 30  # the gate opened exactly 10% of the time
    assert 0 < explored <= 30
    assert all("exploring" in d.reason for d in decisions if d.explored)

    quiet = learning.Learner(None, seed=7)
    assert not any(_decide(quiet, _prompt(i), rate=1e-9).explored for i in range(300))


async def test_a_new_replica_starts_from_the_snapshot_and_the_log_is_trimmed(
    clients: tuple[aioredis.Redis, aioredis.Redis], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(learning, "COMPACT_EVERY", 3)
    writer = learning.Learner(clients[0])
    await _teach(writer, 3)  # 6 observations: a snapshot is written and the log trimmed
    log_key = f"orchestra:router:learn:v{features.FEATURE_VERSION}:{{{TENANT}}}:log"
    assert await clients[0].xlen(log_key) < 6
    fresh = learning.Learner(clients[1])
    await fresh.refresh(TENANT)
    x = _features(writer, _prompt(50))
    arms = [(CHEAP, 0.70), (DEAR, 0.75)]
    want, got = writer.estimates(TENANT, x, arms), fresh.estimates(TENANT, x, arms)
    for name, _ in arms:
        assert got[name].quality == pytest.approx(want[name].quality)
        assert got[name].observations == want[name].observations == 3


async def test_the_engine_hook_records_outcomes(
    clients: tuple[aioredis.Redis, aioredis.Redis],
) -> None:
    learner = learning.Learner(clients[0])
    request = _request(_prompt(3))
    await learning.record_outcome(
        learner, TENANT, "ok-1", request, CHEAP, 0.7, ok=True, ttft_ms=10, cost_micro_usd=5
    )
    await learning.record_outcome(
        learner, TENANT, "gone-1", request, CHEAP, 0.7, ok=False, cancelled=True, ttft_ms=0,
        cost_micro_usd=0,
    )  # fmt: skip
    assert await learner.feedback(TENANT, "ok-1", 0.9)
    assert not await learner.feedback(TENANT, "gone-1", 0.9)
    assert learner.state(TENANT).counts[CHEAP].calls == 1  # the cancel is not a failure
