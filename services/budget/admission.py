"""Reserve-then-settle admission: the budget service's core.

* Reserve holds the worst-case cost on every budget that applies to the
  request's subject, atomically in Redis (all or nothing), idempotently per
  request id.
* Settle writes the ledger row first (PostgreSQL is the truth), then moves the
  hold to spent in Redis. A crash between the two leaves the ledger right and
  the hold open; a retry (or the reaper, or Release) completes it, and Redis
  applies each settlement at most once.
* When Redis has lost its data, the current windows' spent counters are
  rebuilt from the ledger before anything else is admitted.
* Rate limits (requests and tokens per minute, per tenant and per API key)
  are counted by the same Reserve script (:mod:`services.budget.ratelimits`).
* When Redis is unreachable, a tenant whose policy says ``fail_open`` is
  admitted without a hold (:mod:`services.budget.failopen`); others get
  UNAVAILABLE (STORE_UNAVAILABLE with RetryInfo).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import logging
import time
import zoneinfo
from collections.abc import Callable

from orchestra.budget.v1 import budget_service_pb2 as pb
from orchestra.common.v1 import errors_pb2
from services.budget import storage
from services.budget.budgets import BudgetStore
from services.budget.catalog import Catalog, TenantContext
from services.budget.counters import Check, Counters, counter_key
from services.budget.failopen import FailOpen, redis_down
from services.budget.ledger import Charge, Ledger
from services.budget.ratelimits import rate_checks
from services.budget.refusals import already_settled, exhausted, not_reserved, rate_limited
from services.budget.unheld import Unheld, UnheldStore
from services.budget.windows import Window, window_of
from services.common.errors import Unavailable

log = logging.getLogger(__name__)

DEFAULT_HOLD_TTL_SECONDS = 600
# After Redis fails, Reserve answers without trying it for this long.
REDIS_DOWN_SKIP_SECONDS = 0.5


@dataclasses.dataclass(frozen=True)
class Subject:
    """Who pays, at every level."""

    tenant_id: str
    team: str = ""
    project: str = ""
    key_id: str = ""
    end_user: str = ""


@dataclasses.dataclass(frozen=True)
class Warning:
    """A soft budget this request crosses."""

    budget_id: str
    used_micro_usd: int
    limit_micro_usd: int


@dataclasses.dataclass(frozen=True)
class Hold:
    """A granted reservation (``unheld``: admitted without a hold, fail open)."""

    held_micro_usd: int
    expire_at: float
    warnings: tuple[Warning, ...] = ()
    unheld: bool = False


@dataclasses.dataclass(frozen=True)
class Settlement:
    """The outcome of a settle."""

    charged_micro_usd: int
    released_micro_usd: int


@dataclasses.dataclass(frozen=True)
class Status:
    """One budget in its current window."""

    budget: pb.Budget
    window: Window
    spent_micro_usd: int
    reserved_micro_usd: int
    remaining_micro_usd: int
    projected_micro_usd: int


def applies(budget: pb.Budget, subject: Subject) -> bool:
    """Whether ``budget`` counts the spend of ``subject``."""
    level = budget.level
    if level == pb.BUDGET_LEVEL_TENANT:
        return True
    if level == pb.BUDGET_LEVEL_TEAM:
        return bool(subject.team) and budget.subject == subject.team
    if level == pb.BUDGET_LEVEL_PROJECT:
        return bool(subject.project) and budget.subject == subject.project
    if level == pb.BUDGET_LEVEL_API_KEY:
        return bool(subject.key_id) and budget.subject == subject.key_id
    if level == pb.BUDGET_LEVEL_END_USER:
        return bool(subject.end_user) and budget.subject in ("*", subject.end_user)
    return False


def per_end_user(budget: pb.Budget) -> bool:
    """Whether the budget limits each end user separately ("*")."""
    return budget.level == pb.BUDGET_LEVEL_END_USER and budget.subject == "*"


def counter_of(budget: pb.Budget, window: Window, subject: Subject) -> str:
    """The counter key of ``budget`` for ``subject`` in ``window`` ("" if uncounted)."""
    if not window.counted:
        return ""
    end_user = subject.end_user if per_end_user(budget) else None
    return counter_key(budget.budget_id, window.key, end_user)


def _utc(epoch: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch, dt.UTC)


def _settlement(charge: Charge) -> Settlement:
    released = max(charge.held_micro_usd - charge.cost_micro_usd, 0)
    return Settlement(charge.cost_micro_usd, released)


class Admission:
    """Reserve, settle, release, status and the ledger rebuild."""

    def __init__(
        self,
        catalog: Catalog,
        counters: Counters,
        ledger: Ledger,
        budgets: BudgetStore,
        *,
        unheld: UnheldStore | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._catalog = catalog
        self._counters = counters
        self._ledger = ledger
        self._budgets = budgets
        self._clock = clock
        self._rebuild_lock = asyncio.Lock()
        self._redis_down_until = 0.0  # monotonic; Reserve skips Redis until then
        self._fail_open = (
            None
            if unheld is None
            else FailOpen(unheld, ledger, counters, self._unheld_keys, clock=clock)
        )

    # --- reserve --------------------------------------------------------------

    async def reserve(
        self,
        request_id: str,
        subject: Subject,
        model: str,
        amount: int,
        tokens: int,
        ttl_seconds: int,
    ) -> Hold:
        """Holds ``amount`` on every budget of ``subject``, or refuses.

        Raises:
            NotFound: The tenant does not exist.
            ResourceExhausted: BUDGET_EXHAUSTED naming the first hard budget
                that would be exceeded, or RATE_LIMITED naming the rate limit
                (with RetryInfo); nothing was held or counted.
            Unavailable: STORE_UNAVAILABLE (Redis down and the tenant fails
                closed, or PostgreSQL down).
        """
        context = await self._catalog.tenant(subject.tenant_id)
        now = self._clock()
        applicable = [b for b in context.budgets if applies(b, subject)]
        checks = [self._check(b, context, subject, now) for b in applicable]
        key_limit = await self._catalog.key_rate_limit(subject.tenant_id, subject.key_id)
        rates = rate_checks(
            now, subject.tenant_id, context.policy.rate_limit, subject.key_id, key_limit, tokens
        )
        ttl = ttl_seconds or DEFAULT_HOLD_TTL_SECONDS
        record = {
            "tenant_id": subject.tenant_id,
            "team": subject.team,
            "project": subject.project,
            "key_id": subject.key_id,
            "end_user": subject.end_user,
            "model": model,
            "tokens": str(tokens),
            "reserve_time": f"{now:.6f}",
        }
        # Millisecond precision, as stored: a repeated Reserve answers the same.
        expire_at = round(now + ttl, 3)
        by_id = {b.budget_id: b for b in applicable}
        try:
            if time.monotonic() < self._redis_down_until:
                # Redis just failed: answer within Reserve's deadline instead of
                # waiting for another connect timeout.
                raise storage.store_unavailable("redis", ConnectionError("recently unreachable"))
            for _ in range(2):
                outcome = await self._counters.reserve(
                    request_id, amount, ttl, expire_at, checks, record, rates
                )
                if outcome.status != "COLD":
                    break
                await self.rebuild()
        except Unavailable as exc:
            if redis_down(exc) and time.monotonic() >= self._redis_down_until:
                self._redis_down_until = time.monotonic() + REDIS_DOWN_SKIP_SECONDS
            if not (redis_down(exc) and context.policy.fail_open and self._fail_open):
                raise
            for budget in applicable:  # per-request caps need no counter
                cap = budget.window == pb.BUDGET_WINDOW_REQUEST and not budget.soft
                if cap and amount > budget.limit_micro_usd:
                    raise exhausted(budget, 0, amount) from None
            row = Unheld(
                request_id,
                subject.tenant_id,
                subject.team,
                subject.project,
                subject.key_id,
                subject.end_user,
                model,
                amount,
                tokens,
                _utc(now),
                _utc(expire_at),
            )
            stored = await self._fail_open.admit(row)
            return Hold(0, stored.expire_time.timestamp(), unheld=True)
        if outcome.status == "EXISTS":
            return Hold(outcome.held_micro_usd, outcome.expire_at)
        if outcome.status == "EXHAUSTED":
            raise exhausted(by_id[outcome.budget_id], outcome.used_micro_usd, amount)
        if outcome.status == "RATE_LIMITED":
            raise rate_limited(outcome.rate_limit, outcome.rate_used, now)
        if outcome.status != "OK":
            raise Unavailable(
                errors_pb2.ERROR_REASON_STORE_UNAVAILABLE,
                "budget counters are being rebuilt; retry shortly",
                retry_after=1.0,
            )
        warnings = tuple(
            Warning(bid, used, by_id[bid].limit_micro_usd) for bid, used in outcome.warnings
        )
        return Hold(amount, expire_at, warnings)

    def _check(
        self, budget: pb.Budget, context: TenantContext, subject: Subject, now: float
    ) -> Check:
        window = window_of(budget.window, _utc(now), context.tz)
        return Check(
            budget.budget_id,
            budget.limit_micro_usd,
            budget.soft,
            counter_of(budget, window, subject),
            window.counter_expiry(),
        )

    # --- settle and release ---------------------------------------------------

    async def settle(
        self,
        request_id: str,
        cost: int,
        prompt_tokens: int,
        completion_tokens: int,
        partial: bool,
    ) -> Settlement:
        """Charges ``cost`` for a reserved request (in full, even above the hold).

        A request admitted without a hold (fail open) is settled from its
        ``budget.unheld`` row, even while Redis is still down.

        Raises:
            NotFound: RESERVATION_NOT_FOUND.
            FailedPrecondition: ALREADY_SETTLED with a different amount.
            Unavailable: STORE_UNAVAILABLE (a held request while Redis is down).
        """
        try:
            hold = await self._counters.hold(request_id)
        except Unavailable as exc:
            if not redis_down(exc) or self._fail_open is None:
                raise
            unheld = await self._fail_open.settle(
                request_id, cost, prompt_tokens, completion_tokens, partial
            )
            if unheld is None:
                raise
            return self._settled(unheld, cost)
        if (not hold or "unheld" in hold) and self._fail_open is not None:
            unheld = await self._fail_open.settle(
                request_id, cost, prompt_tokens, completion_tokens, partial
            )
            if unheld is not None:
                return self._settled(unheld, cost)
        if not hold:
            prior = await self._ledger.find(request_id)
            if prior is None:
                raise not_reserved(request_id)
            if prior.cost_micro_usd != cost:
                raise already_settled(prior, cost)
            return _settlement(prior)
        charge = Charge(
            request_id=request_id,
            tenant_id=hold["tenant_id"],
            team=hold["team"],
            project=hold["project"],
            key_id=hold["key_id"],
            end_user=hold["end_user"],
            model=hold["model"],
            held_micro_usd=int(hold["held"]),
            cost_micro_usd=cost,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            partial=partial,
            spend_time=_utc(float(hold["reserve_time"])),
        )
        recorded, _ = await self._ledger.record(charge)
        if recorded.cost_micro_usd != cost:
            raise already_settled(recorded, cost)
        # Also on a repeat: the earlier attempt may have died before this step.
        used_tokens = prompt_tokens + completion_tokens
        # Without reported usage (0 tokens) nothing is given back: the worst case stands.
        unused = int(hold.get("tokens") or 0) - used_tokens if used_tokens else 0
        await self._counters.settle(
            request_id,
            json.loads(hold["keys"]),
            cost,
            (json.loads(hold.get("tpm") or "[]"), unused),
        )
        return _settlement(recorded)

    @staticmethod
    def _settled(recorded: Charge, cost: int) -> Settlement:
        if recorded.cost_micro_usd != cost:
            raise already_settled(recorded, cost)
        return _settlement(recorded)

    async def _unheld_keys(self, row: Unheld) -> list[str]:
        """The counters an unheld request's spend counts in (its admission's windows)."""
        subject = Subject(row.tenant_id, row.team, row.project, row.key_id, row.end_user)
        context = await self._catalog.tenant(row.tenant_id)
        at = row.reserve_time
        keys = []
        for budget in context.budgets:
            if applies(budget, subject):
                key = counter_of(budget, window_of(budget.window, at, context.tz), subject)
                if key:
                    keys.append(key)
        return keys

    async def release(self, request_id: str) -> int:
        """Frees a hold without charging; returns the amount released.

        A hold already settled releases nothing; a repeated release returns
        the same amount; a request admitted without a hold (fail open)
        releases nothing. Raises NotFound (RESERVATION_NOT_FOUND).
        """
        try:
            hold = await self._counters.hold(request_id)
        except Unavailable as exc:
            if redis_down(exc) and self._fail_open and await self._fail_open.release(request_id):
                return 0
            raise
        prior = await self._ledger.find(request_id)
        if not hold and self._fail_open and await self._fail_open.release(request_id):
            return 0
        if not hold:
            if prior is None:
                raise not_reserved(request_id)
            return 0
        keys = json.loads(hold["keys"])
        if prior is not None:
            # Settled in the ledger but not (yet) in Redis: finish the settle
            # rather than lose the charge.
            await self._counters.settle(request_id, keys, prior.cost_micro_usd)
            return 0
        state, amount = await self._counters.release(request_id, keys)
        if state == "GONE":
            raise not_reserved(request_id)
        return 0 if state == "settled" else amount

    async def reap(self, limit: int = 200) -> int:
        """Releases holds past their expiry; returns how many were handled.

        A hold whose request is in the ledger is settled instead. (Settling
        expired holds at their reserved amount is a later step.)
        """
        handled = 0
        if self._fail_open is not None:
            handled = await self._fail_open.reap(limit)
        now = self._clock()
        ids = await self._counters.expired(now, limit)
        if not ids:
            return handled
        charges = await self._ledger.find_many(ids)
        for request_id in ids:
            hold = await self._counters.hold(request_id)
            keys = json.loads(hold["keys"]) if hold else []
            if request_id in charges:
                await self._counters.settle(request_id, keys, charges[request_id].cost_micro_usd)
            else:
                await self._counters.release(request_id, keys, expired_before=now)
        return handled + len(ids)

    # --- status -------------------------------------------------------------------

    async def status(self, subject: Subject) -> list[Status]:
        """Spent, reserved and remaining of every budget that applies to ``subject``."""
        context = await self._catalog.tenant(subject.tenant_id)
        now = self._clock()
        applicable = [b for b in context.budgets if applies(b, subject)]
        windows = [window_of(b.window, _utc(now), context.tz) for b in applicable]
        counters = [counter_of(b, w, subject) for b, w in zip(applicable, windows, strict=True)]
        values = await self._counters.read([c for c in counters if c])
        readings = iter(values)
        statuses = []
        for budget, window, counter in zip(applicable, windows, counters, strict=True):
            spent, reserved = next(readings) if counter else (0, 0)
            remaining = max(budget.limit_micro_usd - spent - reserved, 0)
            statuses.append(
                Status(
                    budget,
                    window,
                    spent,
                    reserved,
                    remaining,
                    _projected(budget, window, spent, now),
                )
            )
        return statuses

    # --- rebuild from the ledger ------------------------------------------------

    async def ensure_ready(self) -> None:
        """Rebuilds the counters from the ledger if Redis lost them."""
        if not await self._counters.is_ready():
            await self.rebuild()

    async def rebuild(self) -> None:
        """Raises every current window's spent counter to the ledger's sum.

        Counters are never lowered: a settlement racing the rebuild may be
        counted twice for a moment, which errs on the side of the budget.
        """
        async with self._rebuild_lock:
            if await self._counters.is_ready():
                return  # another task finished a rebuild meanwhile
            live = await self._budgets.all_live()
            for budget, zone in live:
                await self.seed(budget, _zone(zone))
            await self._counters.mark_ready()
            log.info("rebuilt budget counters of %d budgets from the ledger", len(live))

    async def seed(self, budget: pb.Budget, tz: zoneinfo.ZoneInfo) -> None:
        """Brings one budget's current-window counters up to the ledger."""
        window = window_of(budget.window, _utc(self._clock()), tz)
        if not window.counted:
            return
        sums = await self._ledger.spent_in(budget, window)
        user = per_end_user(budget)
        expiry = window.counter_expiry()
        await self._counters.raise_spent(
            {
                counter_key(budget.budget_id, window.key, who if user else None): (spent, expiry)
                for who, spent in sums.items()
            }
        )


def _zone(name: str) -> zoneinfo.ZoneInfo:
    try:
        return zoneinfo.ZoneInfo(name or "UTC")
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return zoneinfo.ZoneInfo("UTC")


def _projected(budget: pb.Budget, window: Window, spent: int, now: float) -> int:
    """Spend projected to the end of a month window at the rate so far."""
    if budget.window != pb.BUDGET_WINDOW_MONTH or window.start is None or window.end is None:
        return 0
    elapsed = now - window.start.timestamp()
    total = window.end.timestamp() - window.start.timestamp()
    return int(spent * total / elapsed) if elapsed > 0 else spent
