"""Reserve-then-settle admission: the budget service's core.

* Reserve holds the worst-case cost on every budget that applies to the
  request's subject, atomically in Redis (all or nothing), idempotently per
  request id.
* Settle writes the ledger row first (PostgreSQL is the truth), then moves the
  hold to spent in Redis. A crash between the two leaves the ledger right and
  the hold open; a retry (or the reaper, or Release) completes it, and Redis
  applies each settlement at most once.
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

import dataclasses
import datetime as dt
import json
import logging
import time
import zoneinfo
from collections.abc import Callable

from orchestra.budget.v1 import budget_service_pb2 as pb
from orchestra.common.v1 import errors_pb2, identity_pb2
from services.budget import storage
from services.budget.alerts import Alerts
from services.budget.budgets import BudgetStore, per_end_user
from services.budget.catalog import Catalog, TenantContext
from services.budget.counters import Check, Counters, counter_key
from services.budget.failopen import FailOpen, redis_down
from services.budget.holds import HoldStore, StoredHold
from services.budget.ledger import Charge, Ledger
from services.budget.ratelimits import rate_checks
from services.budget.reaper import Reaper
from services.budget.rebuild import Rebuild
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
        self._reaper = Reaper(counters, ledger, clock=clock, on_settled=self._settled_on)
        if holds is not None:
            self._reaper.given_up = holds.given_up
        self._rebuild = Rebuild(counters, ledger, budgets, holds, clock=clock)
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
            raise _rebuilding()
        await self._record_hold(request_id, subject, model, amount, tokens, checks, now, expire_at)
        warnings = tuple(
            Warning(bid, used, by_id[bid].limit_micro_usd) for bid, used in outcome.warnings
        )
        return Hold(amount, expire_at, warnings)

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
            subject.tenant_id,
            subject.team,
            subject.project,
            subject.key_id,
            subject.end_user,
            model,
            amount,
            tokens,
            counters,
            _utc(now),
            _utc(expire_at),
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
            raise _rebuilding()

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
        if not hold and self._holds is not None:
            lost = await self._settle_lost(
                request_id, cost, prompt_tokens, completion_tokens, partial
            )
            if lost is not None:
                return lost
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
        if recorded.reaped:
            # The reaper charged the full hold; the reported cost replaces it.
            recorded = await self._correct(charge)
        if recorded.cost_micro_usd != cost:
            raise already_settled(recorded, cost)
        # Also on a repeat: the earlier attempt may have died before this step.
        used_tokens = prompt_tokens + completion_tokens
        # Without reported usage (0 tokens) nothing is given back: the worst case stands.
        unused = int(hold.get("tokens") or 0) - used_tokens if used_tokens else 0
        keys = json.loads(hold["keys"])
        tpm = (json.loads(hold.get("tpm") or "[]"), unused)
        if await self._counters.settle(request_id, keys, cost, tpm) == "GONE":
            # Redis lost the hold after it was read. Once rebuilt, the hold is
            # either back (the rebuild's snapshot predates the ledger row:
            # settle it) or the ledger row is in the rebuilt spent already.
            await self._await_rebuild()
            if await self._counters.hold(request_id):
                await self._counters.settle(request_id, keys, cost, tpm)
        await self._settled_on(hold["tenant_id"], keys)
        return _settlement(recorded)

    async def _await_rebuild(self) -> None:
        """Returns once the counters are rebuilt; UNAVAILABLE if another replica
        is still at it (the caller retries)."""
        await self.ensure_ready()
        if not await self._counters.is_ready():
            raise _rebuilding()

    async def _settle_lost(
        self,
        request_id: str,
        cost: int,
        prompt_tokens: int,
        completion_tokens: int,
        partial: bool,
    ) -> Settlement | None:
        """Settles a hold whose Redis record is missing, from its PostgreSQL row.

        Redis may have lost its data: the counters are rebuilt first (which
        restores the hold if it is open, and then it is settled as usual).
        A hold still missing after that is charged from its row; its cost is
        added to the counters only if this call wrote the ledger row (a row
        written earlier is already in the rebuilt counters).

        Returns:
            The settlement, or None if the request has no PostgreSQL row either.
        """
        assert self._holds is not None
        await self._await_rebuild()
        hold = await self._counters.hold(request_id)
        if hold:
            return await self.settle(request_id, cost, prompt_tokens, completion_tokens, partial)
        row = await self._holds.find(request_id)
        if row is None:
            return None
        charge = Charge(
            request_id=request_id,
            tenant_id=row.tenant_id,
            team=row.team,
            project=row.project,
            key_id=row.key_id,
            end_user=row.end_user,
            model=row.model,
            held_micro_usd=row.amount_micro_usd,
            cost_micro_usd=cost,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            partial=partial,
            spend_time=row.reserve_time,
        )
        recorded, wrote = await self._ledger.record(charge)
        if recorded.cost_micro_usd != cost:
            raise already_settled(recorded, cost)
        if wrote:
            await self._counters.settle_unheld(
                request_id, row.counters, cost, row.expire_time.timestamp()
            )
            await self._settled_on(row.tenant_id, row.counters)
        return _settlement(recorded)

    async def _settled_on(self, tenant_id: str, counters: list[str]) -> None:
        """After spend reached ``counters``: alerts for thresholds crossed."""
        if self._alerts is not None:
            await self._alerts.check(tenant_id, counters)

    async def _correct(self, charge: Charge) -> Charge:
        """Replaces a reaped charge with ``charge``'s reported cost (once) in the ledger."""
        corrected = await self._ledger.correct(
            charge.request_id,
            charge.cost_micro_usd,
            charge.prompt_tokens,
            charge.completion_tokens,
            charge.partial,
        )
        if corrected is not None:
            log.info(
                "late settle of reaped request %s: %d micro-USD instead of %d",
                charge.request_id,
                charge.cost_micro_usd,
                corrected[1],
            )
            return corrected[0]
        found = await self._ledger.find(charge.request_id)  # corrected concurrently
        assert found is not None  # rows are never deleted
        return found

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
        releases nothing; a hold the reaper charged in full is refunded once.
        Raises NotFound (RESERVATION_NOT_FOUND).
        """
        try:
            hold = await self._counters.hold(request_id)
        except Unavailable as exc:
            if redis_down(exc) and self._fail_open:
                refunded = await self._fail_open.release(request_id)
                if refunded is not None:
                    return refunded
            raise
        if (not hold or "unheld" in hold) and self._fail_open:
            refunded = await self._fail_open.release(request_id)
            if refunded is not None:
                return refunded
        prior = await self._ledger.find(request_id)
        if not hold and self._holds is not None:
            # Redis may have lost it: rebuild (which restores open holds) first.
            await self._await_rebuild()
            hold = await self._counters.hold(request_id)
            if not hold and prior is None and await self._holds.find(request_id):
                await self._holds.give_up(request_id)  # never restored, never charged
                return 0
        if not hold:
            if prior is None:
                raise not_reserved(request_id)
            return 0
        keys = json.loads(hold["keys"])
        if prior is not None:
            # Settled in the ledger but not (yet) in Redis: finish the settle
            # rather than lose the charge. A late Release of a hold the reaper
            # charged in full refunds it (nothing reached a provider).
            refunded = 0
            if prior.reaped:
                unused = dataclasses.replace(prior, cost_micro_usd=0, reaped=False)
                corrected = await self._correct(unused)
                refunded = prior.cost_micro_usd if corrected.cost_micro_usd == 0 else 0
                prior = corrected
            await self._counters.settle(request_id, keys, prior.cost_micro_usd, reaped=prior.reaped)
            return refunded
        if self._holds is not None:
            # Durably first: a rebuild must not restore, nor the reaper charge, it.
            await self._holds.give_up(request_id)
        state, amount = await self._counters.release(request_id, keys)
        if state == "GONE":
            # Redis lost the hold after it was read: a rebuild may put it back
            # (its PostgreSQL row is released now, so a later one will not).
            await self._await_rebuild()
            if not await self._counters.hold(request_id):
                return int(hold["held"])
            state, amount = await self._counters.release(request_id, keys)
        return 0 if state == "settled" else amount

    async def reap(self, limit: int = 200) -> int:
        """Settles expired holds (:mod:`services.budget.reaper`) and carries
        fail-open admissions into Redis; returns how many were handled."""
        handled = 0
        if self._fail_open is not None:
            handled = await self._fail_open.reap(limit)
        if self._holds is not None:
            await self._holds.prune(_utc(self._clock()), limit)
        return handled + await self._reaper.reap(limit)

    # --- status -------------------------------------------------------------------

    async def status(self, subject: Subject) -> list[Status]:
        """Spent, reserved and remaining of every budget that applies to ``subject``.

        Raises:
            Unavailable: STORE_UNAVAILABLE while Redis' counters are being rebuilt.
        """
        await self.ensure_ready()
        if not await self._counters.is_ready():
            raise _rebuilding()
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


def _rebuilding() -> Unavailable:
    return Unavailable(
        errors_pb2.ERROR_REASON_STORE_UNAVAILABLE,
        "budget counters are being rebuilt; retry shortly",
        metadata={"store": "redis"},
        retry_after=1.0,
    )


def _projected(budget: pb.Budget, window: Window, spent: int, now: float) -> int:
    """Spend projected to the end of a month window at the rate so far."""
    if budget.window != pb.BUDGET_WINDOW_MONTH or window.start is None or window.end is None:
        return 0
    elapsed = now - window.start.timestamp()
    total = window.end.timestamp() - window.start.timestamp()
    return int(spent * total / elapsed) if elapsed > 0 else spent
