"""Redis counters and holds, changed only by atomic Lua scripts.

Layout (all keys under ``budget:``):

* ``budget:ctr:<budget_id>:<window>[:u:<end_user>]`` — hash with ``spent`` and
  ``reserved`` micro-USD of one budget in one window.
* ``budget:hold:<request_id>`` — hash describing a hold: who, how much, which
  counters, ``state`` (held, released, settled), the settled ``cost`` and
  ``reaped`` ("1" while that cost is the reaper's full-hold charge, which a
  late Settle corrects once). Kept for a day after the hold expires so
  retries of Reserve, Settle and Release stay idempotent.
* ``budget:holds`` — sorted set of open holds by expiry, for the reaper.
* ``budget:ready`` — present once the counters were rebuilt from the ledger;
  its absence means Redis lost its data (cold start).
* ``budget:rebuilding`` — the lock one replica holds while it rebuilds.
* ``budget:rl:<scope>/<limit>:<minute>`` — requests or tokens counted in one
  minute for one rate limit (:mod:`services.budget.ratelimits`).

A request admitted while Redis was down (fail open, :mod:`services.budget.failopen`)
gets a hold record only when its cost reaches the counters: state ``settled``,
``held`` 0 and ``unheld`` 1.

Scripts use only commands Redis 6.2 and 7 both have, and never turn numbers
into strings inside Lua (large integers would come out as ``1e+15``): amounts
are passed and stored as the decimal strings the caller sent.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis

from services.budget import storage
from services.budget.ratelimits import TOKENS_PER_MINUTE, RateCheck

PREFIX = "budget:"
HOLDS = f"{PREFIX}holds"
READY = f"{PREFIX}ready"
REBUILDING = f"{PREFIX}rebuilding"
# How long a hold's record outlives its expiry (idempotent retries, late settles).
HOLD_RECORD_GRACE_SECONDS = 86_400


def counter_key(budget_id: str, window_key: str, end_user: str | None = None) -> str:
    """The counter of one budget in one window (per end user for "*" budgets)."""
    base = f"{PREFIX}ctr:{budget_id}:{window_key}"
    return base if end_user is None else f"{base}:u:{end_user}"


def hold_key(request_id: str) -> str:
    """The record of a request's hold."""
    return f"{PREFIX}hold:{request_id}"


_RESERVE = """
-- KEYS: hold, holds, ready, counters..., rate counters...
-- ARGV: amount, expire_at, record_ttl, request_id, n, n * (budget_id, limit,
--       soft, counter index or 0, counter expireat or 0), m, m * (name, limit,
--       increment, counter index, counter expireat), hold field pairs...
if redis.call('EXISTS', KEYS[3]) == 0 then return {'COLD'} end
local prior = redis.call('HMGET', KEYS[1], 'held', 'expire_at', 'state')
if prior[1] then return {'EXISTS', prior[1], prior[2], prior[3]} end
local amount = tonumber(ARGV[1])
local n = tonumber(ARGV[5])
local warnings = {}
for i = 0, n - 1 do
  local b = 6 + i * 5
  local idx = tonumber(ARGV[b + 3])
  local used = amount
  if idx > 0 then
    local v = redis.call('HMGET', KEYS[idx], 'spent', 'reserved')
    used = used + (tonumber(v[1]) or 0) + (tonumber(v[2]) or 0)
  end
  if used > tonumber(ARGV[b + 1]) then
    if ARGV[b + 2] ~= '1' then return {'EXHAUSTED', ARGV[b], used - amount} end
    table.insert(warnings, ARGV[b])
    table.insert(warnings, used)
  end
end
local r0 = 6 + n * 5
local m = tonumber(ARGV[r0])
for i = 0, m - 1 do
  local b = r0 + 1 + i * 5
  local count = tonumber(redis.call('GET', KEYS[tonumber(ARGV[b + 3])]) or '0')
  if count + tonumber(ARGV[b + 2]) > tonumber(ARGV[b + 1]) then
    return {'RATE_LIMITED', ARGV[b], count}
  end
end
for i = 0, n - 1 do
  local b = 6 + i * 5
  local idx = tonumber(ARGV[b + 3])
  if idx > 0 then
    redis.call('HINCRBY', KEYS[idx], 'reserved', ARGV[1])
    if ARGV[b + 4] ~= '0' then redis.call('EXPIREAT', KEYS[idx], ARGV[b + 4]) end
  end
end
for i = 0, m - 1 do
  local b = r0 + 1 + i * 5
  local key = KEYS[tonumber(ARGV[b + 3])]
  redis.call('INCRBY', key, ARGV[b + 2])
  redis.call('EXPIREAT', key, ARGV[b + 4])
end
local fields = {}
for j = r0 + 1 + m * 5, #ARGV do table.insert(fields, ARGV[j]) end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[4])
local out = {'OK'}
for _, w in ipairs(warnings) do table.insert(out, w) end
return out
"""

