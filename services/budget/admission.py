"""Reserve-then-settle admission: the budget service's core.

* Reserve holds the worst-case cost on every budget that applies to the
  request's subject, atomically in Redis (all or nothing), idempotently per
  request id.
* Settle and Release (:mod:`services.budget.settlement`) charge or free it.
* Every granted hold is also written to PostgreSQL (:mod:`services.budget.holds`).
  When Redis has lost its data, the current windows' spent counters are
  rebuilt from the ledger and the open holds are put back, from one
  PostgreSQL snapshot, before anything else is admitted.
* Holds that expire unsettled are charged in full by the reaper
  (:mod:`services.budget.reaper`); a late Settle or Release corrects that once.
* Thresholds crossed by settled spend send one webhook alert each
  (:mod:`services.budget.alerts`).
* Rate limits (requests and tokens per minute, per tenant, API key and
  provider) are counted by the same Reserve script (:mod:`services.budget.ratelimits`).
* When Redis is unreachable, a tenant whose policy says ``fail_open`` is
  admitted without a hold (:mod:`services.budget.failopen`); others get
  UNAVAILABLE (STORE_UNAVAILABLE with RetryInfo).
"""

from __future__ import annotations

import logging
import time
import zoneinfo
from collections.abc import Callable

from orchestra.budget.v1 import budget_service_pb2 as pb
from orchestra.common.v1 import errors_pb2, identity_pb2
from services.budget.alerts import Alerts
from services.budget.budgets import BudgetStore
from services.budget.catalog import Catalog, TenantContext
from services.budget.counters import Check, Counters, ReserveOutcome
from services.budget.failopen import FailOpen, redis_down
from services.budget.holds import HoldStore, StoredHold
from services.budget.ledger import Ledger
from services.budget.ratelimits import rate_checks
from services.budget.reaper import Reaper
from services.budget.rebuild import Rebuild
from services.budget.refusals import exhausted, rate_limited
from services.budget.settlement import Settler, Usage
from services.budget.subjects import (
    Hold,
    Settlement,
    Status,
    Subject,
    Warning,
    applies,
    counter_of,
    projected,
    rebuilding,
    utc,
)
from services.budget.unheld import Unheld, UnheldStore
from services.budget.windows import window_of
from services.common.errors import Unavailable
from services.common.outages import store_unavailable

log = logging.getLogger(__name__)

