"""Batch RPCs: many independent items in one call, one outcome per item.

``BatchSettle``, ``BatchRelease`` and ``BatchStore`` take the requests of the
single-item RPC and answer, per item, either that RPC's response or the
``google.rpc.Status`` it would have failed with. They exist so that the
router's outbox pays one RPC per read instead of one per job; each item still
runs the single-item code path (so PostgreSQL writes group-commit and every
guard applies), concurrently.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from orchestra.common.v1 import errors_pb2
from services.common.errors import InvalidArgument
from services.common.interceptors import as_error

Q = TypeVar("Q")
R = TypeVar("R")
M = TypeVar("M")

MAX_ITEMS = 1000


def check_size(requests: Sequence[object], field: str = "requests") -> None:
    """Refuses an empty batch or one of more than :data:`MAX_ITEMS` items.

    Raises:
        InvalidArgument: INVALID_FIELD naming ``field``.
    """
    if not 0 < len(requests) <= MAX_ITEMS:
        raise InvalidArgument(
            errors_pb2.ERROR_REASON_INVALID_FIELD,
            f"{field} must hold 1 to {MAX_ITEMS} items, not {len(requests)}",
            field=field,
        )


async def each(
    requests: Sequence[Q],
    handle: Callable[[Q], Awaitable[R]],
    method: str,
    result: Callable[..., M],
) -> list[M]:
    """Runs ``handle`` on every request concurrently; per request, in order,
    ``result(response=...)`` or ``result(error=...)`` with the status of the
    error it raised (a non-Orchestra error is logged as a bug and becomes
    INTERNAL with an incident id, as for a single call)."""

    return list(await asyncio.gather(*(outcome(r, handle, method, result) for r in requests)))


async def outcome(
    request: Q,
    handle: Callable[[Q], Awaitable[R]],
    method: str,
    result: Callable[..., M],
    **fields: object,
) -> M:
    """One item's result message: ``result(response=..., **fields)``, or
    ``result(error=..., **fields)`` with the status of what ``handle`` raised
    (as for `each`; streams pass the item's ``call_id`` in ``fields``)."""
    try:
        return result(response=await handle(request), **fields)
    except Exception as exc:  # noqa: BLE001 - the item's own outcome
        return result(error=as_error(exc, method).to_rpc_status(), **fields)


__all__ = ["MAX_ITEMS", "check_size", "each", "outcome"]
