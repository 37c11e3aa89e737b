"""Circuit breakers per (provider, model), shared by every router replica through Redis.

A breaker is *closed* (calls pass) until the model fails ``failures`` times in a
row, or at least ``rate`` of the calls in the current ``window`` fail (once the
window holds ``min_calls``); then it is *open*: the engine skips the model and
goes straight to the next one in the fallback chain. After ``cooldown`` seconds
it is *half-open*: up to ``probes`` requests are let through as probes; one
success closes it, one failure opens it again for another cool-down.

Why a Lua script rather than WATCH/MULTI: each transition reads and writes
several fields of one hash and must be atomic across replicas. A script does it
in one round trip with no retry loop; WATCH would need optimistic retries (and
extra round trips) exactly when many replicas report failures at once. The
libraries that keep breaker state in Redis (pybreaker's CircuitRedisStorage,
purgatory, asyncbreaker) have no failure-rate window and no bounded half-open
probes, and read-then-write their state in separate commands.

Time comes from the replica's clock (passed to the script), not Redis's TIME,
so that a test can drive the cool-down with its own clock; replicas' clocks
differ by far less than a cool-down. The window is a fixed window (counts reset
when it ends), which is cheap and good enough for a trip signal.

Only upstream failures are recorded (see :func:`counts_as_failure`); a client
cancel or a 4xx caused by the request is neither a success nor a failure. If
Redis is unreachable the breakers let every call through: a broken breaker
store must not take the gateway down.

A closed breaker costs no Redis round trip per chat. Once a replica has read
a breaker as closed, it trusts that for ``BreakerConfig.local_seconds`` (1 s)
before asking Redis again, and counts that breaker's successes in memory; they
reach Redis with the next failure (in the same script call, so the
consecutive count and the failure rate see them first) or when the local view
is renewed. Failures, probes and every transition still go to Redis at once,
and after a failure the replica asks Redis on every call until it reads the
breaker closed again. The price: after other replicas open a breaker, one
that has seen no failure may send the model calls for up to
``local_seconds`` more; the first of them to fail learns the breaker is
open.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import time
from collections.abc import Callable, Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.common.stores import lua_script, text
from services.providers.base import FailureKind, UpstreamError

log = logging.getLogger(__name__)

PREFIX = "router:breaker:"
# Idle breaker state is forgotten after this long (a closed breaker with no calls).
STATE_TTL_SECONDS = 86_400


class State(enum.Enum):
    """A breaker's state."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclasses.dataclass(frozen=True)
class BreakerConfig:
    """When breakers trip and recover.

    Attributes:
        failures: Consecutive failures that open a closed breaker.
        rate: Share of failed calls in a window that opens it (0-1).
        min_calls: Calls the window must hold before ``rate`` applies.
        window: Seconds of the failure-rate window.
        cooldown: Seconds an open breaker stays open before probing.
        probes: Probe calls let through at once while half-open.
        local_seconds: How long a replica trusts a closed state it read, and
            holds the successes it counts, before asking Redis again (0:
            every call asks).
    """

    failures: int = 5
    rate: float = 0.5
    min_calls: int = 20
    window: float = 60.0
    cooldown: float = 30.0
    probes: int = 1
    local_seconds: float = 1.0


@dataclasses.dataclass(frozen=True)
class Permit:
    """The answer to "may this model be called now?".

    Attributes:
        allowed: Whether to call it.
        probe: The call is a half-open probe (its outcome decides the state).
        state: The breaker's state when asked.
        opened_at: When it last opened (epoch seconds), 0 if never.
    """

    allowed: bool
    probe: bool = False
    state: State = State.CLOSED
    opened_at: float = 0.0


@dataclasses.dataclass(frozen=True)
class BreakerStatus:
    """One breaker, as operators see it."""

    provider_id: str
    model_id: str
    state: State
    consecutive_failures: int
    window_calls: int
    window_failures: int
    opened_at: float
    trips: int


def counts_as_failure(exc: UpstreamError) -> bool:
    """Whether an upstream failure says the model is unhealthy.

    A 4xx other than 429 is caused by the request (bad input, too long a
    prompt), not by the provider, so it does not count.
    """
    return exc.kind is not FailureKind.CLIENT_ERROR


