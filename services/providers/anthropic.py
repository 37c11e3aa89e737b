"""The Anthropic Messages wire format (``POST /v1/messages`` with server-sent events).

Anthropic differs from the OpenAI shape in ways the adapter hides: the system
prompt is a top-level ``system`` field, ``max_tokens`` is required, tool calls are
``tool_use`` content blocks whose arguments stream as ``input_json_delta`` pieces,
and tool results go back as ``tool_result`` blocks in a user message. Requests
always stream; the unary Chat RPC collects the same stream. :func:`list_models`
reads ``GET /v1/models`` for discovery (see :mod:`services.providers.listing`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, ClassVar

import httpx
from google.protobuf import json_format

from orchestra.common.v1 import chat_pb2
from services.providers import http, listing
from services.providers.base import (
    Event,
    FailureKind,
    Finish,
    TextDelta,
    ToolCallDelta,
    UpstreamError,
    UpstreamRequest,
    UsageReport,
    tool_arguments,
)
from services.providers.listing import Endpoint, ListedModel, ListingError

API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096  # only when the router did not resolve one (it always should)
_FINISH = {
    "end_turn": chat_pb2.FINISH_REASON_STOP,
    "stop_sequence": chat_pb2.FINISH_REASON_STOP,
    "pause_turn": chat_pb2.FINISH_REASON_STOP,
    "max_tokens": chat_pb2.FINISH_REASON_LENGTH,
    "model_context_window_exceeded": chat_pb2.FINISH_REASON_LENGTH,
    "tool_use": chat_pb2.FINISH_REASON_TOOL_CALLS,
    "refusal": chat_pb2.FINISH_REASON_CONTENT_FILTER,
}
_TOOL_MODES = {
    chat_pb2.TOOL_CHOICE_MODE_AUTO: "auto",
    chat_pb2.TOOL_CHOICE_MODE_NONE: "none",
    chat_pb2.TOOL_CHOICE_MODE_REQUIRED: "any",
}
# Error types Anthropic sends in an ``error`` event, in the router's terms.
_STREAM_ERRORS = {
    "rate_limit_error": FailureKind.RATE_LIMITED,
    "invalid_request_error": FailureKind.CLIENT_ERROR,
}


def _text(message: chat_pb2.Message) -> str:
    return "".join(p.text for p in message.content if p.WhichOneof("part") == "text")


def _image(url: str) -> dict[str, Any]:
    if url.startswith("data:") and ";base64," in url:
        media_type, data = url[5:].split(";base64,", 1)
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": media_type, "data": data},
        }
    return {"type": "image", "source": {"type": "url", "url": url}}


def _blocks(message: chat_pb2.Message) -> list[dict[str, Any]]:
    """A message's content blocks."""
    if message.role == chat_pb2.ROLE_TOOL:
        return [
            {"type": "tool_result", "tool_use_id": message.tool_call_id, "content": _text(message)}
        ]
    blocks: list[dict[str, Any]] = []
    for part in message.content:
        if part.WhichOneof("part") == "text":
            if part.text:
                blocks.append({"type": "text", "text": part.text})
        else:
            blocks.append(_image(part.image_url.url))
    for call in message.tool_calls:
        blocks.append(
            {
                "type": "tool_use",
                "id": call.id,
                "name": call.name,
                "input": tool_arguments(call.arguments),
            }
        )
    return blocks


def _messages(messages: list[chat_pb2.Message]) -> tuple[str, list[dict[str, Any]]]:
    """The system prompt, and the turns with consecutive same-role turns merged.

    Anthropic wants user and assistant turns to alternate, and every tool result of
    one assistant turn in the single user turn that follows it.
    """
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for message in messages:
        if message.role == chat_pb2.ROLE_SYSTEM:
            system.append(_text(message))
            continue
        role = "assistant" if message.role == chat_pb2.ROLE_ASSISTANT else "user"
        blocks = _blocks(message)
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    return "\n\n".join(s for s in system if s), turns


def request_body(request: UpstreamRequest) -> dict[str, Any]:
    """The JSON body of a streaming Messages request."""
    gen = request.generation
    system, messages = _messages(request.messages)
    body: dict[str, Any] = {
        "model": request.model_id,
        "max_tokens": gen.max_tokens if gen.HasField("max_tokens") else DEFAULT_MAX_TOKENS,
        "messages": messages,
        "stream": True,
    }
    if system:
        body["system"] = system
    if gen.HasField("temperature"):
        body["temperature"] = gen.temperature
    if gen.HasField("top_p"):
        body["top_p"] = gen.top_p
    if gen.stop:
        body["stop_sequences"] = list(gen.stop)
    if request.tools:
        body["tools"] = [
            {
                "name": t.function.name,
                "description": t.function.description,
                "input_schema": json_format.MessageToDict(t.function.parameters)
                or {"type": "object"},
            }
            for t in request.tools
        ]
    choice = request.tool_choice
    if choice is not None and choice.WhichOneof("choice") == "function_name":
        body["tool_choice"] = {"type": "tool", "name": choice.function_name}
    elif choice is not None and choice.mode in _TOOL_MODES:
        body["tool_choice"] = {"type": _TOOL_MODES[choice.mode]}
    return body


