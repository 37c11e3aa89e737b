"""The router reserves and looks up over long-lived streams, and rides over their loss."""

from __future__ import annotations

import asyncio

from orchestra.common.v1 import chat_pb2
from orchestra.router.v1 import chat_service_pb2 as chat_api
from services.router.peers import Peers
from tests.router.conftest import Suite


def _request(text: str) -> chat_api.ChatRequest:
    return chat_api.ChatRequest(
        messages=[
            chat_pb2.Message(role=chat_pb2.ROLE_USER, content=[chat_pb2.ContentPart(text=text)])
        ],
        generation=chat_pb2.GenerationConfig(temperature=0.0, max_tokens=16),
    )


async def _chat(suite: Suite, text: str) -> chat_api.ChatStreamResponse:
    events = [e async for e in suite.chat.ChatStream(_request(text), metadata=suite.metadata)]
    return events[-1]


def _peers(suite: Suite) -> Peers:
    peers: Peers = suite.running["router"].service.peers  # type: ignore[attr-defined]
    return peers


async def test_chats_reserve_and_look_up_over_one_stream_each(suite: Suite) -> None:
    peers = _peers(suite)
    await _chat(suite, "first question")
    reserves, lookups = peers._reserves._stream, peers._lookups._stream
    assert reserves is not None and lookups is not None
    ends = await asyncio.gather(*(_chat(suite, f"question {i}") for i in range(6)))
    assert all(e.end.cost_micro_usd > 0 for e in ends)
    # The same streams carried them all, and are still open.
    assert (peers._reserves._stream, peers._lookups._stream) == (reserves, lookups)
    assert not reserves.call.done() and not lookups.call.done()


async def test_a_chat_rides_over_a_lost_stream(suite: Suite) -> None:
    peers = _peers(suite)
    await _chat(suite, "before")
    for mux in (peers._reserves, peers._lookups):
        assert mux._stream is not None
        mux._stream.call.cancel()
    end = await _chat(suite, "after")
    assert end.end.cost_micro_usd > 0
    await suite.drain()
    assert await suite.spent_micro_usd() > 0
