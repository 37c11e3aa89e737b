"""The one server interceptor that maps exceptions to rich gRPC statuses.

Servicers raise :class:`~services.common.errors.OrchestraError`; this turns it
into ``context.abort_with_status``. ``NotImplementedError`` (what the generated
base servicer raises for an RPC a service does not offer yet) becomes
UNIMPLEMENTED. Anything else is a bug: it is logged with an
incident id and the client gets INTERNAL with that id, never a stack trace.
A request whose bytes do not parse as the RPC's request message is answered
INVALID_ARGUMENT MALFORMED_REQUEST (grpc itself would answer UNKNOWN).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from orchestra.common.v1 import errors_pb2
from services.common.errors import Internal, InvalidArgument, OrchestraError

log = logging.getLogger(__name__)

_Context = grpc.aio.ServicerContext[Any, Any]
_Unary = Callable[[Any, _Context], Awaitable[Any]]
_Stream = Callable[[Any, _Context], AsyncIterator[Any]]


# asyncpg's character_not_in_repertoire and untranslatable_character.
_UNSTORABLE_TEXT = frozenset({"22021", "22P05"})


def as_error(exc: BaseException, method: str) -> OrchestraError:
    """``exc`` itself if it is an OrchestraError; anything else is a bug, logged
    with an incident id and answered as INTERNAL naming only that id."""
    if isinstance(exc, OrchestraError):
        return exc
    if getattr(exc, "sqlstate", None) in _UNSTORABLE_TEXT:
        # A string PostgreSQL text cannot hold (NUL) that no check caught:
        # the client's input, not a bug.
        return InvalidArgument(
            errors_pb2.ERROR_REASON_INVALID_FIELD,
            "a text field holds a character that cannot be stored (NUL)",
        )
    incident = uuid.uuid4().hex[:12]
    log.exception("unhandled error in %s (incident %s)", method, incident, exc_info=exc)
    return Internal(
        errors_pb2.ERROR_REASON_INTERNAL,
        f"internal error; incident {incident}",
        metadata={"incident_id": incident},
    )


async def _abort(context: _Context, exc: BaseException, method: str) -> None:
    if isinstance(exc, NotImplementedError):
        # The generated base servicer's answer for an RPC a service does not offer yet.
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented yet")
    await context.abort_with_status(as_error(exc, method).to_status())


class _Undecodable:
    """What the tolerant deserializer returns for bytes that do not parse.

    grpc's own answer to a deserializer error is UNKNOWN "Unexpected
    DecodeError" with no ErrorInfo; the handler answers this with
    INVALID_ARGUMENT MALFORMED_REQUEST instead.
    """

    __slots__ = ("complaint",)

    def __init__(self, complaint: str) -> None:
        self.complaint = complaint

    def refusal(self, method: str) -> InvalidArgument:
        return InvalidArgument(
            errors_pb2.ERROR_REASON_MALFORMED_REQUEST,
            f"the request is not a valid {method} request message: {self.complaint}",
            metadata={"error": self.complaint},
        )


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError, or a string that is not UTF-8
            return _Undecodable(str(exc) or type(exc).__name__)

    return deserialize


async def _checked(requests: AsyncIterator[Any], method: str) -> AsyncIterator[Any]:
    """A client stream's messages; raises at the first that did not parse."""
    async for request in requests:
        if type(request) is _Undecodable:
            raise request.refusal(method)
        yield request


def _wrap_unary(behavior: _Unary, method: str) -> _Unary:
    async def handler(request: Any, context: _Context) -> Any:
        try:
            if type(request) is _Undecodable:
                raise request.refusal(method)
            return await behavior(request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status, see module doc
            await _abort(context, exc, method)

    return handler


def _wrap_stream(behavior: _Stream, method: str, *, client_streams: bool = False) -> _Stream:
    if not inspect.isasyncgenfunction(behavior):
        # The other style grpc.aio allows: a coroutine that sends its messages
        # with context.write (grpc_health's Watch, which client-side health
        # checking calls, is one).
        return _wrap_unary(behavior, method)  # type: ignore[arg-type,return-value]

    async def handler(request: Any, context: _Context) -> AsyncIterator[Any]:
        try:
            if client_streams:
                request = _checked(request, method)
            elif type(request) is _Undecodable:
                raise request.refusal(method)
            async for item in behavior(request, context):
                yield item
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status, see module doc
            await _abort(context, exc, method)

    return handler


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions raised by unary-unary, unary-stream and bidirectional
    handlers to statuses."""

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method),  # type: ignore[arg-type]
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method),  # type: ignore[arg-type]
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                _wrap_stream(handler.stream_stream, method, client_streams=True),  # type: ignore[arg-type]
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler  # no client-streaming-only RPCs in our contracts
