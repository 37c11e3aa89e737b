"""The error model every Orchestra service shares.

Domain code raises an :class:`OrchestraError` subclass; one server interceptor
(:mod:`services.common.interceptors`) turns it into a ``google.rpc.Status``
carrying an ``ErrorInfo`` (reason from ``orchestra.common.v1.ErrorReason``,
domain ``orchestra.dev``) plus ``BadRequest``, ``QuotaFailure`` or
``RetryInfo`` where they fit. Clients decode it back with :func:`decode`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from orchestra.common.v1 import errors_pb2

DOMAIN = "orchestra.dev"
_REASON_PREFIX = "ERROR_REASON_"


def reason_name(reason: errors_pb2.ErrorReason.ValueType) -> str:
    """Returns the wire form of a reason: the enum name without its prefix."""
    return errors_pb2.ErrorReason.Name(reason).removeprefix(_REASON_PREFIX)


# A refusal may quote what the client sent ("got '...'"). Quoted in full, an
# 8 kB value made the status (grpc-message, percent-encoded, plus
# grpc-status-details-bin, which repeats the message) too large for the
# client's 16 KiB metadata limit or for Envoy's response headers: the client
# got RESOURCE_EXHAUSTED or a reset instead of the refusal. Limits in UTF-8 bytes.
MAX_MESSAGE_BYTES = 600
MAX_METADATA_BYTES = 200


def clip(text: str, limit: int) -> str:
    """``text``, cut to at most ``limit`` UTF-8 bytes, the cut marked with "..."."""
    encoded = text.encode("utf-8", "surrogatepass")
    if len(encoded) <= limit:
        return text
    return encoded[: limit - 3].decode("utf-8", "ignore") + "..."


class OrchestraError(Exception):
    """An error with a canonical gRPC code and an ``ErrorInfo`` reason.

    Attributes:
        code: The canonical gRPC status code.
        reason: One of ``orchestra.common.v1.ErrorReason``.
        metadata: Request specifics for ``ErrorInfo.metadata`` (never secrets).
        retry_after: Seconds after which a retry may succeed (adds ``RetryInfo``).
        field: The request field at fault (adds ``BadRequest``).
        quota_subject: What ran out (adds ``QuotaFailure``).
    """

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(
        self,
        reason: errors_pb2.ErrorReason.ValueType,
        message: str,
        *,
        metadata: Mapping[str, str] | None = None,
        retry_after: float | None = None,
        field: str | None = None,
        quota_subject: str | None = None,
    ) -> None:
        message = clip(message, MAX_MESSAGE_BYTES)
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.metadata = {k: clip(str(v), MAX_METADATA_BYTES) for k, v in (metadata or {}).items()}
        self.retry_after = retry_after
        self.field = field
        self.quota_subject = quota_subject
        self.forwarded_status: status_pb2.Status | None = None
        if field is not None:
            self.metadata.setdefault("field", field)

    @property
    def status_number(self) -> int:
        """The status code's number on the wire (``google.rpc.Status.code``)."""
        return _CODE_NUMBERS[self.code]

    def to_status(self) -> grpc.Status:
        """Builds the ``grpc.Status`` (with rich details) for this error."""
        result: grpc.Status = rpc_status.to_status(self.to_rpc_status())
        return result

    def to_rpc_status(self) -> status_pb2.Status:
        """This error as a ``google.rpc.Status``: code, message, ErrorInfo and
        the other details (what a batch RPC returns for one failed item)."""
        if self.forwarded_status is not None:
            return self.forwarded_status
        details: list[any_pb2.Any] = []
        info = error_details_pb2.ErrorInfo(
            reason=reason_name(self.reason), domain=DOMAIN, metadata=self.metadata
        )
        details.append(_pack(info))
        if self.field is not None:
            details.append(
                _pack(
                    error_details_pb2.BadRequest(
                        field_violations=[
                            error_details_pb2.BadRequest.FieldViolation(
                                field=self.field, description=self.message
                            )
                        ]
                    )
                )
            )
        if self.quota_subject is not None:
            details.append(
                _pack(
                    error_details_pb2.QuotaFailure(
                        violations=[
                            error_details_pb2.QuotaFailure.Violation(
                                subject=self.quota_subject, description=self.message
                            )
                        ]
                    )
                )
            )
        if self.retry_after is not None:
            delay = duration_pb2.Duration()
            delay.FromMilliseconds(int(self.retry_after * 1000))
            details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
        return status_pb2.Status(code=self.status_number, message=self.message, details=details)


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


_CODE_NUMBERS: dict[grpc.StatusCode, int] = {code: code.value[0] for code in grpc.StatusCode}
_CODES: dict[int, grpc.StatusCode] = {number: code for code, number in _CODE_NUMBERS.items()}


