"""The Ollama chat wire format (``POST /api/chat``, newline-delimited JSON).

Each streamed line is a JSON object with a ``message`` fragment; the last has
``done: true`` with ``done_reason`` and the token counts (``prompt_eval_count``,
``eval_count``). Sampling controls go in ``options`` (``num_predict`` is
max_tokens). Tool calls arrive whole, with arguments as an object, and Ollama says
``done_reason: "stop"`` after them, so the adapter reports TOOL_CALLS itself.
Images must be inline base64: a data: URL is sent, a remote URL cannot be.
:func:`list_models` reads ``/api/tags``, ``/api/ps`` and ``/api/show`` for
discovery (see :mod:`services.providers.listing`).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Mapping
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
    tool_arguments,
)
from services.providers.listing import DetailCache, Endpoint, ListedModel, ListingError
from services.providers.openai import function_tools

_SHOW_CONCURRENCY = 4  # one local server: a few /api/show at a time
_MAX_DETAILS = 100_000
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


def _message(message: chat_pb2.Message, tool_names: Mapping[str, str]) -> dict[str, Any]:
    parts = list(message.content)
    out: dict[str, Any] = {
        "role": ROLE_NAMES[message.role],
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
            {"function": {"name": c.name, "arguments": tool_arguments(c.arguments)}}
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
        body["tools"] = function_tools(request.tools)
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


def _error_detail(body: Any) -> str:
    return str(body["error"])


def _http_error(status: int, body: bytes, headers: http.Headers) -> UpstreamError:
    return http.json_error(status, body, headers, _error_detail)


def auth_headers(credential: str) -> dict[str, str]:
    """Ollama itself has no auth; a proxy in front of it may want a bearer token."""
    return http.bearer(credential)


def api_root(base_url: str) -> str:
    """Ollama's root URL: operators often paste its OpenAI-compatible ``/v1``
    (or ``/api``) URL, but the native API hangs off the root."""
    return base_url.removesuffix("/v1").removesuffix("/api")


class OllamaAdapter(http.HttpAdapter):
    """Ollama's native chat API over HTTP with NDJSON streaming."""

    def _auth(self, credential: str) -> dict[str, str]:
        return auth_headers(credential)

    def _path(self, request: UpstreamRequest) -> str:
        return "api/chat"

    def _body(self, request: UpstreamRequest) -> dict[str, Any]:
        return request_body(request)

    def _error(self, status: int, body: bytes, headers: http.Headers) -> UpstreamError:
        return _http_error(status, body, headers)

    async def _events(self, answer: http.Answer) -> AsyncIterator[Event]:
        state = _StreamState()
        async for text in http.ndjson_lines(answer):
            line = http.decode_object(text, "line")
            if "error" in line:
                raise UpstreamError(FailureKind.SERVER_ERROR, str(line["error"]))
            for event in state.events(line):
                yield event
            if state.finished:
                return
        raise UpstreamError(FailureKind.STREAM_BROKEN, "stream ended without done: true")


async def list_models(
    endpoint: Endpoint, client: httpx.AsyncClient, details: DetailCache
) -> list[ListedModel]:
    """``GET {root}/api/tags`` answers ``{"models": [{"name", "model", "details"}]}``.

    ``GET {root}/api/ps`` names the models loaded in memory now with their
    ``size`` and ``size_vram``, and ``POST {root}/api/show`` gives each
    model's context length (``model_info["<arch>.context_length"]``). Both
    are best effort: an old server without them is not a failure.

    Args:
        endpoint: The provider.
        client: The shared client.
        details: Context lengths already fetched, kept between listings; a
            model's is fetched again only when its digest changes.
    """
    root = api_root(endpoint.base_url)
    headers = auth_headers(endpoint.credential)
    body = await listing.get_json(client, endpoint, f"{root}/api/tags", headers)
    names, digests = [], []
    for item in listing.list_of_dicts(body, "models"):
        name = item.get("name") or item.get("model")
        if isinstance(name, str):
            names.append(name)
            digests.append(str(item.get("digest") or ""))
    loaded = await _loaded(endpoint, client, root, headers)
    gate = asyncio.Semaphore(_SHOW_CONCURRENCY)

    async def context_of(name: str, digest: str) -> int:
        key = (root, name, digest)
        if digest and key in details:
            return details[key]
        found = await _context(endpoint, client, root, headers, name, gate)
        if digest and found:
            if len(details) >= _MAX_DETAILS:
                details.clear()  # bounded; refills as providers are listed
            details[key] = found
        return found

    contexts = await asyncio.gather(
        *(context_of(n, d) for n, d in zip(names, digests, strict=True))
    )
    out = []
    for name, context in zip(names, contexts, strict=True):
        size, vram = loaded.get(name, (0, 0))
        out.append(
            ListedModel(
                name,
                context_window=context,
                loaded=name in loaded,
                vram_bytes=vram,
                memory_bytes=size,
            )
        )
    return out


async def _loaded(
    endpoint: Endpoint, client: httpx.AsyncClient, root: str, headers: Mapping[str, str]
) -> dict[str, tuple[int, int]]:
    """Loaded models: name -> (size, size_vram) in bytes."""
    try:
        body = await listing.get_json(client, endpoint, f"{root}/api/ps", headers)
        return {
            str(item.get("name") or item.get("model")): (
                listing.positive_int(item.get("size")),
                listing.positive_int(item.get("size_vram")),
            )
            for item in listing.list_of_dicts(body, "models")
        }
    except (ListingError, httpx.HTTPError):
        return {}  # the listing itself worked; "loaded" is a hint


async def _context(
    endpoint: Endpoint,
    client: httpx.AsyncClient,
    root: str,
    headers: Mapping[str, str],
    name: str,
    gate: asyncio.Semaphore,
) -> int:
    """The model's trained context length from ``/api/show`` (0 when unknown)."""
    try:
        async with gate:
            response = await client.post(
                f"{root}/api/show",
                json={"model": name},
                headers=listing.request_headers(endpoint, headers),
                timeout=listing.timeout(endpoint),
            )
        info = response.json().get("model_info") if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError):
        return 0  # a hint, like /api/ps
    if not isinstance(info, dict):
        return 0
    return max(
        (
            listing.positive_int(v)
            for k, v in info.items()
            if isinstance(k, str) and k.endswith(".context_length")
        ),
        default=0,
    )
