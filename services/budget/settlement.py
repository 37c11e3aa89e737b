"""Settle and Release: the second half of reserve-then-settle.

Settle writes the ledger row first (PostgreSQL is the truth), then moves the
hold to spent in Redis. A crash between the two leaves the ledger right and
the hold open; a retry (or the reaper, or Release) completes it, and Redis
applies each settlement at most once. A hold Redis lost is settled from its
PostgreSQL row (:mod:`services.budget.holds`) after the counters are rebuilt;
a request admitted without a hold (fail open) from its ``budget.unheld`` row.
A hold the reaper charged in full is corrected once by a late Settle or
refunded once by a late Release.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
from collections.abc import Awaitable, Callable

from services.budget.alerts import Alerts
from services.budget.counters import Counters
from services.budget.failopen import FailOpen, redis_down
from services.budget.holds import HoldStore
from services.budget.ledger import Charge, Ledger
from services.budget.refusals import already_settled, not_reserved
from services.budget.subjects import Settlement, Subject, rebuilding, utc
from services.common.errors import Unavailable

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Usage:
    """What a finished request reports: its cost and tokens."""

    cost_micro_usd: int
    prompt_tokens: int
    completion_tokens: int
    partial: bool

    def charge(
        self, request_id: str, subject: Subject, model: str, held: int, at: dt.datetime
    ) -> Charge:
        """The ledger row of this usage for a hold of ``held`` admitted ``at``."""
        return Charge(
            request_id=request_id,
            **subject.payer(),
            model=model,
            held_micro_usd=held,
            cost_micro_usd=self.cost_micro_usd,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            partial=self.partial,
            spend_time=at,
        )


class Settler:
    """Settles and releases holds."""

    def __init__(
        self,
        counters: Counters,
        ledger: Ledger,
        ensure_ready: Callable[[], Awaitable[None]],
        *,
        holds: HoldStore | None,
        fail_open: FailOpen | None,
        alerts: Alerts | None,
    ) -> None:
        self._counters = counters
        self._ledger = ledger
        self._ensure_ready = ensure_ready
        self._holds = holds
        self._fail_open = fail_open
        self._alerts = alerts

    async def settle(self, request_id: str, usage: Usage) -> Settlement:
        """Charges ``usage`` for a reserved request (in full, even above the hold).

        A request admitted without a hold (fail open) is settled from its
        ``budget.unheld`` row, even while Redis is still down.

        Raises:
            NotFound: RESERVATION_NOT_FOUND.
            FailedPrecondition: ALREADY_SETTLED with a different amount.
            Unavailable: STORE_UNAVAILABLE (a held request while Redis is down).
        """
        cost = usage.cost_micro_usd
        try:
            hold = await self._counters.hold(request_id)
        except Unavailable as exc:
            if not redis_down(exc) or self._fail_open is None:
                raise
            unheld = await self._settle_unheld(request_id, usage)
            if unheld is None:
                raise
            return unheld
        if (not hold or "unheld" in hold) and self._fail_open is not None:
            unheld = await self._settle_unheld(request_id, usage)
            if unheld is not None:
                return unheld
        if not hold and self._holds is not None:
            lost = await self._settle_lost(request_id, usage)
            if lost is not None:
                return lost
        if not hold:
            prior = await self._ledger.find(request_id)
            if prior is None:
                raise not_reserved(request_id)
            if prior.cost_micro_usd != cost:
                raise already_settled(prior, cost)
            return Settlement.of(prior)
        charge = usage.charge(
            request_id,
            Subject.of(hold),
            hold["model"],
            int(hold["held"]),
            utc(float(hold["reserve_time"])),
        )
        recorded, _ = await self._ledger.record(charge)
        if recorded.reaped:
            # The reaper charged the full hold; the reported cost replaces it.
            recorded = await self._correct(charge)
        if recorded.cost_micro_usd != cost:
            raise already_settled(recorded, cost)
        await self._move_to_spent(request_id, hold, usage)
        return Settlement.of(recorded)

    async def _move_to_spent(self, request_id: str, hold: dict[str, str], usage: Usage) -> None:
        """Moves a settled hold to spent in Redis (also on a repeat: the earlier
        attempt may have died before this step)."""
        used_tokens = usage.prompt_tokens + usage.completion_tokens
        # Without reported usage (0 tokens) nothing is given back: the worst case stands.
        unused = int(hold.get("tokens") or 0) - used_tokens if used_tokens else 0
        keys = json.loads(hold["keys"])
        tpm = (json.loads(hold.get("tpm") or "[]"), unused)
        cost = usage.cost_micro_usd
        if await self._counters.settle(request_id, keys, cost, tpm) == "GONE":
            # Redis lost the hold after it was read. Once rebuilt, the hold is
            # either back (the rebuild's snapshot predates the ledger row:
            # settle it) or the ledger row is in the rebuilt spent already.
            await self.await_rebuild()
            if await self._counters.hold(request_id):
                await self._counters.settle(request_id, keys, cost, tpm)
        await self.settled_on(hold["tenant_id"], keys)

    async def _settle_unheld(self, request_id: str, usage: Usage) -> Settlement | None:
        """Settles a fail-open admission from its row (None if it has none)."""
        assert self._fail_open is not None
        recorded = await self._fail_open.settle(
            request_id,
            usage.cost_micro_usd,
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.partial,
        )
        if recorded is None:
            return None
        if recorded.cost_micro_usd != usage.cost_micro_usd:
            raise already_settled(recorded, usage.cost_micro_usd)
        return Settlement.of(recorded)

    async def await_rebuild(self) -> None:
        """Returns once the counters are rebuilt; UNAVAILABLE if another replica
        is still at it (the caller retries)."""
        await self._ensure_ready()
        if not await self._counters.is_ready():
            raise rebuilding()

    async def _settle_lost(self, request_id: str, usage: Usage) -> Settlement | None:
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
        await self.await_rebuild()
        if await self._counters.hold(request_id):
            return await self.settle(request_id, usage)
        row = await self._holds.find(request_id)
        if row is None:
            return None
        charge = usage.charge(
            request_id, Subject.of(row), row.model, row.amount_micro_usd, row.reserve_time
        )
        recorded, wrote = await self._ledger.record(charge)
        if recorded.cost_micro_usd != usage.cost_micro_usd:
            raise already_settled(recorded, usage.cost_micro_usd)
        if wrote:
            await self._counters.settle_unheld(
                request_id, row.counters, usage.cost_micro_usd, row.expire_time.timestamp()
            )
            await self.settled_on(row.tenant_id, row.counters)
        return Settlement.of(recorded)

    async def settled_on(self, tenant_id: str, counters: list[str]) -> None:
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
            await self.await_rebuild()
            hold = await self._counters.hold(request_id)
            if not hold and prior is None and await self._holds.find(request_id):
                await self._holds.give_up(request_id)  # never restored, never charged
                return 0
        if not hold:
            if prior is None:
                raise not_reserved(request_id)
            return 0
        if prior is not None:
            return await self._finish_settled(request_id, hold, prior)
        return await self._free(request_id, hold)

    async def _finish_settled(self, request_id: str, hold: dict[str, str], prior: Charge) -> int:
        """Release of a hold settled in the ledger but not (yet) in Redis: finish
        the settle rather than lose the charge. A late Release of a hold the
        reaper charged in full refunds it (nothing reached a provider)."""
        refunded = 0
        if prior.reaped:
            unused = dataclasses.replace(prior, cost_micro_usd=0, reaped=False)
            corrected = await self._correct(unused)
            refunded = prior.cost_micro_usd if corrected.cost_micro_usd == 0 else 0
            prior = corrected
        keys = json.loads(hold["keys"])
        await self._counters.settle(request_id, keys, prior.cost_micro_usd, reaped=prior.reaped)
        return refunded

    async def _free(self, request_id: str, hold: dict[str, str]) -> int:
        """Frees an open hold; returns the amount released."""
        keys = json.loads(hold["keys"])
        if self._holds is not None:
            # Durably first: a rebuild must not restore, nor the reaper charge, it.
            await self._holds.give_up(request_id)
        state, amount = await self._counters.release(request_id, keys)
        if state == "GONE":
            # Redis lost the hold after it was read: a rebuild may put it back
            # (its PostgreSQL row is released now, so a later one will not).
            await self.await_rebuild()
            if not await self._counters.hold(request_id):
                return int(hold["held"])
            state, amount = await self._counters.release(request_id, keys)
        return 0 if state == "settled" else amount
