"""Calling any public RPC generically through the edge, and judging its answer.

:func:`start_suite` starts ``orchestra up`` (:class:`bench.suite.Suite`, no
local model) with the OpenAI-wire fake as its only provider and two keys on
one tenant: ``admin`` holds every scope, ``reader`` only chat and read.

The RPCs come from the generated descriptors (every ``orchestra.*.v1``
service in ``gen/``), so a new RPC is fuzzed without touching this file.
Requests go out as raw bytes on a ``grpc.aio`` channel (``unary_unary``,
``unary_stream`` or ``stream_stream``, by the method's shape), so damaged
bodies reach the server exactly as drawn. An answer is good when it is a
success whose messages parse as the method's output type, or a refusal with
a precise code (never INTERNAL or UNKNOWN, and never UNAVAILABLE: the suite is
healthy while fuzzed) and a ``google.rpc.Status`` in ``grpc-status-details-bin``
that carries an ``ErrorInfo`` reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import pkgutil
import subprocess
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import message_factory, text_format
from google.protobuf.descriptor import Descriptor, MethodDescriptor
from google.rpc import error_details_pb2, status_pb2

import orchestra
from bench.suite import Suite, start_fake_upstream
from services.common.errors import DOMAIN

DETAILS = "grpc-status-details-bin"
UNARY_DEADLINE = 15.0
STREAM_DEADLINE = 15.0
# A server stream is read this far (or until it idles this long after its first
# message), then cancelled: WatchModels never ends by itself.
STREAM_READ = 4
STREAM_IDLE = 1.0
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
AUTHS = ("admin", "reader", "none", "garbled", "forged")
ROOT = Path(__file__).resolve().parents[2]
MODEL = "gpt-4o-mini"  # a catalog model, so it is priced and routable
CONFIG = """
providers:
  - id: fake
    type: openai_compatible
    base_url: {url}
tenants:
  - id: fuzz
    policy: {{cache_enabled: true}}
    api_keys:
      - {{id: fuzzadmin, secret: {admin}, scopes: [chat, read, admin, operator]}}
      - {{id: fuzzreader, secret: {reader}, scopes: [chat, read]}}
    budgets:
      - {{level: tenant, window: month, limit_usd: 1000000}}
routing:
  default_max_tokens: 16
"""


@dataclasses.dataclass(frozen=True)
class Rpc:
    """One public method, as the descriptors describe it."""

    path: str  # /orchestra.x.v1.Service/Method
    input: Descriptor
    output: Descriptor
    client_streaming: bool
    server_streaming: bool

    @property
    def name(self) -> str:
        """``Service/Method`` without the package."""
        return self.path.rsplit(".", 1)[1]


def _rpc(method: MethodDescriptor) -> Rpc:
    return Rpc(
        path=f"/{method.containing_service.full_name}/{method.name}",
        input=method.input_type,
        output=method.output_type,
        client_streaming=method.client_streaming,
        server_streaming=method.server_streaming,
    )


def public_rpcs() -> list[Rpc]:
    """Every method of every ``orchestra.*.v1`` service, sorted by path."""
    found: dict[str, Rpc] = {}
    for info in pkgutil.walk_packages(orchestra.__path__, "orchestra."):
        if not info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(info.name)
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                found[f"/{service.full_name}/{method.name}"] = _rpc(method)
    return [found[path] for path in sorted(found)]


@dataclasses.dataclass(frozen=True)
class Keys:
    """The suite's API keys: ``admin`` holds every scope, ``reader`` only chat and read."""

    admin: str
    reader: str


KEYS = Keys(
    admin="ok_fuzzadmin_0123456789abcdefghijklmnop",
    reader="ok_fuzzreader_0123456789abcdefghijklmno",
)


def start_suite() -> tuple[Suite, subprocess.Popen[bytes]]:
    """Starts the fake upstream and the suite; returns both (stop them in reverse)."""
    upstream, url = start_fake_upstream(latency_ms=1, chunks=2, model=MODEL)
    suite = Suite(ROOT, CONFIG.format(url=url, admin=KEYS.admin, reader=KEYS.reader), "fuzz")
    try:
        suite.start()
    except BaseException:
        upstream.terminate()
        raise
    return suite, upstream


def metadata(auth: str, keys: Keys, garbage: str) -> tuple[tuple[str, str], ...]:
    """Call metadata for one of :data:`AUTHS` (``garbage``: printable ASCII)."""
    if auth == "admin":
        return (("authorization", f"Bearer {keys.admin}"),)
    if auth == "reader":
        return (("authorization", f"Bearer {keys.reader}"),)
    if auth == "garbled":
        return (("authorization", f"Bearer {garbage}" if garbage[:1] != "B" else garbage),)
    if auth == "forged":  # the edge strips a client's identity header before any filter
        return (("x-orchestra-identity", garbage or "forged"),)
    return ()


@dataclasses.dataclass(frozen=True)
class Answer:
    """What one call got: ``outcome`` is ``OK`` or ``CODE/REASON``; ``problem`` "" if good."""

    outcome: str
    problem: str = ""
    message: str = ""

    @property
    def ok(self) -> bool:
        """Whether the call succeeded."""
        return self.outcome == "OK"


