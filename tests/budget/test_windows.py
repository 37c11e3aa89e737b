"""Budget windows at their edges, on the service's injected clock (no sleeping):
a spend just before midnight or the month's end in the tenant's time zone
counts in the old window, just after in the new one, also on the days the
clocks change (a 23-hour and a 25-hour day).

The days are the next year's DST changes, so that the Redis counters' expiry
(window end plus a grace) is always in the real future.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import zoneinfo
from collections.abc import Awaitable, Callable

import pytest

from orchestra.budget.v1 import budget_service_pb2 as pb
from orchestra.common.v1 import chat_pb2
from tests.budget.conftest import Budget, Metadata, make_budget, make_tenant

SECOND = dt.timedelta(seconds=1)


@dataclasses.dataclass
class FakeClock:
    """Epoch seconds the test sets."""

    now: float

    def __call__(self) -> float:
        return self.now

    def at(self, moment: dt.datetime) -> None:
        self.now = moment.timestamp()


def _dst_day(zone: str, month: int, sunday: int) -> dt.date:
    """The ``sunday``-th (-1: last) Sunday of ``month`` next year."""
    year = dt.datetime.now(dt.UTC).year + 1
    sundays = [
        dt.date(year, month, d)
        for d in range(1, 32)
        if _valid(year, month, d) and dt.date(year, month, d).weekday() == 6
    ]
    return sundays[sunday - 1 if sunday > 0 else sunday]


def _valid(year: int, month: int, day: int) -> bool:
    try:
        dt.date(year, month, day)
    except ValueError:
        return False
    return True


def _midnight(day: dt.date, tz: zoneinfo.ZoneInfo) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(), tzinfo=tz)


@pytest.mark.parametrize(
    ("zone", "month", "sunday", "hours"),
    [("America/New_York", 3, 2, 23), ("Europe/Berlin", 10, -1, 25)],
    ids=["new-york-spring-forward", "berlin-fall-back"],
)
async def test_spend_counts_in_the_window_of_its_admission(
    start_budget: Callable[..., Awaitable[Budget]],
    operator: Metadata,
    admin: Callable[[str], Metadata],
    internal: Metadata,
    zone: str,
    month: int,
    sunday: int,
    hours: int,
) -> None:
    tz = zoneinfo.ZoneInfo(zone)
    day = _dst_day(zone, month, sunday)
    day_start, day_end = _midnight(day, tz), _midnight(day + dt.timedelta(days=1), tz)
    month_end = _midnight((day.replace(day=1) + dt.timedelta(days=32)).replace(day=1), tz)
    length = day_end.astimezone(dt.UTC) - day_start.astimezone(dt.UTC)
    assert length == dt.timedelta(hours=hours)  # really a DST change day
    clock = FakeClock((day_start - dt.timedelta(hours=2)).timestamp())
    budget = await start_budget(clock=clock)
    await make_tenant(budget, operator, "acme", time_zone=zone)
    daily = await make_budget(budget, admin("acme"), "acme", 10_000, window=pb.BUDGET_WINDOW_DAY)
    monthly = await make_budget(budget, admin("acme"), "acme", 100_000)

    async def spend(request_id: str, cost: int, settle_at: dt.datetime | None = None) -> None:
        await budget.budgets.Reserve(
            pb.ReserveRequest(
                request_id=request_id,
                subject=pb.SpendSubject(tenant_id="acme", key_id="k1"),
                model="openai/gpt-4o",
                amount_micro_usd=cost,
            ),
            metadata=internal,
        )
        if settle_at is not None:
            clock.at(settle_at)
        await budget.budgets.Settle(
            pb.SettleRequest(request_id=request_id, cost_micro_usd=cost, usage=chat_pb2.Usage()),
            metadata=internal,
        )

    async def state() -> dict[str, pb.BudgetStatus]:
        response = await budget.budgets.GetBudgetStatus(
            pb.GetBudgetStatusRequest(subject=pb.SpendSubject(tenant_id="acme")),
            metadata=admin("acme"),
        )
        return {s.budget.budget_id: s for s in response.statuses}

    clock.at(day_start - SECOND)
    await spend("before-midnight", 100)
    assert (await state())[daily.budget_id].spent_micro_usd == 100

    clock.at(day_start + SECOND)
    now = await state()
    window = now[daily.budget_id]
    assert (
        window.window_start_time.ToDatetime(dt.UTC),
        window.window_end_time.ToDatetime(dt.UTC),
    ) == (
        day_start.astimezone(dt.UTC),
        day_end.astimezone(dt.UTC),
    )
    assert window.spent_micro_usd == 0  # a new day
    assert now[monthly.budget_id].spent_micro_usd == 100  # the same month
    await spend("after-midnight", 200)

    # The last second of the 23- or 25-hour day still belongs to it; a hold
    # made then and settled after midnight counts where it was admitted.
    clock.at(day_end - SECOND)
    await spend("last-second", 300)
    await spend("straddles-midnight", 400, settle_at=day_end + SECOND)
    now = await state()
    assert now[daily.budget_id].spent_micro_usd == 0
    assert now[daily.budget_id].window_start_time.ToDatetime(dt.UTC) == day_end.astimezone(dt.UTC)

    clock.at(month_end - SECOND)
    assert (await state())[monthly.budget_id].spent_micro_usd == 1_000
    await spend("month-end", 500)
    assert (await state())[monthly.budget_id].spent_micro_usd == 1_500
    clock.at(month_end + SECOND)
    now = await state()
    assert now[monthly.budget_id].spent_micro_usd == 0
    await spend("new-month", 600)
    assert (await state())[monthly.budget_id].spent_micro_usd == 600

    # The ledger groups the same spend by day in the tenant's zone.
    query = pb.ListSpendRequest(group_by=pb.SPEND_GROUP_BY_DAY, page_size=100)
    query.start_time.FromDatetime(day_start - dt.timedelta(days=1))
    query.end_time.FromDatetime(month_end + dt.timedelta(days=1))
    response = await budget.budgets.ListSpend(query, metadata=admin("acme"))
    by_day = {row.key: row.cost_micro_usd for row in response.rows}
    expected: collections.Counter[str] = collections.Counter()
    expected[(day - dt.timedelta(days=1)).isoformat()] += 100
    expected[day.isoformat()] += 200 + 300 + 400
    expected[(month_end - SECOND).date().isoformat()] += 500  # may be the DST day itself
    expected[month_end.date().isoformat()] += 600
    assert by_day == dict(expected)
