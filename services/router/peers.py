"""The router's view of the other services: budget, accounts, cache and audit.

Calls on the request path (tenant policy, reserve, cache lookup) are made here
with tight deadlines; follow-up work (settle, release, cache store, audit) is
handed to the outbox, whose handlers are the ``deliver_*`` methods below.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from orchestra.audit.v1 import audit_service_pb2 as audit_pb2
from orchestra.audit.v1 import audit_service_pb2_grpc as audit_grpc
from orchestra.budget.v1 import account_service_pb2 as account_pb2
from orchestra.budget.v1 import account_service_pb2_grpc as account_grpc
from orchestra.budget.v1 import budget_service_pb2 as budget_pb2
from orchestra.budget.v1 import budget_service_pb2_grpc as budget_grpc
from orchestra.cache.v1 import cache_service_pb2 as cache_pb2
from orchestra.cache.v1 import cache_service_pb2_grpc as cache_grpc
from services.common.clients import ServiceToken, channel
from services.common.errors import OrchestraError, decode_status, from_rpc_error, reason_name
from services.common.identity import IdentitySigner
from services.common.settings import Settings
from services.common.streams import Multiplexer, StreamUnusable
from services.router.outbox import PermanentFailure

log = logging.getLogger(__name__)

POLICY_TTL_SECONDS = 10.0
RESERVE_DEADLINE = 2.0
# As the edge's ext_authz timeout was: a key is resolved from memory or one
# primary-key read, so a second means budget is in trouble.
AUTHENTICATE_DEADLINE = 1.0
LOOKUP_DEADLINE = 0.25
DELIVERY_DEADLINE = 5.0
# Refusals that no retry can fix: the job goes to the dead-letter stream.
_PERMANENT = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
}


class Peers:
    """Stubs for the services the router depends on."""

    def __init__(self, settings: Settings, signer: IdentitySigner) -> None:
        self._token = ServiceToken(signer, "router")
        self._channels = [channel(settings.addrs[name]) for name in ("budget", "cache", "audit")]
        budget_channel, cache_channel, audit_channel = self._channels
        self.accounts = account_grpc.AccountServiceStub(budget_channel)
        self.budget = budget_grpc.BudgetServiceStub(budget_channel)
        self.cache = cache_grpc.CacheServiceStub(cache_channel)
        self.audit = audit_grpc.AuditServiceStub(audit_channel)
        self._policies: dict[str, tuple[float, account_pb2.TenantPolicy]] = {}
        # Reserve and Lookup ride one long-lived stream each (one message per
        # chat instead of a whole RPC); an item the stream cannot carry goes
        # unary (see services/common/streams.py).
        self._reserves: Multiplexer[budget_pb2.ReserveRequest, budget_pb2.ReserveResponse] = (
            Multiplexer(
                lambda: self.budget.ReserveStream(metadata=self._token.metadata()),
                lambda call_id, r: budget_pb2.ReserveStreamRequest(call_id=call_id, request=r),
                "budget",
            )
        )
        self._lookups: Multiplexer[cache_pb2.LookupRequest, cache_pb2.LookupResponse] = Multiplexer(
            lambda: self.cache.LookupStream(metadata=self._token.metadata()),
            lambda call_id, r: cache_pb2.LookupStreamRequest(call_id=call_id, request=r),
            "cache",
        )

    async def close(self) -> None:
        """Ends the streams and closes every channel."""
        await asyncio.gather(self._reserves.aclose(), self._lookups.aclose())
        await asyncio.gather(*(c.close() for c in self._channels))

    async def tenant_policy(self, tenant_id: str) -> account_pb2.TenantPolicy:
        """The tenant's policy, cached for a few seconds."""
        cached = self._policies.get(tenant_id)
        now = time.monotonic()
        if cached and cached[0] > now:
            return cached[1]
        try:
            reply = await self.accounts.GetTenant(
                account_pb2.GetTenantRequest(tenant_id=tenant_id),
                timeout=RESERVE_DEADLINE,
                metadata=self._token.metadata(),
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, dependency="budget") from None
        self._policies[tenant_id] = (now + POLICY_TTL_SECONDS, reply.tenant.policy)
        return reply.tenant.policy

    async def authenticate(self, secret: str) -> account_pb2.AuthenticateResponse:
        """Who an API key belongs to, or the budget service's refusal as ours."""
        try:
            reply: account_pb2.AuthenticateResponse = await self.accounts.Authenticate(
                account_pb2.AuthenticateRequest(api_key=secret),
                timeout=AUTHENTICATE_DEADLINE,
                metadata=self._token.metadata(),
            )
            return reply
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, dependency="budget") from None

    async def reserve(self, request: budget_pb2.ReserveRequest) -> budget_pb2.ReserveResponse:
        """Holds the worst-case cost, or raises the budget's refusal as ours."""
        with contextlib.suppress(StreamUnusable):
            return await self._reserves.call(request, RESERVE_DEADLINE)
        # Unary Reserve is idempotent per request_id, so an item whose stream
        # broke after the budget held it gets the same hold back.
        try:
            reply: budget_pb2.ReserveResponse = await self.budget.Reserve(
                request, timeout=RESERVE_DEADLINE, metadata=self._token.metadata()
            )
            return reply
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, dependency="budget") from None

    async def lookup(self, request: cache_pb2.LookupRequest) -> cache_pb2.LookupResponse | None:
        """The cache's answer (``hit`` false on a miss); None if the cache failed,
        which is a miss too, not an error."""
        try:
            return await self._lookups.call(request, LOOKUP_DEADLINE)
        except StreamUnusable:
            pass
        except OrchestraError as exc:
            log.warning("cache lookup failed, treated as a miss: %s", reason_name(exc.reason))
            return None
        try:
            reply: cache_pb2.LookupResponse = await self.cache.Lookup(
                request, timeout=LOOKUP_DEADLINE, metadata=self._token.metadata()
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("cache lookup failed, treated as a miss: %s", exc.code().name)
            return None
        return reply

    # --- outbox handlers: raise to retry later, PermanentFailure to dead-letter

    async def deliver_settle(self, payload: bytes) -> None:
        """Settles a reservation (idempotent per request id)."""
        await self._deliver(self.budget.Settle, budget_pb2.SettleRequest.FromString(payload))

    async def deliver_release(self, payload: bytes) -> None:
        """Releases a reservation (idempotent)."""
        await self._deliver(self.budget.Release, budget_pb2.ReleaseRequest.FromString(payload))

    async def deliver_cache_store(self, payload: bytes) -> None:
        """Stores an answer in the cache (idempotent per key)."""
        await self._deliver(self.cache.Store, cache_pb2.StoreRequest.FromString(payload))

    async def deliver_settle_many(self, payloads: Sequence[bytes]) -> list[BaseException | None]:
        """Settles several reservations in one BatchSettle call."""
        batch = budget_pb2.BatchSettleRequest(
            requests=[budget_pb2.SettleRequest.FromString(p) for p in payloads]
        )
        return await self._deliver_many(
            self.budget.BatchSettle, batch, payloads, self.deliver_settle
        )

    async def deliver_release_many(self, payloads: Sequence[bytes]) -> list[BaseException | None]:
        """Releases several reservations in one BatchRelease call."""
        batch = budget_pb2.BatchReleaseRequest(
            requests=[budget_pb2.ReleaseRequest.FromString(p) for p in payloads]
        )
        return await self._deliver_many(
            self.budget.BatchRelease, batch, payloads, self.deliver_release
        )

    async def deliver_cache_store_many(
        self, payloads: Sequence[bytes]
    ) -> list[BaseException | None]:
        """Stores several answers in one BatchStore call."""
        batch = cache_pb2.BatchStoreRequest(
            requests=[cache_pb2.StoreRequest.FromString(p) for p in payloads]
        )
        return await self._deliver_many(
            self.cache.BatchStore, batch, payloads, self.deliver_cache_store
        )

    async def deliver_audit(self, payload: bytes) -> None:
        """Appends an audit record (idempotent per event id)."""
        await self._deliver(
            self.audit.AppendRecord, audit_pb2.AppendRecordRequest.FromString(payload)
        )

    async def deliver_audit_many(self, payloads: Sequence[bytes]) -> list[BaseException | None]:
        """Appends several audit records in one AppendRecords call (idempotent per event id).

        AppendRecords is atomic: if one record is refused, none is appended,
        so the records then go one by one and only the refused one is
        dead-lettered. Any other failure leaves them all to retry.
        """
        requests = [audit_pb2.AppendRecordRequest.FromString(p) for p in payloads]
        batch = audit_pb2.AppendRecordsRequest(
            records=[r.record for r in requests],
            bodies=[r.body for r in requests if r.HasField("body")],
        )
        try:
            await self._deliver(self.audit.AppendRecords, batch)
        except PermanentFailure:
            # In order: the log keeps the chats' order.
            return await _one_by_one(payloads, self.deliver_audit)
        return [None] * len(payloads)

    async def _deliver_many(
        self,
        method: Any,
        batch: Any,
        payloads: Sequence[bytes],
        deliver_one: Callable[[bytes], Awaitable[None]],
    ) -> list[BaseException | None]:
        """One batch call; per payload, None (done) or why it is not.

        Each item's own error comes back in its result: PermanentFailure for
        a refusal no retry can fix, ItemFailed otherwise. A batch the peer
        refuses as a whole for good (an older peer without the batch RPC, say)
        goes one by one, so that only a refused item is dead-lettered; any
        other failure of the call raises, leaving every job to retry.
        """
        try:
            reply = await method(batch, timeout=DELIVERY_DEADLINE, metadata=self._token.metadata())
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in _PERMANENT and exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            return await _one_by_one(payloads, deliver_one)
        return [_item_outcome(result) for result in reply.results]

    async def _deliver(self, method: Any, request: object) -> None:
        try:
            await method(request, timeout=DELIVERY_DEADLINE, metadata=self._token.metadata())
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _PERMANENT:
                raise PermanentFailure(f"{exc.code().name}: {exc.details()}") from exc
            raise


async def _one_by_one(
    payloads: Sequence[bytes], deliver_one: Callable[[bytes], Awaitable[None]]
) -> list[BaseException | None]:
    """Delivers each payload on its own, in order; per payload, None or its error."""
    outcomes: list[BaseException | None] = []
    for payload in payloads:
        try:
            await deliver_one(payload)
            outcomes.append(None)
        except Exception as exc:  # noqa: BLE001 - the outbox judges each
            outcomes.append(exc)
    return outcomes


class ItemFailed(Exception):
    """One item of a batch call failed in a way that a retry may fix."""


def _item_outcome(result: Any) -> BaseException | None:
    """None for an item that succeeded; else the exception the outbox judges."""
    if result.WhichOneof("outcome") != "error":
        return None
    details = decode_status(result.error)
    text = f"{details.code.name}: {details.message}"
    return PermanentFailure(text) if details.code in _PERMANENT else ItemFailed(text)
