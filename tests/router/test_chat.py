"""The chat flow through the real router and its real peer services."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from orchestra.common.v1 import chat_pb2
from orchestra.router.v1 import chat_service_pb2 as chat_api
from orchestra.router.v1 import router_service_pb2 as router_api
from services.common import errors
from tests.fakes.faults import Fault
from tests.router.conftest import BUDGET_USD, Suite


def _request(text: str = "What is 2+2?", **kwargs: object) -> chat_api.ChatRequest:
    kwargs.setdefault("generation", chat_pb2.GenerationConfig(temperature=0.0, max_tokens=32))
    return chat_api.ChatRequest(
        messages=[
            chat_pb2.Message(role=chat_pb2.ROLE_USER, content=[chat_pb2.ContentPart(text=text)])
        ],
        **kwargs,  # type: ignore[arg-type]
    )


async def _events(suite: Suite, request: chat_api.ChatRequest) -> list[chat_api.ChatStreamResponse]:
    return [e async for e in suite.chat.ChatStream(request, metadata=suite.metadata)]


def _chats(fake: object) -> list[object]:
    """The chat-completion requests a fake received (not discovery's model listings)."""
    return [r for r in fake.requests if r.path.endswith("/chat/completions")]  # type: ignore[attr-defined]


def _text(events: list[chat_api.ChatStreamResponse]) -> str:
    return "".join(e.text_delta.text for e in events if e.WhichOneof("event") == "text_delta")


async def test_stream_is_routed_priced_settled_and_audited(suite: Suite) -> None:
    events = await _events(suite, _request())
    assert events[0].WhichOneof("event") == "start"
    assert events[0].start.model == "primary/gpt-4o-mini"  # the cheaper of the two
    assert _text(events) == suite.primary.reply_text
    end = events[-1].end
    assert end.finish_reason == chat_pb2.FINISH_REASON_STOP
    assert not end.usage.estimated  # the fake reports usage in its last chunk
    assert end.cost_micro_usd > 0
    sent = _chats(suite.primary)[-1].body  # type: ignore[attr-defined]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    await suite.drain()
    assert await suite.spent_micro_usd() == end.cost_micro_usd


async def test_unary_chat_folds_the_stream(suite: Suite) -> None:
    response = await suite.chat.Chat(_request(), metadata=suite.metadata)
    assert response.message.role == chat_pb2.ROLE_ASSISTANT
    assert response.message.content[0].text == suite.primary.reply_text
    assert response.model == "primary/gpt-4o-mini" and response.request_id


async def test_fallback_before_the_first_token_is_invisible_to_the_client(suite: Suite) -> None:
    suite.primary.set_fault(Fault.http_error(503), model="gpt-4o-mini")  # stays until cleared
    events = await _events(suite, _request())
    assert events[0].start.model == "backup/gpt-4o"
    assert _text(events) == suite.backup.reply_text
    end = events[-1].end
    assert [f.model for f in end.fallbacks] == ["primary/gpt-4o-mini"]
    assert end.fallbacks[0].reason == "UPSTREAM_UNAVAILABLE"
    assert len(_chats(suite.primary)) == 3  # the first try and two retries


async def test_rate_limit_is_retried_after_retry_after(suite: Suite) -> None:
    suite.primary.set_fault(Fault.rate_limit(retry_after=0), times=1)
    events = await _events(suite, _request())
    assert events[0].start.model == "primary/gpt-4o-mini"
    assert not events[-1].end.fallbacks
    assert len(_chats(suite.primary)) == 2


async def test_a_stream_broken_midway_ends_with_partial_usage_and_a_status(suite: Suite) -> None:
    suite.primary.set_fault(Fault.stream_cut(after_chunks=3), times=1)
    received: list[chat_api.ChatStreamResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for event in suite.chat.ChatStream(_request(), metadata=suite.metadata):
            received.append(event)
    details = errors.decode(raised.value)
    assert (details.code, details.reason) == (
        grpc.StatusCode.UNAVAILABLE,
        "UPSTREAM_STREAM_BROKEN",
    )
    end = received[-1].end
    assert end.finish_reason == chat_pb2.FINISH_REASON_ERROR
    assert end.usage.estimated and end.usage.completion_tokens > 0
    assert end.cost_micro_usd > 0
    await suite.drain()
    assert await suite.spent_micro_usd() == end.cost_micro_usd  # never zero


async def test_every_model_failing_is_unavailable_and_charges_nothing(suite: Suite) -> None:
    suite.primary.set_fault(Fault.http_error(500))
    suite.backup.set_fault(Fault.http_error(502))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _events(suite, _request())
    details = errors.decode(raised.value)
    assert (details.code, details.reason) == (grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE")
    await suite.drain()
    assert await suite.spent_micro_usd() == 0


async def test_a_request_beyond_the_budget_is_refused_before_any_upstream_call(
    suite: Suite,
) -> None:
    # Within gpt-4o's context window, but its worst case (100k output tokens at
    # USD 10 per million = USD 1) is more than the tenant's whole budget.
    request = _request()
    request.generation.max_tokens = 100_000
    request.model = "backup/gpt-4o"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _events(suite, request)
    details = errors.decode(raised.value)
    assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED, (details, BUDGET_USD)
    assert details.reason == "BUDGET_EXHAUSTED"
    assert not _chats(suite.backup)


async def test_cancelling_closes_the_upstream_stream_and_charges_what_was_produced(
    suite: Suite,
) -> None:
    suite.primary.chunk_delay = 0.2
    call = suite.chat.ChatStream(_request(), metadata=suite.metadata)
    seen = 0
    async for event in call:
        if event.WhichOneof("event") == "text_delta":
            seen += 1
            if seen == 2:
                call.cancel()
                break
    assert await suite.primary.wait_for_streams_closed(within=5)
    assert _chats(suite.primary)[-1].client_disconnected  # type: ignore[attr-defined]
    await suite.drain()
    assert await suite.spent_micro_usd() > 0


async def test_a_cache_hit_is_replayed_in_few_large_messages(suite: Suite) -> None:
    suite.primary.reply_text = " ".join(f"word{i}" for i in range(600))  # about 4,500 chars
    generation = chat_pb2.GenerationConfig(temperature=0.0, max_tokens=1024)
    first = await _events(suite, _request("A long answer, please.", generation=generation))
    await suite.drain()
    second = await _events(suite, _request("A long answer, please.", generation=generation))
    assert second[-1].end.cache_hit and not first[-1].end.cache_hit
    assert _text(second) == _text(first) == suite.primary.reply_text
    deltas = [e for e in second if e.WhichOneof("event") == "text_delta"]
    assert len(deltas) == 1  # the provider sent 16


async def test_the_same_question_is_answered_from_the_cache(suite: Suite) -> None:
    first = await suite.chat.Chat(_request("Capital of France?"), metadata=suite.metadata)
    await suite.drain()
    second = await suite.chat.Chat(_request("Capital of France?"), metadata=suite.metadata)
    assert not first.cache_hit and second.cache_hit
    assert second.message.content[0].text == first.message.content[0].text
    assert second.cost_micro_usd == 0
    assert len(_chats(suite.primary)) == 1


async def test_a_paraphrase_is_answered_from_the_cache_a_changed_question_is_not(
    suite: Suite,
) -> None:
    first = await suite.chat.Chat(
        _request("How do I reverse a list in Python?"), metadata=suite.metadata
    )
    await suite.drain()

    paraphrase = await suite.chat.Chat(
        _request("How can I reverse a list in Python?"), metadata=suite.metadata
    )
    negated = await suite.chat.Chat(
        _request("How do I not reverse a list in Python?"), metadata=suite.metadata
    )
    renumbered = await suite.chat.Chat(
        _request("How do I reverse a list in Python 2?"), metadata=suite.metadata
    )
    exact_only = await suite.chat.Chat(
        _request(
            "How can I reverse a list in Python?",
            cache=chat_api.CacheControl(exact_only=True),
        ),
        metadata=suite.metadata,
    )

    assert not first.cache_hit
    assert paraphrase.cache_hit
    assert paraphrase.message.content[0].text == first.message.content[0].text
    assert not negated.cache_hit
    assert not renumbered.cache_hit
    assert not exact_only.cache_hit
    assert len(_chats(suite.primary)) == 4


async def test_route_explains_its_decision(suite: Suite) -> None:
    reply = await suite.router.Route(
        router_api.RouteRequest(chat=_request()), metadata=suite.metadata
    )
    decision = reply.decision
    assert decision.model == "primary/gpt-4o-mini"
    assert decision.fallbacks == ["backup/gpt-4o"]
    assert "cost strategy" in decision.reason
    assert decision.estimated_cost_micro_usd > 0


@pytest.mark.parametrize(
    ("request_", "code", "reason"),
    [
        (chat_api.ChatRequest(), grpc.StatusCode.INVALID_ARGUMENT, "EMPTY_MESSAGES"),
        (_request(model="nope/nothing"), grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"),
        (_request(request_id="bad id!"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD"),
        (
            _request(generation=chat_pb2.GenerationConfig(temperature=3)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_FIELD",
        ),
        (_request("x" * 2_000_000), grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_TOO_LARGE"),
    ],
    ids=["empty", "unknown-model", "bad-request-id", "temperature", "oversized"],
)
async def test_bad_requests_are_refused_precisely(
    suite: Suite, request_: chat_api.ChatRequest, code: grpc.StatusCode, reason: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _events(suite, request_)
    details = errors.decode(raised.value)
    assert (details.code, details.reason) == (code, reason)
    assert not _chats(suite.primary)


async def test_concurrent_streams_each_get_their_own_answer(suite: Suite) -> None:
    results = await asyncio.gather(*(_events(suite, _request(f"q{i}")) for i in range(8)))
    assert all(_text(events) == suite.primary.reply_text for events in results)
    ids = {events[0].start.request_id for events in results}
    assert len(ids) == 8
