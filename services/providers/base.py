"""What every provider adapter speaks: a request in, a stream of events out.

Adapters translate between the gateway's chat model (the protobuf types of
``orchestra.common.v1``) and one provider's wire format. They never buffer: each
upstream chunk becomes events as soon as it is parsed. Failures are raised as
:class:`UpstreamError`, which says whether anything was streamed before it (the
router may fall back only if nothing was) and whether a retry may help.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import AsyncIterator
from typing import Any, Protocol

from orchestra.common.v1 import chat_pb2

# The role names of the OpenAI chat format, which Ollama and custom providers share.
ROLE_NAMES = {
    chat_pb2.ROLE_SYSTEM: "system",
    chat_pb2.ROLE_USER: "user",
    chat_pb2.ROLE_ASSISTANT: "assistant",
    chat_pb2.ROLE_TOOL: "tool",
}


def tool_arguments(text: str) -> dict[str, Any]:
    """A tool call's arguments as the JSON object native formats want (``{}`` if not one)."""
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


@dataclasses.dataclass(frozen=True)
class UpstreamRequest:
    """One call to one provider model.

    Attributes:
        model_id: The provider's own model id.
        messages: The conversation.
        tools: Tools offered.
        tool_choice: How tools may be used (None: provider default).
        generation: Sampling and output controls (max_tokens already resolved).
        timeout: Seconds the whole call may take (from the client's deadline).
    """

    model_id: str
    messages: list[chat_pb2.Message]
    tools: list[chat_pb2.Tool]
    tool_choice: chat_pb2.ToolChoice | None
    generation: chat_pb2.GenerationConfig
    timeout: float | None = None


@dataclasses.dataclass(frozen=True)
class TextDelta:
    """A piece of answer text."""

    text: str


@dataclasses.dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a tool call (pieces with one index form one call)."""

    index: int
    id: str
    name: str
    arguments: str


@dataclasses.dataclass(frozen=True)
class UsageReport:
    """Token counts as the provider reported them."""

    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0


@dataclasses.dataclass(frozen=True)
class Finish:
    """The provider said why generation stopped."""

    reason: chat_pb2.FinishReason.ValueType


Event = TextDelta | ToolCallDelta | UsageReport | Finish


class FailureKind(enum.Enum):
    """Why an upstream call failed, in the terms the router acts on."""

    RATE_LIMITED = "rate_limited"  # 429: retry after a delay, or fall back
    SERVER_ERROR = "server_error"  # 5xx: retry, then fall back
    CONNECT = "connect"  # could not reach it: fall back
    TIMEOUT = "timeout"  # no answer in time: fall back
    MALFORMED = "malformed"  # not the documented format
    CLIENT_ERROR = "client_error"  # 4xx other than 429: our request is wrong
    STREAM_BROKEN = "stream_broken"  # the stream ended early


class UpstreamError(Exception):
    """An upstream call failed.

    Attributes:
        kind: What failed.
        status: The HTTP status, if there was one.
        retry_after: Seconds the provider asked us to wait (Retry-After).
    """

    def __init__(
        self,
        kind: FailureKind,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        """Whether the same call may succeed if repeated."""
        return self.kind in (FailureKind.RATE_LIMITED, FailureKind.SERVER_ERROR)


class ProviderAdapter(Protocol):
    """A provider's wire format."""

    provider_id: str

    def stream(self, request: UpstreamRequest) -> AsyncIterator[Event]:
        """Streams the answer to ``request`` as events.

        Raises:
            UpstreamError: The call failed (before or during the stream).
        """
        ...

    async def aclose(self) -> None:
        """Closes its connections."""
        ...
