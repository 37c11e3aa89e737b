"""What the adapter tests share: requests, event collection and the fault table."""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf import struct_pb2

from orchestra.common.v1 import chat_pb2
from services.providers.base import (
    Event,
    FailureKind,
    ProviderAdapter,
    TextDelta,
    ToolCallDelta,
    UpstreamError,
    UpstreamRequest,
)
from tests.fakes.faults import Fault, FaultKind

TEXT = "Hello from the fake upstream."


def message(role: chat_pb2.Role.ValueType, text: str = "", **fields: object) -> chat_pb2.Message:
    """A message with one text part (none when ``text`` is empty)."""
    content = [chat_pb2.ContentPart(text=text)] if text else []
    return chat_pb2.Message(role=role, content=content, **fields)  # type: ignore[arg-type]


def weather_tool() -> chat_pb2.Tool:
    schema = struct_pb2.Struct()
    schema.update({"type": "object", "properties": {"city": {"type": "string"}}})
    return chat_pb2.Tool(
        function=chat_pb2.FunctionDefinition(
            name="get_weather", description="Weather for a city", parameters=schema
        )
    )


def request(
    model: str,
    *,
    messages: list[chat_pb2.Message] | None = None,
    tools: list[chat_pb2.Tool] | None = None,
    **generation: object,
) -> UpstreamRequest:
    """An upstream request; ``generation`` fields default to ``max_tokens=64``."""
    gen = chat_pb2.GenerationConfig(**{"max_tokens": 64, **generation})  # type: ignore[arg-type]
    return UpstreamRequest(
        model_id=model,
        messages=messages
        or [message(chat_pb2.ROLE_SYSTEM, "Be brief."), message(chat_pb2.ROLE_USER, "Hi there.")],
        tools=tools or [],
        tool_choice=None,
        generation=gen,
    )


async def collect(
    adapter: ProviderAdapter, upstream: UpstreamRequest
) -> tuple[list[Event], UpstreamError | None]:
    """Every event the adapter yields, and the error that ended the stream, if any."""
    events: list[Event] = []
    try:
        async for event in adapter.stream(upstream):
            events.append(event)
    except UpstreamError as error:
        return events, error
    return events, None


def text_of(events: list[Event]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def arguments_of(events: list[Event], index: int = 0) -> str:
    return "".join(e.arguments for e in events if isinstance(e, ToolCallDelta) and e.index == index)


@dataclass(frozen=True)
class FaultCase:
    """A fault, the failure the adapter must raise, and whether text came first."""

    fault: Fault
    kind: FailureKind
    status: int | None = None
    streamed_first: bool = False


FAULT_CASES = [
    FaultCase(Fault.rate_limit(retry_after=3), FailureKind.RATE_LIMITED, 429),
    FaultCase(Fault.of(FaultKind.SERVER_ERROR), FailureKind.SERVER_ERROR, 500),
    FaultCase(Fault.of(FaultKind.UNAVAILABLE), FailureKind.SERVER_ERROR, 503),
    FaultCase(Fault.http_error(400), FailureKind.CLIENT_ERROR, 400),
    FaultCase(Fault.disconnect(), FailureKind.STREAM_BROKEN),
    FaultCase(Fault.timeout(delay=30), FailureKind.TIMEOUT),
    FaultCase(Fault.timeout(delay=30, after_chunks=4), FailureKind.TIMEOUT, streamed_first=True),
    FaultCase(Fault.stream_cut(after_chunks=4), FailureKind.STREAM_BROKEN, streamed_first=True),
    FaultCase(Fault.malformed_chunk(after_chunks=4), FailureKind.MALFORMED, streamed_first=True),
    FaultCase(Fault.stream_error(after_chunks=4), FailureKind.SERVER_ERROR, streamed_first=True),
]
FAULT_IDS = [f"{c.fault.kind.value}-{c.fault.status or c.fault.after_chunks}" for c in FAULT_CASES]
READ_TIMEOUT = 0.5  # the adapters' read timeout in the tests: TIMEOUT faults hang past it
