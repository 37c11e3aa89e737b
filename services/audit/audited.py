"""Audits a servicer's administrative RPCs without touching their code.

:func:`audit_changes` wraps a servicer before it is added to the server: each
listed RPC, once it has succeeded, appends an ADMIN record (through
:class:`~services.audit.admin_client.AdminAuditor`) naming the caller's key,
the RPC, the resource ids it touched, and its request and response as JSON
with secrets redacted. A failed RPC changed nothing and is not recorded.

The record is queued with :meth:`AdminAuditor.submit`: the reply never waits
on the audit service, and queued records are appended in order once it is
reachable (see admin_client.py for what happens on shutdown).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from services.audit.admin_client import AdminAuditor
from services.audit.admin_records import admin_record, redact
from services.common.identity import IdentitySigner, caller

_Method = Callable[[Any, Any], Awaitable[Any]]

# The RPCs that change something, per service (pass as ``methods``).
ACCOUNT_CHANGES = frozenset(
    {
        "CreateTenant",
        "UpdateTenant",
        "DeleteTenant",
        "CreateTeam",
        "CreateProject",
        "CreateApiKey",
        "RotateApiKey",
        "RevokeApiKey",
    }
)
BUDGET_CHANGES = frozenset({"CreateBudget", "UpdateBudget", "DeleteBudget"})
DISCOVERY_CHANGES = frozenset(
    {"CreateProvider", "UpdateProvider", "DeleteProvider", "RunDiscovery"}
)


def _fields(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _ids(found: dict[str, str], value: Any) -> None:
    """Collects ``*_id`` fields (top level and one message deep) into ``found``."""
    if not isinstance(value, dict):
        return
    for key, item in value.items():
        if key.endswith("_id") and isinstance(item, str) and item and key not in found:
            found[key] = item
    for item in value.values():
        if isinstance(item, dict):
            for key, inner in item.items():
                if key.endswith("_id") and isinstance(inner, str) and inner and key not in found:
                    found[key] = inner


class _Audited:
    """A servicer whose listed methods append an audit record after succeeding."""

    def __init__(
        self,
        inner: object,
        auditor: AdminAuditor,
        signer: IdentitySigner,
        service: str,
        methods: Collection[str],
    ) -> None:
        self._inner = inner
        self._auditor = auditor
        self._signer = signer
        self._service = service
        self._methods = frozenset(methods)

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._inner, name)
        if name not in self._methods:
            return attribute
        return self._wrap(name, attribute)

    def _wrap(self, name: str, method: _Method) -> _Method:
        async def audited(request: Message, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            response = await method(request, context)
            self._record(name, request, response, context)
            return response

        return audited

    def _record(
        self,
        name: str,
        request: Message,
        response: Message,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        identity = caller(context, self._signer)  # the method already checked it
        asked, answered = _fields(request), _fields(response)
        ids: dict[str, str] = {}
        _ids(ids, asked)
        _ids(ids, answered)
        record = admin_record(
            tenant_id=ids.get("tenant_id") or identity.tenant_id or "_installation",
            actor=identity.key_id,
            action=f"{self._service}/{name}",
            resource=",".join(f"{k}={v}" for k, v in sorted(ids.items())),
            details={"request": redact(asked), "response": redact(answered)},
        )
        self._auditor.submit(record)


def audit_changes(
    servicer: object,
    auditor: AdminAuditor,
    signer: IdentitySigner,
    service: str,
    methods: Collection[str],
) -> Any:
    """``servicer``, with ``methods`` audited as administrative changes.

    Args:
        servicer: The servicer to add to the server.
        auditor: Appends the records.
        signer: The suite's identity signer (to read the caller).
        service: The full gRPC service name, e.g. "orchestra.budget.v1.AccountService".
        methods: The RPC names that change something, e.g. {"RevokeApiKey"}.

    Returns:
        An object to pass to ``add_XServicer_to_server`` in its place.
    """
    return _Audited(servicer, auditor, signer, service, methods)