_SETTLE = """
-- KEYS: hold, holds, n counters..., tokens-per-minute counters...
-- ARGV: cost, request_id, n, tokens reserved but not used, reaped ('1': the
--       reaper's provisional charge of an expired hold, '0': a reported cost)
local v = redis.call('HMGET', KEYS[1], 'state', 'held', 'reaped', 'cost')
if not v[1] then return {'GONE'} end
local last = 2 + tonumber(ARGV[3])
if v[1] == 'settled' then
  if v[3] ~= '1' or ARGV[5] ~= '0' then return {'SETTLED'} end
  -- A late Settle (or Release) replaces the reaper's charge, once.
  local delta = string.format('%d', tonumber(ARGV[1]) - tonumber(v[4]))
  for i = 3, last do redis.call('HINCRBY', KEYS[i], 'spent', delta) end
  redis.call('HSET', KEYS[1], 'reaped', '0', 'cost', ARGV[1])
  return {'CORRECTED', v[4]}
end
for i = 3, last do
  if v[1] == 'held' and v[2] ~= '0' then
    redis.call('HINCRBY', KEYS[i], 'reserved', '-' .. v[2])
  end
  redis.call('HINCRBY', KEYS[i], 'spent', ARGV[1])
end
-- Unused tokens go back to their minute, if that minute's counter still exists.
if ARGV[4] ~= '0' then
  for i = last + 1, #KEYS do
    if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('DECRBY', KEYS[i], ARGV[4]) end
  end
end
redis.call('HSET', KEYS[1], 'state', 'settled', 'cost', ARGV[1], 'reaped', ARGV[5])
redis.call('ZREM', KEYS[2], ARGV[2])
return {'OK', v[1]}
"""

_RELEASE = """
-- KEYS: hold, holds, counters...   ARGV: request_id, expired_before ('' = now)
local v = redis.call('HMGET', KEYS[1], 'state', 'held', 'expire_at')
if not v[1] then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return {'GONE'}
end
if v[1] ~= 'held' then return {v[1], v[2]} end
if ARGV[2] ~= '' and tonumber(v[3]) > tonumber(ARGV[2]) then return {'LIVE'} end
if v[2] ~= '0' then
  for i = 3, #KEYS do redis.call('HINCRBY', KEYS[i], 'reserved', '-' .. v[2]) end
end
redis.call('HSET', KEYS[1], 'state', 'released')
redis.call('ZREM', KEYS[2], ARGV[1])
return {'OK', v[2]}
"""

_SETTLE_UNHELD = """
-- A request admitted while Redis was unreachable (fail open) has no hold;
-- its settled cost is added to spent once, recorded as a settled hold. A
-- charge the reaper made ('1') is replaced once by a reported one ('0').
-- KEYS: hold, holds, counters...
-- ARGV: cost, request_id, record_ttl, expire_at, reaped
local v = redis.call('HMGET', KEYS[1], 'state', 'held', 'reaped', 'cost')
if v[1] == 'settled' then
  if v[3] ~= '1' or ARGV[5] ~= '0' then return {'SETTLED'} end
  local delta = string.format('%d', tonumber(ARGV[1]) - tonumber(v[4]))
  for i = 3, #KEYS do redis.call('HINCRBY', KEYS[i], 'spent', delta) end
  redis.call('HSET', KEYS[1], 'reaped', '0', 'cost', ARGV[1])
  return {'CORRECTED', v[4]}
end
for i = 3, #KEYS do
  if v[1] == 'held' and v[2] ~= '0' then
    redis.call('HINCRBY', KEYS[i], 'reserved', '-' .. v[2])
  end
  redis.call('HINCRBY', KEYS[i], 'spent', ARGV[1])
end
if v[1] then
  redis.call('HSET', KEYS[1], 'state', 'settled', 'cost', ARGV[1], 'reaped', ARGV[5])
else
  redis.call('HSET', KEYS[1], 'state', 'settled', 'cost', ARGV[1], 'held', '0', 'keys', '[]',
    'expire_at', ARGV[4], 'unheld', '1', 'reaped', ARGV[5])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
redis.call('ZREM', KEYS[2], ARGV[2])
return {'OK', v[1] or 'unheld'}
"""