class Breakers:
    """Every (provider, model) breaker, stored in Redis."""

    def __init__(
        self,
        redis: aioredis.Redis,
        config: BreakerConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config or BreakerConfig()
        self._redis = redis
        self._clock = clock
        self._acquire = redis.register_script(lua_script("services.router", "breaker_acquire"))
        self._record = redis.register_script(lua_script("services.router", "breaker_record"))
        self._release = redis.register_script(lua_script("services.router", "breaker_release"))
        # Breakers read as closed: key -> until when (this clock) that is trusted.
        self._closed_until: dict[str, float] = {}
        # Successes counted while closed, not yet in Redis: key -> count.
        self._successes: dict[str, int] = {}

    @staticmethod
    def key(provider_id: str, model_id: str) -> str:
        """The Redis key of one breaker."""
        return f"{PREFIX}{provider_id}/{model_id}"

    async def acquire(self, provider_id: str, model_id: str) -> Permit:
        """Whether the model may be called now; counts a half-open probe.

        Answered from memory while a closed state read less than
        ``local_seconds`` ago is trusted. Fails open: if Redis does not
        answer, the call is allowed.
        """
        key = self.key(provider_id, model_id)
        now = self._clock()
        if now < self._closed_until.get(key, 0.0):
            return Permit(allowed=True)
        c = self.config
        try:
            await self._flush(key, now)
            decision, state, opened_at = await self._acquire(
                keys=[key], args=[f"{now:.3f}", c.cooldown, c.probes, STATE_TTL_SECONDS]
            )
        except RedisError as exc:
            log.warning("breaker store unavailable (%s); letting the call through", exc)
            return Permit(allowed=True)
        permit = Permit(
            allowed=int(decision) > 0,
            probe=int(decision) == 2,
            state=State(text(state)),
            opened_at=float(text(opened_at)),
        )
        if permit.state is State.CLOSED:
            self._closed_until[key] = now + c.local_seconds
        return permit

    async def record(self, provider_id: str, model_id: str, *, ok: bool) -> State:
        """Records the outcome of one call; returns the breaker's new state.

        A success on a breaker this replica trusts as closed is only counted
        in memory (see the module's docstring); anything else goes to Redis
        with the successes counted so far.
        """
        key = self.key(provider_id, model_id)
        now = self._clock()
        if ok and now < self._closed_until.get(key, 0.0):
            self._successes[key] = self._successes.get(key, 0) + 1
            return State.CLOSED
        successes = self._successes.pop(key, 0)
        try:
            new = await self._send(key, now, successes + (1 if ok else 0), failed=not ok)
        except RedisError as exc:
            log.warning("breaker store unavailable (%s); outcome not recorded", exc)
            self._keep(key, successes)
            return State.CLOSED
        if ok and new is State.CLOSED:
            self._closed_until[key] = now + self.config.local_seconds
        else:  # after a failure, the next call asks Redis again
            self._closed_until.pop(key, None)
        if new is State.OPEN and not ok:
            log.warning("circuit breaker for %s/%s is open", provider_id, model_id)
        return new

    async def _flush(self, key: str, now: float) -> None:
        """Sends the successes counted in memory for ``key``, if any."""
        successes = self._successes.pop(key, 0)
        if successes:
            try:
                await self._send(key, now, successes, failed=False)
            except RedisError:
                self._keep(key, successes)
                raise

    def _keep(self, key: str, successes: int) -> None:
        """Counts ``successes`` that could not be sent again, for the next call."""
        if successes:
            self._successes[key] = self._successes.get(key, 0) + successes

    async def _send(self, key: str, now: float, successes: int, *, failed: bool) -> State:
        c = self.config
        state, _ = await self._record(
            keys=[key],
            args=[
                f"{now:.3f}",
                successes,
                "1" if failed else "0",
                c.failures,
                c.rate,
                c.min_calls,
                c.window,
                STATE_TTL_SECONDS,
            ],
        )
        return State(text(state))

    async def release(self, provider_id: str, model_id: str) -> None:
        """Gives back a probe slot whose call reported no outcome."""
        try:
            await self._release(keys=[self.key(provider_id, model_id)], args=[])
        except RedisError as exc:
            log.warning("breaker store unavailable (%s); probe not released", exc)

    async def status(self, models: Sequence[tuple[str, str]]) -> list[BreakerStatus]:
        """The breakers of ``models`` ((provider_id, model_id) pairs), as stored.

        This replica's successes counted in memory are sent first.
        """
        now = self._clock()
        for key in list(self._successes):
            await self._flush(key, now)
        pipe = self._redis.pipeline(transaction=False)
        for provider_id, model_id in models:
            pipe.hgetall(self.key(provider_id, model_id))
        rows = await pipe.execute()
        out: list[BreakerStatus] = []
        for (provider_id, model_id), raw in zip(models, rows, strict=True):
            row = {text(k): text(v) for k, v in raw.items()}
            state = State(row.get("state", "closed"))
            if (
                state is State.OPEN
                and self._clock() >= float(row.get("opened_at", "0")) + self.config.cooldown
            ):
                state = State.HALF_OPEN  # the next call will probe
            out.append(
                BreakerStatus(
                    provider_id=provider_id,
                    model_id=model_id,
                    state=state,
                    consecutive_failures=int(row.get("consecutive", "0")),
                    window_calls=int(row.get("calls", "0")),
                    window_failures=int(row.get("failed", "0")),
                    opened_at=float(row.get("opened_at", "0")),
                    trips=int(row.get("trips", "0")),
                )
            )
        return out
