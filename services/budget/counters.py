"""Redis counters and holds, changed only by atomic Lua scripts.

Layout (every key starts with ``{budget}:``, a Redis Cluster hash tag: all of
budget's keys share one slot, so each script's keys, which mix budgets, holds,
the reaper's set and provider-wide rate limits, are always on one node):

* ``{budget}:ctr:<budget_id>:<window>[:u:<end_user>]`` — hash with ``spent`` and
  ``reserved`` micro-USD of one budget in one window.
* ``{budget}:hold:<request_id>`` — hash describing a hold: who, how much, which
  counters, ``state`` (held, released, settled), the settled ``cost`` and
  ``reaped`` ("1" while that cost is the reaper's full-hold charge, which a
  late Settle corrects once). Kept for a day after the hold expires so
  retries of Reserve, Settle and Release stay idempotent.
* ``{budget}:holds`` — sorted set of open holds by expiry, for the reaper.
* ``{budget}:ready`` — present once the counters were rebuilt from the ledger;
  its absence means Redis lost its data (cold start).
* ``{budget}:rebuilding`` — the lock one replica holds while it rebuilds.
* ``{budget}:rl:<scope>/<limit>:<minute>`` — requests or tokens counted in one
  minute for one rate limit (:mod:`services.budget.ratelimits`).

A request admitted while Redis was down (fail open, :mod:`services.budget.failopen`)
gets a hold record only when its cost reaches the counters: state ``settled``,
``held`` 0 and ``unheld`` 1.

The scripts are in ``services/budget/lua/`` (their KEYS and ARGV are listed
at the top of each). Scripts use only commands Redis 6.2 and 7 both have, and never turn numbers
into strings inside Lua (large integers would come out as ``1e+15``): amounts
are passed and stored as the decimal strings the caller sent.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence

import redis.asyncio as aioredis

from services.budget.batching import Batcher
from services.budget.ratelimits import TOKENS_PER_MINUTE, RateCheck
from services.common.outages import redis_outage
from services.common.stores import lua_script, text

PREFIX = "{budget}:"
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


class Counters:
    """The Redis side of admission."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._redis = client
        self._reserve = client.register_script(lua_script(__package__, "reserve"))
        self._settle = client.register_script(lua_script(__package__, "settle"))
        self._release = client.register_script(lua_script(__package__, "release"))
        self._raise_spent = client.register_script(lua_script(__package__, "raise_spent"))
        self._settle_unheld = client.register_script(lua_script(__package__, "settle_unheld"))
        self._restore = client.register_script(lua_script(__package__, "restore"))
        self._holds: Batcher[str, dict[str, str]] = Batcher(self._holds_of)

    @redis_outage
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
        reply = [text(v) for v in await self._reserve(keys=keys, args=args)]
        return _reserve_outcome(reply)

    async def hold(self, request_id: str) -> dict[str, str]:
        """The hold record of ``request_id`` ({} if none); concurrent reads share a pipeline."""
        return await self._holds.submit(request_id)

    @redis_outage
    async def _holds_of(self, request_ids: Sequence[str]) -> list[dict[str, str]]:
        pipe = self._redis.pipeline(transaction=False)
        for request_id in request_ids:
            pipe.hgetall(hold_key(request_id))
        return [{text(k): text(v) for k, v in raw.items()} for raw in await pipe.execute()]

    @redis_outage
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
        reply = [text(v) for v in await self._settle(keys=keys, args=args)]
        return reply[1] if reply[0] == "OK" else reply[0]

    @redis_outage
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
        reply = [text(v) for v in await self._settle_unheld(keys=keys, args=args)]
        return reply[1] if reply[0] == "OK" else reply[0]

    @redis_outage
    async def release(
        self, request_id: str, counters: Sequence[str], expired_before: float | None = None
    ) -> tuple[str, int]:
        """Frees a hold. Returns (state before: "OK", "released", "settled",
        "GONE" or "LIVE" when ``expired_before`` is given and the hold has not
        expired, amount released or held)."""
        keys = [hold_key(request_id), HOLDS, *counters]
        cutoff = "" if expired_before is None else f"{expired_before:.3f}"
        reply = [text(v) for v in await self._release(keys=keys, args=[request_id, cutoff])]
        return reply[0], int(reply[1]) if len(reply) > 1 else 0

    @redis_outage
    async def expired(self, now: float, limit: int) -> list[str]:
        """Request ids of open holds whose expiry is before ``now``."""
        ids = await self._redis.zrangebyscore(HOLDS, "-inf", f"{now:.3f}", start=0, num=limit)
        return [text(i) for i in ids]

    @redis_outage
    async def forget(self, request_id: str) -> None:
        """Drops ``request_id`` from the reaper's list (its hold is not open)."""
        await self._redis.zrem(HOLDS, request_id)

    @redis_outage
    async def read(self, counters: Sequence[str]) -> list[tuple[int, int]]:
        """(spent, reserved) of each counter."""
        pipe = self._redis.pipeline(transaction=False)
        for key in counters:
            pipe.hmget(key, ["spent", "reserved"])
        replies = await pipe.execute()
        return [(int(s or 0), int(r or 0)) for s, r in replies]

    @redis_outage
    async def read_if_ready(self, counters: Sequence[str]) -> list[tuple[int, int]] | None:
        """(spent, reserved) of each counter, or None if Redis lost them since the last rebuild.

        The readiness check and the reads are one pipeline, so a reading taken
        after Redis was flushed (and before any replica noticed) is never
        mistaken for zero spend.
        """
        pipe = self._redis.pipeline(transaction=True)
        pipe.exists(READY)
        for key in counters:
            pipe.hmget(key, ["spent", "reserved"])
        ready, *replies = await pipe.execute()
        if not ready:
            return None
        return [(int(s or 0), int(r or 0)) for s, r in replies]

    @redis_outage
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

    @redis_outage
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

    async def exists(self, request_id: str) -> bool:
        """Whether a hold record exists for ``request_id`` (read with :meth:`hold`'s pipeline)."""
        return bool(await self.hold(request_id))

    @redis_outage
    async def try_lock_rebuild(self, seconds: int) -> bool:
        """Takes the replicas' rebuild lock for ``seconds`` (False: another has it)."""
        return bool(await self._redis.set(REBUILDING, "1", nx=True, ex=seconds))

    @redis_outage
    async def unlock_rebuild(self) -> None:
        """Gives the rebuild lock back."""
        await self._redis.delete(REBUILDING)

    @redis_outage
    async def is_ready(self) -> bool:
        """Whether the counters were rebuilt since Redis last lost its data."""
        return bool(await self._redis.exists(READY))

    @redis_outage
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
