"""A fake Anthropic Messages upstream that speaks the real wire format.

Routes: ``GET /v1/models``, ``POST /v1/messages`` (a ``message`` object, or with
``"stream": true`` server-sent events, each an ``event: NAME`` line and a ``data:``
line: ``message_start`` (usage.input_tokens), ``content_block_start``, a ``ping``,
``content_block_delta`` (``text_delta`` or ``input_json_delta``),
``content_block_stop``, ``message_delta`` (stop_reason, usage.output_tokens),
``message_stop``). Errors use Anthropic's body ``{"type": "error", "error": {"type",
"message"}, "request_id"}``: 401 ``authentication_error`` without the right
``x-api-key`` (or ``Authorization: Bearer``, which newer SDKs send) when ``api_key``
is set, 400 without ``anthropic-version`` or for a body Anthropic would refuse
(no ``max_tokens``, no ``messages``, a ``system`` role in ``messages``), 404
``not_found_error`` for an unknown model. Fault statuses: 429 ``rate_limit_error``
with Retry-After, 500 ``api_error``, 529 ``overloaded_error`` (``Fault.http_error(529)``).
A STREAM_ERROR event is ``event: error`` with an ``overloaded_error``; a malformed
chunk is a ``data:`` line cut mid-JSON.

Knobs as in :class:`tests.fakes.openai_upstream.FakeOpenAI`: ``models``,
``reply_text`` in ``chunks`` deltas (output tokens = deltas), ``tool_calls``
(:class:`ScriptedToolCall`, answered when the request has ``tools`` and
``tool_choice`` is not ``none``), ``max_tokens`` below the delta count truncates
with ``stop_reason: "max_tokens"``; a stop sequence in the reply ends it there.

Command line: ``python -m tests.fakes.anthropic_upstream --port 9001``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
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

DEFAULT_MODELS = ("claude-haiku-4-5", "claude-sonnet-4-5")
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
_MESSAGES = {
    429: "Number of request tokens has exceeded your per-minute rate limit.",
    500: "Internal server error",
    529: "Overloaded",
}

__all__ = ["DEFAULT_MODELS", "FakeAnthropic", "ScriptedToolCall"]


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """Anthropic's error body for ``status`` (5xx other than 529 are ``api_error``)."""
    error_type = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    body = {
        "type": "error",
        "error": {"type": error_type, "message": message},
        "request_id": _id("req"),
    }
    return json_response(body, status, headers)


def _id(prefix: str) -> str:
    return f"{prefix}_01{uuid.uuid4().hex[:22]}"


