"""Budget definitions, GetBudgetStatus and ListSpend."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2, timestamp_pb2

from orchestra.budget.v1 import budget_service_pb2 as pb
from services.common import errors
from tests.budget.conftest import Budget, Metadata, make_budget, make_tenant
from tests.budget.test_admission import reserve, settle


async def _fails(call: Any) -> errors.ErrorDetails:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return errors.decode(caught.value)


@pytest.fixture
async def acme(budget: Budget, operator: Metadata) -> Budget:
    await make_tenant(budget, operator, "acme", "Asia/Tokyo")
    await make_tenant(budget, operator, "other")
    return budget


async def test_budget_crud(acme: Budget, admin: Callable[[str], Metadata]) -> None:
    created = await make_budget(acme, admin("acme"), "acme", 5_000_000)
    assert created.budget_id and created.HasField("create_time")
    got = await acme.budgets.GetBudget(
        pb.GetBudgetRequest(budget_id=created.budget_id), metadata=admin("acme")
    )
    assert got.budget == created
    duplicate = await _fails(make_budget(acme, admin("acme"), "acme", 1))
    assert (duplicate.code, duplicate.reason) == (grpc.StatusCode.ALREADY_EXISTS, "RESOURCE_EXISTS")
    updated = await acme.budgets.UpdateBudget(
        pb.UpdateBudgetRequest(
            budget=pb.Budget(budget_id=created.budget_id, limit_micro_usd=7, soft=True),
            update_mask=field_mask_pb2.FieldMask(paths=["limit_micro_usd"]),
        ),
        metadata=admin("acme"),
    )
    assert (updated.budget.limit_micro_usd, updated.budget.soft) == (7, False)
    listed = await acme.budgets.ListBudgets(pb.ListBudgetsRequest(), metadata=admin("acme"))
    assert [b.budget_id for b in listed.budgets] == [created.budget_id]
    await acme.budgets.DeleteBudget(
        pb.DeleteBudgetRequest(budget_id=created.budget_id), metadata=admin("acme")
    )
    gone = await _fails(
        acme.budgets.GetBudget(
            pb.GetBudgetRequest(budget_id=created.budget_id), metadata=admin("acme")
        )
    )
    assert (gone.code, gone.reason) == (grpc.StatusCode.NOT_FOUND, "RESOURCE_NOT_FOUND")


@pytest.mark.parametrize(
    ("wanted", "field"),
    [
        (pb.Budget(window=pb.BUDGET_WINDOW_DAY, limit_micro_usd=1), "budget.level"),
        (pb.Budget(level=pb.BUDGET_LEVEL_TENANT, limit_micro_usd=1), "budget.window"),
        (
            pb.Budget(level=pb.BUDGET_LEVEL_TENANT, window=pb.BUDGET_WINDOW_DAY),
            "budget.limit_micro_usd",
        ),
        (
            pb.Budget(level=pb.BUDGET_LEVEL_TEAM, window=pb.BUDGET_WINDOW_DAY, limit_micro_usd=1),
            "budget.subject",
        ),
        (
            pb.Budget(
                level=pb.BUDGET_LEVEL_TENANT,
                subject="x",
                window=pb.BUDGET_WINDOW_DAY,
                limit_micro_usd=1,
            ),
            "budget.subject",
        ),
        (
            pb.Budget(
                level=pb.BUDGET_LEVEL_TENANT,
                window=pb.BUDGET_WINDOW_DAY,
                limit_micro_usd=1,
                alert_thresholds_percent=[150],
            ),
            "budget.alert_thresholds_percent",
        ),
        (
            pb.Budget(
                level=pb.BUDGET_LEVEL_TENANT,
                window=pb.BUDGET_WINDOW_DAY,
                limit_micro_usd=1,
                alert_webhook_url="ftp://x",
            ),
            "budget.alert_webhook_url",
        ),
    ],
    ids=[
        "no-level",
        "no-window",
        "no-limit",
        "team-without-subject",
        "tenant-with-subject",
        "threshold",
        "webhook",
    ],
)
async def test_create_budget_rejects_bad_fields(
    acme: Budget, admin: Callable[[str], Metadata], wanted: pb.Budget, field: str
) -> None:
    details = await _fails(
        acme.budgets.CreateBudget(pb.CreateBudgetRequest(budget=wanted), metadata=admin("acme"))
    )
    assert (details.code, details.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD")
    assert details.metadata["field"] == field


async def test_budgets_of_another_tenant_are_out_of_reach(
    acme: Budget, admin: Callable[[str], Metadata], as_caller: Any
) -> None:
    theirs = await make_budget(acme, admin("other"), "other", 10)
    for call in (
        acme.budgets.GetBudget(
            pb.GetBudgetRequest(budget_id=theirs.budget_id), metadata=admin("acme")
        ),
        acme.budgets.DeleteBudget(
            pb.DeleteBudgetRequest(budget_id=theirs.budget_id), metadata=admin("acme")
        ),
        acme.budgets.ListBudgets(pb.ListBudgetsRequest(tenant_id="other"), metadata=admin("acme")),
    ):
        details = await _fails(call)
        assert (details.code, details.reason) == (grpc.StatusCode.PERMISSION_DENIED, "SCOPE_DENIED")
    read_only = await _fails(make_budget(acme, as_caller("acme", "read"), "acme", 10))
    assert (read_only.code, read_only.reason) == (grpc.StatusCode.PERMISSION_DENIED, "SCOPE_DENIED")


async def test_status_reports_windows_in_the_tenant_zone(
    acme: Budget, admin: Callable[[str], Metadata], reader: Any, internal: Metadata
) -> None:
    day = await make_budget(acme, admin("acme"), "acme", 1_000, window=pb.BUDGET_WINDOW_DAY)
    total = await make_budget(acme, admin("acme"), "acme", 9_000, window=pb.BUDGET_WINDOW_TOTAL)
    await reserve(acme, internal, "r1", 400)
    await reserve(acme, internal, "r2", 300)
    await settle(acme, internal, "r2", 250)
    response = await acme.budgets.GetBudgetStatus(
        pb.GetBudgetStatusRequest(subject=pb.SpendSubject()), metadata=reader("acme")
    )
    by_id = {s.budget.budget_id: s for s in response.statuses}
    daily = by_id[day.budget_id]
    assert (daily.spent_micro_usd, daily.reserved_micro_usd, daily.remaining_micro_usd) == (
        250,
        400,
        350,
    )
    start = daily.window_start_time.ToDatetime()
    end = daily.window_end_time.ToDatetime()
    # Midnight in Tokyo (UTC+9, no DST) is 15:00 UTC, a day apart.
    assert (start.hour, start.minute, (end - start).days) == (15, 0, 1)
    assert by_id[total.budget_id].remaining_micro_usd == 9_000 - 650
    assert not by_id[total.budget_id].HasField("window_end_time")


async def test_list_spend_groups_and_paginates(
    acme: Budget, admin: Callable[[str], Metadata], reader: Any, internal: Metadata
) -> None:
    costs = {"alpha": 500, "beta": 300, "gamma": 300, "delta": 100}
    for i, (team, cost) in enumerate(costs.items()):
        for part in range(2):
            await reserve(acme, internal, f"r{i}-{part}", cost, team=team)
            await settle(acme, internal, f"r{i}-{part}", cost // 2)
    rows, token = [], ""
    while True:
        page = await acme.budgets.ListSpend(
            pb.ListSpendRequest(group_by=pb.SPEND_GROUP_BY_TEAM, page_size=3, page_token=token),
            metadata=reader("acme"),
        )
        rows += [(r.key, r.cost_micro_usd, r.requests, r.prompt_tokens) for r in page.rows]
        token = page.next_page_token
        if not token:
            break
    assert rows == [
        ("alpha", 500, 2, 20),
        ("beta", 300, 2, 20),
        ("gamma", 300, 2, 20),
        ("delta", 100, 2, 20),
    ]
    by_day = await acme.budgets.ListSpend(
        pb.ListSpendRequest(group_by=pb.SPEND_GROUP_BY_DAY), metadata=reader("acme")
    )
    assert len(by_day.rows) == 1 and by_day.rows[0].cost_micro_usd == 1_200
    nothing = await acme.budgets.ListSpend(
        pb.ListSpendRequest(
            group_by=pb.SPEND_GROUP_BY_MODEL,
            start_time=timestamp_pb2.Timestamp(seconds=0),
            end_time=timestamp_pb2.Timestamp(seconds=86_400),
        ),
        metadata=reader("acme"),
    )
    assert list(nothing.rows) == []
    no_group = await _fails(acme.budgets.ListSpend(pb.ListSpendRequest(), metadata=reader("acme")))
    assert (no_group.code, no_group.metadata["field"]) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "group_by",
    )
