"""Circuit breakers: their state machine on the real Redis, and the router skipping open ones."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import redis.asyncio as aioredis

from orchestra.common.v1 import chat_pb2
from orchestra.router.v1 import chat_service_pb2 as chat_api
from orchestra.router.v1 import router_service_pb2 as router_api
from services.common import errors
from services.common.stores import connect_redis
from services.router.breakers import BreakerConfig, Breakers, State
from services.router.engine import Engine
from tests.fakes.faults import Fault
from tests.router.conftest import Suite

PRIMARY = ("primary", "gpt-4o-mini")


class Clock:
    """A clock the test moves by hand (the cool-down is driven, not waited for)."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def redis_pair(redis_url: str) -> AsyncIterator[tuple[aioredis.Redis, aioredis.Redis]]:
    """Two connections to one Redis, as two router replicas have."""
    first, second = connect_redis(redis_url), connect_redis(redis_url)
    yield first, second
    await first.aclose()
    await second.aclose()


def _pair(
    redis_pair: tuple[aioredis.Redis, aioredis.Redis], config: BreakerConfig, clock: Clock
) -> tuple[Breakers, Breakers]:
    return Breakers(redis_pair[0], config, clock=clock), Breakers(
        redis_pair[1], config, clock=clock
    )


async def test_consecutive_failures_open_it_for_every_replica(
    redis_pair: tuple[aioredis.Redis, aioredis.Redis],
) -> None:
    clock = Clock()
    one, two = _pair(redis_pair, BreakerConfig(failures=3, cooldown=30), clock)
    for _ in range(2):
        assert await one.record(*PRIMARY, ok=False) is State.CLOSED
    assert await two.record(*PRIMARY, ok=False) is State.OPEN  # the third, from the other replica
    for breakers in (one, two):
        permit = await breakers.acquire(*PRIMARY)
        assert not permit.allowed and permit.state is State.OPEN
    assert (await one.acquire("primary", "other-model")).allowed  # per model


async def test_a_success_resets_the_consecutive_count(
    redis_pair: tuple[aioredis.Redis, aioredis.Redis],
) -> None:
    one, _ = _pair(redis_pair, BreakerConfig(failures=2, min_calls=100), Clock())
    for _ in range(3):
        assert await one.record(*PRIMARY, ok=False) is State.CLOSED
        assert await one.record(*PRIMARY, ok=True) is State.CLOSED
    assert (await one.acquire(*PRIMARY)).allowed


async def test_a_failure_rate_in_the_window_opens_it(
    redis_pair: tuple[aioredis.Redis, aioredis.Redis],
) -> None:
    clock = Clock()
    one, _ = _pair(redis_pair, BreakerConfig(failures=100, rate=0.5, min_calls=4, window=60), clock)
    assert await one.record(*PRIMARY, ok=True) is State.CLOSED
    assert await one.record(*PRIMARY, ok=False) is State.CLOSED
    assert await one.record(*PRIMARY, ok=True) is State.CLOSED
    assert await one.record(*PRIMARY, ok=False) is State.OPEN  # 2 of 4 failed


async def test_a_new_window_forgets_old_failures(
    redis_pair: tuple[aioredis.Redis, aioredis.Redis],
) -> None:
    clock = Clock()
    one, _ = _pair(redis_pair, BreakerConfig(failures=100, rate=0.5, min_calls=4, window=60), clock)
    for ok in (True, False, True):
        await one.record(*PRIMARY, ok=ok)
    clock.now += 61
    assert await one.record(*PRIMARY, ok=False) is State.CLOSED  # 1 of 1 in the new window


async def test_half_open_lets_a_bounded_number_of_probes_through(
    redis_pair: tuple[aioredis.Redis, aioredis.Redis],
) -> None:
    clock = Clock()
    one, two = _pair(redis_pair, BreakerConfig(failures=1, cooldown=30, probes=1), clock)
    await one.record(*PRIMARY, ok=False)
    clock.now += 29
    assert not (await one.acquire(*PRIMARY)).allowed
    clock.now += 2
    probe = await one.acquire(*PRIMARY)
    assert probe.allowed and probe.probe
    assert not (await two.acquire(*PRIMARY)).allowed  # the one probe slot is taken
    await one.release(*PRIMARY)  # e.g. the client cancelled the probe
    assert (await two.acquire(*PRIMARY)).probe
    assert await two.record(*PRIMARY, ok=True) is State.CLOSED
    assert (await one.acquire(*PRIMARY)).probe is False


async def test_a_failed_probe_opens_it_again(
    redis_pair: tuple[aioredis.Redis, aioredis.Redis],
) -> None:
    clock = Clock()
    one, _ = _pair(redis_pair, BreakerConfig(failures=1, cooldown=30), clock)
    await one.record(*PRIMARY, ok=False)
    clock.now += 31
    assert (await one.acquire(*PRIMARY)).probe
    assert await one.record(*PRIMARY, ok=False) is State.OPEN
    assert not (await one.acquire(*PRIMARY)).allowed
    [status] = await one.status([PRIMARY])
    assert status.state is State.OPEN and status.trips == 2 and status.opened_at == clock.now


