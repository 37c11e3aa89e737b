"""Opaque page tokens for List RPCs (AIP-158).

A token records where the previous page ended (the last sort key) and a digest
of the request's filter, so a token reused with a different filter is refused
with INVALID_PAGE_TOKEN instead of silently returning the wrong rows.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from orchestra.common.v1 import errors_pb2
from services.common.errors import InvalidArgument

T = TypeVar("T")

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


class ListRequest(Protocol):
    """What every List request carries (AIP-158)."""

    @property
    def page_size(self) -> int: ...

    @property
    def page_token(self) -> str: ...


@dataclasses.dataclass(frozen=True)
class Page:
    """One List call's page: where it starts, how much to fetch, how to cut it.

    Usage in a servicer::

        page = paging.Page.of(request, filters={"team": request.team})
        rows = await store.list(after=page.after, limit=page.fetch)
        items, token = page.cut(rows, key=lambda row: row.id)

    Attributes:
        size: Items on the page (the default for 0, capped at the maximum).
        after: The last sort key of the previous page; None for the first page.
        filters: What the request filters on; a token made for other filters
            is refused.
    """

    size: int
    after: Any
    filters: Any = None

    @classmethod
    def of(cls, request: ListRequest, filters: Any = None) -> Page:
        """The page ``request`` asks for.

        Raises:
            InvalidArgument: INVALID_FIELD for a negative page_size,
                INVALID_PAGE_TOKEN for a token that is malformed or was made
                for other filters.
        """
        return cls(page_size(request.page_size), decode(request.page_token, filters), filters)

    @property
    def fetch(self) -> int:
        """How many items to fetch: one more than the page, to know whether more follow."""
        return self.size + 1

    def cut(self, items: Sequence[T], key: Callable[[T], Any]) -> tuple[list[T], str]:
        """The page's items (of ``items``, fetched as :attr:`fetch`) and the next page token.

        The token is empty on the last page.
        """
        if len(items) > self.size:
            return list(items[: self.size]), encode(key(items[self.size - 1]), self.filters)
        return list(items), ""


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
