"""coalesced(): waiting text deltas merged; order, errors and cancellation kept."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest

from orchestra.router.v1 import chat_service_pb2 as chat_api
from services.router.coalesce import coalesced


def _text(text: str) -> chat_api.ChatStreamResponse:
    return chat_api.ChatStreamResponse(text_delta=chat_api.TextDelta(text=text))


def _start() -> chat_api.ChatStreamResponse:
    return chat_api.ChatStreamResponse(start=chat_api.ChatStart(request_id="r1"))


def _end() -> chat_api.ChatStreamResponse:
    return chat_api.ChatStreamResponse(end=chat_api.ChatEnd())


def _tool(arguments: str) -> chat_api.ChatStreamResponse:
    return chat_api.ChatStreamResponse(
        tool_call_delta=chat_api.ToolCallDelta(index=0, arguments_delta=arguments)
    )


async def _burst(
    events: list[chat_api.ChatStreamResponse],
) -> AsyncGenerator[chat_api.ChatStreamResponse, None]:
    for event in events:
        yield event


def _shape(events: list[chat_api.ChatStreamResponse]) -> list[str]:
    return [
        f"text:{e.text_delta.text}"
        if e.WhichOneof("event") == "text_delta"
        else str(e.WhichOneof("event"))
        for e in events
    ]


async def test_deltas_waiting_together_go_as_one_and_other_events_keep_their_place() -> None:
    events = [_start(), _text("a"), _text("b"), _text("c"), _tool("{}"), _text("d"), _end()]
    out = []
    async for event in coalesced(_burst(events)):
        out.append(event)
        await asyncio.sleep(0.01)  # a busy client: the reader fills the queue meanwhile
    # The start goes alone (nothing waited behind it yet); the rest was waiting.
    assert _shape(out) == ["start", "text:abc", "tool_call_delta", "text:d", "end"]


async def test_a_delta_that_arrives_while_the_stream_is_idle_goes_at_once() -> None:
    more = asyncio.Event()

    async def paced() -> AsyncGenerator[chat_api.ChatStreamResponse, None]:
        yield _text("first")
        await more.wait()
        yield _text("second")

    stream = coalesced(paced())
    first = await asyncio.wait_for(anext(stream), 5)
    assert first.text_delta.text == "first"  # did not wait for "second"
    more.set()
    assert [e.text_delta.text async for e in stream] == ["second"]


async def test_an_error_is_raised_after_the_events_before_it() -> None:
    async def broken() -> AsyncGenerator[chat_api.ChatStreamResponse, None]:
        yield _text("partial")
        raise RuntimeError("stream broke")

    out = []
    with pytest.raises(RuntimeError, match="stream broke"):
        async for event in coalesced(broken()):
            out.append(event)
    assert _shape(out) == ["text:partial"]


@pytest.mark.parametrize("blocked_on_queue", [False, True], ids=["reading", "queue-full"])
async def test_a_consumer_that_stops_cancels_the_producer_and_its_cleanup_runs(
    blocked_on_queue: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if blocked_on_queue:
        monkeypatch.setattr("services.router.coalesce.QUEUE_EVENTS", 1)
    seen: list[str] = []
    hang = asyncio.Event()

    async def producer() -> AsyncGenerator[chat_api.ChatStreamResponse, None]:
        try:
            yield _text("one")
            for i in range(10 if blocked_on_queue else 0):
                yield _text(str(i))  # fills a one-event queue: the reader waits on it
            await hang.wait()  # else: the reader waits on the producer
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        finally:
            seen.append("cleanup")

    stream = coalesced(producer())
    assert (await anext(stream)).text_delta.text == "one"
    await asyncio.sleep(0.05)  # the reader runs ahead until it blocks
    await stream.aclose()  # the client went away
    assert seen == ["cancelled", "cleanup"]


async def test_merged_deltas_stop_at_the_size_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("services.router.coalesce.MAX_MERGED_CHARS", 4)
    events = [_start(), *[_text("ab") for _ in range(5)], _end()]
    out = []
    async for event in coalesced(_burst(events)):
        out.append(event)
        await asyncio.sleep(0.01)
    assert _shape(out) == ["start", "text:abab", "text:abab", "text:ab", "end"]
