"""The Google Gemini API wire format (``streamGenerateContent?alt=sse``).

Gemini calls the assistant ``model``, takes the system prompt as
``systemInstruction``, sampling controls in ``generationConfig`` (camelCase), tools
as ``functionDeclarations`` and tool results as ``functionResponse`` parts. Each
streamed chunk is a whole ``GenerateContentResponse``: text or ``functionCall``
parts of ``candidates[0]``, the running ``usageMetadata``, and on the last one a
``finishReason``. Requests always stream; the unary Chat RPC collects the stream.
:func:`list_models` reads ``GET /v1beta/models`` for discovery (see
:mod:`services.providers.listing`).
"""

from __future__ import annotations

import json
import mimetypes
import re
import uuid
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

API_VERSION = "v1beta"
_FILTERED = {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"}
_TOOL_MODES = {
    chat_pb2.TOOL_CHOICE_MODE_AUTO: "AUTO",
    chat_pb2.TOOL_CHOICE_MODE_NONE: "NONE",
    chat_pb2.TOOL_CHOICE_MODE_REQUIRED: "ANY",
}


def _image(url: str) -> dict[str, Any]:
    if url.startswith("data:") and ";base64," in url:
        mime_type, data = url[5:].split(";base64,", 1)
        return {"inlineData": {"mimeType": mime_type, "data": data}}
    mime_type = mimetypes.guess_type(url)[0] or "image/jpeg"
    return {"fileData": {"mimeType": mime_type, "fileUri": url}}


def _parts(message: chat_pb2.Message, tool_names: Mapping[str, str]) -> list[dict[str, Any]]:
    text = "".join(p.text for p in message.content if p.WhichOneof("part") == "text")
    if message.role == chat_pb2.ROLE_TOOL:
        result = tool_arguments(text) or {"result": text}  # the response must be an object
        name = tool_names.get(message.tool_call_id, "")
        return [{"functionResponse": {"name": name, "response": result}}]
    parts: list[dict[str, Any]] = []
    for part in message.content:
        if part.WhichOneof("part") == "text":
            if part.text:
                parts.append({"text": part.text})
        else:
            parts.append(_image(part.image_url.url))
    for call in message.tool_calls:
        parts.append({"functionCall": {"name": call.name, "args": tool_arguments(call.arguments)}})
    return parts


def _contents(messages: list[chat_pb2.Message]) -> tuple[str, list[dict[str, Any]]]:
    """The system instruction, and the turns with consecutive same-role turns merged."""
    tool_names = {c.id: c.name for m in messages for c in m.tool_calls}
    system: list[str] = []
    contents: list[dict[str, Any]] = []
    for message in messages:
        if message.role == chat_pb2.ROLE_SYSTEM:
            system.append("".join(p.text for p in message.content))
            continue
        role = "model" if message.role == chat_pb2.ROLE_ASSISTANT else "user"
        parts = _parts(message, tool_names)
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts})
    return "\n\n".join(s for s in system if s), contents


def _generation_config(gen: chat_pb2.GenerationConfig) -> dict[str, Any]:
    config: dict[str, Any] = {}
    fields = {"temperature": "temperature", "top_p": "topP", "max_tokens": "maxOutputTokens"}
    fields |= {"seed": "seed", "presence_penalty": "presencePenalty"}
    fields["frequency_penalty"] = "frequencyPenalty"
    for field, name in fields.items():
        if gen.HasField(field):  # type: ignore[arg-type]
            config[name] = getattr(gen, field)
    if gen.stop:
        config["stopSequences"] = list(gen.stop)
    fmt = gen.response_format
    if fmt.type in (
        chat_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT,
        chat_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
    ):
        config["responseMimeType"] = "application/json"
    if fmt.type == chat_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA:
        config["responseJsonSchema"] = json_format.MessageToDict(fmt.json_schema)
    return config


def request_body(request: UpstreamRequest) -> dict[str, Any]:
    """The JSON body of a ``streamGenerateContent`` request."""
    system, contents = _contents(request.messages)
    body: dict[str, Any] = {"contents": contents}
    if system:
        body["systemInstruction"] = {"parts": [{"text": system}]}
    config = _generation_config(request.generation)
    if config:
        body["generationConfig"] = config
    if request.tools:
        declarations = []
        for tool in request.tools:
            declaration: dict[str, Any] = {
                "name": tool.function.name,
                "description": tool.function.description,
            }
            if tool.function.parameters.fields:
                declaration["parameters"] = json_format.MessageToDict(tool.function.parameters)
            declarations.append(declaration)
        body["tools"] = [{"functionDeclarations": declarations}]
    choice = request.tool_choice
    if choice is not None and choice.WhichOneof("choice") == "function_name":
        calling = {"mode": "ANY", "allowedFunctionNames": [choice.function_name]}
        body["toolConfig"] = {"functionCallingConfig": calling}
    elif choice is not None and choice.mode in _TOOL_MODES:
        body["toolConfig"] = {"functionCallingConfig": {"mode": _TOOL_MODES[choice.mode]}}
    return body


