"""The routing decision's filters (pure: no stores, no network)."""

from __future__ import annotations

import pytest

from orchestra.budget.v1 import account_service_pb2 as account_pb2
from orchestra.common.v1 import chat_pb2, identity_pb2
from orchestra.discovery.v1 import discovery_service_pb2 as discovery_pb2
from orchestra.router.v1 import chat_service_pb2 as chat_api
from services.common.errors import OrchestraError
from services.router import policy


def _model(name: str, price: int, status: int, ttft_ms: int = 0) -> discovery_pb2.Model:
    return discovery_pb2.Model(
        name=name,
        provider_id="p",
        model_id=name.removeprefix("p/"),
        context_window=100_000,
        quality=0.7,
        price_source=discovery_pb2.PRICE_SOURCE_CATALOG,
        pricing=discovery_pb2.Pricing(
            input_micro_usd_per_mtok=price, output_micro_usd_per_mtok=price
        ),
        health=discovery_pb2.Health(status=status, ttft_p50_ms=ttft_ms),  # type: ignore[arg-type]
    )


def _request() -> chat_api.ChatRequest:
    return chat_api.ChatRequest(
        messages=[
            chat_pb2.Message(role=chat_pb2.ROLE_USER, content=[chat_pb2.ContentPart(text="Hi")])
        ]
    )


def _decide(models: list[discovery_pb2.Model]) -> policy.Decision:
    tenant = account_pb2.TenantPolicy()
    return policy.decide(_request(), models, tenant, default_max_tokens=50)


def test_an_unhealthy_model_is_skipped_while_a_healthy_one_fits() -> None:
    decision = _decide(
        [
            _model("p/cheap", 1, discovery_pb2.HEALTH_STATUS_UNHEALTHY),
            _model("p/dear", 100, discovery_pb2.HEALTH_STATUS_HEALTHY),
        ]
    )
    assert [m.name for m in decision.chain] == ["p/dear"]
    assert ("p/cheap", "unhealthy") in decision.excluded


def test_when_every_fitting_model_is_unhealthy_they_are_tried_anyway() -> None:
    decision = _decide(
        [
            _model("p/cheap", 1, discovery_pb2.HEALTH_STATUS_UNHEALTHY),
            _model("p/dear", 100, discovery_pb2.HEALTH_STATUS_UNHEALTHY),
        ]
    )
    assert [m.name for m in decision.chain] == ["p/cheap", "p/dear"]
    assert "marked unhealthy" in decision.reason


def test_with_no_model_at_all_the_request_is_refused() -> None:
    with pytest.raises(OrchestraError):
        _decide([])


_HEALTHY = discovery_pb2.HEALTH_STATUS_HEALTHY


def _decide_within(models: list[discovery_pb2.Model], max_latency_ms: int) -> policy.Decision:
    """The cost strategy's choice under a ``max_latency_ms`` hint."""
    request = _request()
    request.routing.max_latency_ms = max_latency_ms
    tenant = account_pb2.TenantPolicy(routing_strategy=identity_pb2.ROUTING_STRATEGY_COST)
    return policy.decide(request, models, tenant, default_max_tokens=50)


def test_max_latency_drops_a_model_slower_than_the_hint() -> None:
    models = [
        _model("p/cheap", 1, _HEALTHY, ttft_ms=2_000),
        _model("p/dear", 100, _HEALTHY, ttft_ms=100),
    ]
    assert _decide_within(models, 0).model.name == "p/cheap"  # 0: no limit
    decision = _decide_within(models, 500)
    assert [m.name for m in decision.chain] == ["p/dear"]
    assert ("p/cheap", "max_latency") in decision.excluded


def test_max_latency_keeps_the_fastest_when_every_model_is_slower() -> None:
    models = [
        _model("p/cheap", 1, _HEALTHY, ttft_ms=2_000),
        _model("p/dear", 100, _HEALTHY, ttft_ms=900),
        _model("p/mid", 10, _HEALTHY, ttft_ms=1_500),
    ]
    decision = _decide_within(models, 500)
    assert [m.name for m in decision.chain] == ["p/dear"]
    assert {name for name, f in decision.excluded if f == "max_latency"} == {"p/cheap", "p/mid"}


def test_max_latency_keeps_a_model_with_no_estimate_yet() -> None:
    models = [
        _model("p/cheap", 1, _HEALTHY),  # never probed: no estimate
        _model("p/dear", 100, _HEALTHY, ttft_ms=100),
    ]
    decision = _decide_within(models, 50)
    assert [m.name for m in decision.chain] == ["p/cheap"]
    assert ("p/dear", "max_latency") in decision.excluded


def test_max_latency_does_not_apply_to_a_pinned_model() -> None:
    models = [_model("p/slow", 1, _HEALTHY, ttft_ms=2_000), _model("p/fast", 1, _HEALTHY, 10)]
    request = _request()
    request.model = "p/slow"
    request.routing.max_latency_ms = 500
    decision = policy.decide(request, models, account_pb2.TenantPolicy(), default_max_tokens=50)
    assert decision.model.name == "p/slow"