_RESTORE = """
-- Puts back a hold Redis lost (cold start), unless its record exists.
-- KEYS: hold, holds, counters...   ARGV: amount, expire_at, record_ttl,
--       request_id, hold field pairs...
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if ARGV[1] ~= '0' then
  for i = 3, #KEYS do redis.call('HINCRBY', KEYS[i], 'reserved', ARGV[1]) end
end
local fields = {}
for j = 5, #ARGV do table.insert(fields, ARGV[j]) end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[4])
return 1
"""

_RAISE_SPENT = """
-- KEYS: counters   ARGV: per counter (spent from the ledger, expireat or 0)
for i = 1, #KEYS do
  local current = tonumber(redis.call('HGET', KEYS[i], 'spent') or '0')
  if current < tonumber(ARGV[2 * i - 1]) then
    redis.call('HSET', KEYS[i], 'spent', ARGV[2 * i - 1])
  end
  if ARGV[2 * i] ~= '0' then redis.call('EXPIREAT', KEYS[i], ARGV[2 * i]) end
end
return #KEYS
"""


@dataclasses.dataclass(frozen=True)
class Check:
    """One budget a Reserve must pass.

    Attributes:
        budget_id: The budget.
        limit_micro_usd: Its limit.
        soft: Soft budgets warn instead of refusing.
        counter: Its counter key, or "" for a per-request cap.
        counter_expiry: Epoch second the counter may vanish after (0: never).
    """

    budget_id: str
    limit_micro_usd: int
    soft: bool
    counter: str
    counter_expiry: int


