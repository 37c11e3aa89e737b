"""Budget windows: which calendar day or month a moment falls in.

Day and month windows are calendar windows in the tenant's time zone. Their
key ("2026-11-23", "2026-11") is part of the Redis counter's name, so a new
window simply starts a new counter and nothing ever needs resetting.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import zoneinfo

from orchestra.budget.v1 import budget_service_pb2 as pb

# Counters outlive their window by this much so that late settlements of holds
# made near the end of a window still find them.
COUNTER_GRACE = dt.timedelta(days=35)


@dataclasses.dataclass(frozen=True)
class Window:
    """One period of a budget.

    Attributes:
        key: The counter key part ("2026-11-23", "2026-11", "total"); empty for
            per-request budgets, which keep no counter.
        start: Inclusive start (None for TOTAL and REQUEST).
        end: Exclusive end (None for TOTAL and REQUEST).
    """

    key: str
    start: dt.datetime | None
    end: dt.datetime | None

    @property
    def counted(self) -> bool:
        """Whether spend in this window is counted (not a per-request cap)."""
        return bool(self.key)

    def counter_expiry(self) -> int:
        """Epoch second after which the window's counter may vanish (0: never)."""
        return 0 if self.end is None else int((self.end + COUNTER_GRACE).timestamp())


def _midnight(day: dt.date, tz: zoneinfo.ZoneInfo) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(), tzinfo=tz)


def window_of(window: pb.BudgetWindow.ValueType, at: dt.datetime, tz: zoneinfo.ZoneInfo) -> Window:
    """The window of kind ``window`` that contains the moment ``at``.

    Args:
        window: DAY, MONTH, TOTAL or REQUEST.
        at: An aware moment.
        tz: The tenant's time zone.
    """
    local = at.astimezone(tz)
    if window == pb.BUDGET_WINDOW_DAY:
        start = _midnight(local.date(), tz)
        end = _midnight(local.date() + dt.timedelta(days=1), tz)
        return Window(local.strftime("%Y-%m-%d"), start, end)
    if window == pb.BUDGET_WINDOW_MONTH:
        first = local.date().replace(day=1)
        following = (first + dt.timedelta(days=32)).replace(day=1)
        return Window(local.strftime("%Y-%m"), _midnight(first, tz), _midnight(following, tz))
    if window == pb.BUDGET_WINDOW_TOTAL:
        return Window("total", None, None)
    return Window("", None, None)


def month_start(at: dt.datetime, tz: zoneinfo.ZoneInfo) -> dt.datetime:
    """The start of the calendar month containing ``at`` in ``tz``."""
    start = window_of(pb.BUDGET_WINDOW_MONTH, at, tz).start
    assert start is not None
    return start