class _StreamState:
    """What the events so far said: usage, which blocks are tool calls, the finish."""

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.tool_index: dict[int, int] = {}  # content block index -> tool call index
        self.finished = False

    def events(self, data: Mapping[str, Any]) -> list[Event]:
        """The events in one SSE ``data`` object."""
        kind = data.get("type")
        if kind == "message_start":
            usage = (data.get("message") or {}).get("usage") or {}
            cached = int(usage.get("cache_read_input_tokens") or 0)
            created = int(usage.get("cache_creation_input_tokens") or 0)
            self.prompt_tokens = int(usage.get("input_tokens") or 0) + cached + created
            self.cached_tokens = cached
        elif kind == "content_block_start":
            block = data.get("content_block") or {}
            if block.get("type") == "tool_use":
                index = self.tool_index.setdefault(int(data.get("index", 0)), len(self.tool_index))
                return [ToolCallDelta(index, block.get("id") or "", block.get("name") or "", "")]
            if block.get("type") == "text" and block.get("text"):
                return [TextDelta(block["text"])]
        elif kind == "content_block_delta":
            delta = data.get("delta") or {}
            if delta.get("type") == "text_delta" and delta.get("text"):
                return [TextDelta(delta["text"])]
            if delta.get("type") == "input_json_delta" and delta.get("partial_json"):
                index = self.tool_index.get(int(data.get("index", 0)), 0)
                return [ToolCallDelta(index, "", "", delta["partial_json"])]
        elif kind == "message_delta":
            return self._message_delta(data)
        elif kind == "error":
            error = data.get("error") or {}
            kind_ = _STREAM_ERRORS.get(str(error.get("type")), FailureKind.SERVER_ERROR)
            raise UpstreamError(kind_, f"{error.get('type')}: {error.get('message', '')}")
        return []  # ping, content_block_stop, message_stop and unknown new event types

    def _message_delta(self, data: Mapping[str, Any]) -> list[Event]:
        events: list[Event] = []
        reason = (data.get("delta") or {}).get("stop_reason")
        if reason:
            self.finished = True
            events.append(Finish(_FINISH.get(reason, chat_pb2.FINISH_REASON_STOP)))
        usage = data.get("usage") or {}
        if "output_tokens" in usage:  # cumulative, so the last one is the total
            events.append(
                UsageReport(
                    prompt_tokens=self.prompt_tokens,
                    completion_tokens=int(usage.get("output_tokens") or 0),
                    cached_prompt_tokens=self.cached_tokens,
                )
            )
        return events


def _error_detail(body: Any) -> str:
    error = body["error"]
    return f"{error['type']}: {error['message']}"


def _http_error(status: int, body: bytes, headers: http.Headers) -> UpstreamError:
    return http.json_error(status, body, headers, _error_detail)


def auth_headers(credential: str) -> dict[str, str]:
    """The header that carries the API key (none without one)."""
    return http.credential_header("x-api-key", credential)


class AnthropicAdapter(http.HttpAdapter):
    """Anthropic Messages over HTTP(S) with server-sent events."""

    defaults: ClassVar[Mapping[str, str]] = {"anthropic-version": API_VERSION}

    def _auth(self, credential: str) -> dict[str, str]:
        return auth_headers(credential)

    def _path(self, request: UpstreamRequest) -> str:
        return "v1/messages"

    def _body(self, request: UpstreamRequest) -> dict[str, Any]:
        return request_body(request)

    def _error(self, status: int, body: bytes, headers: http.Headers) -> UpstreamError:
        return _http_error(status, body, headers)

    async def _events(self, answer: http.Answer) -> AsyncIterator[Event]:
        state = _StreamState()
        # "event:" names are skipped: the data's "type" repeats them.
        async for data in http.sse_data(answer):
            parsed = http.decode_object(data, "event data")
            if parsed.get("type") == "message_stop":
                if not state.finished:
                    raise UpstreamError(
                        FailureKind.STREAM_BROKEN, "message_stop before a stop_reason"
                    )
                return
            for event in state.events(parsed):
                yield event
        if not state.finished:
            raise UpstreamError(FailureKind.STREAM_BROKEN, "stream ended without a stop_reason")


def api_root(base_url: str) -> str:
    """The API's root: operators may paste the URL with its ``/v1``; the paths add it."""
    return base_url.removesuffix("/v1")


async def list_models(endpoint: Endpoint, client: httpx.AsyncClient) -> list[ListedModel]:
    """``GET {base}/v1/models`` with the API key and version, paginated by ``after_id``."""
    url = f"{api_root(endpoint.base_url)}/v1/models"
    headers = {"anthropic-version": API_VERSION, **auth_headers(endpoint.credential)}
    out: list[ListedModel] = []
    params: dict[str, str | int] = {"limit": 1000}
    for _ in range(listing.MAX_PAGES):
        body = await listing.get_json(client, endpoint, url, headers, params)
        items = listing.list_of_dicts(body, "data")
        out.extend(ListedModel(i["id"]) for i in items if isinstance(i.get("id"), str))
        last_id = body.get("last_id")
        if body.get("has_more") is not True or not isinstance(last_id, str):
            return out
        params = {"limit": 1000, "after_id": last_id}
    raise ListingError(f"more than {listing.MAX_PAGES} pages of models")
