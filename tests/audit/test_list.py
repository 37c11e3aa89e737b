"""ListRecords: exact round trip, filters, pagination, tenant isolation."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from orchestra.audit.v1 import audit_service_pb2 as pb
from services.audit.store import RecordFilter
from services.common import errors, paging
from tests.audit.conftest import Audit, Metadata
from tests.audit.factory import admin, at, chat

# One log shared by the filter tests: (event, tenant) in append order.
_SEED = [
    chat("c0", minute=0, model="openai/gpt-4o-mini", actor="key-1", end_user="alice"),
    chat("c1", minute=1, model="anthropic/claude-haiku", actor="key-2", end_user="bob"),
    admin("a0", minute=2, actor="admin-key"),
    chat("g0", "globex", minute=2.5, model="openai/gpt-4o-mini", end_user="alice"),
    chat("c2", minute=3, model="openai/gpt-4o-mini", actor="key-2", end_user="alice"),
    admin("a1", minute=4, actor="key-1"),
    chat("c3", minute=5, model="anthropic/claude-haiku", actor="key-1", end_user="alice"),
]


async def _seed(audit: Audit, internal: Metadata) -> None:
    await audit.stub.AppendRecords(pb.AppendRecordsRequest(records=_SEED), metadata=internal)


async def _list(audit: Audit, metadata: Metadata, **fields: Any) -> pb.ListRecordsResponse:
    response: pb.ListRecordsResponse = await audit.stub.ListRecords(
        pb.ListRecordsRequest(**fields), metadata=metadata
    )
    return response


async def test_records_read_back_exactly_as_appended(
    audit: Audit, internal: Metadata, reader: Callable[[str], Metadata]
) -> None:
    appended = [
        await audit.stub.AppendRecord(pb.AppendRecordRequest(record=r), metadata=internal)
        for r in (chat("c0"), admin("a0"))
    ]

    listed = (await _list(audit, reader("acme"))).records

    expected = []
    for original, response in zip((chat("c0"), admin("a0")), appended, strict=True):
        original.index, original.leaf_hash = response.index, response.leaf_hash
        expected.append(original)
    assert list(listed) == expected


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({}, ["c0", "c1", "a0", "c2", "a1", "c3"]),
        ({"kind": pb.RECORD_KIND_ADMIN}, ["a0", "a1"]),
        ({"kind": pb.RECORD_KIND_CHAT}, ["c0", "c1", "c2", "c3"]),
        ({"model": "anthropic/claude-haiku"}, ["c1", "c3"]),
        ({"actor": "key-1"}, ["c0", "a1", "c3"]),
        ({"end_user": "alice"}, ["c0", "c2", "c3"]),
        ({"start_time": at(2)}, ["a0", "c2", "a1", "c3"]),
        ({"end_time": at(3)}, ["c0", "c1", "a0"]),
        ({"start_time": at(1), "end_time": at(4)}, ["c1", "a0", "c2"]),
        ({"actor": "key-1", "kind": pb.RECORD_KIND_CHAT, "end_user": "alice"}, ["c0", "c3"]),
        ({"model": "no/such-model"}, []),
    ],
    ids=[
        "all",
        "kind-admin",
        "kind-chat",
        "model",
        "actor",
        "end-user",
        "start",
        "end",
        "window",
        "combined",
        "none",
    ],
)
async def test_filters(
    audit: Audit,
    internal: Metadata,
    reader: Callable[[str], Metadata],
    filters: dict[str, object],
    expected: list[str],
) -> None:
    await _seed(audit, internal)

    response = await _list(audit, reader("acme"), **filters)

    assert [r.event_id for r in response.records] == expected
    assert response.next_page_token == ""


async def test_pages_follow_the_index_until_the_last(
    audit: Audit, internal: Metadata, reader: Callable[[str], Metadata]
) -> None:
    await _seed(audit, internal)
    pages, token = [], ""
    while True:
        page = await _list(audit, reader("acme"), page_size=4, page_token=token, model="")
        pages.append([r.event_id for r in page.records])
        token = page.next_page_token
        if not token:
            break

    assert pages == [["c0", "c1", "a0", "c2"], ["a1", "c3"]]


async def test_a_full_last_page_ends_the_listing(
    audit: Audit, internal: Metadata, reader: Callable[[str], Metadata]
) -> None:
    await _seed(audit, internal)

    first = await _list(audit, reader("acme"), page_size=3)
    second = await _list(audit, reader("acme"), page_size=3, page_token=first.next_page_token)

    assert [r.index for r in second.records] == [4, 5, 6]
    assert second.next_page_token == ""


async def test_page_size_may_change_between_pages(
    audit: Audit, internal: Metadata, reader: Callable[[str], Metadata]
) -> None:
    await _seed(audit, internal)

    first = await _list(audit, reader("acme"), page_size=1)
    rest = await _list(audit, reader("acme"), page_size=10, page_token=first.next_page_token)

    assert [r.event_id for r in rest.records] == ["c1", "a0", "c2", "a1", "c3"]


@pytest.mark.parametrize(
    "changed",
    [{"kind": pb.RECORD_KIND_CHAT}, {"actor": "key-2"}, {"start_time": at(0)}, {"actor": ""}],
    ids=["kind-added", "actor-changed", "start-added", "actor-dropped"],
)
async def test_token_is_refused_when_the_filter_changes(
    audit: Audit,
    internal: Metadata,
    reader: Callable[[str], Metadata],
    changed: dict[str, object],
) -> None:
    await _seed(audit, internal)
    first = await _list(audit, reader("acme"), page_size=2, actor="key-1")

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _list(
            audit,
            reader("acme"),
            page_token=first.next_page_token,
            **{"actor": "key-1", **changed},
        )

    error = errors.decode(caught.value)
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")


async def test_naming_ones_own_tenant_is_the_same_filter(
    audit: Audit, internal: Metadata, reader: Callable[[str], Metadata]
) -> None:
    await _seed(audit, internal)
    first = await _list(audit, reader("acme"), page_size=2, actor="key-1")

    rest = await _list(
        audit, reader("acme"), tenant_id="acme", actor="key-1", page_token=first.next_page_token
    )

    assert [r.event_id for r in rest.records] == ["c3"]


# A token whose digest matches but whose key is not an index.
_WRONG_KEY = paging.encode("c3", dataclasses.asdict(RecordFilter(tenant_id="acme")))


@pytest.mark.parametrize(
    "token",
    ["garbage!", "eyJrIjogIngifQ", _WRONG_KEY],
    ids=["not-base64", "no-digest", "not-an-index"],
)
async def test_malformed_token_is_refused(
    audit: Audit, reader: Callable[[str], Metadata], token: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _list(audit, reader("acme"), page_token=token)

    error = errors.decode(caught.value)
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")
    assert error.metadata["field"] == "page_token"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"start_time": at(3), "end_time": at(3)}, "end_time"),
        ({"kind": 9}, "kind"),
        ({"page_size": -1}, "page_size"),
        ({"model": "gpt\x00"}, "model"),
    ],
    ids=["empty-window", "unknown-kind", "negative-page-size", "nul-in-model"],
)
async def test_bad_request_is_refused_naming_the_field(
    audit: Audit, reader: Callable[[str], Metadata], fields: dict[str, object], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _list(audit, reader("acme"), **fields)

    error = errors.decode(caught.value)
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD")
    assert error.metadata["field"] == field


async def test_a_tenant_sees_only_its_own_records(
    audit: Audit, internal: Metadata, reader: Callable[[str], Metadata]
) -> None:
    await _seed(audit, internal)

    globex = await _list(audit, reader("globex"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _list(audit, reader("acme"), tenant_id="globex")

    assert [r.event_id for r in globex.records] == ["g0"]
    error = errors.decode(caught.value)
    assert (error.code, error.reason) == (grpc.StatusCode.PERMISSION_DENIED, "SCOPE_DENIED")


async def test_an_operator_may_list_any_tenant(
    audit: Audit, internal: Metadata, operator: Metadata
) -> None:
    await _seed(audit, internal)

    response = await _list(audit, operator, tenant_id="globex")

    assert [(r.index, r.event_id) for r in response.records] == [(3, "g0")]


@pytest.mark.parametrize("scopes", [("chat",), ("internal",)])
async def test_listing_needs_read_scope(
    audit: Audit, as_caller: Callable[..., Metadata], scopes: tuple[str, ...]
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _list(audit, as_caller("acme", *scopes))

    error = errors.decode(caught.value)
    assert (error.code, error.reason) == (grpc.StatusCode.PERMISSION_DENIED, "SCOPE_DENIED")
