"""Who pays, and the values admission answers with.

A request's payer is a :class:`Subject`: the tenant and, where the caller
says so, its team, project, API key and end user. The ledger, the PostgreSQL
holds and the fail-open rows store the same five fields; :data:`PAYER_FIELDS`
names them once and :meth:`Subject.payer` / :meth:`Subject.of` convert.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any, TypedDict

from orchestra.budget.v1 import budget_service_pb2 as pb
from orchestra.common.v1 import errors_pb2
from services.budget.budgets import per_end_user
from services.budget.counters import counter_key
from services.budget.ledger import Charge
from services.budget.windows import Window
from services.common.errors import Unavailable

PAYER_FIELDS = ("tenant_id", "team", "project", "key_id", "end_user")


class Payer(TypedDict):
    """The payer fields of a stored row, as keyword arguments."""

    tenant_id: str
    team: str
    project: str
    key_id: str
    end_user: str


@dataclasses.dataclass(frozen=True)
class Subject:
    """Who pays, at every level."""

    tenant_id: str
    team: str = ""
    project: str = ""
    key_id: str = ""
    end_user: str = ""

    def payer(self) -> Payer:
        """The five payer fields, as keyword arguments for a stored row."""
        return Payer(
            tenant_id=self.tenant_id,
            team=self.team,
            project=self.project,
            key_id=self.key_id,
            end_user=self.end_user,
        )

    @classmethod
    def of(cls, row: Any) -> Subject:
        """The payer of a stored row (a ledger charge, a hold, a fail-open row)
        or of a Redis hold (a mapping)."""
        if isinstance(row, dict):
            return cls(**{name: row[name] for name in PAYER_FIELDS})
        return cls(**{name: getattr(row, name) for name in PAYER_FIELDS})


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

    @classmethod
    def of(cls, charge: Charge) -> Settlement:
        """What a recorded charge took and gave back."""
        return cls(charge.cost_micro_usd, max(charge.held_micro_usd - charge.cost_micro_usd, 0))


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


def utc(epoch: float) -> dt.datetime:
    """A Unix time as an aware UTC datetime."""
    return dt.datetime.fromtimestamp(epoch, dt.UTC)


def rebuilding() -> Unavailable:
    """The refusal while Redis' counters are rebuilt from the ledger."""
    return Unavailable(
        errors_pb2.ERROR_REASON_STORE_UNAVAILABLE,
        "budget counters are being rebuilt; retry shortly",
        metadata={"store": "redis"},
        retry_after=1.0,
    )


def projected(budget: pb.Budget, window: Window, spent: int, now: float) -> int:
    """Spend projected to the end of a month window at the rate so far."""
    if budget.window != pb.BUDGET_WINDOW_MONTH or window.start is None or window.end is None:
        return 0
    elapsed = now - window.start.timestamp()
    total = window.end.timestamp() - window.start.timestamp()
    return int(spent * total / elapsed) if elapsed > 0 else spent
