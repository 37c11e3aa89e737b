"""The OpenAI chat-completions wire format, for OpenAI and every compatible server.

vLLM, LM Studio, llama.cpp's server, Groq, Together and Mistral speak the same
format, so one adapter serves them all. Requests always stream (``stream: true``
with ``stream_options.include_usage``) so tokens pass straight through; the
unary Chat RPC collects the same stream.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx
from google.protobuf import json_format

from orchestra.common.v1 import chat_pb2
from services.providers import http
from services.providers.base import (
    Event,
    FailureKind,
    Finish,
    TextDelta,
    ToolCallDelta,
    UpstreamError,
    UpstreamRequest,
    UsageReport,
)

_ROLES = {
    chat_pb2.ROLE_SYSTEM: "system",
    chat_pb2.ROLE_USER: "user",
    chat_pb2.ROLE_ASSISTANT: "assistant",
    chat_pb2.ROLE_TOOL: "tool",
}
_FINISH = {
    "stop": chat_pb2.FINISH_REASON_STOP,
    "length": chat_pb2.FINISH_REASON_LENGTH,
    "tool_calls": chat_pb2.FINISH_REASON_TOOL_CALLS,
    "function_call": chat_pb2.FINISH_REASON_TOOL_CALLS,
    "content_filter": chat_pb2.FINISH_REASON_CONTENT_FILTER,
}
_TOOL_MODES = {
    chat_pb2.TOOL_CHOICE_MODE_AUTO: "auto",
    chat_pb2.TOOL_CHOICE_MODE_NONE: "none",
    chat_pb2.TOOL_CHOICE_MODE_REQUIRED: "required",
}
_OPTIONAL_FIELDS = (
    "temperature",
    "top_p",
    "max_tokens",
    "seed",
    "presence_penalty",
    "frequency_penalty",
)
_DETAIL = {chat_pb2.IMAGE_DETAIL_LOW: "low", chat_pb2.IMAGE_DETAIL_HIGH: "high"}


def _content(message: chat_pb2.Message) -> str | list[dict[str, Any]] | None:
    parts = list(message.content)
    if not parts:
        return None
    if all(p.WhichOneof("part") == "text" for p in parts):
        return "".join(p.text for p in parts)
    out: list[dict[str, Any]] = []
    for part in parts:
        if part.WhichOneof("part") == "text":
            out.append({"type": "text", "text": part.text})
        else:
            image: dict[str, Any] = {"url": part.image_url.url}
            if part.image_url.detail in _DETAIL:
                image["detail"] = _DETAIL[part.image_url.detail]
            out.append({"type": "image_url", "image_url": image})
    return out


def _message(message: chat_pb2.Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": _ROLES[message.role], "content": _content(message)}
    if message.name:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in message.tool_calls
        ]
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    return out


def request_body(request: UpstreamRequest) -> dict[str, Any]:
    """The JSON body of a streaming chat-completions request."""
    gen = request.generation
    body: dict[str, Any] = {
        "model": request.model_id,
        "messages": [_message(m) for m in request.messages],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if request.tools:
        body["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t.function.name,
                    "description": t.function.description,
                    "parameters": json_format.MessageToDict(t.function.parameters),
                },
            }
            for t in request.tools
        ]
    choice = request.tool_choice
    if choice is not None and choice.WhichOneof("choice") == "function_name":
        body["tool_choice"] = {"type": "function", "function": {"name": choice.function_name}}
    elif choice is not None and choice.mode in _TOOL_MODES:
        body["tool_choice"] = _TOOL_MODES[choice.mode]
    optional = (
        "temperature",
        "top_p",
        "max_tokens",
        "seed",
        "presence_penalty",
        "frequency_penalty",
    )
    for field in optional:
        if gen.HasField(field):  # type: ignore[arg-type]
            body[field] = getattr(gen, field)
    if gen.stop:
        body["stop"] = list(gen.stop)
    fmt = gen.response_format
    if fmt.type == chat_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT:
        body["response_format"] = {"type": "json_object"}
    elif fmt.type == chat_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {
                "name": fmt.schema_name or "response",
                "schema": json_format.MessageToDict(fmt.json_schema),
            },
        }
    return body


def chunk_events(chunk: Mapping[str, Any]) -> list[Event]:
    """The events in one ``chat.completion.chunk``."""
    events: list[Event] = []
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        if delta.get("content"):
            events.append(TextDelta(delta["content"]))
        for call in delta.get("tool_calls") or ():
            function = call.get("function") or {}
            events.append(
                ToolCallDelta(
                    index=int(call.get("index", 0)),
                    id=call.get("id") or "",
                    name=function.get("name") or "",
                    arguments=function.get("arguments") or "",
                )
            )
        if choice.get("finish_reason"):
            reason = _FINISH.get(choice["finish_reason"], chat_pb2.FINISH_REASON_STOP)
            events.append(Finish(reason))
    usage = chunk.get("usage")
    if usage:
        details = usage.get("prompt_tokens_details") or {}
        events.append(
            UsageReport(
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0),
                cached_prompt_tokens=int(details.get("cached_tokens") or 0),
            )
        )
    return events


def _http_error(status: int, body: bytes, headers: httpx.Headers) -> UpstreamError:
    try:
        detail = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        detail = http.body_preview(body)
    return http.status_failure(status, detail, http.retry_after(headers))


class OpenAIAdapter:
    """Chat completions over HTTP(S) with server-sent events."""

    def __init__(
        self,
        provider_id: str,
        base_url: str,
        *,
        credential: str = "",
        organization: str = "",
        headers: Mapping[str, str] | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
    ) -> None:
        self.provider_id = provider_id
        sent = dict(headers or {})
        if credential:
            sent["Authorization"] = f"Bearer {credential}"
        if organization:
            sent["OpenAI-Organization"] = organization
        self._client = http.client(
            base_url, sent, connect_timeout=connect_timeout, read_timeout=read_timeout
        )

    async def stream(self, request: UpstreamRequest) -> AsyncIterator[Event]:
        """See :meth:`ProviderAdapter.stream`."""
        async for event in http.post_stream(
            self._client, "chat/completions", self._events, _http_error, json=request_body(request)
        ):
            yield event

    async def _events(self, response: httpx.Response) -> AsyncIterator[Event]:
        finished = False
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, comments (": ping") and other fields
            data = line[5:].strip()
            if data == "[DONE]":
                if not finished:
                    raise UpstreamError(FailureKind.STREAM_BROKEN, "[DONE] before a finish_reason")
                return
            try:
                chunk = json.loads(data)
            except ValueError:
                raise UpstreamError(
                    FailureKind.MALFORMED, f"chunk is not JSON: {data[:80]!r}"
                ) from None
            if "error" in chunk:
                message = (chunk["error"] or {}).get("message", "error event in stream")
                raise UpstreamError(FailureKind.SERVER_ERROR, str(message))
            for event in chunk_events(chunk):
                finished = finished or isinstance(event, Finish)
                yield event
        if not finished:
            raise UpstreamError(FailureKind.STREAM_BROKEN, "stream ended without finish_reason")

    async def aclose(self) -> None:
        """See :meth:`ProviderAdapter.aclose`."""
        await self._client.aclose()
