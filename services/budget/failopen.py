"""Admission while Redis is unreachable, for tenants whose policy says ``fail_open``.

How it works (the contract Settle and the reaper rely on):

* Reserve: Redis does not answer, the tenant fails open. The request is
  admitted *without a hold* (``held_micro_usd`` = 0) and a row naming the
  payer is written to ``budget.unheld`` in PostgreSQL. Per-request caps are
  still enforced (they need no counter); window budgets and rate limits are
  not, since their counters are in Redis. If PostgreSQL is down as well the
  request is refused (UNAVAILABLE): an admission that cannot be recorded is
  never granted. A retry with the same request id returns the same row.
* Settle: no Redis hold is found (or Redis still does not answer), so the
  payer comes from the ``budget.unheld`` row: the ledger row is written as
  usual (held 0), then the cost is added to the Redis spent counters of the
  window the request was admitted in, at most once per request id (the
  script marks the hold record settled). If Redis is still down, the ledger
  is right and the reaper carries the cost into Redis once it answers.
* Reaper: rows settled in the ledger but not yet applied are applied; rows
  past their expiry without a Settle are charged the amount they asked to
  hold (the router died; see :mod:`services.budget.reaper`), and a late
  Settle or Release replaces that charge once.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable

from services.budget.counters import Counters
from services.budget.ledger import Charge, Ledger
from services.budget.unheld import Unheld, UnheldStore
from services.common.errors import Unavailable

log = logging.getLogger(__name__)

# The Redis counter keys an unheld request's spend counts in.
CounterKeys = Callable[[Unheld], Awaitable[list[str]]]


def redis_down(exc: Unavailable) -> bool:
    """Whether ``exc`` reports that Redis (not PostgreSQL) is unreachable."""
    return exc.metadata.get("store") == "redis"


def _utc(epoch: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch, dt.UTC)


class FailOpen:
    """Admits, settles and reconciles requests that hold nothing in Redis."""

    def __init__(
        self,
        store: UnheldStore,
        ledger: Ledger,
        counters: Counters,
        counter_keys: CounterKeys,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Creates the fail-open path.

        Args:
            store: The ``budget.unheld`` table.
            ledger: The spend ledger.
            counters: The Redis counters.
            counter_keys: The counter keys an unheld request's spend counts in.
            clock: Epoch seconds now.
        """
        self._store = store
        self._ledger = ledger
        self._counters = counters
        self._counter_keys = counter_keys
        self._clock = clock

    async def admit(self, unheld: Unheld) -> Unheld:
        """Records an admission without a hold; returns the stored row (the first on a retry)."""
        stored = await self._store.add(unheld)
        log.warning(
            "redis unreachable: admitted request %s of fail-open tenant %s without a hold",
            unheld.request_id,
            unheld.tenant_id,
        )
        return stored

    async def settle(
        self,
        request_id: str,
        cost: int,
        prompt_tokens: int,
        completion_tokens: int,
        partial: bool,
    ) -> Charge | None:
        """Writes the ledger row of an admission without a hold.

        Returns:
            The recorded charge (an earlier one on a repeat, whose cost may
            differ from ``cost``), or None if ``request_id`` was not admitted
            without a hold.
        """
        row = await self._store.find(request_id)
        if row is None:
            return None
        recorded, _ = await self._ledger.record(
            Charge(
                request_id=request_id,
                tenant_id=row.tenant_id,
                team=row.team,
                project=row.project,
                key_id=row.key_id,
                end_user=row.end_user,
                model=row.model,
                held_micro_usd=0,
                cost_micro_usd=cost,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                partial=partial,
                spend_time=row.reserve_time,
            )
        )
        if recorded.reaped:  # the reaper charged the worst case: the reported cost replaces it
            corrected = await self._ledger.correct(
                request_id, cost, prompt_tokens, completion_tokens, partial
            )
            found = corrected[0] if corrected else await self._ledger.find(request_id)
            assert found is not None  # rows are never deleted
            recorded = found
            # The reaper carries the correction into Redis if it cannot be done now.
            await self._store.mark_pending(request_id)
        await self._apply(row, recorded.cost_micro_usd, reaped=recorded.reaped)
        return recorded

    async def release(self, request_id: str) -> int | None:
        """Closes an admission without a hold; None if ``request_id`` is not one.

        Returns the amount refunded: one the reaper charged is refunded
        (settled at 0) once; otherwise nothing was held, 0.
        """
        row = await self._store.find(request_id)
        if row is None:
            return None
        prior = await self._ledger.find(request_id)
        if prior is not None and prior.reaped:
            await self.settle(request_id, 0, 0, 0, False)
            return prior.cost_micro_usd
        await self._store.close_unsettled(request_id)
        return 0

    async def reap(self, limit: int) -> int:
        """Carries settled costs into Redis and closes expired rows; returns how many."""
        pending = await self._store.pending(_utc(self._clock()), limit)
        if not pending:
            return 0
        charges = await self._ledger.find_many([row.request_id for row, _ in pending])
        for row, _ in pending:
            charge = charges.get(row.request_id)
            if charge is None:
                # Expired without a Settle: its router died. As for held
                # requests (services.budget.reaper), the worst case it asked
                # for is charged; a late Settle replaces it.
                charge, _ = await self._ledger.record(
                    Charge(
                        request_id=row.request_id,
                        tenant_id=row.tenant_id,
                        team=row.team,
                        project=row.project,
                        key_id=row.key_id,
                        end_user=row.end_user,
                        model=row.model,
                        held_micro_usd=0,
                        cost_micro_usd=row.amount_micro_usd,
                        prompt_tokens=0,
                        completion_tokens=0,
                        partial=False,
                        spend_time=row.reserve_time,
                        reaped=True,
                    )
                )
            await self._apply(row, charge.cost_micro_usd, reaped=charge.reaped)
        return len(pending)

    async def _apply(self, row: Unheld, cost: int, *, reaped: bool = False) -> None:
        """Adds ``cost`` to the Redis counters once; leaves it to the reaper if Redis is down."""
        keys = await self._counter_keys(row)
        try:
            await self._counters.settle_unheld(
                row.request_id, keys, cost, row.expire_time.timestamp(), reaped=reaped
            )
        except Unavailable as exc:
            if not redis_down(exc):
                raise
            log.warning("redis unreachable: settle of %s left to the reaper", row.request_id)
            return
        await self._store.mark_applied([row.request_id])
