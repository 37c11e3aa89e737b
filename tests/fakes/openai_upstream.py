"""A fake OpenAI Chat Completions upstream that speaks the real wire format.

Routes: ``GET /v1/models``, ``GET /v1/models/{model}``, ``POST /v1/chat/completions``
(a ``chat.completion`` object, or with ``"stream": true`` Server-Sent Events: one
``data: {chat.completion.chunk}`` per event, the role first, content or tool-call
deltas, a chunk with ``finish_reason``, the ``choices: []`` usage chunk when
``stream_options.include_usage`` is true, then ``data: [DONE]``). Anything else is
OpenAI's 404 ``Invalid URL``. Errors use OpenAI's body ``{"error": {"message",
"type", "param", "code"}}``: 401 without the right ``Authorization: Bearer`` key when
``api_key`` is set, 404 ``model_not_found``, 400 for a body OpenAI would refuse
(no JSON, no ``model``/``messages``, ``stream_options`` without ``stream``, JSON mode
without the word "json" in the messages).

Usage::

    async with FakeOpenAI(api_key="sk-test", chunks=4) as fake:
        client = openai.AsyncOpenAI(base_url=fake.url, api_key="sk-test")
        fake.set_fault(Fault.rate_limit(retry_after=2), times=1)  # next chat call: 429
        fake.set_fault(FaultKind.SERVER_ERROR, model="broken-model")  # always 500
        ...
        assert fake.requests[-1].body["stream_options"] == {"include_usage": True}
        assert await fake.wait_for_streams_closed()

Knobs, plain attributes that can change between calls:

* ``models``: the ids ``/v1/models`` lists; any other model gets 404.
* ``reply_text`` split into ``chunks`` content deltas (completion tokens = deltas);
  ``reply_for(body) -> str`` overrides the text per request.
* ``tool_calls``: a list of :class:`ScriptedToolCall`; when set and the request has
  ``tools`` (and ``tool_choice`` is not ``"none"``) the reply is those calls, their
  arguments streamed in ``chunks`` pieces, ``finish_reason: "tool_calls"``.
* ``json_reply``: the object answered in JSON mode (``response_format`` type
  ``json_object`` or ``json_schema``); by default ``{"reply": reply_text}``.
* ``first_token_delay`` seconds before the first event, ``chunk_delay`` seconds
  between content deltas (a non-streaming reply waits for the whole generation).
* ``max_tokens`` / ``max_completion_tokens`` below the delta count truncate the reply
  with ``finish_reason: "length"``. Prompt tokens: ``len(text) // 4 + 1`` a message.

Faults, the request log and stream tracking come from
:class:`tests.fakes.faults.FakeUpstream` (see there). Here a STREAM_ERROR event is
``data: {"error": {...}}`` and a malformed chunk is a ``data:`` line cut mid-JSON.

Command line, for the benchmarks::

    python -m tests.fakes.openai_upstream --port 9000 --latency-ms 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
import uuid
from collections.abc import Callable, Sequence
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

DEFAULT_MODELS = ("gpt-4o-mini", "gpt-4o")
SYSTEM_FINGERPRINT = "fp_fake0openai"
_PADDING = "Zq3xLp0sWb8r"  # for the "obfuscation" field streamed chunks carry
_KEYS_URL = "https://platform.openai.com/account/api-keys"
_NO_KEY = (
    "You didn't provide an API key. You need to provide your API key in an "
    "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), "
    "or as the password field (with blank username) if you're accessing the API "
    "from your browser and are prompted for a username and password. You can "
    f"obtain an API key from {_KEYS_URL}."
)
_BAD_JSON = (
    "We could not parse the JSON body of your request. (HINT: This likely means "
    "you aren't using your HTTP library correctly. The OpenAI API expects a JSON "
    "payload, but what was sent was not valid JSON. If you have trouble figuring "
    "out how to fix this, please contact us through our help center at "
    "help.openai.com.)"
)
_BAD_KEY = f"Incorrect API key provided: {{key}}. You can find your API key at {_KEYS_URL}."
_EMPTY_MESSAGES = (
    "Invalid 'messages': empty array. Expected an array with minimum length 1, "
    "but got an empty array instead."
)
_NO_JSON_WORD = (
    "'messages' must contain the word 'json' in some form, to use 'response_format' "
    "of type 'json_object'."
)
_RATE_LIMITED = (
    "Rate limit reached for {model} in organization org-fake on requests per min "
    "(RPM): Limit 3, Used 3, Requested 1. Please try again in {retry}s. Visit "
    "https://platform.openai.com/account/rate-limits to learn more."
)
_SERVER_MESSAGES = {
    500: "The server had an error while processing your request. Sorry about that!",
    503: "The server is overloaded or not ready yet.",
}


def error_body(
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | int | None = None,
) -> JsonDict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _refuse(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> web.Response:
    """An ``invalid_request_error`` response."""
    return json_response(error_body(message, param=param, code=code), status)


def _message_text(message: object) -> str:
    """A message's text: its string content, or its text parts joined."""
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def _prompt_text(messages: list[object]) -> str:
    return " ".join(map(_message_text, messages))


