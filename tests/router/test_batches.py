"""Batches through the real router: run, limits, priority, cancel, errors, restart."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable

import grpc
import pytest
import redis.asyncio as aioredis

from orchestra.common.v1 import chat_pb2, errors_pb2, identity_pb2
from orchestra.router.v1 import chat_service_pb2 as chat_api
from orchestra.router.v1 import router_service_pb2 as router_api
from services.cli.embedded import free_port
from services.common import errors
from services.common.server import start
from services.common.stores import connect_redis
from services.router.batch_runner import BatchRunner
from services.router.batch_store import LEASE_SECONDS, BatchStore, Claimed
from services.router.server import RouterService
from services.router.server import build as build_router
from tests.router.conftest import TENANT, Suite


def _chat(text: str, **kwargs: object) -> chat_api.ChatRequest:
    return chat_api.ChatRequest(
        messages=[
            chat_pb2.Message(role=chat_pb2.ROLE_USER, content=[chat_pb2.ContentPart(text=text)])
        ],
        generation=chat_pb2.GenerationConfig(max_tokens=32),
        cache=chat_api.CacheControl(mode=chat_api.CACHE_MODE_DISABLED),
        **kwargs,  # type: ignore[arg-type]
    )


def _batch(batch_id: str, n: int, **kwargs: object) -> router_api.CreateBatchRequest:
    items = [
        router_api.BatchItem(custom_id=f"item-{i:02d}", request=_chat(f"{batch_id} q{i}"))
        for i in range(n)
    ]
    return router_api.CreateBatchRequest(batch_id=batch_id, items=items, **kwargs)  # type: ignore[arg-type]


def _router(suite: Suite) -> RouterService:
    service = suite.running["router"].service
    assert isinstance(service, RouterService)
    return service


async def _finished(suite: Suite, batch_id: str) -> router_api.Batch:
    """Polls GetBatch until the batch is completed or cancelled (bounded)."""
    for _ in range(600):
        reply = await suite.router.GetBatch(
            router_api.GetBatchRequest(batch_id=batch_id), metadata=suite.metadata
        )
        if reply.batch.state in (
            router_api.BATCH_STATE_COMPLETED,
            router_api.BATCH_STATE_CANCELLED,
        ):
            return reply.batch
        await asyncio.sleep(0.05)
    raise AssertionError(f"batch {batch_id} did not finish: {reply.batch}")


async def _results(suite: Suite, batch_id: str, page_size: int = 0) -> list[router_api.BatchResult]:
    out: list[router_api.BatchResult] = []
    token = ""
    while True:
        page = await suite.router.ListBatchResults(
            router_api.ListBatchResultsRequest(
                batch_id=batch_id, page_size=page_size, page_token=token
            ),
            metadata=suite.metadata,
        )
        out.extend(page.results)
        token = page.next_page_token
        if not token:
            return out


def _chats(fake: object) -> list[object]:
    return [r for r in fake.requests if r.path.endswith("/chat/completions")]  # type: ignore[attr-defined]


def _most_at_once(requests: list[object]) -> int:
    """The largest number of these upstream requests that were open at the same moment."""
    edges = sorted(
        itertools.chain.from_iterable(
            ((r.received_at, 1), (r.closed_at or r.received_at, -1))  # type: ignore[attr-defined]
            for r in requests
        ),
        key=lambda e: (e[0], e[1]),
    )
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


async def test_a_batch_runs_every_item_within_its_concurrency_limit(suite: Suite) -> None:
    suite.primary.chunk_delay = 0.02  # each answer takes a while, so items overlap
    created = await suite.router.CreateBatch(
        _batch("b1", 6, max_concurrency=2), metadata=suite.metadata
    )
    assert created.batch.batch_id == "b1" and created.batch.total_items == 6
    batch = await _finished(suite, "b1")
    assert batch.state == router_api.BATCH_STATE_COMPLETED
    assert (batch.succeeded_items, batch.failed_items) == (6, 0)
    assert batch.HasField("end_time")
    results = await _results(suite, "b1", page_size=4)  # two pages
    assert [r.custom_id for r in results] == [f"item-{i:02d}" for i in range(6)]
    assert all(r.response.message.content[0].text == suite.primary.reply_text for r in results)
    assert [r.response.request_id for r in results] == [f"b1:item-{i:02d}" for i in range(6)]
    assert batch.cost_micro_usd == sum(r.response.cost_micro_usd for r in results) > 0
    assert _most_at_once(_chats(suite.primary)) == 2


async def test_creating_the_same_batch_again_is_idempotent(suite: Suite) -> None:
    first = await suite.router.CreateBatch(_batch("same", 2), metadata=suite.metadata)
    again = await suite.router.CreateBatch(_batch("same", 2), metadata=suite.metadata)
    assert again.batch.create_time == first.batch.create_time
    await _finished(suite, "same")
    assert len(_chats(suite.primary)) == 2
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await suite.router.CreateBatch(_batch("same", 3), metadata=suite.metadata)
    details = errors.decode(raised.value)
    assert (details.code, details.reason) == (grpc.StatusCode.ALREADY_EXISTS, "RESOURCE_EXISTS")


async def test_a_failing_item_is_reported_and_the_rest_answered(suite: Suite) -> None:
    request = _batch("mixed", 2)
    request.items.add(custom_id="bad", request=_chat("x", model="nope/nothing"))
    await suite.router.CreateBatch(request, metadata=suite.metadata)
    batch = await _finished(suite, "mixed")
    assert (batch.succeeded_items, batch.failed_items) == (2, 1)
    results = {r.custom_id: r for r in await _results(suite, "mixed")}
    error = results["bad"].error
    assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND.value[0], "MODEL_NOT_FOUND")
    assert results["item-00"].HasField("response")


async def test_higher_priority_batches_run_first(suite: Suite) -> None:
    router = _router(suite)
    await router.batches.stop()  # queue both before anything runs
    await suite.router.CreateBatch(
        _batch("low", 2, priority=0, max_concurrency=1), metadata=suite.metadata
    )
    await suite.router.CreateBatch(
        _batch("high", 2, priority=5, max_concurrency=1), metadata=suite.metadata
    )
    assert await router.batches.store.ready() == [f"{TENANT}/high", f"{TENANT}/low"]
    runner = BatchRunner(router.batches.store, router.engine, slots=1, poll=0.05)
    runner.start()
    try:
        await _finished(suite, "low")
    finally:
        await runner.stop()
    sent = [r.body["messages"][0]["content"] for r in _chats(suite.primary)]  # type: ignore[attr-defined]
    assert sent == ["high q0", "high q1", "low q0", "low q1"]


async def test_cancel_drops_queued_items(suite: Suite) -> None:
    router = _router(suite)
    await router.batches.stop()
    await suite.router.CreateBatch(_batch("stop-me", 3), metadata=suite.metadata)
    reply = await suite.router.CancelBatch(
        router_api.CancelBatchRequest(batch_id="stop-me"), metadata=suite.metadata
    )
    assert reply.batch.state == router_api.BATCH_STATE_CANCELLED and reply.batch.HasField(
        "end_time"
    )
    assert await router.batches.store.ready() == []
    assert await router.batches.store.claim(f"{TENANT}/stop-me") == "done"
    assert not _chats(suite.primary) and not await _results(suite, "stop-me")
    again = await suite.router.CancelBatch(
        router_api.CancelBatchRequest(batch_id="stop-me"), metadata=suite.metadata
    )
    assert again.batch.state == router_api.BATCH_STATE_CANCELLED  # idempotent


async def test_a_dead_replicas_item_is_run_again_after_its_lease(suite: Suite) -> None:
    router = _router(suite)
    await router.batches.stop()
    await suite.router.CreateBatch(_batch("lease", 1), metadata=suite.metadata)
    client = connect_redis(suite.settings.redis_url)
    now = [1_800_000_000.0]
    store = BatchStore(client, clock=lambda: now[0])
    ref = f"{TENANT}/lease"
    taken = await store.claim(ref)  # by a replica that then dies
    assert isinstance(taken, Claimed) and taken.attempts == 0
    assert await store.claim(ref) == "empty"
    now[0] += LEASE_SECONDS + 1
    again = await store.claim(ref)
    assert isinstance(again, Claimed) and again.custom_id == taken.custom_id and again.attempts == 1
    await client.aclose()


async def test_an_item_run_again_after_its_lease_is_charged_once(suite: Suite) -> None:
    router = _router(suite)
    await router.batches.stop()
    await suite.router.CreateBatch(_batch("twice", 1), metadata=suite.metadata)
    upstream_before = len(_chats(suite.primary)) + len(_chats(suite.backup))
    client = connect_redis(suite.settings.redis_url)
    now = [1_800_000_000.0]
    store = BatchStore(client, clock=lambda: now[0])
    ref = f"{TENANT}/twice"
    taken = await store.claim(ref)
    assert isinstance(taken, Claimed)
    # A replica answers the item (and settles it), then dies before recording the result.
    await router.engine.chat(await store.identity(ref), taken.request, 30.0)
    await suite.drain()
    once = await suite.spent_micro_usd()
    assert once > 0
    now[0] += LEASE_SECONDS + 1  # its lease expires; another replica runs it again
    runner = BatchRunner(store, router.engine, poll=0.05)
    runner.start()
    try:
        batch = await _finished(suite, "twice")
    finally:
        await runner.stop()
        await client.aclose()
    assert batch.succeeded_items == 1
    upstream = len(_chats(suite.primary)) + len(_chats(suite.backup))
    assert upstream - upstream_before == 2  # it did run twice
    await suite.drain()
    assert await suite.spent_micro_usd() == once


async def test_results_and_queues_survive_a_router_restart(suite: Suite) -> None:
    await suite.router.CreateBatch(_batch("done", 2), metadata=suite.metadata)
    before = await _results(suite, "done") if await _finished(suite, "done") else []
    # A second batch is queued while nothing runs it, then the router process goes away.
    await _router(suite).batches.stop()
    await suite.router.CreateBatch(_batch("waiting", 3), metadata=suite.metadata)
    await suite.running["router"].stop(0)
    assert len(_chats(suite.primary)) == 2
    service = await build_router(suite.settings)
    suite.running["router"] = await start(service, suite.settings.listen_addr("router"))
    assert await _results(suite, "done") == before and len(before) == 2
    batch = await _finished(suite, "waiting")  # the new router took the queue over
    assert (batch.state, batch.succeeded_items) == (router_api.BATCH_STATE_COMPLETED, 3)
    results = await _results(suite, "waiting")
    assert [r.custom_id for r in results] == [f"item-{i:02d}" for i in range(3)]
    assert len(_chats(suite.primary)) == 5  # every item ran exactly once


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (router_api.CreateBatchRequest(), "items"),
        (_batch("bad id!", 1), "batch_id"),
        (
            router_api.CreateBatchRequest(
                items=[router_api.BatchItem(custom_id="a", request=_chat("x"))] * 2
            ),
            "items[1].custom_id",
        ),
        (
            router_api.CreateBatchRequest(
                items=[router_api.BatchItem(custom_id="a b", request=_chat("x"))]
            ),
            "items[0].custom_id",
        ),
        (
            router_api.CreateBatchRequest(
                items=[router_api.BatchItem(custom_id="a", request=chat_api.ChatRequest())]
            ),
            "items[0].request.messages",
        ),
        (_batch("b", 1, max_concurrency=1000), "max_concurrency"),
    ],
    ids=["no-items", "bad-batch-id", "repeated-id", "bad-custom-id", "bad-item", "concurrency"],
)
async def test_bad_batches_are_refused_precisely(
    suite: Suite, request_: router_api.CreateBatchRequest, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await suite.router.CreateBatch(request_, metadata=suite.metadata)
    details = errors.decode(raised.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert (details.reason, list(details.field_violations)) == ("INVALID_FIELD", [field]), details


async def test_unknown_batches_and_bad_tokens(suite: Suite) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await suite.router.GetBatch(
            router_api.GetBatchRequest(batch_id="nope"), metadata=suite.metadata
        )
    details = errors.decode(raised.value)
    assert (details.code, details.reason) == (grpc.StatusCode.NOT_FOUND, "RESOURCE_NOT_FOUND")
    await suite.router.CreateBatch(_batch("paged", 1), metadata=suite.metadata)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await suite.router.ListBatchResults(
            router_api.ListBatchResultsRequest(batch_id="paged", page_token="garbage"),
            metadata=suite.metadata,
        )
    assert errors.decode(raised.value).reason == "INVALID_PAGE_TOKEN"


async def test_a_tenant_sees_only_its_own_batches(
    suite: Suite, as_caller: Callable[..., list[tuple[str, str]]]
) -> None:
    await suite.router.CreateBatch(_batch("mine", 1), metadata=suite.metadata)
    other = as_caller("globex", "chat")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await suite.router.GetBatch(router_api.GetBatchRequest(batch_id="mine"), metadata=other)
    assert errors.decode(raised.value).code == grpc.StatusCode.NOT_FOUND


async def test_redis_down_is_unavailable_for_every_batch_call() -> None:
    # Nothing listens on a port the OS just handed out and took back.
    redis = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=2)
    store = BatchStore(redis)
    identity = identity_pb2.Identity(tenant_id=TENANT)
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: store.create(identity, _batch("down", 1), 1_000_000),
        lambda: store.get(TENANT, "down"),
        lambda: store.results(TENANT, router_api.ListBatchResultsRequest(batch_id="down")),
        lambda: store.cancel(TENANT, "down"),
    ]
    try:
        for call in calls:
            with pytest.raises(errors.Unavailable) as raised:
                await call()
            assert raised.value.reason == errors_pb2.ERROR_REASON_STORE_UNAVAILABLE
            assert raised.value.metadata["store"] == "redis"
            assert raised.value.retry_after is not None and raised.value.retry_after > 0
    finally:
        await redis.aclose()
