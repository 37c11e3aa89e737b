"""Checks a ChatRequest before anything is spent on it.

Each failure is an INVALID_ARGUMENT naming the field, so a client (or a person
with grpcurl) sees exactly what to fix.
"""

from __future__ import annotations

import re
import uuid

from orchestra.common.v1 import chat_pb2, errors_pb2
from orchestra.router.v1 import chat_service_pb2
from services.common.errors import InvalidArgument

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
MAX_STOP_SEQUENCES = 4


def _bad(field: str, message: str) -> InvalidArgument:
    return InvalidArgument(errors_pb2.ERROR_REASON_INVALID_FIELD, message, field=field)


def _has_content(message: chat_pb2.Message) -> bool:
    return bool(message.tool_calls) or any(
        (part.WhichOneof("part") == "text" and part.text.strip())
        or part.WhichOneof("part") == "image_url"
        for part in message.content
    )


def validate(request: chat_service_pb2.ChatRequest, max_request_bytes: int) -> None:
    """Raises InvalidArgument if ``request`` cannot be served as it is."""
    size = request.ByteSize()
    if size > max_request_bytes:
        raise InvalidArgument(
            errors_pb2.ERROR_REASON_REQUEST_TOO_LARGE,
            f"request is {size} bytes; the limit is {max_request_bytes}",
            metadata={"limit_bytes": str(max_request_bytes), "size_bytes": str(size)},
        )
    if request.request_id and not _REQUEST_ID.fullmatch(request.request_id):
        raise _bad("request_id", "request_id must be 1-128 characters of [A-Za-z0-9._:-]")
    if not request.messages or not any(_has_content(m) for m in request.messages):
        raise InvalidArgument(
            errors_pb2.ERROR_REASON_EMPTY_MESSAGES,
            "messages must contain at least one message with content",
            field="messages",
        )
    for i, message in enumerate(request.messages):
        if message.role == chat_pb2.ROLE_UNSPECIFIED:
            raise _bad(f"messages[{i}].role", "every message needs a role")
        if message.role == chat_pb2.ROLE_TOOL and not message.tool_call_id:
            raise _bad(f"messages[{i}].tool_call_id", "a tool message must name its tool_call_id")
        for j, part in enumerate(message.content):
            if part.WhichOneof("part") is None:
                raise _bad(f"messages[{i}].content[{j}]", "a content part needs text or image_url")
    gen = request.generation
    if gen.HasField("temperature") and not 0 <= gen.temperature <= 2:
        raise _bad("generation.temperature", "temperature must be between 0 and 2")
    if gen.HasField("top_p") and not 0 <= gen.top_p <= 1:
        raise _bad("generation.top_p", "top_p must be between 0 and 1")
    if gen.HasField("max_tokens") and gen.max_tokens <= 0:
        raise _bad("generation.max_tokens", "max_tokens must be positive")
    if len(gen.stop) > MAX_STOP_SEQUENCES:
        raise _bad("generation.stop", f"at most {MAX_STOP_SEQUENCES} stop sequences")
    for i, tool in enumerate(request.tools):
        if not re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", tool.function.name):
            raise _bad(f"tools[{i}].function.name", "tool names are 1-64 of [a-zA-Z0-9_-]")
    if request.routing.max_cost_micro_usd < 0:
        raise _bad("routing.max_cost_micro_usd", "max_cost_micro_usd must not be negative")


def is_request_id(value: str) -> bool:
    """Whether ``value`` is a well-formed request id (1-128 of [A-Za-z0-9._:-])."""
    return bool(_REQUEST_ID.fullmatch(value))


def request_id(request: chat_service_pb2.ChatRequest) -> str:
    """The client's request id, or a new one."""
    return request.request_id or f"req_{uuid.uuid4().hex}"
