"""The exact cache key: a canonical form of a ``CacheKey`` and its SHA-256.

Two requests share an entry exactly when their canonical forms are equal. The
canonical form is a plain dict (never raw protobuf bytes, whose field order and
default handling are not a stable contract) serialised as sorted-keys,
separator-free JSON and hashed with SHA-256. It holds:

* the tenant, by construction: the tenant is a field of the hashed document, so
  two tenants can never produce the same digest, whatever their ids look like
  (a prefix of another, containing ``:`` …);
* the model, exactly as given;
* every message: role, name, content parts (text normalised as described
  below; images by URL and detail), tool calls and ``tool_call_id``;
* every generation parameter (temperature, top_p, max_tokens, stop,
  response_format, seed, penalties) and the tools offered.

Normalisation only removes differences that cannot change what a model is
asked; anything doubtful stays part of the key, because a wrong hit is worse
than a miss:

* text: Unicode NFC, CRLF/CR to LF, trailing whitespace of each line removed,
  runs of spaces/tabs inside a line collapsed to one space, runs of blank lines
  collapsed to one, leading and trailing blank space of the whole text removed.
  Indentation at the start of a line is kept (it is meaning in code and YAML).
  Text parts that become empty are dropped.
* stop sequences are a set: sorted and de-duplicated, but never trimmed.
* ``RESPONSE_FORMAT_TYPE_UNSPECIFIED`` and ``_TEXT`` both mean plain text.
* floats are rounded to 6 decimals (they arrive as float32) and -0.0 is 0.0;
  an unset optional parameter (the provider's default) differs from any value.
* tool-call ids are opaque provider tokens: they are replaced by their order
  of first appearance, and ``tool_call_id`` by a reference to that order, so
  two identical agent loops hit even though their providers drew other ids.
* tool-call arguments that parse as JSON are compared as JSON values.

The document carries a version: changing the normalisation bumps it, so old
entries simply stop matching instead of matching wrongly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf import descriptor, json_format, struct_pb2

from orchestra.cache.v1 import cache_service_pb2
from orchestra.common.v1 import chat_pb2, errors_pb2
from services.common.errors import InvalidArgument

KEY_VERSION = 1
DIGEST_LENGTH = 64  # hex characters of a SHA-256
MAX_ID_LENGTH = 256  # tenant ids, model names

# Horizontal whitespace: every Unicode space except the newline itself.
_HSPACE = re.compile(r"[^\S\n]+")
_BLANK_RUNS = re.compile(r"\n{3,}")

# Documented ranges of GenerationConfig (chat.proto).
_RANGES: Mapping[str, tuple[float, float]] = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
}


@dataclasses.dataclass(frozen=True)
class NormalisedKey:
    """A validated cache key in canonical form.

    Attributes:
        tenant: The tenant the key belongs to.
        model: The model (or model class) of the key.
        digest: SHA-256 of the canonical document, 64 lowercase hex digits.
            It is also the id of the entry stored under this key.
        canonical: The canonical document itself (later layers read the
            normalised conversation from it).
    """

    tenant: str
    model: str
    digest: str
    canonical: Mapping[str, Any]


def normalise_text(text: str) -> str:
    """Returns ``text`` with differences of whitespace and encoding removed.

    See the module docstring for the exact rules.
    """
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    lines = []
    for line in text.split("\n"):
        body = line.lstrip()
        indent = line[: len(line) - len(body)]
        body = _HSPACE.sub(" ", body).rstrip()
        lines.append(indent + body if body else "")
    return _BLANK_RUNS.sub("\n\n", "\n".join(lines)).strip()


def normalise(key: cache_service_pb2.CacheKey, field: str = "key") -> NormalisedKey:
    """Validates ``key`` and computes its canonical form and digest.

    Args:
        key: The key of a Lookup or Store request.
        field: Its path in the request, for error messages.

    Raises:
        InvalidArgument: EMPTY_MESSAGES when the conversation has no message
            with content; INVALID_FIELD (naming the field) for a missing
            tenant or model, a message without a role, or a parameter outside
            its documented range.
    """
    tenant = _required_id(key.tenant_id, f"{field}.tenant_id")
    model = _required_id(key.model, f"{field}.model")
    canonical = {
        "v": KEY_VERSION,
        "tenant": tenant,
        "model": model,
        "messages": _messages(key.messages, f"{field}.messages"),
        "generation": _generation(key.generation, f"{field}.generation"),
        "tools": _tools(key.tools, f"{field}.tools"),
    }
    document = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(document.encode("utf-8")).hexdigest()
    return NormalisedKey(tenant=tenant, model=model, digest=digest, canonical=canonical)


def is_digest(text: str) -> bool:
    """Whether ``text`` has the form of an entry id (64 lowercase hex digits)."""
    return len(text) == DIGEST_LENGTH and is_hex(text)


def is_hex(text: str) -> bool:
    """Whether ``text`` is a non-empty run of lowercase hex digits."""
    return bool(text) and all(c in "0123456789abcdef" for c in text)


# --- validation helpers ----------------------------------------------------


def invalid(field: str, message: str) -> InvalidArgument:
    """An INVALID_FIELD error naming ``field``."""
    return InvalidArgument(errors_pb2.ERROR_REASON_INVALID_FIELD, message, field=field)


def _required_id(value: str, field: str) -> str:
    if not value:
        raise invalid(field, f"{field} is required")
    if len(value) > MAX_ID_LENGTH:
        raise invalid(field, f"{field} is longer than {MAX_ID_LENGTH} characters")
    return value


# --- messages --------------------------------------------------------------


def _messages(messages: Sequence[chat_pb2.Message], field: str) -> list[dict[str, Any]]:
    if not messages:
        raise InvalidArgument(
            errors_pb2.ERROR_REASON_EMPTY_MESSAGES, f"{field} is empty", field=field
        )
    refs: dict[str, int] = {}
    out = []
    for i, message in enumerate(messages):
        here = f"{field}[{i}]"
        if message.role not in chat_pb2.Role.values() or message.role == chat_pb2.ROLE_UNSPECIFIED:
            raise invalid(f"{here}.role", f"{here}.role must be set")
        calls = []
        for call in message.tool_calls:
            # Ids are numbered in order of first appearance across the conversation.
            ref = refs.setdefault(call.id, len(refs)) if call.id else None
            calls.append(
                {
                    "id": {"ref": ref} if ref is not None else {"raw": ""},
                    "name": call.name,
                    "arguments": _arguments(call.arguments),
                }
            )
        answered: dict[str, Any] | None = None
        if message.tool_call_id:
            known = refs.get(message.tool_call_id)
            answered = {"ref": known} if known is not None else {"raw": message.tool_call_id}
        out.append(
            {
                "role": chat_pb2.Role.Name(message.role),
                "name": message.name,
                "content": _content(message.content, f"{here}.content"),
                "tool_calls": calls,
                "tool_call_id": answered,
            }
        )
    if not any(m["content"] or m["tool_calls"] for m in out):
        raise InvalidArgument(
            errors_pb2.ERROR_REASON_EMPTY_MESSAGES,
            f"every message of {field} is empty",
            field=field,
        )
    return out


def _content(parts: Sequence[chat_pb2.ContentPart], field: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for j, part in enumerate(parts):
        kind = part.WhichOneof("part")
        if kind == "text":
            text = normalise_text(part.text)
            if text:
                out.append({"text": text})
        elif kind == "image_url":
            if not part.image_url.url:
                raise invalid(f"{field}[{j}].image_url.url", "an image part needs a url")
            detail = _enum_name(chat_pb2.ImageDetail.DESCRIPTOR, part.image_url.detail)
            out.append({"image": {"url": part.image_url.url, "detail": detail}})
        else:
            raise invalid(f"{field}[{j}]", f"{field}[{j}] has neither text nor image_url")
    return out


def _arguments(arguments: str) -> dict[str, Any]:
    try:
        return {"json": json.loads(arguments)}
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
        return {"text": arguments}


# --- generation parameters and tools ---------------------------------------


def _number(config: chat_pb2.GenerationConfig, name: str, field: str) -> float | None:
    if not config.HasField(name):  # type: ignore[arg-type]
        return None
    value = float(getattr(config, name))
    low, high = _RANGES[name]
    if not math.isfinite(value) or not low <= value <= high:
        raise invalid(f"{field}.{name}", f"{field}.{name} must be between {low:g} and {high:g}")
    # float32 on the wire: round away the representation noise; + 0.0 turns -0.0 into 0.0.
    return round(value, 6) + 0.0


def _generation(config: chat_pb2.GenerationConfig, field: str) -> dict[str, Any]:
    max_tokens: int | None = None
    if config.HasField("max_tokens"):
        if config.max_tokens <= 0:
            raise invalid(f"{field}.max_tokens", f"{field}.max_tokens must be positive")
        max_tokens = config.max_tokens
    fmt = config.response_format
    fmt_type = fmt.type or chat_pb2.RESPONSE_FORMAT_TYPE_TEXT
    return {
        "temperature": _number(config, "temperature", field),
        "top_p": _number(config, "top_p", field),
        "presence_penalty": _number(config, "presence_penalty", field),
        "frequency_penalty": _number(config, "frequency_penalty", field),
        "max_tokens": max_tokens,
        "seed": config.seed if config.HasField("seed") else None,
        "stop": sorted(set(config.stop)),
        "response_format": {
            "type": _enum_name(chat_pb2.ResponseFormatType.DESCRIPTOR, fmt_type),
            "json_schema": _struct(fmt.json_schema) if fmt.HasField("json_schema") else None,
            "schema_name": fmt.schema_name,
        },
    }


def _tools(tools: Sequence[chat_pb2.Tool], field: str) -> list[dict[str, Any]]:
    out = []
    for i, tool in enumerate(tools):
        function = tool.function
        if not function.name:
            raise invalid(f"{field}[{i}].function.name", "a tool needs a function name")
        # Order is kept: it is what the model reads, and a miss is cheaper than a wrong hit.
        out.append(
            {
                "name": function.name,
                "description": function.description,
                "parameters": (
                    _struct(function.parameters) if function.HasField("parameters") else None
                ),
            }
        )
    return out


def _enum_name(enum: descriptor.EnumDescriptor, number: int) -> str:
    # proto3 enums are open: a newer client may send a value this build does not know.
    value = enum.values_by_number.get(number)
    return value.name if value is not None else str(number)


def _struct(value: struct_pb2.Struct) -> dict[str, Any]:
    plain: dict[str, Any] = json_format.MessageToDict(value)
    return plain