class InvalidArgument(OrchestraError):
    """The request is malformed (INVALID_ARGUMENT)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(OrchestraError):
    """A named thing does not exist (NOT_FOUND)."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(OrchestraError):
    """A resource with that id exists (ALREADY_EXISTS)."""

    code = grpc.StatusCode.ALREADY_EXISTS


class Unauthenticated(OrchestraError):
    """No valid credential (UNAUTHENTICATED)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(OrchestraError):
    """A valid caller may not do this (PERMISSION_DENIED)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(OrchestraError):
    """A budget or rate limit is reached (RESOURCE_EXHAUSTED)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(OrchestraError):
    """The system is not in a state that allows this (FAILED_PRECONDITION)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(OrchestraError):
    """A dependency is down; retrying may help (UNAVAILABLE)."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(OrchestraError):
    """The caller's deadline expired (DEADLINE_EXCEEDED)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(OrchestraError):
    """A bug (INTERNAL)."""

    code = grpc.StatusCode.INTERNAL


# --- client side ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ErrorDetails:
    """What a client learns from a failed call.

    Attributes:
        code: The status code.
        message: The human-readable message.
        reason: The ``ErrorInfo`` reason ("" when the server sent none).
        metadata: The ``ErrorInfo`` metadata.
        retry_after: Seconds from ``RetryInfo``, if sent.
        field_violations: ``BadRequest`` field -> description.
    """

    code: grpc.StatusCode
    message: str
    reason: str = ""
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)
    retry_after: float | None = None
    field_violations: Mapping[str, str] = dataclasses.field(default_factory=dict)


def decode(error: grpc.RpcError) -> ErrorDetails:
    """Decodes the rich status of a failed call (sync or asyncio stubs).

    Args:
        error: The exception a stub raised.

    Returns:
        The status code, message, and whatever details the server attached.
    """
    call = error  # grpc.Call and grpc.aio.AioRpcError both carry the trailers
    code: grpc.StatusCode = call.code()
    message: str = call.details() or ""
    status = _status_from_trailers(call)
    if status is None:
        return ErrorDetails(code=code, message=message)
    return _details(code, message, status)


def decode_status(status: status_pb2.Status) -> ErrorDetails:
    """Decodes a ``google.rpc.Status`` sent as data (a batch or stream item's error)."""
    return _details(_CODES.get(status.code, grpc.StatusCode.UNKNOWN), status.message, status)


def _details(code: grpc.StatusCode, message: str, status: status_pb2.Status) -> ErrorDetails:
    reason, metadata, retry_after, fields = "", {}, None, {}
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.ToMilliseconds() / 1000
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields = {v.field: v.description for v in bad.field_violations}
    return ErrorDetails(code, message, reason, metadata, retry_after, fields)


def from_rpc_error(error: grpc.RpcError, *, dependency: str) -> OrchestraError:
    """Re-raises a peer service's failure to our own caller, details intact.

    A failure with an Orchestra ErrorInfo keeps its code, reason, metadata and
    RetryInfo; one without (the peer is down, say) becomes UNAVAILABLE
    DEPENDENCY_UNAVAILABLE naming the peer.
    """
    return _forward(decode(error), _status_from_trailers(error), dependency)


def from_rpc_status(status: status_pb2.Status, *, dependency: str) -> OrchestraError:
    """Like `from_rpc_error`, for the status of one item of a batch or stream."""
    return _forward(decode_status(status), status, dependency)


def dependency_unavailable(dependency: str, why: str) -> Unavailable:
    """UNAVAILABLE DEPENDENCY_UNAVAILABLE: a peer service did not answer."""
    return Unavailable(
        errors_pb2.ERROR_REASON_DEPENDENCY_UNAVAILABLE,
        f"the {dependency} service did not answer: {why}",
        metadata={"dependency": dependency},
        retry_after=1.0,
    )


def _forward(
    details: ErrorDetails, status: status_pb2.Status | None, dependency: str
) -> OrchestraError:
    if details.reason:
        try:
            reason = errors_pb2.ErrorReason.Value(_REASON_PREFIX + details.reason)
        except ValueError:
            reason = errors_pb2.ERROR_REASON_INTERNAL
        forwarded = OrchestraError(
            reason, details.message, metadata=details.metadata, retry_after=details.retry_after
        )
        forwarded.code = details.code
        forwarded.forwarded_status = status  # every detail, as sent
        return forwarded
    return dependency_unavailable(dependency, f"{details.code.name} {details.message}")


def _status_from_trailers(call: object) -> status_pb2.Status | None:
    trailers = call.trailing_metadata() or ()  # type: ignore[attr-defined]
    for key, value in trailers:
        if key == "grpc-status-details-bin":
            status = status_pb2.Status()
            status.ParseFromString(value)
            return status
    return None


__all__ = [
    "DOMAIN",
    "AlreadyExists",
    "DeadlineExceeded",
    "ErrorDetails",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OrchestraError",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "decode",
    "decode_status",
    "dependency_unavailable",
    "from_rpc_error",
    "from_rpc_status",
    "reason_name",
]