class _StreamState:
    """What the chunks so far said: how many tool calls, whether it finished."""

    def __init__(self) -> None:
        self.tool_calls = 0
        self.finished = False

    def events(self, chunk: Mapping[str, Any]) -> list[Event]:
        """The events in one streamed ``GenerateContentResponse``."""
        events: list[Event] = []
        candidates = chunk.get("candidates") or [{}]
        candidate = candidates[0]
        for part in (candidate.get("content") or {}).get("parts") or ():
            if part.get("text") and not part.get("thought"):
                events.append(TextDelta(part["text"]))
            elif "functionCall" in part:
                call = part["functionCall"] or {}
                events.append(
                    ToolCallDelta(
                        index=self.tool_calls,
                        id=call.get("id") or f"call_{uuid.uuid4().hex[:24]}",
                        name=call.get("name") or "",
                        arguments=json.dumps(call.get("args") or {}),
                    )
                )
                self.tool_calls += 1
        reason = candidate.get("finishReason")
        blocked = (chunk.get("promptFeedback") or {}).get("blockReason")
        if reason or blocked:
            self.finished = True
            events.append(Finish(self._finish(reason, blocked)))
        usage = chunk.get("usageMetadata")
        if usage and self.finished:  # running totals; the last chunk's are final
            events.append(
                UsageReport(
                    prompt_tokens=int(usage.get("promptTokenCount") or 0),
                    completion_tokens=int(usage.get("candidatesTokenCount") or 0)
                    + int(usage.get("thoughtsTokenCount") or 0),
                    cached_prompt_tokens=int(usage.get("cachedContentTokenCount") or 0),
                )
            )
        return events

    def _finish(self, reason: str | None, blocked: str | None) -> chat_pb2.FinishReason.ValueType:
        if blocked or reason in _FILTERED:
            return chat_pb2.FINISH_REASON_CONTENT_FILTER
        if reason == "MAX_TOKENS":
            return chat_pb2.FINISH_REASON_LENGTH
        if self.tool_calls:  # Gemini says STOP after function calls
            return chat_pb2.FINISH_REASON_TOOL_CALLS
        return chat_pb2.FINISH_REASON_STOP


def _retry_hint(body: Any) -> float | None:
    """The ``google.rpc.RetryInfo`` delay in an error's details."""
    for detail in body["error"].get("details") or ():
        delay = detail.get("retryDelay") if isinstance(detail, dict) else None
        if isinstance(delay, str) and delay.endswith("s"):
            try:
                return max(0.0, float(delay[:-1]))
            except ValueError:
                return None
    return None


def _error_detail(body: Any) -> str:
    error = body["error"]
    return f"{error.get('status')}: {error['message']}"


def _http_error(status: int, body: bytes, headers: http.Headers) -> UpstreamError:
    """Retry-After, or else the RetryInfo in the error body, says when to retry."""
    return http.json_error(status, body, headers, _error_detail, _retry_hint)


def auth_headers(credential: str) -> dict[str, str]:
    """The header that carries the API key (never ``?key=``, which would put the
    key in URLs and error messages); none without one."""
    return http.credential_header("x-goog-api-key", credential)


class GeminiAdapter(http.HttpAdapter):
    """The Gemini API over HTTP(S) with server-sent events."""

    params: ClassVar[Mapping[str, str] | None] = {"alt": "sse"}

    def _auth(self, credential: str) -> dict[str, str]:
        return auth_headers(credential)

    def _path(self, request: UpstreamRequest) -> str:
        # The configured URL may name the API version itself (…/v1beta or …/v1).
        versioned = self.base_url.rsplit("/", 1)[-1] in ("v1", "v1beta")
        model = request.model_id.removeprefix("models/")
        prefix = "" if versioned else f"{API_VERSION}/"
        return f"{prefix}models/{model}:streamGenerateContent"

    def _body(self, request: UpstreamRequest) -> dict[str, Any]:
        return request_body(request)

    def _error(self, status: int, body: bytes, headers: http.Headers) -> UpstreamError:
        return _http_error(status, body, headers)

    async def _events(self, answer: http.Answer) -> AsyncIterator[Event]:
        state = _StreamState()
        async for data in http.sse_data(answer):
            chunk = http.decode_object(data, "chunk")
            if "error" in chunk:
                error = chunk["error"] or {}
                raise UpstreamError(FailureKind.SERVER_ERROR, str(error.get("message", error)))
            for event in state.events(chunk):
                yield event
            if state.finished:
                return
        raise UpstreamError(FailureKind.STREAM_BROKEN, "stream ended without a finishReason")


async def list_models(endpoint: Endpoint, client: httpx.AsyncClient) -> list[ListedModel]:
    """``GET {base}/v1beta/models``, paginated by ``pageToken``.

    Only models that support ``generateContent`` are chat models.
    """
    base = endpoint.base_url
    versioned = re.search(r"/v1(beta|alpha)?$", base) is not None
    url = f"{base}/models" if versioned else f"{base}/{API_VERSION}/models"
    headers = auth_headers(endpoint.credential)
    out: list[ListedModel] = []
    params: dict[str, str | int] = {"pageSize": 1000}
    for _ in range(listing.MAX_PAGES):
        body = await listing.get_json(client, endpoint, url, headers, params)
        for item in listing.list_of_dicts(body, "models"):
            name = item.get("name")
            methods = item.get("supportedGenerationMethods") or []
            if not isinstance(name, str) or "generateContent" not in methods:
                continue
            out.append(
                ListedModel(
                    name.removeprefix("models/"),
                    context_window=listing.positive_int(item.get("inputTokenLimit")),
                    max_output_tokens=listing.positive_int(item.get("outputTokenLimit")),
                )
            )
        token = body.get("nextPageToken")
        if not isinstance(token, str) or not token:
            return out
        params = {"pageSize": 1000, "pageToken": token}
    raise ListingError(f"more than {listing.MAX_PAGES} pages of models")
