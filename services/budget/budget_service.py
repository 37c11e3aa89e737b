"""The BudgetService servicer: budget definitions, admission, status and spend."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import field_mask_pb2

from orchestra.budget.v1 import budget_service_pb2 as pb
from orchestra.budget.v1 import budget_service_pb2_grpc
from orchestra.common.v1 import errors_pb2, identity_pb2
from services.budget import convert, validation, windows
from services.budget.admission import Admission
from services.budget.budgets import BudgetStore
from services.budget.catalog import Catalog
from services.budget.ledger import GROUP_KEYS, Ledger
from services.budget.subjects import Status, Subject
from services.common import batches, paging, streams
from services.common.errors import InvalidArgument
from services.common.identity import IdentitySigner, caller, tenant_of

Context = grpc.aio.ServicerContext[Any, Any]

ADMIN = identity_pb2.SCOPE_ADMIN
READ = identity_pb2.SCOPE_READ
INTERNAL = identity_pb2.SCOPE_INTERNAL
MAX_HOLD_TTL_SECONDS = 86_400
# Trailing metadata of a Reserve admitted without a hold (fail open).
FAIL_OPEN_HEADER = "orchestra-budget-fail-open"
_BUDGET_MASK = ("limit_micro_usd", "soft", "alert_thresholds_percent", "alert_webhook_url")


def _subject(subject: pb.SpendSubject, field: str) -> Subject:
    validation.tenant_id(subject.tenant_id, f"{field}.tenant_id")
    for name in ("team", "project", "key_id"):
        value = getattr(subject, name)
        if value:
            validation.child_id(value, f"{field}.{name}")
    if len(subject.end_user) > validation.MAX_SUBJECT_CHARS:
        raise validation.invalid(f"{field}.end_user", "end_user is too long")
    return Subject(
        subject.tenant_id, subject.team, subject.project, subject.key_id, subject.end_user
    )


def _budget_mask(mask: field_mask_pb2.FieldMask) -> field_mask_pb2.FieldMask:
    paths = list(mask.paths) or list(_BUDGET_MASK)
    if any(p not in _BUDGET_MASK for p in paths):
        raise validation.invalid("update_mask", f"update_mask may name {', '.join(_BUDGET_MASK)}")
    return field_mask_pb2.FieldMask(paths=paths)


def _status(status: Status) -> pb.BudgetStatus:
    return pb.BudgetStatus(
        budget=status.budget,
        window_start_time=convert.timestamp(status.window.start),
        window_end_time=convert.timestamp(status.window.end),
        spent_micro_usd=status.spent_micro_usd,
        reserved_micro_usd=status.reserved_micro_usd,
        remaining_micro_usd=status.remaining_micro_usd,
        projected_micro_usd=status.projected_micro_usd,
    )


class BudgetServicer(budget_service_pb2_grpc.BudgetServiceServicer):
    """orchestra.budget.v1.BudgetService."""

    def __init__(
        self,
        budgets: BudgetStore,
        admission: Admission,
        catalog: Catalog,
        ledger: Ledger,
        signer: IdentitySigner,
    ) -> None:
        self._budgets = budgets
        self._admission = admission
        self._catalog = catalog
        self._ledger = ledger
        self._signer = signer

    # --- budget definitions ---------------------------------------------------

    async def CreateBudget(
        self, request: pb.CreateBudgetRequest, context: Context
    ) -> pb.CreateBudgetResponse:
        budget = pb.Budget()
        budget.CopyFrom(request.budget)
        budget.tenant_id = tenant_of(caller(context, self._signer, ADMIN), budget.tenant_id)
        validation.budget(budget)
        created = await self._budgets.create(budget)
        self._catalog.invalidate(created.tenant_id)
        # Spend already settled in the current window counts against it.
        tenant = await self._catalog.tenant(created.tenant_id)
        await self._admission.seed(created, tenant.tz)
        return pb.CreateBudgetResponse(budget=created)

    async def _own_budget(self, context: Context, budget_id: str, *scopes: Any) -> pb.Budget:
        identity = caller(context, self._signer, *scopes)
        validation.required_text(budget_id, "budget_id", 64)
        budget = await self._budgets.get(budget_id)
        tenant_of(identity, budget.tenant_id)
        return budget

    async def GetBudget(
        self, request: pb.GetBudgetRequest, context: Context
    ) -> pb.GetBudgetResponse:
        budget = await self._own_budget(context, request.budget_id, READ)
        return pb.GetBudgetResponse(budget=budget)

    async def ListBudgets(
        self, request: pb.ListBudgetsRequest, context: Context
    ) -> pb.ListBudgetsResponse:
        tenant = tenant_of(caller(context, self._signer, READ), request.tenant_id)
        page = paging.Page.of(request, {"rpc": "ListBudgets", "tenant": tenant})
        found = await self._budgets.page(tenant, page.after, page.fetch)
        items, token = page.cut(found, lambda b: b.budget_id)
        return pb.ListBudgetsResponse(budgets=items, next_page_token=token)

    async def UpdateBudget(
        self, request: pb.UpdateBudgetRequest, context: Context
    ) -> pb.UpdateBudgetResponse:
        await self._own_budget(context, request.budget.budget_id, ADMIN)
        mask = _budget_mask(request.update_mask)

        def apply(budget: pb.Budget) -> None:
            mask.MergeMessage(request.budget, budget, replace_repeated_field=True)
            if budget.limit_micro_usd <= 0:
                raise validation.invalid(
                    "budget.limit_micro_usd", "limit_micro_usd must be greater than 0"
                )
            validation.alerts(budget)

        updated = await self._budgets.update(request.budget.budget_id, apply)
        self._catalog.invalidate(updated.tenant_id)
        return pb.UpdateBudgetResponse(budget=updated)

    async def DeleteBudget(
        self, request: pb.DeleteBudgetRequest, context: Context
    ) -> pb.DeleteBudgetResponse:
        budget = await self._own_budget(context, request.budget_id, ADMIN)
        await self._budgets.delete(budget.budget_id)
        self._catalog.invalidate(budget.tenant_id)
        return pb.DeleteBudgetResponse()

    # --- admission ------------------------------------------------------------

    async def Reserve(self, request: pb.ReserveRequest, context: Context) -> pb.ReserveResponse:
        caller(context, self._signer, INTERNAL)
        response = await self._reserve(request)
        if response.unheld:
            # Admitted without a hold: Redis is unreachable and the tenant fails open.
            context.set_trailing_metadata(((FAIL_OPEN_HEADER, "redis-unreachable"),))
        return response

    async def ReserveStream(
        self, requests: AsyncIterator[pb.ReserveStreamRequest], context: Context
    ) -> AsyncIterator[pb.ReserveStreamResponse]:
        """See the proto: Reserve's code path for each item, answered as it finishes."""
        caller(context, self._signer, INTERNAL)
        async for answer in streams.serve(
            requests, self._reserve, "ReserveStream", pb.ReserveStreamResponse
        ):
            yield answer

    async def _reserve(self, request: pb.ReserveRequest) -> pb.ReserveResponse:
        validation.required_text(request.request_id, "request_id", validation.MAX_REQUEST_ID_CHARS)
        subject = _subject(request.subject, "subject")
        if len(request.model) > validation.MAX_NAME_CHARS:
            raise validation.invalid("model", "model is too long")
        if request.amount_micro_usd < 0:
            raise validation.invalid("amount_micro_usd", "amount_micro_usd must not be negative")
        if request.tokens < 0:
            raise validation.invalid("tokens", "tokens must not be negative")
        if not 0 <= request.ttl_seconds <= MAX_HOLD_TTL_SECONDS:
            raise validation.invalid(
                "ttl_seconds", f"ttl_seconds must be 0 to {MAX_HOLD_TTL_SECONDS}"
            )
        provider_limit = None
        if request.HasField("provider_rate_limit"):
            limit = request.provider_rate_limit
            if limit.requests_per_minute < 0 or limit.tokens_per_minute < 0:
                raise validation.invalid(
                    "provider_rate_limit", "provider_rate_limit must not be negative"
                )
            if "/" not in request.model:
                raise validation.invalid(
                    "model", 'model must be "provider/model" with a provider_rate_limit'
                )
            provider_limit = limit
        hold = await self._admission.reserve(
            request.request_id,
            subject,
            request.model,
            request.amount_micro_usd,
            request.tokens,
            request.ttl_seconds,
            provider_limit,
        )
        response = pb.ReserveResponse(
            held_micro_usd=hold.held_micro_usd,
            warnings=[
                pb.BudgetWarning(
                    budget_id=w.budget_id,
                    used_micro_usd=w.used_micro_usd,
                    limit_micro_usd=w.limit_micro_usd,
                )
                for w in hold.warnings
            ],
        )
        response.expire_time.FromMicroseconds(int(hold.expire_at * 1e6))
        response.unheld = hold.unheld
        return response

    async def Settle(self, request: pb.SettleRequest, context: Context) -> pb.SettleResponse:
        caller(context, self._signer, INTERNAL)
        return await self._settle(request)

    async def BatchSettle(
        self, request: pb.BatchSettleRequest, context: Context
    ) -> pb.BatchSettleResponse:
        caller(context, self._signer, INTERNAL)
        batches.check_size(request.requests)
        results = await batches.each(request.requests, self._settle, "BatchSettle", pb.SettleResult)
        return pb.BatchSettleResponse(results=results)

    async def _settle(self, request: pb.SettleRequest) -> pb.SettleResponse:
        validation.required_text(request.request_id, "request_id", validation.MAX_REQUEST_ID_CHARS)
        if request.cost_micro_usd < 0:
            raise validation.invalid("cost_micro_usd", "cost_micro_usd must not be negative")
        usage = request.usage
        if usage.prompt_tokens < 0 or usage.completion_tokens < 0:
            raise validation.invalid("usage", "token counts must not be negative")
        settled = await self._admission.settle(
            request.request_id,
            request.cost_micro_usd,
            usage.prompt_tokens,
            usage.completion_tokens,
            request.partial,
        )
        return pb.SettleResponse(
            charged_micro_usd=settled.charged_micro_usd,
            released_micro_usd=settled.released_micro_usd,
        )

    async def Release(self, request: pb.ReleaseRequest, context: Context) -> pb.ReleaseResponse:
        caller(context, self._signer, INTERNAL)
        return await self._release(request)

    async def BatchRelease(
        self, request: pb.BatchReleaseRequest, context: Context
    ) -> pb.BatchReleaseResponse:
        caller(context, self._signer, INTERNAL)
        batches.check_size(request.requests)
        results = await batches.each(
            request.requests, self._release, "BatchRelease", pb.ReleaseResult
        )
        return pb.BatchReleaseResponse(results=results)

    async def _release(self, request: pb.ReleaseRequest) -> pb.ReleaseResponse:
        validation.required_text(request.request_id, "request_id", validation.MAX_REQUEST_ID_CHARS)
        released = await self._admission.release(request.request_id)
        return pb.ReleaseResponse(released_micro_usd=released)

    # --- reporting ------------------------------------------------------------

    async def GetBudgetStatus(
        self, request: pb.GetBudgetStatusRequest, context: Context
    ) -> pb.GetBudgetStatusResponse:
        identity = caller(context, self._signer, READ)
        wanted = pb.SpendSubject()
        wanted.CopyFrom(request.subject)
        wanted.tenant_id = tenant_of(identity, wanted.tenant_id)
        statuses = await self._admission.status(_subject(wanted, "subject"))
        return pb.GetBudgetStatusResponse(statuses=[_status(s) for s in statuses])

    async def ListSpend(
        self, request: pb.ListSpendRequest, context: Context
    ) -> pb.ListSpendResponse:
        tenant_id = tenant_of(caller(context, self._signer, READ), request.tenant_id)
        if request.group_by not in GROUP_KEYS:
            raise validation.invalid("group_by", "group_by is required")
        page = paging.Page.of(
            request,
            {
                "rpc": "ListSpend",
                "tenant": tenant_id,
                "group_by": request.group_by,
                "start": request.start_time.ToJsonString()
                if request.HasField("start_time")
                else "",
                "end": request.end_time.ToJsonString() if request.HasField("end_time") else "",
            },
        )
        # The token pins the resolved range, so "until now" does not move between pages.
        last = page.after
        tenant = await self._catalog.tenant(tenant_id)
        if last is None:
            now = dt.datetime.fromtimestamp(time.time(), dt.UTC)
            start = (
                convert.from_timestamp(request.start_time)
                if request.HasField("start_time")
                else windows.month_start(now, tenant.tz)
            )
            end = convert.from_timestamp(request.end_time) if request.HasField("end_time") else now
            after = None
        else:
            try:
                start, end = (dt.datetime.fromisoformat(v) for v in last[2:4])
                after = (int(last[0]), str(last[1]))
            except (TypeError, ValueError, IndexError):
                raise InvalidArgument(
                    errors_pb2.ERROR_REASON_INVALID_PAGE_TOKEN,
                    "page_token is malformed; start again without it",
                    field="page_token",
                ) from None
        if start >= end:
            raise validation.invalid("start_time", "start_time must be before end_time")
        groups = await self._ledger.spend(
            tenant_id, request.group_by, start, end, tenant.policy.time_zone, after, page.fetch
        )
        rows, token = page.cut(
            groups, lambda g: [g.cost_micro_usd, g.key, start.isoformat(), end.isoformat()]
        )
        return pb.ListSpendResponse(
            rows=[
                pb.SpendRow(
                    key=g.key,
                    cost_micro_usd=g.cost_micro_usd,
                    requests=g.requests,
                    prompt_tokens=g.prompt_tokens,
                    completion_tokens=g.completion_tokens,
                )
                for g in rows
            ],
            next_page_token=token,
        )
