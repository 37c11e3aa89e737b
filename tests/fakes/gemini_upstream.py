"""A fake Google Gemini API (``generativelanguage``) upstream that speaks its wire format.

Routes under ``/v1beta`` (and ``/v1``): ``GET models``, ``GET models/{model}``,
``POST models/{model}:generateContent`` (one ``GenerateContentResponse``) and
``POST models/{model}:streamGenerateContent?alt=sse`` (one ``data:
{GenerateContentResponse}`` event a text piece, each with the running
``usageMetadata``; the last carries ``finishReason``: ``STOP``, or ``MAX_TOKENS`` when
``generationConfig.maxOutputTokens`` cuts the reply). Scripted ``tool_calls`` come as
``functionCall`` parts in one chunk with ``finishReason: STOP``. A ``stopSequences``
entry in the reply ends it there. Errors use Google's body ``{"error": {"code",
"message", "status", "details"}}``: 400 ``INVALID_ARGUMENT`` (``API_KEY_INVALID``)
without the right ``x-goog-api-key`` when ``api_key`` is set, 404 ``NOT_FOUND`` for an
unknown model, 429 ``RESOURCE_EXHAUSTED`` with a ``RetryInfo`` detail (and
Retry-After), 500 ``INTERNAL``, 503 ``UNAVAILABLE``. A STREAM_ERROR event is ``data:
{"error": {...}}``; a malformed chunk is a ``data:`` line cut mid-JSON.

Knobs as in :class:`tests.fakes.openai_upstream.FakeOpenAI`: ``models``,
``reply_text`` in ``chunks`` events (candidatesTokenCount = pieces), ``tool_calls``.

Command line: ``python -m tests.fakes.gemini_upstream --port 9002``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import uuid
from collections.abc import Sequence
from typing import Unpack

from aiohttp import web

from tests.fakes.faults import (
    FakeUpstream,
    Fault,
    JsonDict,
    Knobs,
    add_knob_arguments,
    approx_tokens,
    json_response,
    knobs_from,
    record,
    split_text,
)
from tests.fakes.openai_upstream import ScriptedToolCall

DEFAULT_MODELS = ("gemini-2.5-flash", "gemini-2.5-pro")
_STATUS = {
    400: "INVALID_ARGUMENT",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_MESSAGES = {
    429: "Resource has been exhausted (e.g. check quota).",
    500: "An internal error has occurred. Please retry or report in "
    "https://developers.generativeai.google/guide/troubleshooting",
    503: "The model is overloaded. Please try again later.",
}

__all__ = ["DEFAULT_MODELS", "FakeGemini", "ScriptedToolCall"]


def error_body(code: int, message: str, details: list[JsonDict] | None = None) -> JsonDict:
    status = _STATUS.get(code, "INTERNAL" if code >= 500 else "FAILED_PRECONDITION")
    error: JsonDict = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = details
    return {"error": error}


def _error(code: int, message: str, details: list[JsonDict] | None = None) -> web.Response:
    return json_response(error_body(code, message, details), code)


def _prompt_tokens(body: JsonDict) -> int:
    texts = [
        str(part.get("text", ""))
        for content in [body.get("systemInstruction") or {}, *(body.get("contents") or [])]
        if isinstance(content, dict)
        for part in content.get("parts") or []
        if isinstance(part, dict)
    ]
    return sum(approx_tokens(t) for t in texts) or 1


class FakeGemini(FakeUpstream):
    """The fake; see the module docstring."""

    def __init__(self, *, models: Sequence[str] = DEFAULT_MODELS, **knobs: Unpack[Knobs]) -> None:
        super().__init__(**knobs)
        self.models = list(models)
        self.tool_calls: list[ScriptedToolCall] = []

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/{version:v1|v1beta}/models", self._list_models),
            web.get("/{version:v1|v1beta}/models/{target}", self._get_model),
            web.post("/{version:v1|v1beta}/models/{target}", self._generate),
            web.route("*", "/{tail:.*}", self._not_found),
        ]

    def fault_response(self, fault: Fault, model: str | None) -> web.Response:
        headers, details = {}, None
        if fault.status == 429 and fault.retry_after is not None:
            headers["retry-after"] = str(math.ceil(fault.retry_after))
            delay = f"{math.ceil(fault.retry_after)}s"
            details = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}]
        message = fault.message or _MESSAGES.get(fault.status, "Request failed.")
        return json_response(error_body(fault.status, message, details), fault.status, headers)

    # -- handlers -----------------------------------------------------------------
    async def _not_found(self, request: web.Request) -> web.Response:
        return web.Response(status=404, text="<html><title>Error 404 (Not Found)</title></html>")

    def _model_object(self, model: str) -> JsonDict:
        return {
            "name": f"models/{model}",
            "version": "001",
            "displayName": model,
            "inputTokenLimit": 1048576,
            "outputTokenLimit": 65536,
            "supportedGenerationMethods": ["generateContent", "countTokens"],
        }

    async def _list_models(self, request: web.Request) -> web.Response:
        if (refused := await self._preflight(request, None, "models", False)) is not None:
            return refused
        return json_response({"models": [self._model_object(m) for m in self.models]})

    async def _get_model(self, request: web.Request) -> web.Response:
        model = request.match_info["target"]
        if (refused := await self._preflight(request, model, "models", False)) is not None:
            return refused
        if model not in self.models:
            return _error(404, f"models/{model} is not found for API version v1beta")
        return json_response(self._model_object(model))

    async def _preflight(
        self, request: web.Request, model: str | None, endpoint: str, streaming: bool
    ) -> web.Response | None:
        if self.api_key is not None and request.headers.get("x-goog-api-key") != self.api_key:
            reason = {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID",
            }
            reason["domain"] = "googleapis.com"
            return _error(400, "API key not valid. Please pass a valid API key.", [reason])
        fault = self.take_fault(request, model=model, endpoint=endpoint)
        if fault is None:
            return None
        return await self.apply_fault(request, fault, model, streaming=streaming)

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        model, _, method = request.match_info["target"].partition(":")
        streaming = method == "streamGenerateContent"
        if method not in ("generateContent", "streamGenerateContent"):
            return await self._not_found(request)
        if (refused := await self._preflight(request, model, "chat", streaming)) is not None:
            return refused
        body = record(request).body
        if body is None or not isinstance(body.get("contents"), list) or not body["contents"]:
            return _error(400, "* GenerateContentRequest.contents: contents is not specified")
        if model not in self.models:
            message = (
                f"models/{model} is not found for API version {request.match_info['version']}, "
                "or is not supported for generateContent."
            )
            return _error(404, message)
        chunks = self._chunks(body, model)
        if not streaming:
            await asyncio.sleep(self.first_token_delay + self.chunk_delay * max(len(chunks) - 1, 0))
            parts = [p for c in chunks for p in c["candidates"][0]["content"]["parts"]]
            merged = "".join(p.get("text", "") for p in parts)
            last = chunks[-1]
            content = {"role": "model", "parts": [{"text": merged}] if merged else parts}
            candidate = {**last["candidates"][0], "content": content}
            return json_response({**last, "candidates": [candidate]})
        if streaming and request.query.get("alt") != "sse":
            return _error(400, "this fake streams only with ?alt=sse")
        events = [
            (self.first_token_delay if i == 0 else self.chunk_delay, _sse(json.dumps(c)))
            for i, c in enumerate(chunks)
        ]
        fault = record(request).fault
        message = fault.message if fault is not None and fault.message else _MESSAGES[500]
        return await self.write_stream(
            request,
            web.StreamResponse(headers={"content-type": "text/event-stream"}),
            events,
            malformed=_sse('{"candidates": [{"content": {"parts": [{"te'),
            error_event=_sse(json.dumps(error_body(500, message))),
        )

    def _chunks(self, body: JsonDict, model: str) -> list[JsonDict]:
        """The streamed responses, the last one with the finishReason."""
        config = body.get("generationConfig") or {}
        prompt, response_id = _prompt_tokens(body), uuid.uuid4().hex[:22]
        calling = ((body.get("toolConfig") or {}).get("functionCallingConfig") or {}).get("mode")
        if self.tool_calls and body.get("tools") and calling != "NONE":
            calls = [
                {"functionCall": {"name": c.name, "args": json.loads(c.arguments)}}
                for c in self.tool_calls
            ]
            pieces: list[list[JsonDict]] = [calls]
            reason = "STOP"
        else:
            text, reason = self.reply_text, "STOP"
            for stop in config.get("stopSequences") or ():
                if stop and stop in text:
                    text = text[: text.index(stop)]
            texts = split_text(text, self.chunks)
            limit = config.get("maxOutputTokens")
            if isinstance(limit, int) and 0 < limit < len(texts):
                texts, reason = texts[:limit], "MAX_TOKENS"
            pieces = [[{"text": t}] for t in texts]
        chunks: list[JsonDict] = []
        for index, parts in enumerate(pieces):
            candidate: JsonDict = {"content": {"parts": parts, "role": "model"}, "index": 0}
            if index == len(pieces) - 1:
                candidate["finishReason"] = reason
            usage = {
                "promptTokenCount": prompt,
                "candidatesTokenCount": index + 1,
                "totalTokenCount": prompt + index + 1,
                "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}],
            }
            chunks.append(
                {
                    "candidates": [candidate],
                    "usageMetadata": usage,
                    "modelVersion": model,
                    "responseId": response_id,
                }
            )
        return chunks


def _sse(data: str) -> bytes:
    return f"data: {data}\r\n\r\n".encode()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the fake Gemini upstream.")
    add_knob_arguments(parser, default_port=9002)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated")
    args = parser.parse_args(argv)
    fake = FakeGemini(models=[m for m in args.models.split(",") if m], **knobs_from(args))
    asyncio.run(fake.serve_forever(args.host, args.port))


if __name__ == "__main__":
    main()
