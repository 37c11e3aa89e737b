"""SubmitFeedback and the learned parts of Route, through the real suite."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from orchestra.common.v1 import chat_pb2, identity_pb2
from orchestra.router.v1 import chat_service_pb2 as chat_api
from orchestra.router.v1 import router_service_pb2 as router_api
from services.common import errors
from tests.router.conftest import Suite

MINI = "primary/gpt-4o-mini"  # catalog quality 0.62


def _request(text: str, **kwargs: object) -> chat_api.ChatRequest:
    return chat_api.ChatRequest(
        messages=[
            chat_pb2.Message(role=chat_pb2.ROLE_USER, content=[chat_pb2.ContentPart(text=text)])
        ],
        generation=chat_pb2.GenerationConfig(max_tokens=16),
        # Similar prompts would be cache hits, which are not the model's answers.
        cache=chat_api.CacheControl(mode=chat_api.CACHE_MODE_DISABLED),
        **kwargs,  # type: ignore[arg-type]
    )


def _math(i: int) -> str:
    return f"A shop sells {10 + i} pens at 3 dollars each. How much do they cost in total?"


async def _route(suite: Suite, text: str) -> router_api.RouteDecision:
    hints = chat_api.RoutingHints(strategy=identity_pb2.ROUTING_STRATEGY_BALANCED)
    reply = await suite.router.Route(
        router_api.RouteRequest(chat=_request(text, routing=hints)), metadata=suite.metadata
    )
    return reply.decision


async def _feedback(
    suite: Suite,
    request_id: str,
    score: float,
    comment: str = "",
    metadata: list[tuple[str, str]] | None = None,
) -> router_api.SubmitFeedbackResponse:
    return await suite.router.SubmitFeedback(
        router_api.SubmitFeedbackRequest(request_id=request_id, score=score, comment=comment),
        metadata=metadata or suite.metadata,
    )


async def test_low_scores_lower_what_route_expects_of_the_model(suite: Suite) -> None:
    before = await _route(suite, _math(100))
    assert before.model == MINI
    assert before.expected_quality == pytest.approx(0.62)
    assert before.task_type == chat_api.TASK_TYPE_MATH
    assert before.complexity != chat_api.COMPLEXITY_UNSPECIFIED
    assert 0.5 < before.confidence <= 1.0
    assert "math task" in before.reason and "learned quality 0.62" in before.reason

    for i in range(4):
        reply = await suite.chat.Chat(
            _request(_math(i), request_id=f"fb-{i}", model=MINI), metadata=suite.metadata
        )
        assert reply.model == MINI
    await suite.drain()  # the outcome is recorded by the accounting, off the client's path
    for i in range(4):
        await _feedback(suite, f"fb-{i}", 0.0, comment="wrong total")

    after = await _route(suite, _math(100))
    assert after.model == MINI  # still far cheaper, but now known to be worse here
    assert after.expected_quality < 0.5
    assert "from 4 rated answers" in after.reason

    # Feedback is idempotent per request: re-scoring replaces, it does not add.
    for i in range(4):
        await _feedback(suite, f"fb-{i}", 1.0)
    rescored = await _route(suite, _math(100))
    assert rescored.expected_quality > 0.62
    assert "from 4 rated answers" in rescored.reason


@pytest.mark.parametrize(
    ("request_id", "score", "comment", "code", "reason"),
    [
        ("", 0.5, "", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD"),
        ("bad id!", 0.5, "", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD"),
        ("fb-x", 1.5, "", grpc.StatusCode.INVALID_ARGUMENT, "FEEDBACK_SCORE_OUT_OF_RANGE"),
        ("fb-x", -0.1, "", grpc.StatusCode.INVALID_ARGUMENT, "FEEDBACK_SCORE_OUT_OF_RANGE"),
        ("fb-x", float("nan"), "", grpc.StatusCode.INVALID_ARGUMENT, "FEEDBACK_SCORE_OUT_OF_RANGE"),
        ("fb-x", 0.5, "x" * 2001, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD"),
        ("never-sent", 0.5, "", grpc.StatusCode.NOT_FOUND, "FEEDBACK_REQUEST_UNKNOWN"),
    ],
    ids=["no-id", "bad-id", "above-1", "below-0", "nan", "long-comment", "unknown"],
)
async def test_bad_feedback_is_refused_precisely(
    suite: Suite,
    request_id: str,
    score: float,
    comment: str,
    code: grpc.StatusCode,
    reason: str,
) -> None:
    await suite.chat.Chat(_request(_math(1), request_id="fb-x"), metadata=suite.metadata)
    await suite.drain()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _feedback(suite, request_id, score, comment)
    details = errors.decode(raised.value)
    assert (details.code, details.reason) == (code, reason)
    await _feedback(suite, "fb-x", 0.5)  # the request itself takes feedback


async def test_another_tenant_cannot_rate_a_request(
    suite: Suite, as_caller: Callable[..., list[tuple[str, str]]]
) -> None:
    await suite.chat.Chat(_request(_math(1), request_id="fb-mine"), metadata=suite.metadata)
    await suite.drain()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _feedback(suite, "fb-mine", 0.5, metadata=as_caller("intruder", "chat"))
    details = errors.decode(raised.value)
    assert (details.code, details.reason) == (grpc.StatusCode.NOT_FOUND, "FEEDBACK_REQUEST_UNKNOWN")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _feedback(suite, "fb-mine", 0.5, metadata=as_caller("acme", "read"))
    assert errors.decode(raised.value).reason == "SCOPE_DENIED"