def _text(content: object) -> str:
    """The text of a ``content`` (a string, or blocks with ``text``/tool results)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            _text(b.get("text", b.get("content", ""))) for b in content if isinstance(b, dict)
        )
    return ""


def _sse(event: str, data: JsonDict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


@dataclass
class _Reply:
    blocks: list[tuple[str, JsonDict, list[str]]]  # (type, start block, delta pieces)
    stop_reason: str
    stop_sequence: str | None
    input_tokens: int
    output_tokens: int


class FakeAnthropic(FakeUpstream):
    """The fake; see the module docstring."""

    def __init__(self, *, models: Sequence[str] = DEFAULT_MODELS, **knobs: Unpack[Knobs]) -> None:
        super().__init__(**knobs)
        self.models = list(models)
        self.tool_calls: list[ScriptedToolCall] = []

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/models", self._list_models),
            web.post("/v1/messages", self._messages),
            web.route("*", "/{tail:.*}", self._not_found),
        ]

    def fault_response(self, fault: Fault, model: str | None) -> web.Response:
        headers = {"request-id": _id("req")}
        if fault.status == 429 and fault.retry_after is not None:
            headers["retry-after"] = str(math.ceil(fault.retry_after))
        default = _MESSAGES.get(fault.status, "Internal server error")
        return error_response(fault.status, fault.message or default, headers)

    # -- handlers -----------------------------------------------------------------
    async def _not_found(self, request: web.Request) -> web.Response:
        return error_response(404, "Not Found")

    async def _list_models(self, request: web.Request) -> web.Response:
        if (refused := await self._preflight(request, None, "models", False)) is not None:
            return refused
        data = [
            {"type": "model", "id": m, "display_name": m, "created_at": "2025-10-01T00:00:00Z"}
            for m in self.models
        ]
        body = {"data": data, "has_more": False, "first_id": data[0]["id"] if data else None}
        body["last_id"] = data[-1]["id"] if data else None
        return json_response(body)

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        rec = record(request)
        model = rec.body.get("model") if rec.body is not None else None
        model = model if isinstance(model, str) else None
        streaming = rec.body is not None and rec.body.get("stream") is True
        if (refused := await self._preflight(request, model, "chat", streaming)) is not None:
            return refused
        if (invalid := self._invalid(rec.body, model)) is not None:
            return invalid
        assert rec.body is not None and model is not None
        reply = self._reply(rec.body)
        if streaming:
            return await self._stream(request, model, reply)
        await asyncio.sleep(
            self.first_token_delay + self.chunk_delay * max(reply.output_tokens - 1, 0)
        )
        return json_response(self._message(model, reply), headers={"request-id": _id("req")})

    async def _preflight(
        self, request: web.Request, model: str | None, endpoint: str, streaming: bool
    ) -> web.Response | None:
        """Authentication and the version header, then the fault plan."""
        if self.api_key is not None:
            # The key comes as x-api-key, or as a bearer token (newer SDKs send that).
            auth = request.headers.get("authorization", "")
            key = request.headers.get("x-api-key", "") or auth.removeprefix("Bearer ").strip()
            if not key:
                return error_response(401, "x-api-key header is required")
            if key != self.api_key:
                return error_response(401, "invalid x-api-key")
        if "anthropic-version" not in request.headers:
            return error_response(400, "anthropic-version: header is required")
        fault = self.take_fault(request, model=model, endpoint=endpoint)
        if fault is None:
            return None
        return await self.apply_fault(request, fault, model, streaming=streaming)

    def _invalid(self, body: JsonDict | None, model: str | None) -> web.Response | None:
        if body is None:
            return error_response(400, "There was an error parsing the body of your request.")
        if not model:
            return error_response(400, "model: Field required")
        if not isinstance(body.get("max_tokens"), int):
            return error_response(400, "max_tokens: Field required")
        messages = body.get("messages")
        if not isinstance(messages, list):
            return error_response(400, "messages: Field required")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
                return error_response(
                    400, f"messages.{i}.role: Input should be 'user' or 'assistant'"
                )
        if model not in self.models:
            return error_response(404, f"model: {model}")
        return None

    # -- the reply ----------------------------------------------------------------
    def _reply(self, body: JsonDict) -> _Reply:
        prompt = approx_tokens(_text(body.get("system", "")))
        prompt += sum(approx_tokens(_text(m.get("content"))) for m in body["messages"])
        choice = body.get("tool_choice") or {}
        if self.tool_calls and body.get("tools") and choice.get("type") != "none":
            blocks = [
                (
                    "tool_use",
                    {"type": "tool_use", "id": _id("toolu"), "name": c.name, "input": {}},
                    split_text(c.arguments, self.chunks),
                )
                for c in self.tool_calls
            ]
            output = sum(len(pieces) for _, _, pieces in blocks)
            return _Reply(blocks, "tool_use", None, prompt, output)
        text, stop_reason, stop_sequence = self.reply_text, "end_turn", None
        for stop in body.get("stop_sequences") or ():
            if stop and stop in text:
                text, stop_reason, stop_sequence = text[: text.index(stop)], "stop_sequence", stop
        pieces = split_text(text, self.chunks)
        if 0 < body["max_tokens"] < len(pieces):
            pieces, stop_reason, stop_sequence = pieces[: body["max_tokens"]], "max_tokens", None
        block = {"type": "text", "text": ""}
        return _Reply([("text", block, pieces)], stop_reason, stop_sequence, prompt, len(pieces))

    def _message(self, model: str, reply: _Reply) -> JsonDict:
        content: list[JsonDict] = []
        for kind, start, pieces in reply.blocks:
            if kind == "text":
                content.append({"type": "text", "text": "".join(pieces)})
            else:
                content.append({**start, "input": json.loads("".join(pieces) or "{}")})
        return {
            "id": _id("msg"),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": reply.stop_reason,
            "stop_sequence": reply.stop_sequence,
            "usage": self._usage(reply.input_tokens, reply.output_tokens),
        }

    @staticmethod
    def _usage(input_tokens: int, output_tokens: int) -> JsonDict:
        return {
            "input_tokens": input_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": output_tokens,
            "service_tier": "standard",
        }

    async def _stream(self, request: web.Request, model: str, reply: _Reply) -> web.StreamResponse:
        start = {**self._message(model, reply), "content": [], "stop_reason": None}
        start["stop_sequence"], start["usage"] = None, self._usage(reply.input_tokens, 1)
        events: list[tuple[float, bytes]] = [
            (
                self.first_token_delay,
                _sse("message_start", {"type": "message_start", "message": start}),
            )
        ]
        first = True
        for index, (kind, block, pieces) in enumerate(reply.blocks):
            events.append(
                (
                    0.0,
                    _sse(
                        "content_block_start",
                        {
                            "type": "content_block_start",
                            "index": index,
                            "content_block": block,
                        },
                    ),
                )
            )
            if index == 0:
                events.append((0.0, _sse("ping", {"type": "ping"})))
            for piece in pieces:
                delta = (
                    {"type": "text_delta", "text": piece}
                    if kind == "text"
                    else {"type": "input_json_delta", "partial_json": piece}
                )
                events.append(
                    (
                        0.0 if first else self.chunk_delay,
                        _sse(
                            "content_block_delta",
                            {
                                "type": "content_block_delta",
                                "index": index,
                                "delta": delta,
                            },
                        ),
                    )
                )
                first = False
            events.append(
                (0.0, _sse("content_block_stop", {"type": "content_block_stop", "index": index}))
            )
        events.append(
            (
                0.0,
                _sse(
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {
                            "stop_reason": reply.stop_reason,
                            "stop_sequence": reply.stop_sequence,
                        },
                        "usage": {"output_tokens": reply.output_tokens},
                    },
                ),
            )
        )
        events.append((0.0, _sse("message_stop", {"type": "message_stop"})))
        fault = record(request).fault
        message = fault.message if fault is not None and fault.message else _MESSAGES[529]
        error = {"type": "error", "error": {"type": "overloaded_error", "message": message}}
        headers = {
            "content-type": "text/event-stream; charset=utf-8",
            "cache-control": "no-cache",
            "request-id": _id("req"),
        }
        return await self.write_stream(
            request,
            web.StreamResponse(headers=headers),
            events,
            malformed=b'event: content_block_delta\ndata: {"type": "content_block_delta", "ind\n\n',
            error_event=_sse("error", error),
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the fake Anthropic upstream.")
    add_knob_arguments(parser, default_port=9001)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated")
    args = parser.parse_args(argv)
    fake = FakeAnthropic(models=[m for m in args.models.split(",") if m], **knobs_from(args))
    asyncio.run(fake.serve_forever(args.host, args.port))


if __name__ == "__main__":
    main()