def judge_refusal(code: grpc.StatusCode, message: str, trailers: Sequence[Any]) -> Answer:
    """Judges a failed call by its code and the rich status in its trailers."""
    raw = next((v for k, v in trailers if k == DETAILS), None)
    info = None
    status = status_pb2.Status()
    if raw is not None:
        try:
            status.ParseFromString(raw if isinstance(raw, bytes) else raw.encode())
        except Exception:  # noqa: BLE001 - any parse failure is the finding
            status = status_pb2.Status(code=-1)
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
    reason = info.reason if info is not None else ""
    outcome = f"{code.name}/{reason or '-'}"
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        problem = f"{code.name} answer"
    elif code == grpc.StatusCode.UNAVAILABLE and reason != "UPSTREAM_UNAVAILABLE":
        # Every part of the suite is up while fuzzed (only the fake provider may refuse).
        problem = "UNAVAILABLE from a healthy suite: the input broke the edge or a service"
    elif raw is None:
        problem = f"no {DETAILS} trailer"
    elif info is None or not reason:
        problem = "no ErrorInfo reason in the status details"
    elif status.code != code.value[0]:
        problem = f"details say code {status.code}, the call {code.value[0]}"
    elif info.domain != DOMAIN:
        problem = f"ErrorInfo domain {info.domain!r}"
    else:
        problem = ""
    return Answer(outcome, problem, message)


def parses_as(descriptor: Descriptor, body: bytes) -> bool:
    """Whether ``body`` parses as a message of ``descriptor``'s type."""
    try:
        message_factory.GetMessageClass(descriptor).FromString(body)
    except Exception:  # noqa: BLE001 - DecodeError, or any other refusal to parse
        return False
    return True


def values(descriptor: Descriptor, body: bytes) -> list[tuple[str, Any]]:
    """Every value anywhere in ``body`` as (type or field full name, value); [] if unparsable.

    A message value is listed under its type's full name (``google.protobuf.Timestamp``)
    and then walked; a scalar under its field's full name; map keys count as strings.
    """
    try:
        message = message_factory.GetMessageClass(descriptor).FromString(body)
    except Exception:  # noqa: BLE001 - see parses_as
        return []
    found: list[tuple[str, Any]] = []
    _walk(message, found)
    return found


def _walk(message: Any, found: list[tuple[str, Any]]) -> None:
    found.append((message.DESCRIPTOR.full_name, message))
    for field, value in message.ListFields():
        if hasattr(value, "keys"):  # a map: keys, then values
            found.extend((field.full_name, key) for key in value)
            items = list(value.values())
        else:
            items = list(value) if field.is_repeated else [value]
        for item in items:
            if hasattr(item, "ListFields"):
                _walk(item, found)
            else:
                found.append((field.full_name, item))


def longest_string(descriptor: Descriptor, body: bytes) -> int:
    """The length of the longest string or bytes value anywhere in ``body`` (0 if unparsable)."""
    lengths = [len(v) for _, v in values(descriptor, body) if isinstance(v, str | bytes)]
    return max(lengths, default=0)


def _parses(rpc: Rpc, body: bytes) -> str:
    try:
        message_factory.GetMessageClass(rpc.output).FromString(body)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the finding
        return f"response does not parse as {rpc.output.full_name}: {exc}"
    return ""


async def _requests(bodies: Sequence[bytes]) -> AsyncIterator[bytes]:
    for body in bodies:
        yield body


async def call(
    channel: grpc.aio.Channel,
    rpc: Rpc,
    bodies: Sequence[bytes],
    meta: tuple[tuple[str, str], ...],
) -> Answer:
    """Sends ``bodies`` (one for a unary request, a stream otherwise) and judges the answer."""
    read = 0
    raw: Any = channel  # bytes in, bytes out: no serializers, so typed stubs do not apply
    try:
        if rpc.client_streaming:
            stream = raw.stream_stream(rpc.path)(
                _requests(bodies), metadata=meta, timeout=STREAM_DEADLINE
            )
        elif rpc.server_streaming:
            stream = raw.unary_stream(rpc.path)(bodies[0], metadata=meta, timeout=STREAM_DEADLINE)
        else:
            reply = await raw.unary_unary(rpc.path)(
                bodies[0], metadata=meta, timeout=UNARY_DEADLINE
            )
            return Answer("OK", _parses(rpc, reply))
        while read < STREAM_READ:
            try:  # the first message may take until the deadline; later ones are awaited briefly
                item = await asyncio.wait_for(stream.read(), STREAM_IDLE if read else None)
            except TimeoutError:
                break  # an open stream with nothing more to say yet (WatchModels)
            if item is grpc.aio.EOF:
                return Answer("OK")
            read += 1
            if problem := _parses(rpc, item):
                return Answer("OK", problem)
        stream.cancel()
        return Answer("OK")
    except grpc.aio.AioRpcError as exc:
        code, trailers = exc.code(), exc.trailing_metadata() or ()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and not trailers:
            return Answer(f"{code.name}/client", f"no answer within the deadline ({read} read)")
        return judge_refusal(code, exc.details() or "", tuple(trailers))


def describe(rpc: Rpc, bodies: Sequence[bytes], auth: str, garbage: str) -> str:
    """A reproducer: the RPC, the auth, and each body as hex and in text format."""
    parts = [f"rpc {rpc.path}  auth={auth} garbage={garbage!r}"]
    cls = message_factory.GetMessageClass(rpc.input)
    for body in bodies:
        shown = body.hex() if len(body) <= 600 else f"{body[:600].hex()}... ({len(body)} bytes)"
        parts.append(f"  body (hex): {shown}")
        try:
            text = text_format.MessageToString(cls.FromString(body), as_utf8=True)
        except Exception:  # noqa: BLE001 - a damaged body may not parse at all
            parts.append("  body (text): does not parse")
            continue
        shown = text if len(text) <= 600 else f"{text[:600]}... ({len(text)} chars)"
        parts.append(f"  body (text): {shown!r}")
    return "\n".join(parts)