def _format(body: JsonDict) -> str | None:
    """The ``response_format`` type asked for, if any."""
    response_format = body.get("response_format")
    return response_format.get("type") if isinstance(response_format, dict) else None


@dataclass(frozen=True)
class ScriptedToolCall:
    name: str
    arguments: str  # JSON text


@dataclass
class _Reply:
    pieces: list[str]  # content deltas
    calls: list[tuple[str, str, list[str]]]  # (call id, function name, argument pieces)
    finish_reason: str
    usage: JsonDict


def _usage(prompt: int, completion: int) -> JsonDict:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


class FakeOpenAI(FakeUpstream):
    """The fake; see the module docstring."""

    def __init__(self, *, models: Sequence[str] = DEFAULT_MODELS, **knobs: Unpack[Knobs]) -> None:
        super().__init__(**knobs)
        self.models = list(models)
        self.tool_calls: list[ScriptedToolCall] = []
        self.json_reply: JsonDict | None = None
        self.reply_for: Callable[[JsonDict], str] | None = None

    @property
    def url(self) -> str:
        """The base URL an OpenAI client is given, ending in ``/v1``."""
        return f"{self.base_url}/v1"

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/v1/models", self._list_models),
            web.get("/v1/models/{model}", self._get_model),
            web.post("/v1/chat/completions", self._chat),
            web.route("*", "/{tail:.*}", self._not_found),
        ]

    def fault_response(self, fault: Fault, model: str | None) -> web.Response:
        headers = self._headers()
        if fault.status == 429:
            retry = fault.retry_after
            if retry is not None:
                headers["retry-after"] = str(math.ceil(retry))
                headers["x-ratelimit-remaining-requests"] = "0"
                headers["x-ratelimit-reset-requests"] = f"{retry}s"
            message = fault.message or _RATE_LIMITED.format(model=model, retry=retry or 1)
            body = error_body(message, "requests", None, "rate_limit_exceeded")
        elif fault.status == 502:  # Cloudflare's answer, code and all
            body = error_body(fault.message or "Bad gateway.", "cf_bad_gateway", None, 502)
        else:
            default = _SERVER_MESSAGES.get(fault.status, "The server had an error.")
            error_type = "server_error" if fault.status >= 500 else "invalid_request_error"
            body = error_body(fault.message or default, error_type)
        return json_response(body, fault.status, headers)

    # -- handlers -----------------------------------------------------------------
    async def _list_models(self, request: web.Request) -> web.Response:
        if (refused := await self._preflight(request, None, "models", False)) is not None:
            return refused
        data = [self._model_object(m) for m in self.models]
        return json_response({"object": "list", "data": data}, headers=self._headers())

    async def _get_model(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        if (refused := await self._preflight(request, model, "models", False)) is not None:
            return refused
        if model not in self.models:
            return _refuse(404, f"The model '{model}' does not exist", "model", "model_not_found")
        return json_response(self._model_object(model), headers=self._headers())

    async def _not_found(self, request: web.Request) -> web.Response:
        return _refuse(404, f"Invalid URL ({request.method} {request.path})")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
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
            return await self._stream(request, rec.body, model, reply)
        n = max(len(reply.pieces), sum(len(pieces) for _, _, pieces in reply.calls))
        await asyncio.sleep(self.first_token_delay + self.chunk_delay * max(n - 1, 0))
        return json_response(self._completion(model, reply), headers=self._headers())

    async def _preflight(
        self, request: web.Request, model: str | None, endpoint: str, streaming: bool
    ) -> web.Response | None:
        """Authentication, then the fault plan: a response here ends the request."""
        if self.api_key is not None:
            auth = request.headers.get("authorization", "")
            key = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else ""
            if not key:
                return _refuse(401, _NO_KEY)
            if key != self.api_key:
                shown = f"{key[:3]}*{key[-4:]}" if len(key) > 8 else key
                return _refuse(401, _BAD_KEY.format(key=shown), code="invalid_api_key")
        fault = self.take_fault(request, model=model, endpoint=endpoint)
        if fault is None:
            return None
        return await self.apply_fault(request, fault, model, streaming=streaming)

    def _invalid(self, body: JsonDict | None, model: str | None) -> web.Response | None:
        """OpenAI's 400/404 for a request it would refuse, or None."""
        if body is None:
            return _refuse(400, _BAD_JSON)
        if not model:
            return _refuse(400, "you must provide a model parameter")
        messages = body.get("messages")
        if not isinstance(messages, list):
            message = "Missing required parameter: 'messages'."
            return _refuse(400, message, "messages", "missing_required_parameter")
        if not messages:
            return _refuse(400, _EMPTY_MESSAGES, "messages", "empty_array")
        if model not in self.models:
            message = f"The model `{model}` does not exist or you do not have access to it."
            return _refuse(404, message, code="model_not_found")
        if body.get("stream_options") is not None and body.get("stream") is not True:
            message = "The 'stream_options' parameter is only allowed when 'stream' is enabled."
            return _refuse(400, message, "stream_options")
        if _format(body) == "json_object" and "json" not in _prompt_text(messages).lower():
            return _refuse(400, _NO_JSON_WORD, "messages")
        return None

    # -- the reply ----------------------------------------------------------------
    def _reply(self, body: JsonDict) -> _Reply:
        messages = body.get("messages") or []
        prompt = sum(approx_tokens(_message_text(m)) for m in messages)
        if self.tool_calls and body.get("tools") and body.get("tool_choice") != "none":
            calls = [
                (f"call_{uuid.uuid4().hex[:24]}", c.name, split_text(c.arguments, self.chunks))
                for c in self.tool_calls
            ]
            completion = sum(len(pieces) for _, _, pieces in calls)
            return _Reply([], calls, "tool_calls", _usage(prompt, completion))
        text = self.reply_for(body) if self.reply_for is not None else self.reply_text
        if _format(body) in ("json_object", "json_schema"):
            text = json.dumps(self.json_reply if self.json_reply is not None else {"reply": text})
        pieces, finish = split_text(text, self.chunks), "stop"
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if isinstance(limit, int) and 0 < limit < len(pieces):
            pieces, finish = pieces[:limit], "length"
        return _Reply(pieces, [], finish, _usage(prompt, len(pieces)))

    def _completion(self, model: str, reply: _Reply) -> JsonDict:
        message: JsonDict = {
            "role": "assistant",
            "content": None if reply.calls else "".join(reply.pieces),
            "refusal": None,
            "annotations": [],
        }
        if reply.calls:
            message["tool_calls"] = [
                {"id": i, "type": "function", "function": {"name": n, "arguments": "".join(a)}}
                for i, n, a in reply.calls
            ]
        choice = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": reply.finish_reason,
        }
        return {
            "id": _completion_id(),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": reply.usage,
            "service_tier": "default",
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }

    def _deltas(self, reply: _Reply) -> list[JsonDict]:
        """The stream's deltas, role first; all but the role-only one carry output."""
        if not reply.calls:
            role: JsonDict = {"role": "assistant", "content": "", "refusal": None}
            return [role, *({"content": p} for p in reply.pieces)]
        deltas: list[JsonDict] = []
        for index, (call_id, name, pieces) in enumerate(reply.calls):
            head = {
                "index": index,
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": ""},
            }
            deltas.append({"tool_calls": [head]})
            deltas += [
                {"tool_calls": [{"index": index, "function": {"arguments": p}}]} for p in pieces
            ]
        deltas[0] = {"role": "assistant", "content": None, **deltas[0], "refusal": None}
        return deltas

    async def _stream(
        self, request: web.Request, body: JsonDict, model: str, reply: _Reply
    ) -> web.StreamResponse:
        options = body.get("stream_options") or {}
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        obfuscate = not isinstance(options, dict) or options.get("include_obfuscation") is not False
        completion_id, created = _completion_id(), int(time.time())

        def chunk(choices: list[JsonDict], usage: JsonDict | None = None) -> str:
            data: JsonDict = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "service_tier": "default",
                "system_fingerprint": SYSTEM_FINGERPRINT,
                "choices": choices,
            }
            if include_usage:
                data["usage"] = usage
            if obfuscate:
                data["obfuscation"] = _PADDING[: 2 + len(choices) * 6]
            return json.dumps(data)

        def choice(delta: JsonDict, finish: str | None = None) -> JsonDict:
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

        first_output = 0 if reply.calls else 1  # index of the first delta with output
        events = [
            (self._delay_before(i, first_output), _sse(chunk([choice(delta)])))
            for i, delta in enumerate(self._deltas(reply))
        ]
        events.append((0.0, _sse(chunk([choice({}, reply.finish_reason)]))))
        if include_usage:
            events.append((0.0, _sse(chunk([], reply.usage))))
        events.append((0.0, _sse("[DONE]")))
        fault = record(request).fault
        message = fault.message if fault is not None and fault.message else _SERVER_MESSAGES[500]
        error = error_body(message, "server_error")
        headers = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}
        return await self.write_stream(
            request,
            web.StreamResponse(headers={**self._headers(), **headers}),
            events,
            malformed=_sse(f'{{"id": "{completion_id}", "choices": [{{"delta": {{"cont'),
            error_event=_sse(json.dumps(error)),
        )

    def _delay_before(self, index: int, first_output: int) -> float:
        """The time-to-first-token delay, then ``chunk_delay`` between output deltas."""
        if index == 0:
            return self.first_token_delay
        return self.chunk_delay if index > first_output else 0.0

    # -- small pieces -------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        return {
            "x-request-id": f"req_{uuid.uuid4().hex}",
            "openai-organization": "org-fake",
            "openai-processing-ms": "1",
            "openai-version": "2020-10-01",
            "x-ratelimit-limit-requests": "10000",
            "x-ratelimit-remaining-requests": "9999",
            "x-ratelimit-reset-requests": "6ms",
        }

    @staticmethod
    def _model_object(model: str) -> JsonDict:
        return {"id": model, "object": "model", "created": 1686935002, "owned_by": "openai"}


def _sse(data: str) -> bytes:
    return f"data: {data}\n\n".encode()


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:29]}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the fake OpenAI upstream.")
    add_knob_arguments(parser, default_port=9000)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated")
    args = parser.parse_args(argv)
    fake = FakeOpenAI(models=[m for m in args.models.split(",") if m], **knobs_from(args))
    asyncio.run(fake.serve_forever(args.host, args.port))


if __name__ == "__main__":
    main()
