"""The OpenAI chat-completions wire format, for OpenAI and every compatible server.

vLLM, LM Studio, llama.cpp's server, Groq, Together and Mistral speak the same
format, so one adapter serves them all. Requests always stream (``stream: true``
with ``stream_options.include_usage``) so tokens pass straight through; the
unary Chat RPC collects the same stream. :func:`list_models` reads
``GET /models`` for discovery (see :mod:`services.providers.listing`).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import httpx
from google.protobuf import json_format

from orchestra.common.v1 import chat_pb2
from services.providers import http, listing
from services.providers.base import (
    ROLE_NAMES,
    Event,
    FailureKind,
    Finish,
    TextDelta,
    ToolCallDelta,
    UpstreamError,
    UpstreamRequest,
    UsageReport,
)
from services.providers.listing import Endpoint, ListedModel
from services.providers.types import ProviderType

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
# OpenAI's own /models lists embedding, image, audio and moderation models too;
# the gateway routes chat, so those are left out (only for the official API,
# where the ids are known; compatible servers list what they serve).
_NON_CHAT = re.compile(
    r"^(text-embedding|embedding|dall-e|gpt-image|tts-|whisper|omni-moderation|"
    r"text-moderation|davinci|babbage|sora|computer-use)"
)


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
    out: dict[str, Any] = {"role": ROLE_NAMES[message.role], "content": _content(message)}
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


def function_tools(tools: Sequence[chat_pb2.Tool]) -> list[dict[str, Any]]:
    """Tools as OpenAI's ``{"type": "function", "function": …}`` (Ollama's format too)."""
    return [
        {
            "type": "function",
            "function": {
                "name": t.function.name,
                "description": t.function.description,
                "parameters": json_format.MessageToDict(t.function.parameters),
            },
        }
        for t in tools
    ]


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
        body["tools"] = function_tools(request.tools)
    choice = request.tool_choice
    if choice is not None and choice.WhichOneof("choice") == "function_name":
        body["tool_choice"] = {"type": "function", "function": {"name": choice.function_name}}
    elif choice is not None and choice.mode in _TOOL_MODES:
        body["tool_choice"] = _TOOL_MODES[choice.mode]
    for field in _OPTIONAL_FIELDS:
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


def _error_detail(body: Any) -> str:
    return str(body["error"]["message"])


def _http_error(status: int, body: bytes, headers: http.Headers) -> UpstreamError:
    return http.json_error(status, body, headers, _error_detail)


def auth_headers(credential: str, organization: str = "") -> dict[str, str]:
    """The headers that carry the API key and the organisation (none when unset)."""
    return http.bearer(credential) | http.credential_header("OpenAI-Organization", organization)


class OpenAIAdapter(http.HttpAdapter):
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
        self._organization = organization  # read by _auth, from the base's __init__
        super().__init__(
            provider_id,
            base_url,
            credential=credential,
            headers=headers,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )

    def _auth(self, credential: str) -> dict[str, str]:
        return auth_headers(credential, self._organization)

    def _path(self, request: UpstreamRequest) -> str:
        return "chat/completions"

    def _body(self, request: UpstreamRequest) -> dict[str, Any]:
        return request_body(request)

    def _error(self, status: int, body: bytes, headers: http.Headers) -> UpstreamError:
        return _http_error(status, body, headers)

    async def _events(self, answer: http.Answer) -> AsyncIterator[Event]:
        finished = False
        async for data in http.sse_data(answer):
            if data == "[DONE]":
                if not finished:
                    raise UpstreamError(FailureKind.STREAM_BROKEN, "[DONE] before a finish_reason")
                return
            chunk = http.decode(data, "chunk")
            if "error" in chunk:
                message = (chunk["error"] or {}).get("message", "error event in stream")
                raise UpstreamError(FailureKind.SERVER_ERROR, str(message))
            for event in chunk_events(chunk):
                finished = finished or isinstance(event, Finish)
                yield event
        if not finished:
            raise UpstreamError(FailureKind.STREAM_BROKEN, "stream ended without finish_reason")


async def list_models(endpoint: Endpoint, client: httpx.AsyncClient) -> list[ListedModel]:
    """``GET {base_url}/models`` (``base_url`` ends in ``/v1``, as for the OpenAI SDK).

    The answer is ``{"object": "list", "data": [{"id": ...}]}``; vLLM adds
    ``max_model_len``.
    """
    headers = auth_headers(endpoint.credential, endpoint.organization)
    body = await listing.get_json(client, endpoint, f"{endpoint.base_url}/models", headers)
    official = endpoint.type == ProviderType.OPENAI
    # llama.cpp and vLLM serve exactly what they list: it is in memory.
    loaded = endpoint.local and endpoint.type != ProviderType.LM_STUDIO
    out = []
    for item in listing.list_of_dicts(body, "data"):
        model_id = item.get("id")
        if not isinstance(model_id, str) or (official and _NON_CHAT.match(model_id)):
            continue
        context = listing.positive_int(item.get("max_model_len"))
        out.append(ListedModel(model_id, context_window=context, loaded=loaded))
    return out