DEFAULT_HOLD_TTL_SECONDS = 600
# After Redis fails, Reserve answers without trying it for this long.
REDIS_DOWN_SKIP_SECONDS = 0.5


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
        holds: HoldStore | None = None,
        alerts: Alerts | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._catalog = catalog
        self._counters = counters
        self._ledger = ledger
        self._budgets = budgets
        self._clock = clock
        self._holds = holds
        self._alerts = alerts
        self._rebuild = Rebuild(counters, ledger, budgets, holds, clock=clock)
        self._redis_down_until = 0.0  # monotonic; Reserve skips Redis until then
        self._fail_open = (
            None
            if unheld is None
            else FailOpen(unheld, ledger, counters, self._unheld_keys, clock=clock)
        )
        self._settler = Settler(
            counters,
            ledger,
            self.ensure_ready,
            holds=holds,
            fail_open=self._fail_open,
            alerts=alerts,
        )
        self._reaper = Reaper(counters, ledger, clock=clock, on_settled=self._settler.settled_on)
        if holds is not None:
            self._reaper.given_up = holds.given_up

    # --- reserve --------------------------------------------------------------

    async def reserve(
        self,
        request_id: str,
        subject: Subject,
        model: str,
        amount: int,
        tokens: int,
        ttl_seconds: int,
        provider_limit: identity_pb2.RateLimit | None = None,
    ) -> Hold:
        """Holds ``amount`` on every budget of ``subject``, or refuses.

        ``provider_limit`` is the rate limit of the provider named by
        ``model``'s prefix ("provider/model"), counted across tenants.

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
        provider = model.split("/", 1)[0] if "/" in model else ""
        rates = rate_checks(
            now,
            subject.tenant_id,
            context.policy.rate_limit,
            subject.key_id,
            key_limit,
            tokens,
            provider,
            provider_limit,
        )
        ttl = ttl_seconds or DEFAULT_HOLD_TTL_SECONDS
        # The Redis hold record: who pays, the model, the worst-case tokens.
        record = {name: str(value) for name, value in subject.payer().items()} | {
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
                raise store_unavailable("redis", ConnectionError("recently unreachable"))
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
            return await self._admit_unheld(
                request_id, subject, model, amount, tokens, applicable, now, expire_at
            )
        if outcome.status == "OK":
            await self._record_hold(
                request_id, subject, model, amount, tokens, checks, now, expire_at
            )
        return _answer(outcome, by_id, amount, expire_at, now)

    async def _admit_unheld(
        self,
        request_id: str,
        subject: Subject,
        model: str,
        amount: int,
        tokens: int,
        applicable: list[pb.Budget],
        now: float,
        expire_at: float,
    ) -> Hold:
        """Admits without a hold while Redis is down (the tenant fails open)."""
        assert self._fail_open is not None
        for budget in applicable:  # per-request caps need no counter
            cap = budget.window == pb.BUDGET_WINDOW_REQUEST and not budget.soft
            if cap and amount > budget.limit_micro_usd:
                raise exhausted(budget, 0, amount) from None
        row = Unheld(
            request_id,
            **subject.payer(),
            model=model,
            amount_micro_usd=amount,
            tokens=tokens,
            reserve_time=utc(now),
            expire_time=utc(expire_at),
        )
        stored = await self._fail_open.admit(row)
        return Hold(0, stored.expire_time.timestamp(), unheld=True)

    async def _record_hold(
        self,
        request_id: str,
        subject: Subject,
        model: str,
        amount: int,
        tokens: int,
        checks: list[Check],
        now: float,
        expire_at: float,
    ) -> None:
        """Writes a granted hold to PostgreSQL (:mod:`services.budget.holds`).

        Raises:
            Unavailable: PostgreSQL is down (the Redis hold is released), or
                Redis lost the hold meanwhile (the row is given up); the
                caller retries with the same request id.
        """
        if self._holds is None:
            return
        counters = [c.counter for c in checks if c.counter]
        row = StoredHold(
            request_id,
            **subject.payer(),
            model=model,
            amount_micro_usd=amount,
            tokens=tokens,
            counters=counters,
            reserve_time=utc(now),
            expire_time=utc(expire_at),
        )
        try:
            await self._holds.add(row)
        except Unavailable:
            await self._counters.release(request_id, counters)
            raise
        if not await self._counters.exists(request_id):
            # Redis lost its data between the hold and the row, and the
            # rebuild did not see the row: the hold is not counted anywhere.
            await self._holds.give_up(request_id)
            raise rebuilding()

    def _check(
        self, budget: pb.Budget, context: TenantContext, subject: Subject, now: float
    ) -> Check:
        window = window_of(budget.window, utc(now), context.tz)
        return Check(
            budget.budget_id,
            budget.limit_micro_usd,
            budget.soft,
            counter_of(budget, window, subject),
            window.counter_expiry(),
        )

    # --- settle and release (services.budget.settlement) -------------------------

    async def settle(
        self,
        request_id: str,
        cost: int,
        prompt_tokens: int,
        completion_tokens: int,
        partial: bool,
    ) -> Settlement:
        """Charges ``cost`` for a reserved request (:meth:`Settler.settle`)."""
        usage = Usage(cost, prompt_tokens, completion_tokens, partial)
        return await self._settler.settle(request_id, usage)

    async def release(self, request_id: str) -> int:
        """Frees a hold without charging (:meth:`Settler.release`)."""
        return await self._settler.release(request_id)

    async def _unheld_keys(self, row: Unheld) -> list[str]:
        """The counters an unheld request's spend counts in (its admission's windows)."""
        subject = Subject.of(row)
        context = await self._catalog.tenant(row.tenant_id)
        at = row.reserve_time
        keys = []
        for budget in context.budgets:
            if applies(budget, subject):
                key = counter_of(budget, window_of(budget.window, at, context.tz), subject)
                if key:
                    keys.append(key)
        return keys

    async def reap(self, limit: int = 200) -> int:
        """Settles expired holds (:mod:`services.budget.reaper`) and carries
        fail-open admissions into Redis; returns how many were handled."""
        handled = 0
        if self._fail_open is not None:
            handled = await self._fail_open.reap(limit)
        if self._holds is not None:
            await self._holds.prune(utc(self._clock()), limit)
        return handled + await self._reaper.reap(limit)

    # --- status -------------------------------------------------------------------

    async def status(self, subject: Subject) -> list[Status]:
        """Spent, reserved and remaining of every budget that applies to ``subject``.

        Raises:
            Unavailable: STORE_UNAVAILABLE while Redis' counters are being rebuilt.
        """
        await self._settler.await_rebuild()
        context = await self._catalog.tenant(subject.tenant_id)
        now = self._clock()
        applicable = [b for b in context.budgets if applies(b, subject)]
        windows = [window_of(b.window, utc(now), context.tz) for b in applicable]
        counters = [counter_of(b, w, subject) for b, w in zip(applicable, windows, strict=True)]
        keys = [c for c in counters if c]
        values = await self._counters.read_if_ready(keys)
        if values is None:  # Redis lost the counters: rebuild them first
            await self.ensure_ready()
            values = await self._counters.read_if_ready(keys)
            if values is None:
                raise Unavailable(
                    errors_pb2.ERROR_REASON_STORE_UNAVAILABLE,
                    "the budget counters are being rebuilt",
                    retry_after=1.0,
                )
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
                    projected(budget, window, spent, now),
                )
            )
        return statuses

    # --- rebuild from the ledger (services.budget.rebuild) ------------------------

    async def ensure_ready(self) -> None:
        """Rebuilds the counters from PostgreSQL if Redis lost them."""
        await self._rebuild.ensure_ready()

    async def rebuild(self) -> None:
        """Brings Redis back to PostgreSQL after it lost its data."""
        await self._rebuild.rebuild()

    async def seed(self, budget: pb.Budget, tz: zoneinfo.ZoneInfo) -> None:
        """Brings one budget's current-window counters up to the ledger."""
        await self._rebuild.seed(budget, tz)


def _answer(
    outcome: ReserveOutcome,
    by_id: dict[str, pb.Budget],
    amount: int,
    expire_at: float,
    now: float,
) -> Hold:
    """The hold a Reserve script's outcome grants, or the refusal it means."""
    if outcome.status == "EXISTS":
        return Hold(outcome.held_micro_usd, outcome.expire_at)
    if outcome.status == "EXHAUSTED":
        raise exhausted(by_id[outcome.budget_id], outcome.used_micro_usd, amount)
    if outcome.status == "RATE_LIMITED":
        raise rate_limited(outcome.rate_limit, outcome.rate_used, now)
    if outcome.status != "OK":
        raise rebuilding()
    warnings = tuple(
        Warning(bid, used, by_id[bid].limit_micro_usd) for bid, used in outcome.warnings
    )
    return Hold(amount, expire_at, warnings)
