"""A fake Ollama server that speaks its native API.

Routes: ``GET /api/version``, ``GET /api/tags`` (the local models), ``GET /api/ps``
(the loaded ones, with ``size`` and ``size_vram``), ``POST /api/show`` (``model_info``
with ``llama.context_length``), ``POST /api/chat``: streaming unless ``"stream": false``, as
``application/x-ndjson``, one JSON object a line (``model``, ``created_at``,
``message`` with a ``content`` fragment, ``done: false``), then a final line with
``done: true``, ``done_reason`` (``stop``, or ``length`` when ``options.num_predict``
cuts the reply) and the counts and durations (``prompt_eval_count``,
``eval_count``...). Scripted ``tool_calls`` arrive whole in one line, arguments as
an object, and ``done_reason`` stays ``stop`` (as Ollama does). Errors are
``{"error": "..."}``: 404 for an unknown model (``model "x" not found, try pulling it
first``), 400 for a bad body. A STREAM_ERROR event is an ``{"error": ...}`` line; a
malformed chunk is a line cut mid-JSON. Ollama has no auth; ``api_key``, when set,
is checked as a bearer token (a proxy in front of it).

Knobs as in :class:`tests.fakes.openai_upstream.FakeOpenAI`: ``models``,
``reply_text`` in ``chunks`` lines (eval_count = lines), ``tool_calls``; ``loaded``
(the models ``/api/ps`` lists; None: the first one), ``context_length``.

Command line: ``python -m tests.fakes.ollama_upstream --port 11434``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
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

DEFAULT_MODELS = ("llama3.2:latest", "qwen2.5:0.5b")
_DIGEST = "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72"
_DETAILS = {
    "parent_model": "",
    "format": "gguf",
    "family": "llama",
    "families": ["llama"],
    "parameter_size": "3.2B",
    "quantization_level": "Q4_K_M",
}

__all__ = ["DEFAULT_MODELS", "FakeOllama", "ScriptedToolCall"]


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return json_response({"error": message}, status, headers)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


def _line(data: JsonDict) -> bytes:
    return (json.dumps(data) + "\n").encode()


class FakeOllama(FakeUpstream):
    """The fake; see the module docstring."""

    def __init__(self, *, models: Sequence[str] = DEFAULT_MODELS, **knobs: Unpack[Knobs]) -> None:
        super().__init__(**knobs)
        self.models = list(models)
        self.tool_calls: list[ScriptedToolCall] = []
        self.loaded: list[str] | None = None
        self.context_length = 131072

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/api/version", self._version),
            web.get("/api/tags", self._tags),
            web.get("/api/ps", self._ps),
            web.post("/api/show", self._show),
            web.post("/api/chat", self._chat),
            web.route("*", "/{tail:.*}", self._not_found),
        ]

    def fault_response(self, fault: Fault, model: str | None) -> web.Response:
        headers = {}
        if fault.status == 429 and fault.retry_after is not None:
            headers["retry-after"] = str(math.ceil(fault.retry_after))
        default = {429: "too many requests", 503: "server busy, please try again"}.get(
            fault.status, "an error was encountered while running the model"
        )
        return _error(fault.status, fault.message or default, headers)

    # -- handlers -----------------------------------------------------------------
    async def _not_found(self, request: web.Request) -> web.Response:
        return web.Response(status=404, text="404 page not found")

    async def _version(self, request: web.Request) -> web.Response:
        return json_response({"version": "0.12.6"})

    def _model(self, name: str) -> JsonDict:
        return {
            "name": name,
            "model": name,
            "modified_at": "2025-10-01T12:00:00.000000000Z",
            "size": 2019393189,
            "digest": _DIGEST,
            "details": _DETAILS,
        }

    async def _tags(self, request: web.Request) -> web.Response:
        if (refused := await self._preflight(request, None, "models", False)) is not None:
            return refused
        return json_response({"models": [self._model(m) for m in self.models]})

    async def _ps(self, request: web.Request) -> web.Response:
        if (refused := await self._preflight(request, None, "models", False)) is not None:
            return refused
        loaded = [
            {
                **self._model(m),
                "expires_at": "2099-01-01T00:00:00Z",
                "size_vram": 2019393189,
                "context_length": 4096,
            }
            for m in (self.models[:1] if self.loaded is None else self.loaded)
        ]
        return json_response({"models": loaded})

    async def _show(self, request: web.Request) -> web.Response:
        if (refused := await self._preflight(request, None, "models", False)) is not None:
            return refused
        body = record(request).body
        name = body.get("model") if body is not None else None
        if name not in self.models:
            return _error(404, f"model '{name}' not found")
        info = {
            "general.architecture": "llama",
            "general.parameter_count": 3212749888,
            "llama.context_length": self.context_length,
        }
        return json_response(
            {"license": "", "modelfile": "", "details": _DETAILS, "model_info": info}
        )

    async def _preflight(
        self, request: web.Request, model: str | None, endpoint: str, streaming: bool
    ) -> web.Response | None:
        if self.api_key is not None:
            auth = request.headers.get("authorization", "")
            if auth != f"Bearer {self.api_key}":
                return _error(401, "unauthorized")
        fault = self.take_fault(request, model=model, endpoint=endpoint)
        if fault is None:
            return None
        return await self.apply_fault(request, fault, model, streaming=streaming)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        rec = record(request)
        body = rec.body
        model = body.get("model") if body is not None else None
        model = model if isinstance(model, str) else None
        streaming = body is None or body.get("stream", True) is not False  # streams by default
        if (refused := await self._preflight(request, model, "chat", streaming)) is not None:
            return refused
        if body is None:
            return _error(400, "invalid character looking for beginning of value")
        if not model:
            return _error(400, "model is required")
        if model not in self.models:
            return _error(404, f'model "{model}" not found, try pulling it first')
        if not isinstance(body.get("messages", []), list):
            return _error(400, "json: cannot unmarshal messages")
        lines, final = self._reply(body, model)
        if not streaming:
            await asyncio.sleep(self.first_token_delay + self.chunk_delay * max(len(lines) - 1, 0))
            content = "".join(line["message"].get("content", "") for line in lines)
            message: JsonDict = {"role": "assistant", "content": content}
            calls = [c for line in lines for c in line["message"].get("tool_calls", [])]
            if calls:
                message["tool_calls"] = calls
            return json_response({**final, "message": message})
        events = [
            (self.first_token_delay if i == 0 else self.chunk_delay, _line(line))
            for i, line in enumerate(lines)
        ]
        events.append((0.0, _line(final)))
        fault = rec.fault
        message_text = (
            fault.message if fault is not None and fault.message else "model runner crashed"
        )
        return await self.write_stream(
            request,
            web.StreamResponse(headers={"content-type": "application/x-ndjson"}),
            events,
            malformed=f'{{"model": "{model}", "created_at": "{_now()}", "mess\n'.encode(),
            error_event=_line({"error": message_text}),
        )

    def _reply(self, body: JsonDict, model: str) -> tuple[list[JsonDict], JsonDict]:
        """The content lines and the final ``done`` line."""
        messages = body.get("messages") or []
        prompt = sum(
            approx_tokens(str(m.get("content", ""))) for m in messages if isinstance(m, dict)
        )
        options = body.get("options") or {}
        head = {"model": model, "created_at": _now()}
        reason = "stop"
        if self.tool_calls and body.get("tools"):
            calls = [
                {"function": {"name": c.name, "arguments": json.loads(c.arguments)}}
                for c in self.tool_calls
            ]
            message = {"role": "assistant", "content": "", "tool_calls": calls}
            lines = [{**head, "message": message, "done": False}]
        else:
            pieces = split_text(self.reply_text, self.chunks)
            limit = options.get("num_predict")
            if isinstance(limit, int) and 0 < limit < len(pieces):
                pieces, reason = pieces[:limit], "length"
            lines = [
                {**head, "message": {"role": "assistant", "content": p}, "done": False}
                for p in pieces
            ]
        final = {
            **head,
            "message": {"role": "assistant", "content": ""},
            "done": True,
            "done_reason": reason,
            "total_duration": 5_043_500_667,
            "load_duration": 5_025_959,
            "prompt_eval_count": prompt,
            "prompt_eval_duration": 325_953_000,
            "eval_count": len(lines),
            "eval_duration": 4_709_213_000,
        }
        return lines, final


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the fake Ollama upstream.")
    add_knob_arguments(parser, default_port=11434)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated")
    args = parser.parse_args(argv)
    fake = FakeOllama(models=[m for m in args.models.split(",") if m], **knobs_from(args))
    asyncio.run(fake.serve_forever(args.host, args.port))


if __name__ == "__main__":
    main()
