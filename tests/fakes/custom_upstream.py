"""A fake in-house LLM API of no known format, for the ``custom`` provider type.

Route: ``POST /v2/generate`` with a JSON body ``{"model", "input": [{"role",
"content"}], "params": {"max_new_tokens", "temperature"}, "stream"}`` and the key
in ``X-Api-Key``. Unary answer: ``{"output": {"text", "stop_reason"}, "usage":
{"input", "output"}}``; ``stop_reason`` is ``end``, or ``max_tokens`` when
``max_new_tokens`` cuts the reply. Streaming (``"stream": true``) sends, as SSE
``data:`` lines (``stream_format="sse"``, ending with ``data: [DONE]``) or NDJSON
lines (``stream_format="ndjson"``), one ``{"delta": {"text"}}`` per piece, then
``{"done_reason", "usage"}``. With ``report_usage=False`` the ``usage`` objects
are left out (a provider that does not count tokens). Errors are ``{"error":
{"message"}}``; a STREAM_ERROR event is such an object inside the stream.

Command line: ``python -m tests.fakes.custom_upstream --port 8089``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
from collections.abc import Sequence
from typing import Literal, Unpack

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

DEFAULT_MODELS = ("acme-large", "acme-small")
PATH = "/v2/generate"

__all__ = ["DEFAULT_MODELS", "PATH", "FakeCustom"]


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return json_response({"error": {"message": message}}, status, headers)


class FakeCustom(FakeUpstream):
    """The fake; see the module docstring."""

    def __init__(
        self,
        *,
        models: Sequence[str] = DEFAULT_MODELS,
        stream_format: Literal["sse", "ndjson"] = "sse",
        report_usage: bool = True,
        **knobs: Unpack[Knobs],
    ) -> None:
        super().__init__(**knobs)
        self.models = list(models)
        self.stream_format = stream_format
        self.report_usage = report_usage

    def routes(self) -> list[web.RouteDef]:
        return [web.post(PATH, self._generate)]

    def fault_response(self, fault: Fault, model: str | None) -> web.Response:
        headers = {}
        if fault.status == 429 and fault.retry_after is not None:
            headers["Retry-After"] = str(math.ceil(fault.retry_after))
        return _error(fault.status, fault.message or f"upstream says {fault.status}", headers)

    def _frame(self, data: JsonDict | str) -> bytes:
        text = data if isinstance(data, str) else json.dumps(data)
        return f"data: {text}\n\n".encode() if self.stream_format == "sse" else f"{text}\n".encode()

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        rec = record(request)
        body = rec.body
        model = body.get("model") if body is not None else None
        model = model if isinstance(model, str) else None
        streaming = body is not None and body.get("stream") is True
        if self.api_key is not None and request.headers.get("x-api-key") != self.api_key:
            return _error(401, "bad or missing X-Api-Key")
        fault = self.take_fault(request, model=model, endpoint="chat")
        if fault is not None:
            refused = await self.apply_fault(request, fault, model, streaming=streaming)
            if refused is not None:
                return refused
        if body is None or not isinstance(body.get("input"), list):
            return _error(400, "input must be a list of messages")
        if model not in self.models:
            return _error(404, f"no model named {model!r}")
        prompt = sum(approx_tokens(str(m.get("content", ""))) for m in body["input"])
        pieces = split_text(self.reply_text, self.chunks)
        reason = "end"
        limit = (body.get("params") or {}).get("max_new_tokens")
        if isinstance(limit, int) and 0 < limit < len(pieces):
            pieces, reason = pieces[:limit], "max_tokens"
        usage = {"input": prompt, "output": len(pieces)} if self.report_usage else None
        if not streaming:
            await asyncio.sleep(self.first_token_delay)
            answer: JsonDict = {"output": {"text": "".join(pieces), "stop_reason": reason}}
            if usage is not None:
                answer["usage"] = usage
            return json_response(answer)
        events = [
            (
                self.first_token_delay if i == 0 else self.chunk_delay,
                self._frame({"delta": {"text": p}}),
            )
            for i, p in enumerate(pieces)
        ]
        final: JsonDict = {"done_reason": reason}
        if usage is not None:
            final["usage"] = usage
        events.append((0.0, self._frame(final)))
        if self.stream_format == "sse":
            events.append((0.0, self._frame("[DONE]")))
        message = fault.message if fault is not None and fault.message else "generation crashed"
        content_type = (
            "text/event-stream" if self.stream_format == "sse" else "application/x-ndjson"
        )
        return await self.write_stream(
            request,
            web.StreamResponse(headers={"content-type": content_type}),
            events,
            malformed=self._frame('{"delta": {"te'),
            error_event=self._frame({"error": {"message": message}}),
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the fake custom-format upstream.")
    add_knob_arguments(parser, default_port=8089)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated")
    parser.add_argument("--stream-format", choices=["sse", "ndjson"], default="sse")
    parser.add_argument("--no-usage", action="store_true", help="never report token counts")
    args = parser.parse_args(argv)
    fake = FakeCustom(
        models=[m for m in args.models.split(",") if m],
        stream_format=args.stream_format,
        report_usage=not args.no_usage,
        **knobs_from(args),
    )
    asyncio.run(fake.serve_forever(args.host, args.port))


if __name__ == "__main__":
    main()