async def test_a_probe_that_never_reports_is_forgotten_after_a_cooldown(
    redis_pair: tuple[aioredis.Redis, aioredis.Redis],
) -> None:
    clock = Clock()
    one, two = _pair(redis_pair, BreakerConfig(failures=1, cooldown=30), clock)
    await one.record(*PRIMARY, ok=False)
    clock.now += 31
    assert (await one.acquire(*PRIMARY)).probe  # its replica dies before reporting
    assert not (await two.acquire(*PRIMARY)).allowed
    clock.now += 31
    assert (await two.acquire(*PRIMARY)).probe


async def test_a_closed_breaker_is_trusted_for_local_seconds_then_read_again(
    redis_pair: tuple[aioredis.Redis, aioredis.Redis],
) -> None:
    clock = Clock()
    config = BreakerConfig(failures=1, cooldown=30, local_seconds=1.0)
    one, two = _pair(redis_pair, config, clock)
    assert (await one.acquire(*PRIMARY)).allowed  # read as closed: trusted for 1 s
    assert await two.record(*PRIMARY, ok=False) is State.OPEN
    # No round trip: replica one still answers from what it read.
    assert (await one.acquire(*PRIMARY)).allowed
    clock.now += 1.01
    assert not (await one.acquire(*PRIMARY)).allowed


async def test_a_failure_on_a_trusted_breaker_is_recorded_at_once(
    redis_pair: tuple[aioredis.Redis, aioredis.Redis],
) -> None:
    clock = Clock()
    one, two = _pair(redis_pair, BreakerConfig(failures=1, cooldown=30), clock)
    assert (await one.acquire(*PRIMARY)).allowed
    assert await one.record(*PRIMARY, ok=False) is State.OPEN
    assert not (await one.acquire(*PRIMARY)).allowed  # its own view is dropped
    assert not (await two.acquire(*PRIMARY)).allowed


async def test_successes_counted_in_memory_reach_redis(
    redis_pair: tuple[aioredis.Redis, aioredis.Redis],
) -> None:
    clock = Clock()
    config = BreakerConfig(failures=100, rate=0.5, min_calls=4, window=60)
    one, two = _pair(redis_pair, config, clock)
    assert (await one.acquire(*PRIMARY)).allowed
    for _ in range(5):
        assert await one.record(*PRIMARY, ok=True) is State.CLOSED
    [seen] = await two.status([PRIMARY])
    assert seen.window_calls == 0  # still in replica one's memory
    [status] = await one.status([PRIMARY])  # sends them first
    assert status.window_calls == 5 and status.window_failures == 0
    # Counted before a failure: 3 of 11 calls failed, under the 0.5 rate.
    for _ in range(3):
        await one.record(*PRIMARY, ok=True)
    for _ in range(3):
        assert await one.record(*PRIMARY, ok=False) is State.CLOSED
    [status] = await two.status([PRIMARY])
    assert (status.window_calls, status.window_failures) == (11, 3)
    # After a failure every call asks Redis, until it reads the breaker closed.
    assert (await one.acquire(*PRIMARY)).allowed
    for _ in range(2):
        await one.record(*PRIMARY, ok=True)
    [status] = await two.status([PRIMARY])
    assert status.window_calls == 11
    # Renewing the local view sends what was counted since.
    clock.now += 1.5
    assert (await one.acquire(*PRIMARY)).allowed
    [status] = await two.status([PRIMARY])
    assert status.window_calls == 13


async def test_local_seconds_zero_asks_redis_every_time(
    redis_pair: tuple[aioredis.Redis, aioredis.Redis],
) -> None:
    clock = Clock()
    config = BreakerConfig(failures=1, cooldown=30, local_seconds=0)
    one, two = _pair(redis_pair, config, clock)
    assert (await one.acquire(*PRIMARY)).allowed
    await one.record(*PRIMARY, ok=True)
    [status] = await two.status([PRIMARY])
    assert status.window_calls == 1
    assert await two.record(*PRIMARY, ok=False) is State.OPEN
    assert not (await one.acquire(*PRIMARY)).allowed


# -- through the real router ---------------------------------------------------------


def _request(text: str = "What is 2+2?") -> chat_api.ChatRequest:
    return chat_api.ChatRequest(
        messages=[
            chat_pb2.Message(role=chat_pb2.ROLE_USER, content=[chat_pb2.ContentPart(text=text)])
        ],
        generation=chat_pb2.GenerationConfig(max_tokens=32),
        cache=chat_api.CacheControl(mode=chat_api.CACHE_MODE_DISABLED),
    )


def _chats(fake: object) -> int:
    return sum(r.path.endswith("/chat/completions") for r in fake.requests)  # type: ignore[attr-defined]


@pytest.fixture
async def router(suite: Suite) -> AsyncIterator[tuple[Suite, Clock, Breakers]]:
    """The suite's router with breakers that trip after 3 failures and a hand-moved clock."""
    engine: Engine = suite.running["router"].service.engine  # type: ignore[attr-defined]
    clock = Clock()
    replica = connect_redis(suite.settings.redis_url)
    config = BreakerConfig(failures=3, cooldown=30)
    engine.breakers = Breakers(replica, config, clock=clock)
    # A second replica's view of the same breakers.
    other = connect_redis(suite.settings.redis_url)
    yield suite, clock, Breakers(other, config, clock=clock)
    await replica.aclose()
    await other.aclose()


