"""The outbox's batch handlers against the real budget and cache services.

Settlements, releases and cache stores of one outbox read go as one batch
call; each job's own refusal comes back as its own outcome, so only that job
is dead-lettered, and a peer without the batch RPC gets the jobs one by one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from orchestra.budget.v1 import budget_service_pb2 as budget_pb2
from orchestra.cache.v1 import cache_service_pb2 as cache_pb2
from orchestra.common.v1 import chat_pb2
from services.router.outbox import PermanentFailure
from services.router.peers import Peers
from tests.cache.builders import answer, conversation, key
from tests.router.conftest import TENANT, Suite

Metadata = list[tuple[str, str]]


def _peers(suite: Suite) -> Peers:
    peers: Peers = suite.running["router"].service.peers  # type: ignore[attr-defined]
    return peers


async def _reserve(suite: Suite, internal: Metadata, request_id: str, amount: int) -> None:
    await suite.budget.Reserve(
        budget_pb2.ReserveRequest(
            request_id=request_id,
            subject=budget_pb2.SpendSubject(tenant_id=TENANT, key_id="app"),
            model="primary/gpt-4o-mini",
            amount_micro_usd=amount,
            tokens=10,
        ),
        metadata=internal,
    )


def _settle(request_id: str, cost: int) -> bytes:
    return budget_pb2.SettleRequest(
        request_id=request_id,
        cost_micro_usd=cost,
        usage=chat_pb2.Usage(prompt_tokens=3, completion_tokens=2),
    ).SerializeToString()


async def test_one_refused_settlement_does_not_hold_back_the_others(
    suite: Suite, as_caller: Callable[..., Metadata]
) -> None:
    internal = as_caller("", "internal", key_id="service:router")
    await _reserve(suite, internal, "s-1", 1_000)
    await _reserve(suite, internal, "s-2", 1_000)
    await _reserve(suite, internal, "s-3", 1_000)
    outcomes = await _peers(suite).deliver_settle_many(
        [_settle("s-1", 300), _settle("never-reserved", 5), _settle("s-2", 400)]
    )
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], PermanentFailure)
    assert "NOT_FOUND" in str(outcomes[1])
    released = await _peers(suite).deliver_release_many(
        [budget_pb2.ReleaseRequest(request_id="s-3").SerializeToString()]
    )
    assert released == [None]
    assert await suite.spent_micro_usd() == 700


async def test_a_peer_without_the_batch_rpc_gets_the_jobs_one_by_one(
    suite: Suite, as_caller: Callable[..., Metadata]
) -> None:
    internal = as_caller("", "internal", key_id="service:router")
    await _reserve(suite, internal, "o-1", 1_000)
    await _reserve(suite, internal, "o-2", 1_000)
    peers = _peers(suite)
    channel = grpc.aio.insecure_channel(suite.settings.addrs["budget"])
    try:
        # What an older budget replica answers for an RPC it does not have.
        missing: Any = channel.unary_unary(
            "/orchestra.budget.v1.BudgetService/BatchSettleFromTheFuture",
            request_serializer=budget_pb2.BatchSettleRequest.SerializeToString,
            response_deserializer=budget_pb2.BatchSettleResponse.FromString,
        )
        payloads = [_settle("o-1", 100), _settle("o-2", 200), _settle("unknown", 1)]
        outcomes = await peers._deliver_many(
            missing,
            budget_pb2.BatchSettleRequest(
                requests=[budget_pb2.SettleRequest.FromString(p) for p in payloads]
            ),
            payloads,
            peers.deliver_settle,
        )
    finally:
        await channel.close()
    assert outcomes[:2] == [None, None]
    assert isinstance(outcomes[2], PermanentFailure)
    assert await suite.spent_micro_usd() == 300


async def test_cache_stores_go_in_one_call_and_are_served(
    suite: Suite, as_caller: Callable[..., Metadata]
) -> None:
    internal = as_caller("", "internal", key_id="service:router")
    questions = ["What is the capital of Spain?", "What is the capital of Peru?"]
    keys = [key(tenant=TENANT, messages=conversation(q)) for q in questions]
    payloads = [
        cache_pb2.StoreRequest(key=k, answer=answer(text), request_id=f"c-{i}").SerializeToString()
        for i, (k, text) in enumerate(zip(keys, ["Madrid.", "Lima."], strict=True))
    ]
    bad = cache_pb2.StoreRequest(key=keys[0], request_id="c-bad").SerializeToString()  # no answer
    outcomes = await _peers(suite).deliver_cache_store_many([payloads[0], bad, payloads[1]])
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], PermanentFailure)
    cache = _peers(suite).cache
    for cache_key, text in zip(keys, ["Madrid.", "Lima."], strict=True):
        found = await cache.Lookup(
            cache_pb2.LookupRequest(key=cache_key, exact_only=True), metadata=internal
        )
        assert (found.hit, found.answer.text) == (True, text)
