"""The engine in process, with its peers faked: what one chat reads and hands on.

These pin down the request context: the tenant's policy is read once per chat
and the prompt featurised once, whether the answer comes from a provider or
from the cache, and the follow-up jobs still go to the outbox.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import cast

import numpy as np

from orchestra.audit.v1 import audit_service_pb2 as audit_pb2
from orchestra.budget.v1 import account_service_pb2 as account_pb2
from orchestra.budget.v1 import budget_service_pb2 as budget_pb2
from orchestra.cache.v1 import cache_service_pb2 as cache_pb2
from orchestra.common.v1 import chat_pb2, identity_pb2
from orchestra.discovery.v1 import discovery_service_pb2 as discovery_pb2
from orchestra.router.v1 import chat_service_pb2 as chat_api
from services.providers.base import Event, Finish, TextDelta, UpstreamRequest, UsageReport
from services.router import features, learning, tasks
from services.router.engine import Engine, EngineConfig
from services.router.outbox import Outbox
from services.router.peers import Peers

TENANT = "acme"


class _CountingFeaturizer(features.Featurizer):
    """Zero features, counting the calls (no embedding model loaded)."""

    def __init__(self) -> None:  # no super().__init__: it would load the embedder
        self.calls = 0

    def __call__(self, text: str, analysis: tasks.TaskAnalysis) -> features.Vector:
        self.calls += 1
        return np.zeros(features.FEATURE_DIM)


class _Peers:
    """The budget/cache side of :class:`Peers`, counting policy reads."""

    def __init__(self, hit: cache_pb2.LookupResponse | None = None) -> None:
        self.policy_reads = 0
        self.hit = hit
        self.policy = account_pb2.TenantPolicy(
            routing_strategy=identity_pb2.ROUTING_STRATEGY_BALANCED, cache_enabled=True
        )

    async def tenant_policy(self, tenant_id: str) -> account_pb2.TenantPolicy:
        self.policy_reads += 1
        return self.policy

    async def reserve(self, request: budget_pb2.ReserveRequest) -> budget_pb2.ReserveResponse:
        return budget_pb2.ReserveResponse()

    async def lookup(self, request: cache_pb2.LookupRequest) -> cache_pb2.LookupResponse | None:
        return self.hit


class _Outbox:
    def __init__(self) -> None:
        self.kinds: list[str] = []
        self.writes: list[list[tuple[str, bytes]]] = []

    async def put(self, *jobs: tuple[str, bytes]) -> None:
        self.kinds.extend(kind for kind, _ in jobs)
        self.writes.append(list(jobs))


class _Adapter:
    provider_id = "p"

    async def stream(self, request: UpstreamRequest) -> AsyncIterator[Event]:
        yield TextDelta("Hello")
        yield UsageReport(prompt_tokens=5, completion_tokens=1)
        yield Finish(chat_pb2.FINISH_REASON_STOP)

    async def aclose(self) -> None:
        return None


def _models() -> Sequence[discovery_pb2.Model]:
    return [
        discovery_pb2.Model(
            name=f"p/{name}",
            provider_id="p",
            model_id=name,
            quality=quality,
            price_source=discovery_pb2.PRICE_SOURCE_CATALOG,
            pricing=discovery_pb2.Pricing(
                input_micro_usd_per_mtok=price, output_micro_usd_per_mtok=price
            ),
        )
        for name, quality, price in (("small", 0.6, 1), ("large", 0.9, 100))
    ]


def _engine(peers: _Peers, outbox: _Outbox) -> tuple[Engine, _CountingFeaturizer]:
    featurizer = _CountingFeaturizer()
    engine = Engine(
        EngineConfig(default_max_tokens=16),
        cast(Peers, peers),
        cast(Outbox, outbox),
        _models,
        {"p": _Adapter()},
        learner=learning.Learner(None, featurizer, seed=0),
    )
    return engine, featurizer


def _hit() -> cache_pb2.LookupResponse:
    return cache_pb2.LookupResponse(
        hit=True,
        match_kind=cache_pb2.MATCH_KIND_EXACT,
        answer=cache_pb2.CachedAnswer(text="cached", model="p/small"),
    )


def _request() -> chat_api.ChatRequest:
    return chat_api.ChatRequest(
        messages=[
            chat_pb2.Message(role=chat_pb2.ROLE_USER, content=[chat_pb2.ContentPart(text="Hi")])
        ]
    )


async def test_a_provider_answer_reads_the_policy_and_featurises_once() -> None:
    peers, outbox = _Peers(), _Outbox()
    engine, featurizer = _engine(peers, outbox)
    identity = identity_pb2.Identity(tenant_id=TENANT, key_id="app")
    response = await engine.chat(identity, _request(), None)
    await engine.aclose()
    assert response.message.content[0].text == "Hello"
    assert outbox.kinds == ["settle", "cache_store", "audit"]
    assert peers.policy_reads == 1
    assert featurizer.calls == 1  # routing and the learned outcome share it
    counts = engine.learner.state(TENANT).counts[response.model] if engine.learner else None
    assert counts is not None and counts.calls == 1


async def test_a_cache_hit_reads_the_policy_once() -> None:
    peers, outbox = _Peers(_hit()), _Outbox()
    engine, _ = _engine(peers, outbox)
    identity = identity_pb2.Identity(tenant_id=TENANT, key_id="app")
    response = await engine.chat(identity, _request(), None)
    await engine.aclose()
    assert response.cache_hit and response.message.content[0].text == "cached"
    # The release and the audit record go in one outbox write, after the replay.
    assert [[kind for kind, _ in jobs] for jobs in outbox.writes] == [["release", "audit"]]
    record = audit_pb2.AppendRecordRequest.FromString(outbox.writes[0][1][1]).record
    assert record.chat.cache_hit and record.chat.status_code == 0
    assert peers.policy_reads == 1


async def test_a_cache_hit_the_client_cancels_is_released_and_audited_as_cancelled() -> None:
    peers, outbox = _Peers(_hit()), _Outbox()
    engine, _ = _engine(peers, outbox)
    identity = identity_pb2.Identity(tenant_id=TENANT, key_id="app")
    events = cast(
        AsyncGenerator[chat_api.ChatStreamResponse, None],
        engine.stream(identity, _request(), None),
    )
    first = await anext(aiter(events))
    assert first.start.cache_hit
    await events.aclose()  # what the servicer does when the client goes away
    await engine.aclose()
    assert outbox.kinds == ["release", "audit"]
    record = audit_pb2.AppendRecordRequest.FromString(outbox.writes[0][1][1]).record
    assert record.chat.cache_hit and record.chat.status_code == 1  # CANCELLED


async def test_a_cache_hit_refused_by_budget_is_audited_without_a_release() -> None:
    peers, outbox = _Peers(_hit()), _Outbox()

    async def refuse(request: budget_pb2.ReserveRequest) -> budget_pb2.ReserveResponse:
        raise RuntimeError("over budget")

    peers.reserve = refuse  # type: ignore[method-assign]
    engine, _ = _engine(peers, outbox)
    response = await engine.chat(identity_pb2.Identity(tenant_id=TENANT), _request(), None)
    await engine.aclose()
    assert response.cache_hit
    assert outbox.kinds == ["audit"]


async def test_route_reads_the_policy_once_and_has_no_side_effects() -> None:
    peers, outbox = _Peers(), _Outbox()
    engine, _ = _engine(peers, outbox)
    decision = await engine.route(identity_pb2.Identity(tenant_id=TENANT), _request())
    assert decision.model.name in {"p/small", "p/large"}
    assert peers.policy_reads == 1
    assert outbox.kinds == []
