"""The routing decision's hard filters (pure: no stores, no network)."""

from __future__ import annotations

import pytest

from orchestra.budget.v1 import account_service_pb2 as account_pb2
from orchestra.common.v1 import chat_pb2
from orchestra.discovery.v1 import discovery_service_pb2 as discovery_pb2
from orchestra.router.v1 import chat_service_pb2 as chat_api
from services.common.errors import OrchestraError
from services.router import policy


def _model(name: str, price: int, status: int) -> discovery_pb2.Model:
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
        health=discovery_pb2.Health(status=status),  # type: ignore[arg-type]
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
