"""Rebuilding the Redis counters from PostgreSQL after Redis lost its data.

Redis' ``{budget}:ready`` key is set once the counters match PostgreSQL; its
absence means a cold start (a new or flushed Redis). Reserve then refuses
(UNAVAILABLE with RetryInfo) until one replica has, from one PostgreSQL
snapshot, raised every current window's spent counter to the ledger's sum
(never lowering one) and put back every hold that is neither settled nor
released (:mod:`services.budget.holds`). So the counters never fall below
the ledger and in-flight requests still count against their limits.

Rate-limit minute counters are not rebuilt: after a loss, up to one more
minute's worth of requests can be admitted.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
import zoneinfo
from collections.abc import Callable

from orchestra.budget.v1 import budget_service_pb2 as pb
from services.budget.budgets import BudgetStore, per_end_user
from services.budget.counters import Counters, counter_key
from services.budget.holds import HoldStore
from services.budget.ledger import Db, Ledger
from services.budget.windows import window_of

log = logging.getLogger(__name__)

# One replica rebuilds the counters after Redis lost its data; the lock lapses
# after this long if that replica dies, and the others wait this long for it.
REBUILD_LOCK_SECONDS = 30
REBUILD_WAIT_SECONDS = 5.0


def _utc(epoch: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch, dt.UTC)


def _zone(name: str) -> zoneinfo.ZoneInfo:
    try:
        return zoneinfo.ZoneInfo(name or "UTC")
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return zoneinfo.ZoneInfo("UTC")


class Rebuild:
    """Brings the Redis counters up to PostgreSQL."""

    def __init__(
        self,
        counters: Counters,
        ledger: Ledger,
        budgets: BudgetStore,
        holds: HoldStore | None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._counters = counters
        self._ledger = ledger
        self._budgets = budgets
        self._holds = holds
        self._clock = clock
        self._rebuild_lock = asyncio.Lock()

    async def ensure_ready(self) -> None:
        """Rebuilds the counters if Redis lost them."""
        if not await self._counters.is_ready():
            await self.rebuild()

    async def rebuild(self) -> None:
        """Brings Redis back to the ledger after it lost its data.

        In one PostgreSQL snapshot: every current window's spent counter is
        raised to the ledger's sum (never lowered), and every hold that is
        neither settled nor released is put back (:mod:`services.budget.holds`).
        One replica rebuilds at a time (a Redis lock); the others wait for it.
        Reserve refuses with UNAVAILABLE until the rebuild is done.
        """
        async with self._rebuild_lock:
            if await self._counters.is_ready():
                return  # another task finished a rebuild meanwhile
            if not await self._counters.try_lock_rebuild(REBUILD_LOCK_SECONDS):
                for _ in range(int(REBUILD_WAIT_SECONDS / 0.05)):
                    await asyncio.sleep(0.05)
                    if await self._counters.is_ready():
                        return
                return  # the caller sees COLD and answers UNAVAILABLE
            try:
                live = await self._budgets.all_live()
                spent: dict[str, tuple[int, int]] = {}
                async with self._ledger.snapshot() as conn:
                    for budget, zone in live:
                        spent.update(await self._spent_now(budget, _zone(zone), conn))
                    open_holds = (
                        await self._holds.open_holds(conn, _utc(self._clock()))
                        if self._holds is not None
                        else []
                    )
                await self._counters.raise_spent(spent)
                for row in open_holds:
                    await self._counters.restore(
                        row.request_id,
                        row.amount_micro_usd,
                        row.expire_time.timestamp(),
                        row.counters,
                        {
                            "tenant_id": row.tenant_id,
                            "team": row.team,
                            "project": row.project,
                            "key_id": row.key_id,
                            "end_user": row.end_user,
                            "model": row.model,
                            "tokens": str(row.tokens),
                            "reserve_time": f"{row.reserve_time.timestamp():.6f}",
                        },
                    )
                await self._counters.mark_ready()
            finally:
                await self._counters.unlock_rebuild()
            log.info(
                "rebuilt budget counters of %d budgets and %d open holds from PostgreSQL",
                len(live),
                len(open_holds),
            )

    async def _spent_now(
        self, budget: pb.Budget, tz: zoneinfo.ZoneInfo, conn: Db | None = None
    ) -> dict[str, tuple[int, int]]:
        """Counter key -> (ledger spend, expiry) of ``budget``'s current window."""
        window = window_of(budget.window, _utc(self._clock()), tz)
        if not window.counted:
            return {}
        sums = await self._ledger.spent_in(budget, window, conn)
        user = per_end_user(budget)
        expiry = window.counter_expiry()
        return {
            counter_key(budget.budget_id, window.key, who if user else None): (spent, expiry)
            for who, spent in sums.items()
        }

    async def seed(self, budget: pb.Budget, tz: zoneinfo.ZoneInfo) -> None:
        """Brings one budget's current-window counters up to the ledger."""
        await self._counters.raise_spent(await self._spent_now(budget, tz))
