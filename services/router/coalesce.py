"""Text deltas that wait for the client's stream go out as one message.

Every message the router writes to a chat stream costs a gRPC write (a hop
through gRPC's completion queue and back to the event loop), Envoy's relay and
the client's read. Providers often send tokens faster than that: several
chunks at once after a pause, or a burst when the router is busy. So the
answer is read from the provider by a task of its own into a short queue, and
whenever the client's stream is ready for the next message, every text delta
already waiting goes out as one. A delta that arrives while the stream is idle
goes out alone and at once: nothing waits for more, so time to first token and
the pace of a slow provider are unchanged. The text, the order of events and
what is accounted (the engine's :class:`~services.router.answering.Run` sees
every provider chunk) stay the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncGenerator

from orchestra.router.v1 import chat_service_pb2 as chat_api

MAX_MERGED_CHARS = 16_384
QUEUE_EVENTS = 256  # read ahead of a slow client at most this many events


@dataclasses.dataclass(frozen=True)
class _Raised:
    error: BaseException


_END = object()


async def coalesced(
    events: AsyncGenerator[chat_api.ChatStreamResponse, None],
) -> AsyncGenerator[chat_api.ChatStreamResponse, None]:
    """``events``, with consecutive text deltas that are already waiting merged.

    Errors of ``events`` are raised here, after the events before them. When
    the consumer stops early (the client went away), the reading task and
    with it ``events`` are cancelled, so its cleanup runs as it would without
    this wrapper.
    """
    queue: asyncio.Queue[object] = asyncio.Queue(QUEUE_EVENTS)
    reader = asyncio.create_task(_read(events, queue))
    held: object = None
    try:
        while True:
            item = held if held is not None else await queue.get()
            held = None
            if item is _END:
                return
            if isinstance(item, _Raised):
                raise item.error
            assert isinstance(item, chat_api.ChatStreamResponse)
            if item.WhichOneof("event") == "text_delta":
                pieces = [item.text_delta.text]
                size = len(pieces[0])
                while size < MAX_MERGED_CHARS and not queue.empty():
                    follower = queue.get_nowait()
                    if (
                        isinstance(follower, chat_api.ChatStreamResponse)
                        and follower.WhichOneof("event") == "text_delta"
                    ):
                        pieces.append(follower.text_delta.text)
                        size += len(pieces[-1])
                    else:
                        held = follower
                        break
                if len(pieces) > 1:
                    item = chat_api.ChatStreamResponse(
                        text_delta=chat_api.TextDelta(text="".join(pieces))
                    )
            yield item
    finally:
        if not reader.done():
            reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


async def _read(
    events: AsyncGenerator[chat_api.ChatStreamResponse, None], queue: asyncio.Queue[object]
) -> None:
    try:
        async for event in events:
            await queue.put(event)
    except asyncio.CancelledError:
        paused = getattr(events, "ag_frame", None) is not None
        if paused and not getattr(events, "ag_running", True):
            # Stopped while waiting for room in the queue, so ``events`` is
            # paused at a yield: it is cancelled there, as it would have been
            # without this wrapper, and runs its cleanup now.
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await events.athrow(asyncio.CancelledError())
        raise
    except Exception as exc:  # noqa: BLE001 - handed to the consumer, raised there
        await queue.put(_Raised(exc))
        return
    await queue.put(_END)
