"""Opaque page tokens for List RPCs (AIP-158).

A token records where the previous page ended (the last sort key) and a digest
of the request's filter, so a token reused with a different filter is refused
with INVALID_PAGE_TOKEN instead of silently returning the wrong rows.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from orchestra.common.v1 import errors_pb2
from services.common.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def page_size(requested: int) -> int:
    """The page size to use: the default for 0, capped at the maximum.

    Raises:
        InvalidArgument: INVALID_FIELD for a negative size.
    """
    if requested < 0:
        raise InvalidArgument(
            errors_pb2.ERROR_REASON_INVALID_FIELD,
            "page_size must not be negative",
            field="page_size",
        )
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _digest(filters: Any) -> str:
    return hashlib.sha256(json.dumps(filters, sort_keys=True, default=str).encode()).hexdigest()[
        :16
    ]


def encode(last_key: Any, filters: Any = None) -> str:
    """A token for the page after ``last_key`` under ``filters``."""
    body = json.dumps({"k": last_key, "f": _digest(filters)}, default=str)
    return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


def decode(token: str, filters: Any = None) -> Any:
    """The last key a token carries, or None for an empty token.

    Raises:
        InvalidArgument: INVALID_PAGE_TOKEN if it is malformed or was made for
            other filters.
    """
    if not token:
        return None
    try:
        body = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        last_key, digest = body["k"], body["f"]
    except (ValueError, KeyError, TypeError):
        raise _bad() from None
    if digest != _digest(filters):
        raise _bad()
    return last_key


def _bad() -> InvalidArgument:
    return InvalidArgument(
        errors_pb2.ERROR_REASON_INVALID_PAGE_TOKEN,
        "page_token does not belong to this request; start again without it",
        field="page_token",
    )
