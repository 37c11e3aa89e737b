"""Discovery's PostgreSQL store: the ``discovery`` schema, one part per table.

:class:`DiscoveryStore` is the three parts on one pool: providers
(:mod:`~services.discovery.provider_store`), the probe schedule and statistics
(:mod:`~services.discovery.probe_store`) and models
(:mod:`~services.discovery.model_store`).
"""

from __future__ import annotations

import asyncpg

from orchestra.common.v1 import errors_pb2
from services.common.errors import Unavailable
from services.discovery.model_store import ModelChanges, ModelStore
from services.discovery.probe_store import ProbeStore
from services.discovery.provider_store import ProviderStore

__all__ = ["DiscoveryStore", "ModelChanges", "store_unavailable"]


class DiscoveryStore(ProviderStore, ProbeStore, ModelStore):
    """Reads and writes the ``discovery`` schema."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool


def store_unavailable(exc: BaseException) -> Unavailable:
    """The error for a PostgreSQL failure: retryable, with a hint when."""
    return Unavailable(
        errors_pb2.ERROR_REASON_STORE_UNAVAILABLE,
        f"PostgreSQL is unavailable: {type(exc).__name__}",
        retry_after=1.0,
    )