@dataclasses.dataclass(frozen=True)
class ReserveOutcome:
    """What the reserve script decided.

    Attributes:
        status: "OK", "EXISTS" (a hold with this request id exists), "EXHAUSTED",
            "RATE_LIMITED" or "COLD" (counters must be rebuilt first).
        held_micro_usd: The hold (OK, EXISTS).
        expire_at: The hold's expiry, epoch seconds (EXISTS).
        state: The existing hold's state (EXISTS).
        budget_id: The budget that refused (EXHAUSTED).
        used_micro_usd: Its spent + reserved before this request (EXHAUSTED).
        rate_limit: The rate limit that refused (RATE_LIMITED).
        rate_used: What its window had counted before this request (RATE_LIMITED).
        warnings: (budget_id, used after this request) of soft budgets crossed.
    """

    status: str
    held_micro_usd: int = 0
    expire_at: float = 0.0
    state: str = ""
    budget_id: str = ""
    used_micro_usd: int = 0
    rate_limit: str = ""
    rate_used: int = 0
    warnings: tuple[tuple[str, int], ...] = ()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Counters:
    """The Redis side of admission."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._redis = client
        self._reserve = client.register_script(_RESERVE)
        self._settle = client.register_script(_SETTLE)
        self._release = client.register_script(_RELEASE)
        self._raise_spent = client.register_script(_RAISE_SPENT)
        self._settle_unheld = client.register_script(_SETTLE_UNHELD)
        self._restore = client.register_script(_RESTORE)

    @storage.redis_store
    async def reserve(
        self,
        request_id: str,
        amount: int,
        ttl_seconds: int,
        expire_at: float,
        checks: Sequence[Check],
        hold: Mapping[str, str],
        rates: Sequence[RateCheck] = (),
    ) -> ReserveOutcome:
        """Holds ``amount`` on every counted budget and counts the request in
        every rate limit, or does nothing if a hard budget or a rate limit
        would overflow.

        Args:
            request_id: The idempotency key.
            amount: Micro-USD to hold.
            ttl_seconds: How long the hold lives.
            expire_at: When it expires, epoch seconds.
            checks: The budgets that apply.
            hold: What to record about the request (who, model, tokens …).
            rates: The rate limits that apply.
        """
        counters = [c.counter for c in checks if c.counter]
        keys = [hold_key(request_id), HOLDS, READY, *counters, *(r.counter for r in rates)]
        args: list[str | int] = [
            str(amount),
            f"{expire_at:.3f}",
            ttl_seconds + HOLD_RECORD_GRACE_SECONDS,
            request_id,
            len(checks),
        ]
        index = 4  # KEYS index (1-based) of the first counter
        for check in checks:
            slot = 0
            if check.counter:
                slot, index = index, index + 1
            args += [
                check.budget_id,
                str(check.limit_micro_usd),
                "1" if check.soft else "0",
                slot,
                check.counter_expiry if check.counter else 0,
            ]
        args.append(len(rates))
        for rate in rates:
            args += [rate.name, str(rate.limit), str(rate.increment), index, rate.counter_expiry]
            index += 1
        fields = {
            **hold,
            "held": str(amount),
            "expire_at": f"{expire_at:.3f}",
            "keys": json.dumps(counters),
            "tpm": json.dumps([r.counter for r in rates if r.name.endswith(TOKENS_PER_MINUTE)]),
            "state": "held",
        }
        for name, value in fields.items():
            args += [name, value]
        reply = [_text(v) for v in await self._reserve(keys=keys, args=args)]
        return _reserve_outcome(reply)

    @storage.redis_store
    async def hold(self, request_id: str) -> dict[str, str]:
        """The hold record of ``request_id`` ({} if none)."""
        raw = await self._redis.hgetall(hold_key(request_id))
        return {_text(k): _text(v) for k, v in raw.items()}

    @storage.redis_store
    async def settle(
        self,
        request_id: str,
        counters: Sequence[str],
        cost: int,
        unused_tokens: tuple[Sequence[str], int] = ((), 0),
        *,
        reaped: bool = False,
    ) -> str:
        """Moves a hold to spent at ``cost``; returns the state it was in ("GONE" if none,
        "SETTLED" if it was settled already, "CORRECTED" if a reaped charge was replaced).

        Charges ``cost`` even if the hold was released in the meantime, and
        never twice: a hold settled by the reaper (``reaped``) is corrected
        once by a later settle with the reported cost (spent moves by the
        difference); any other repeat changes nothing.

        Args:
            request_id: The hold's request.
            counters: Its budget counters.
            cost: What to charge.
            unused_tokens: (tokens-per-minute counters, tokens reserved but
                not used): given back once, with the settlement.
        """
        tpm, unused = unused_tokens
        keys = [hold_key(request_id), HOLDS, *counters, *tpm]
        args = [
            str(cost),
            request_id,
            str(len(counters)),
            str(max(unused, 0)),
            "1" if reaped else "0",
        ]
        reply = [_text(v) for v in await self._settle(keys=keys, args=args)]
        return reply[1] if reply[0] == "OK" else reply[0]

    @storage.redis_store
    async def settle_unheld(
        self,
        request_id: str,
        counters: Sequence[str],
        cost: int,
        expire_at: float,
        *,
        reaped: bool = False,
    ) -> str:
        """Adds the cost of a request admitted without a hold (fail open) to spent.

        At most once per request id: a hold record in state "settled" is left
        alone (but a ``reaped`` charge is corrected once by a reported one);
        an open hold (the request was reserved again once Redis was back) is
        settled. Returns the prior state ("unheld" if none).
        """
        keys = [hold_key(request_id), HOLDS, *counters]
        args: list[str | int] = [
            str(cost),
            request_id,
            HOLD_RECORD_GRACE_SECONDS,
            f"{expire_at:.3f}",
            "1" if reaped else "0",
        ]
        reply = [_text(v) for v in await self._settle_unheld(keys=keys, args=args)]
        return reply[1] if reply[0] == "OK" else reply[0]

    @storage.redis_store
    async def release(
        self, request_id: str, counters: Sequence[str], expired_before: float | None = None
    ) -> tuple[str, int]:
        """Frees a hold. Returns (state before: "OK", "released", "settled",
        "GONE" or "LIVE" when ``expired_before`` is given and the hold has not
        expired, amount released or held)."""
        keys = [hold_key(request_id), HOLDS, *counters]
        cutoff = "" if expired_before is None else f"{expired_before:.3f}"
        reply = [_text(v) for v in await self._release(keys=keys, args=[request_id, cutoff])]
        return reply[0], int(reply[1]) if len(reply) > 1 else 0

    @storage.redis_store
    async def expired(self, now: float, limit: int) -> list[str]:
        """Request ids of open holds whose expiry is before ``now``."""
        ids = await self._redis.zrangebyscore(HOLDS, "-inf", f"{now:.3f}", start=0, num=limit)
        return [_text(i) for i in ids]

    @storage.redis_store
    async def forget(self, request_id: str) -> None:
        """Drops ``request_id`` from the reaper's list (its hold is not open)."""
        await self._redis.zrem(HOLDS, request_id)

    @storage.redis_store
    async def read(self, counters: Sequence[str]) -> list[tuple[int, int]]:
        """(spent, reserved) of each counter."""
        pipe = self._redis.pipeline(transaction=False)
        for key in counters:
            pipe.hmget(key, ["spent", "reserved"])
        replies = await pipe.execute()
        return [(int(s or 0), int(r or 0)) for s, r in replies]

    @storage.redis_store
    async def raise_spent(self, spent: Mapping[str, tuple[int, int]]) -> None:
        """Sets each counter's spent to at least the ledger's value.

        Args:
            spent: counter key -> (spent from the ledger, expireat or 0).
        """
        items = list(spent.items())
        for start in range(0, len(items), 500):
            batch = items[start : start + 500]
            args: list[str | int] = []
            for _, (value, expiry) in batch:
                args += [str(value), expiry]
            await self._raise_spent(keys=[k for k, _ in batch], args=args)

    @storage.redis_store
    async def restore(
        self,
        request_id: str,
        amount: int,
        expire_at: float,
        counters: Sequence[str],
        hold: Mapping[str, str],
    ) -> bool:
        """Puts back a hold lost with Redis' data; False if its record exists.

        Args:
            request_id: The hold's request.
            amount: What it holds.
            expire_at: When it expires, epoch seconds.
            counters: The counters it holds on.
            hold: What Reserve recorded about the request (who, model, tokens …).
        """
        ttl = max(int(expire_at - time.time()), 0) + HOLD_RECORD_GRACE_SECONDS
        fields = {
            **hold,
            "held": str(amount),
            "expire_at": f"{expire_at:.3f}",
            "keys": json.dumps(list(counters)),
            "tpm": "[]",  # the minute it counted in is over or lost with the data
            "state": "held",
        }
        args: list[str | int] = [str(amount), f"{expire_at:.3f}", ttl, request_id]
        for name, value in fields.items():
            args += [name, value]
        keys = [hold_key(request_id), HOLDS, *counters]
        return bool(await self._restore(keys=keys, args=args))

    @storage.redis_store
    async def exists(self, request_id: str) -> bool:
        """Whether a hold record exists for ``request_id``."""
        return bool(await self._redis.exists(hold_key(request_id)))

    @storage.redis_store
    async def try_lock_rebuild(self, seconds: int) -> bool:
        """Takes the replicas' rebuild lock for ``seconds`` (False: another has it)."""
        return bool(await self._redis.set(REBUILDING, "1", nx=True, ex=seconds))

    @storage.redis_store
    async def unlock_rebuild(self) -> None:
        """Gives the rebuild lock back."""
        await self._redis.delete(REBUILDING)

    @storage.redis_store
    async def is_ready(self) -> bool:
        """Whether the counters were rebuilt since Redis last lost its data."""
        return bool(await self._redis.exists(READY))

    @storage.redis_store
    async def mark_ready(self) -> None:
        """Records that the counters match the ledger."""
        await self._redis.set(READY, "1")


def _reserve_outcome(reply: list[str]) -> ReserveOutcome:
    status = reply[0]
    if status == "EXISTS":
        return ReserveOutcome(
            status, held_micro_usd=int(reply[1]), expire_at=float(reply[2]), state=reply[3]
        )
    if status == "EXHAUSTED":
        return ReserveOutcome(status, budget_id=reply[1], used_micro_usd=int(reply[2]))
    if status == "RATE_LIMITED":
        return ReserveOutcome(status, rate_limit=reply[1], rate_used=int(reply[2]))
    if status == "OK":
        pairs = reply[1:]
        warnings = tuple((pairs[i], int(pairs[i + 1])) for i in range(0, len(pairs), 2))
        return ReserveOutcome(status, warnings=warnings)
    return ReserveOutcome(status)
