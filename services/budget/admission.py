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
from services.budget.budgets import BudgetStore
from services.budget.catalog import Catalog, TenantContext
from services.budget.counters import Check, Counters, counter_key
from services.budget.ledger import Charge, Ledger
from services.budget.windows import Window, window_of
from services.common.errors import (
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
    Unavailable,
)

log = logging.getLogger(__name__)

DEFAULT_HOLD_TTL_SECONDS = 600


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
    """A granted reservation."""

    held_micro_usd: int
    expire_at: float
    warnings: tuple[Warning, ...] = ()


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


def _not_reserved(request_id: str) -> NotFound:
    return NotFound(
        errors_pb2.ERROR_REASON_RESERVATION_NOT_FOUND,
        f"no reservation is held for request {request_id!r}",
        metadata={"request_id": request_id},
    )


def _exhausted(budget: pb.Budget, used: int, amount: int) -> ResourceExhausted:
    window = pb.BudgetWindow.Name(budget.window).removeprefix("BUDGET_WINDOW_").lower()
    level = pb.BudgetLevel.Name(budget.level).removeprefix("BUDGET_LEVEL_").lower()
    return ResourceExhausted(
        errors_pb2.ERROR_REASON_BUDGET_EXHAUSTED,
        f"budget {budget.budget_id} ({level} {budget.subject or budget.tenant_id}, {window})"
        f" would be exceeded: {used} of {budget.limit_micro_usd} micro-USD used,"
        f" {amount} requested",
        metadata={
            "budget_id": budget.budget_id,
            "level": level,
            "subject": budget.subject,
            "window": window,
            "limit_micro_usd": str(budget.limit_micro_usd),
            "used_micro_usd": str(used),
            "requested_micro_usd": str(amount),
        },
        quota_subject=f"budgets/{budget.budget_id}",
    )


def _already_settled(prior: Charge, cost: int) -> FailedPrecondition:
    return FailedPrecondition(
        errors_pb2.ERROR_REASON_ALREADY_SETTLED,
        f"request {prior.request_id!r} was settled at {prior.cost_micro_usd} micro-USD, not {cost}",
        metadata={
            "request_id": prior.request_id,
            "charged_micro_usd": str(prior.cost_micro_usd),
        },
    )


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
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._catalog = catalog
        self._counters = counters
        self._ledger = ledger
        self._budgets = budgets
        self._clock = clock
        self._rebuild_lock = asyncio.Lock()

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
                that would be exceeded; nothing was held.
            Unavailable: STORE_UNAVAILABLE (fail closed).
        """
        context = await self._catalog.tenant(subject.tenant_id)
        now = self._clock()
        applicable = [b for b in context.budgets if applies(b, subject)]
        checks = [self._check(b, context, subject, now) for b in applicable]
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
        for _ in range(2):
            outcome = await self._counters.reserve(
                request_id, amount, ttl, expire_at, checks, record
            )
            if outcome.status != "COLD":
                break
            await self.rebuild()
        if outcome.status == "EXISTS":
            return Hold(outcome.held_micro_usd, outcome.expire_at)
        by_id = {b.budget_id: b for b in applicable}
        if outcome.status == "EXHAUSTED":
            raise _exhausted(by_id[outcome.budget_id], outcome.used_micro_usd, amount)
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

        Raises:
            NotFound: RESERVATION_NOT_FOUND.
            FailedPrecondition: ALREADY_SETTLED with a different amount.
        """
        hold = await self._counters.hold(request_id)
        if not hold:
            prior = await self._ledger.find(request_id)
            if prior is None:
                raise _not_reserved(request_id)
            if prior.cost_micro_usd != cost:
                raise _already_settled(prior, cost)
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
            raise _already_settled(recorded, cost)
        # Also on a repeat: the earlier attempt may have died before this step.
        await self._counters.settle(request_id, json.loads(hold["keys"]), cost)
        return _settlement(recorded)

    async def release(self, request_id: str) -> int:
        """Frees a hold without charging; returns the amount released.

        A hold already settled releases nothing; a repeated release returns
        the same amount. Raises NotFound (RESERVATION_NOT_FOUND).
        """
        hold = await self._counters.hold(request_id)
        prior = await self._ledger.find(request_id)
        if not hold:
            if prior is None:
                raise _not_reserved(request_id)
            return 0
        keys = json.loads(hold["keys"])
        if prior is not None:
            # Settled in the ledger but not (yet) in Redis: finish the settle
            # rather than lose the charge.
            await self._counters.settle(request_id, keys, prior.cost_micro_usd)
            return 0
        state, amount = await self._counters.release(request_id, keys)
        if state == "GONE":
            raise _not_reserved(request_id)
        return 0 if state == "settled" else amount

    async def reap(self, limit: int = 200) -> int:
        """Releases holds past their expiry; returns how many were handled.

        A hold whose request is in the ledger is settled instead. (Settling
        expired holds at their reserved amount is a later step.)
        """
        now = self._clock()
        ids = await self._counters.expired(now, limit)
        if not ids:
            return 0
        charges = await self._ledger.find_many(ids)
        for request_id in ids:
            hold = await self._counters.hold(request_id)
            keys = json.loads(hold["keys"]) if hold else []
            if request_id in charges:
                await self._counters.settle(request_id, keys, charges[request_id].cost_micro_usd)
            else:
                await self._counters.release(request_id, keys, expired_before=now)
        return len(ids)

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
