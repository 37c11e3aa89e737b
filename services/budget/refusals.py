"""The errors admission refuses with: what ran out, and when to retry."""

from __future__ import annotations

from orchestra.budget.v1 import budget_service_pb2 as pb
from orchestra.common.v1 import errors_pb2
from services.budget.ledger import Charge
from services.budget.ratelimits import seconds_until_next_window
from services.common.errors import FailedPrecondition, NotFound, ResourceExhausted


def not_reserved(request_id: str) -> NotFound:
    return NotFound(
        errors_pb2.ERROR_REASON_RESERVATION_NOT_FOUND,
        f"no reservation is held for request {request_id!r}",
        metadata={"request_id": request_id},
    )


def exhausted(budget: pb.Budget, used: int, amount: int) -> ResourceExhausted:
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


def rate_limited(name: str, used: int, now: float) -> ResourceExhausted:
    limit = name.rsplit("/", 1)[-1]
    retry_after = seconds_until_next_window(now)
    return ResourceExhausted(
        errors_pb2.ERROR_REASON_RATE_LIMITED,
        f"rate limit {name} reached ({used} counted this minute); retry in {retry_after:.1f} s",
        metadata={"limit": limit, "subject": name.rsplit("/", 1)[0], "used": str(used)},
        quota_subject=name,
        retry_after=retry_after,
    )


def already_settled(prior: Charge, cost: int) -> FailedPrecondition:
    return FailedPrecondition(
        errors_pb2.ERROR_REASON_ALREADY_SETTLED,
        f"request {prior.request_id!r} was settled at {prior.cost_micro_usd} micro-USD, not {cost}",
        metadata={
            "request_id": prior.request_id,
            "charged_micro_usd": str(prior.cost_micro_usd),
        },
    )