async def _breaker_states(suite: Suite) -> dict[str, int]:
    reply = await suite.router.ListCircuitBreakers(
        router_api.ListCircuitBreakersRequest(), metadata=suite.metadata
    )
    return {b.model: b.state for b in reply.breakers}


async def test_an_open_breaker_sends_chats_straight_to_the_fallback(
    router: tuple[Suite, Clock, Breakers],
) -> None:
    suite, clock, other_replica = router
    suite.primary.set_fault(Fault.http_error(503), model="gpt-4o-mini")
    first = await suite.chat.Chat(_request(), metadata=suite.metadata)
    assert first.model == "backup/gpt-4o"
    assert _chats(suite.primary) == 3  # the third failure opened it
    assert not (await other_replica.acquire(*PRIMARY)).allowed  # every replica sees it
    states = await _breaker_states(suite)
    assert states["primary/gpt-4o-mini"] == router_api.CIRCUIT_STATE_OPEN
    assert states["backup/gpt-4o"] == router_api.CIRCUIT_STATE_CLOSED

    second = await suite.chat.Chat(_request("again"), metadata=suite.metadata)
    assert second.model == "backup/gpt-4o"
    assert _chats(suite.primary) == 3  # not called at all
    assert [(f.model, f.reason) for f in second.fallbacks] == [
        ("primary/gpt-4o-mini", "CIRCUIT_OPEN")
    ]
    assert "open circuit breaker" in second.routing_reason

    # After the cool-down one probe goes to the primary; it answers, the breaker closes.
    suite.primary.clear_faults()
    clock.now += 31
    third = await suite.chat.Chat(_request("and again"), metadata=suite.metadata)
    assert third.model == "primary/gpt-4o-mini" and not third.fallbacks
    assert _chats(suite.primary) == 4
    await suite.drain()  # the success is recorded off the request's path
    assert (await _breaker_states(suite))["primary/gpt-4o-mini"] == router_api.CIRCUIT_STATE_CLOSED


async def test_a_failed_probe_keeps_the_model_skipped(
    router: tuple[Suite, Clock, Breakers],
) -> None:
    suite, clock, _ = router
    suite.primary.set_fault(Fault.http_error(500), model="gpt-4o-mini")
    await suite.chat.Chat(_request(), metadata=suite.metadata)
    clock.now += 31
    probe = await suite.chat.Chat(_request("probe"), metadata=suite.metadata)
    assert probe.model == "backup/gpt-4o"
    assert _chats(suite.primary) == 4  # one probe, not retried once it reopened
    assert probe.fallbacks[0].reason == "UPSTREAM_UNAVAILABLE"
    after = await suite.chat.Chat(_request("after"), metadata=suite.metadata)
    assert after.fallbacks[0].reason == "CIRCUIT_OPEN" and _chats(suite.primary) == 4


async def test_client_errors_do_not_count(router: tuple[Suite, Clock, Breakers]) -> None:
    suite, _, other_replica = router
    suite.primary.set_fault(Fault.http_error(400), model="gpt-4o-mini")
    for i in range(4):
        reply = await suite.chat.Chat(_request(f"bad {i}"), metadata=suite.metadata)
        assert reply.model == "backup/gpt-4o"
    assert _chats(suite.primary) == 4  # a 4xx is not retried, and never trips the breaker
    assert (await other_replica.acquire(*PRIMARY)).allowed


async def test_every_breaker_open_is_unavailable_with_the_reason(
    router: tuple[Suite, Clock, Breakers],
) -> None:
    suite, _, other_replica = router
    for provider, model in (PRIMARY, ("backup", "gpt-4o")):
        for _ in range(3):
            await other_replica.record(provider, model, ok=False)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await suite.chat.Chat(_request(), metadata=suite.metadata)
    details = errors.decode(raised.value)
    assert (details.code, details.reason) == (grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE")
    assert "circuit breaker open" in details.message
    assert _chats(suite.primary) == 0 and _chats(suite.backup) == 0


async def test_a_client_cancel_does_not_count(router: tuple[Suite, Clock, Breakers]) -> None:
    suite, _, other_replica = router
    engine: Engine = suite.running["router"].service.engine  # type: ignore[attr-defined]
    engine.breakers = Breakers(
        other_replica._redis,  # the same store, with a breaker that trips at once
        BreakerConfig(failures=1),
    )
    suite.primary.chunk_delay = 0.2
    call = suite.chat.ChatStream(_request(), metadata=suite.metadata)
    async for event in call:
        if event.WhichOneof("event") == "text_delta":
            call.cancel()
            break
    assert await suite.primary.wait_for_streams_closed(within=5)
    await suite.drain()
    assert (await other_replica.acquire(*PRIMARY)).allowed
    [status] = await other_replica.status([PRIMARY])
    assert (status.state, status.window_failures) == (State.CLOSED, 0)
