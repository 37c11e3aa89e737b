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
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import time
from collections.abc import Callable, Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.providers.base import FailureKind, UpstreamError

log = logging.getLogger(__name__)

PREFIX = "router:breaker:"
# Idle breaker state is forgotten after this long (a closed breaker with no calls).
STATE_TTL_SECONDS = 86_400

# KEYS[1] the breaker's hash. ARGV: now, cooldown, probes, ttl.
# Returns {decision, state, opened_at}: decision 1 = call, 2 = call as a probe, 0 = skip.
_ACQUIRE = """
local now = tonumber(ARGV[1])
local cooldown = tonumber(ARGV[2])
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
if state == 'closed' then
  return {1, state, '0'}
end
local opened_at = redis.call('HGET', KEYS[1], 'opened_at') or '0'
if state == 'open' then
  if now < tonumber(opened_at) + cooldown then
    return {0, state, opened_at}
  end
  state = 'half_open'
  redis.call('HSET', KEYS[1], 'state', state, 'probes', 0, 'probe_at', now)
end
-- half-open: a bounded number of probes; probes that never reported (their
-- replica died) are forgotten after another cool-down.
local probes = tonumber(redis.call('HGET', KEYS[1], 'probes') or '0')
local probe_at = tonumber(redis.call('HGET', KEYS[1], 'probe_at') or '0')
if probes >= tonumber(ARGV[3]) and now >= probe_at + cooldown then
  probes = 0
end
if probes >= tonumber(ARGV[3]) then
  return {0, state, opened_at}
end
redis.call('HSET', KEYS[1], 'probes', probes + 1, 'probe_at', now)
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {2, state, opened_at}
"""

# KEYS[1] the breaker's hash. ARGV: now, ok (1/0), failures, rate, min_calls, window, ttl.
# Returns {state, consecutive failures}.
_RECORD = """
local now = tonumber(ARGV[1])
local ok = ARGV[2] == '1'
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
local function open()
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', now, 'probes', 0,
             'consecutive', 0, 'calls', 0, 'failed', 0, 'window_start', now)
  redis.call('HINCRBY', KEYS[1], 'trips', 1)
  redis.call('EXPIRE', KEYS[1], ARGV[7])
  return {'open', 0}
end
if state == 'half_open' then
  if not ok then return open() end
  redis.call('HSET', KEYS[1], 'state', 'closed', 'consecutive', 0, 'calls', 0,
             'failed', 0, 'window_start', now, 'probes', 0)
  redis.call('EXPIRE', KEYS[1], ARGV[7])
  return {'closed', 0}
end
if state == 'open' then
  return {'open', 0}  -- a call that started before the breaker opened
end
local window_start = tonumber(redis.call('HGET', KEYS[1], 'window_start') or '0')
if now >= window_start + tonumber(ARGV[6]) then
  redis.call('HSET', KEYS[1], 'calls', 0, 'failed', 0, 'window_start', now)
end
local calls = redis.call('HINCRBY', KEYS[1], 'calls', 1)
local failed = tonumber(redis.call('HGET', KEYS[1], 'failed') or '0')
local consecutive = 0
if ok then
  redis.call('HSET', KEYS[1], 'consecutive', 0)
else
  failed = redis.call('HINCRBY', KEYS[1], 'failed', 1)
  consecutive = redis.call('HINCRBY', KEYS[1], 'consecutive', 1)
end
redis.call('HSET', KEYS[1], 'state', 'closed')
redis.call('EXPIRE', KEYS[1], ARGV[7])
if not ok and (consecutive >= tonumber(ARGV[3]) or
    (calls >= tonumber(ARGV[5]) and failed >= tonumber(ARGV[4]) * calls)) then
  return open()
end
return {'closed', consecutive}
"""

# KEYS[1] the breaker's hash. Gives back a probe slot that reported nothing
# (the client cancelled, or the request was the client's fault).
_RELEASE = """
if redis.call('HGET', KEYS[1], 'state') == 'half_open' then
  local probes = tonumber(redis.call('HGET', KEYS[1], 'probes') or '0')
  if probes > 0 then redis.call('HSET', KEYS[1], 'probes', probes - 1) end
end
return 1
"""


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
    """

    failures: int = 5
    rate: float = 0.5
    min_calls: int = 20
    window: float = 60.0
    cooldown: float = 30.0
    probes: int = 1


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


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


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
        self._acquire = redis.register_script(_ACQUIRE)
        self._record = redis.register_script(_RECORD)
        self._release = redis.register_script(_RELEASE)

    @staticmethod
    def key(provider_id: str, model_id: str) -> str:
        """The Redis key of one breaker."""
        return f"{PREFIX}{provider_id}/{model_id}"

    async def acquire(self, provider_id: str, model_id: str) -> Permit:
        """Whether the model may be called now; counts a half-open probe.

        Fails open: if Redis does not answer, the call is allowed.
        """
        c = self.config
        try:
            decision, state, opened_at = await self._acquire(
                keys=[self.key(provider_id, model_id)],
                args=[f"{self._clock():.3f}", c.cooldown, c.probes, STATE_TTL_SECONDS],
            )
        except RedisError as exc:
            log.warning("breaker store unavailable (%s); letting the call through", exc)
            return Permit(allowed=True)
        return Permit(
            allowed=int(decision) > 0,
            probe=int(decision) == 2,
            state=State(_text(state)),
            opened_at=float(_text(opened_at)),
        )

    async def record(self, provider_id: str, model_id: str, *, ok: bool) -> State:
        """Records the outcome of one call; returns the breaker's new state."""
        c = self.config
        key = self.key(provider_id, model_id)
        try:
            state, _ = await self._record(
                keys=[key],
                args=[
                    f"{self._clock():.3f}",
                    "1" if ok else "0",
                    c.failures,
                    c.rate,
                    c.min_calls,
                    c.window,
                    STATE_TTL_SECONDS,
                ],
            )
        except RedisError as exc:
            log.warning("breaker store unavailable (%s); outcome not recorded", exc)
            return State.CLOSED
        new = State(_text(state))
        if new is State.OPEN and not ok:
            log.warning("circuit breaker for %s/%s is open", provider_id, model_id)
        return new

    async def release(self, provider_id: str, model_id: str) -> None:
        """Gives back a probe slot whose call reported no outcome."""
        try:
            await self._release(keys=[self.key(provider_id, model_id)], args=[])
        except RedisError as exc:
            log.warning("breaker store unavailable (%s); probe not released", exc)

    async def status(self, models: Sequence[tuple[str, str]]) -> list[BreakerStatus]:
        """The breakers of ``models`` ((provider_id, model_id) pairs), as stored."""
        pipe = self._redis.pipeline(transaction=False)
        for provider_id, model_id in models:
            pipe.hgetall(self.key(provider_id, model_id))
        rows = await pipe.execute()
        out: list[BreakerStatus] = []
        for (provider_id, model_id), raw in zip(models, rows, strict=True):
            row = {_text(k): _text(v) for k, v in raw.items()}
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
