"""Audits a service's administrative RPCs: one server interceptor, declared per service.

Each service lists the RPCs that change something (:data:`Changes`: full
service name -> method names) and serves with an :class:`AdminAuditInterceptor`
(its ``interceptors()``). Each listed RPC, once it has succeeded, appends an
ADMIN record (through :class:`~services.common.audit_client.AdminAuditor`)
naming the caller's key, the RPC, the resource ids it touched, and its request
and response as JSON with secrets redacted. A failed RPC changed nothing and is
not recorded.

The record is written to the service's durable outbox
(:meth:`AdminAuditor.submit`, one INSERT into its own PostgreSQL) before the
reply goes out: the reply never waits on the audit service, and a crash after
the reply loses nothing; outbox rows are appended in order once the audit
service is reachable. If the outbox cannot be written (its database just
failed), the record is appended directly, and logged at ERROR as JSON when
that fails too.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any, TypeAlias

import asyncpg
import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from services.common.admin_records import admin_record, redact
from services.common.audit_client import AdminAuditor, log_unrecorded
from services.common.identity import IdentitySigner, caller

log = logging.getLogger(__name__)

Changes = Mapping[str, Collection[str]]
"""Full gRPC service name -> the names of its RPCs that change something."""

_Context = grpc.aio.ServicerContext[Any, Any]
# A unary behavior as grpc.aio runs it: the stubs type it as a plain callable.
_Behavior = Callable[[Any, Any], Any]
_Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
_Continuation: TypeAlias = Callable[[grpc.HandlerCallDetails], Awaitable["_Handler | None"]]


def _fields(message: Message) -> dict[str, Any]:
    try:
        return json_format.MessageToDict(message, preserving_proto_field_name=True)
    except (ValueError, json_format.Error):  # a Timestamp or Duration JSON cannot print
        printable = type(message)()
        printable.CopyFrom(message)
        _clear_unprintable(printable)
        return json_format.MessageToDict(printable, preserving_proto_field_name=True)


def _clear_unprintable(message: Message) -> None:
    """Clears, at any depth, the Timestamps and Durations JSON cannot print."""
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        if field.message_type.full_name in _TIME_TYPES and not field.is_repeated:
            try:
                value.ToJsonString()
            except ValueError:
                message.ClearField(field.name)
        elif field.message_type.GetOptions().map_entry:
            for item in value.values():
                if isinstance(item, Message):
                    _clear_unprintable(item)
        elif field.is_repeated:
            for item in value:
                _clear_unprintable(item)
        else:
            _clear_unprintable(value)


_TIME_TYPES = frozenset({"google.protobuf.Timestamp", "google.protobuf.Duration"})


def _ids(found: dict[str, str], value: Any, depth: int = 1) -> None:
    """Collects ``*_id`` fields (top level first, then ``depth`` messages deep) into ``found``."""
    if not isinstance(value, dict):
        return
    for key, item in value.items():
        if key.endswith("_id") and isinstance(item, str) and item:
            found.setdefault(key, item)
    if depth > 0:
        for item in value.values():
            _ids(found, item, depth - 1)


class AdminAuditInterceptor(grpc.aio.ServerInterceptor):
    """Appends an ADMIN record after each successful call of a declared change RPC."""

    def __init__(self, auditor: AdminAuditor, signer: IdentitySigner, changes: Changes) -> None:
        """Args:
        auditor: Appends the records.
        signer: The suite's identity signer (to read the caller).
        changes: The RPCs to audit, e.g.
            ``{"orchestra.budget.v1.AccountService": {"RevokeApiKey"}}``.
        """
        self._auditor = auditor
        self._signer = signer
        self._paths = {
            f"/{service}/{method}" for service, methods in changes.items() for method in methods
        }

    async def intercept_service(
        self, continuation: _Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> _Handler | None:
        handler = await continuation(handler_call_details)
        path = handler_call_details.method
        if handler is None or handler.unary_unary is None or path not in self._paths:
            return handler
        return grpc.unary_unary_rpc_method_handler(
            self._wrap(path, handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _wrap(self, path: str, behavior: _Behavior) -> _Behavior:
        async def audited(request: Message, context: _Context) -> Any:
            response = await behavior(request, context)
            await self._record(path, request, response, context)
            return response

        return audited

    async def _record(
        self, path: str, request: Message, response: Message, context: _Context
    ) -> None:
        identity = caller(context, self._signer)  # the method already checked it
        asked, answered = _fields(request), _fields(response)
        ids: dict[str, str] = {}
        _ids(ids, asked)
        _ids(ids, answered)
        record = admin_record(
            tenant_id=ids.get("tenant_id") or identity.tenant_id or "_installation",
            actor=identity.key_id,
            action=path.removeprefix("/"),
            resource=",".join(f"{k}={v}" for k, v in sorted(ids.items())),
            details={"request": redact(asked), "response": redact(answered)},
        )
        try:
            await self._auditor.submit(record)
        except (asyncpg.PostgresError, OSError) as exc:
            log.warning("admin audit outbox unavailable (%r); appending directly", exc)
            try:
                await self._auditor.record(record)
            except grpc.aio.AioRpcError as failed:
                log_unrecorded(record, failed.code().name)
