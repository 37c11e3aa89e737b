"""The Ollama chat wire format (``POST /api/chat``, newline-delimited JSON).

Each streamed line is a JSON object with a ``message`` fragment; the last has
``done: true`` with ``done_reason`` and the token counts (``prompt_eval_count``,
``eval_count``). Sampling controls go in ``options`` (``num_predict`` is
max_tokens). Tool calls arrive whole, with arguments as an object, and Ollama says
``done_reason: "stop"`` after them, so the adapter reports TOOL_CALLS itself.
Images must be inline base64: a data: URL is sent, a remote URL cannot be.
"""

from __future__ import annotations

import json
import uuid
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
_FINISH = {"stop": chat_pb2.FINISH_REASON_STOP, "length": chat_pb2.FINISH_REASON_LENGTH}
# GenerationConfig field -> Ollama option
_OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "max_tokens": "num_predict",
    "seed": "seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}


def _arguments(text: str) -> Any:
    """A tool call's arguments as the object Ollama wants (``{}`` if not JSON)."""
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _message(message: chat_pb2.Message, tool_names: Mapping[str, str]) -> dict[str, Any]:
    parts = list(message.content)
    out: dict[str, Any] = {
        "role": _ROLES[message.role],
        "content": "".join(p.text for p in parts if p.WhichOneof("part") == "text"),
    }
    images = [
        p.image_url.url.split(";base64,", 1)[1]
        for p in parts
        if p.WhichOneof("part") == "image_url" and ";base64," in p.image_url.url
    ]
    if images:
        out["images"] = images
    if message.tool_calls:
        out["tool_calls"] = [
            {"function": {"name": c.name, "arguments": _arguments(c.arguments)}}
            for c in message.tool_calls
        ]
    if message.tool_call_id and message.tool_call_id in tool_names:
        out["tool_name"] = tool_names[message.tool_call_id]
    return out


def request_body(request: UpstreamRequest) -> dict[str, Any]:
    """The JSON body of a streaming ``/api/chat`` request."""
    gen = request.generation
    tool_names = {c.id: c.name for m in request.messages for c in m.tool_calls}
    body: dict[str, Any] = {
        "model": request.model_id,
        "messages": [_message(m, tool_names) for m in request.messages],
        "stream": True,
    }
    options: dict[str, Any] = {}
    for field, option in _OPTIONS.items():
        if gen.HasField(field):  # type: ignore[arg-type]
            options[option] = getattr(gen, field)
    if gen.stop:
        options["stop"] = list(gen.stop)
    if options:
        body["options"] = options
    # Ollama has no tool_choice: "none" is honoured by not offering the tools.
    choice = request.tool_choice
    if request.tools and not (choice is not None and choice.mode == chat_pb2.TOOL_CHOICE_MODE_NONE):
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
    fmt = gen.response_format
    if fmt.type == chat_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT:
        body["format"] = "json"
    elif fmt.type == chat_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA:
        body["format"] = json_format.MessageToDict(fmt.json_schema)
    return body


class _StreamState:
    """What the lines so far said: how many tool calls, whether it finished."""

    def __init__(self) -> None:
        self.tool_calls = 0
        self.finished = False

    def events(self, line: Mapping[str, Any]) -> list[Event]:
        """The events in one NDJSON line."""
        events: list[Event] = []
        message = line.get("message") or {}
        if message.get("content"):
            events.append(TextDelta(message["content"]))
        for call in message.get("tool_calls") or ():
            function = call.get("function") or {}
            arguments = function.get("arguments")
            events.append(
                ToolCallDelta(
                    index=self.tool_calls,
                    id=call.get("id") or f"call_{uuid.uuid4().hex[:24]}",
                    name=function.get("name") or "",
                    arguments=arguments if isinstance(arguments, str) else json.dumps(arguments),
                )
            )
            self.tool_calls += 1
        if line.get("done"):
            self.finished = True
            reason = _FINISH.get(line.get("done_reason") or "stop", chat_pb2.FINISH_REASON_STOP)
            if self.tool_calls and reason == chat_pb2.FINISH_REASON_STOP:
                reason = chat_pb2.FINISH_REASON_TOOL_CALLS
            events.append(Finish(reason))
            events.append(
                UsageReport(
                    prompt_tokens=int(line.get("prompt_eval_count") or 0),
                    completion_tokens=int(line.get("eval_count") or 0),
                )
            )
        return events


def _http_error(status: int, body: bytes, headers: httpx.Headers) -> UpstreamError:
    try:
        detail = str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        detail = http.body_preview(body)
    return http.status_failure(status, detail, http.retry_after(headers))


class OllamaAdapter:
    """Ollama's native chat API over HTTP with NDJSON streaming."""

    def __init__(
        self,
        provider_id: str,
        base_url: str,
        *,
        credential: str = "",
        headers: Mapping[str, str] | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
    ) -> None:
        self.provider_id = provider_id
        sent = dict(headers or {})
        if credential:  # Ollama itself has no auth; a proxy in front of it may
            sent["Authorization"] = f"Bearer {credential}"
        self._client = http.client(
            base_url, sent, connect_timeout=connect_timeout, read_timeout=read_timeout
        )

    async def stream(self, request: UpstreamRequest) -> AsyncIterator[Event]:
        """See :meth:`ProviderAdapter.stream`."""
        async for event in http.post_stream(
            self._client, "api/chat", self._events, _http_error, json=request_body(request)
        ):
            yield event

    async def _events(self, response: httpx.Response) -> AsyncIterator[Event]:
        state = _StreamState()
        async for text in response.aiter_lines():
            if not text.strip():
                continue
            try:
                line = json.loads(text)
            except ValueError:
                raise UpstreamError(
                    FailureKind.MALFORMED, f"line is not JSON: {text[:80]!r}"
                ) from None
            if not isinstance(line, dict):
                raise UpstreamError(FailureKind.MALFORMED, f"line is not an object: {text[:80]!r}")
            if "error" in line:
                raise UpstreamError(FailureKind.SERVER_ERROR, str(line["error"]))
            for event in state.events(line):
                yield event
            if state.finished:
                return
        raise UpstreamError(FailureKind.STREAM_BROKEN, "stream ended without done: true")

    async def aclose(self) -> None:
        """See :meth:`ProviderAdapter.aclose`."""
        await self._client.aclose()
