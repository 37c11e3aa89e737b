"""A provider the operator describes: URL, token, a request template and JSON paths.

For an in-house or niche API that speaks none of the known formats. The
configuration (:class:`services.common.config_file.CustomMapping`) gives the
body to POST, with placeholders for the model, the conversation and the
sampling controls, and JMESPath expressions for where the answer keeps its
text, finish reason and token counts. With ``stream`` set, the request asks for
a stream and each SSE event or NDJSON line is read with the stream's paths;
without it, one JSON answer becomes the same events.

A provider that reports no token counts gets no UsageReport from here: the
engine then counts the tokens itself and marks the usage estimated.
Tools are not mapped (a custom provider answers text only).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any

import jmespath
from jmespath.parser import ParsedResult

from orchestra.common.v1 import chat_pb2
from services.common.config_file import (
    CUSTOM_PLACEHOLDERS,
    PLACEHOLDER,
    CustomAnswer,
    CustomMapping,
    CustomStream,
)
from services.providers import http
from services.providers.base import (
    ROLE_NAMES,
    Event,
    FailureKind,
    Finish,
    TextDelta,
    UpstreamError,
    UpstreamRequest,
    UsageReport,
)

log = logging.getLogger(__name__)

_FINISH = {
    "stop": chat_pb2.FINISH_REASON_STOP,
    "length": chat_pb2.FINISH_REASON_LENGTH,
    "tool_calls": chat_pb2.FINISH_REASON_TOOL_CALLS,
    "content_filter": chat_pb2.FINISH_REASON_CONTENT_FILTER,
    "error": chat_pb2.FINISH_REASON_ERROR,
}
_UNSET = object()


def _text(message: chat_pb2.Message) -> str:
    return "".join(p.text for p in message.content if p.WhichOneof("part") == "text")


def placeholders(request: UpstreamRequest, *, stream: bool) -> dict[str, Any]:
    """The values the request template may use; unset sampling controls are absent."""
    gen = request.generation
    messages = [{"role": ROLE_NAMES[m.role], "content": _text(m)} for m in request.messages]
    users = [m["content"] for m in messages if m["role"] == "user"]
    values: dict[str, Any] = {
        "model": request.model_id,
        "messages": messages,
        "prompt": "\n".join(f"{m['role']}: {m['content']}" for m in messages),
        "system": "\n".join(m["content"] for m in messages if m["role"] == "system"),
        "last_user": users[-1] if users else "",
        "stream": stream,
    }
    if gen.max_tokens:
        values["max_tokens"] = gen.max_tokens
    for name in ("temperature", "top_p", "seed"):
        if gen.HasField(name):
            values[name] = getattr(gen, name)
    if gen.stop:
        values["stop"] = list(gen.stop)
    return values


def render(template: Any, values: Mapping[str, Any]) -> Any:
    """``template`` with its placeholders filled (see CustomMapping).

    Raises:
        ValueError: A placeholder that does not exist.
    """
    if isinstance(template, dict):
        out = {}
        for key, item in template.items():
            value = render(item, values)
            if value is not _UNSET:
                out[key] = value
        return out
    if isinstance(template, list):
        return [v for v in (render(item, values) for item in template) if v is not _UNSET]
    if not isinstance(template, str):
        return template
    whole = PLACEHOLDER.fullmatch(template.strip())
    if whole:
        _known(whole.group(1))
        return values.get(whole.group(1), _UNSET)

    def text(match: re.Match[str]) -> str:
        _known(match.group(1))
        value = values.get(match.group(1), "")
        return value if isinstance(value, str) else json.dumps(value)

    return PLACEHOLDER.sub(text, template)


def _known(name: str) -> None:
    if name not in CUSTOM_PLACEHOLDERS:
        known = ", ".join(sorted(CUSTOM_PLACEHOLDERS))
        raise ValueError(f"unknown placeholder {{{{{name}}}}}; known: {known}")


@dataclasses.dataclass(frozen=True)
class _Paths:
    """Compiled JMESPath expressions of one answer shape."""

    text: ParsedResult
    finish_reason: ParsedResult | None
    prompt_tokens: ParsedResult | None
    completion_tokens: ParsedResult | None
    error: ParsedResult | None

    @classmethod
    def of(cls, answer: CustomAnswer) -> _Paths:
        def compiled(expression: str) -> ParsedResult | None:
            return jmespath.compile(expression) if expression else None

        return cls(
            text=jmespath.compile(answer.text),
            finish_reason=compiled(answer.finish_reason),
            prompt_tokens=compiled(answer.prompt_tokens),
            completion_tokens=compiled(answer.completion_tokens),
            error=compiled(answer.error),
        )


def _search(path: ParsedResult | None, data: Any) -> Any:
    return path.search(data) if path is not None else None


class _Reader:
    """Turns answers (or stream events) into gateway events with one set of paths."""

    def __init__(self, paths: _Paths, finish_reasons: Mapping[str, str]) -> None:
        self._paths = paths
        self._finish_reasons = finish_reasons
        self.finished = False

    def error(self, data: Any) -> str | None:
        found = _search(self._paths.error, data)
        if found in (None, "", [], {}):
            return None
        return found if isinstance(found, str) else json.dumps(found)

    def read(self, data: Any) -> list[Event]:
        """The events in ``data``, or the failure its error says (SERVER_ERROR)."""
        if (message := self.error(data)) is not None:
            raise UpstreamError(FailureKind.SERVER_ERROR, message)
        return self.events(data)

    def events(self, data: Any) -> list[Event]:
        events: list[Event] = []
        text = _search(self._paths.text, data)
        if isinstance(text, list):  # e.g. content[].text: the parts of one answer
            text = "".join(t for t in text if isinstance(t, str))
        if isinstance(text, str) and text:
            events.append(TextDelta(text))
        elif text not in (None, ""):
            raise UpstreamError(
                FailureKind.MALFORMED, f"the text path gave {type(text).__name__}, not text"
            )
        prompt = _search(self._paths.prompt_tokens, data)
        completion = _search(self._paths.completion_tokens, data)
        if isinstance(prompt, int) or isinstance(completion, int):
            events.append(
                UsageReport(
                    prompt_tokens=prompt if isinstance(prompt, int) else 0,
                    completion_tokens=completion if isinstance(completion, int) else 0,
                )
            )
        reason = _search(self._paths.finish_reason, data)
        if reason not in (None, ""):
            events.append(Finish(self._finish(str(reason))))
            self.finished = True
        return events

    def _finish(self, value: str) -> chat_pb2.FinishReason.ValueType:
        name = self._finish_reasons.get(value, value)
        if name not in _FINISH:
            log.debug("unmapped finish reason %r taken as stop", value)
        return _FINISH.get(name, chat_pb2.FINISH_REASON_STOP)


class CustomAdapter(http.HttpAdapter):
    """A provider described by a :class:`CustomMapping`."""

    def __init__(
        self,
        provider_id: str,
        base_url: str,
        mapping: CustomMapping,
        *,
        credential: str = "",
        headers: Mapping[str, str] | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
    ) -> None:
        self._mapping = mapping  # read by _auth, from the base's __init__
        self._answer = _Paths.of(mapping.response)
        self._stream = _Paths.of(mapping.stream) if mapping.stream is not None else None
        super().__init__(
            provider_id,
            base_url,
            credential=credential,
            headers=headers,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )

    def _auth(self, credential: str) -> dict[str, str]:
        mapping = self._mapping
        return http.credential_header(mapping.auth_header, credential, mapping.auth_prefix)

    def _path(self, request: UpstreamRequest) -> str:
        return self._mapping.path.lstrip("/")

    def _body(self, request: UpstreamRequest) -> Any:
        return render(self._mapping.request, placeholders(request, stream=self._stream is not None))

    async def _events(self, answer: http.Answer) -> AsyncIterator[Event]:
        finish = self._mapping.finish_reasons
        if self._stream is None or self._mapping.stream is None:
            reader = _Reader(self._answer, finish)
            data = _json(await answer.read())
            for event in reader.read(data):
                yield event
            if not reader.finished:
                yield Finish(chat_pb2.FINISH_REASON_STOP)
            return
        config: CustomStream = self._mapping.stream
        reader = _Reader(self._stream, finish)
        ended = False
        frames = http.sse_data(answer) if config.format == "sse" else http.ndjson_lines(answer)
        async for payload in frames:
            if config.done and payload == config.done:
                ended = True
                break
            data = _json(payload.encode())
            for event in reader.read(data):
                yield event
        # The end marker or a finish reason ends a stream; a provider that has
        # neither configured ends it by closing the body.
        if not (ended or reader.finished or (not config.done and not config.finish_reason)):
            raise UpstreamError(FailureKind.STREAM_BROKEN, "the stream ended before its end")
        if not reader.finished:
            yield Finish(chat_pb2.FINISH_REASON_STOP)

    def _error(self, status: int, body: bytes, headers: http.Headers) -> UpstreamError:
        return http.json_error(status, body, headers, _Reader(self._answer, {}).error)


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        raise UpstreamError(
            FailureKind.MALFORMED, f"not JSON: {http.body_preview(raw)[:80]!r}"
        ) from None
