"""Providers: validation of RPC input, and conversion between proto, config and row.

The credential enters here in clear (from CreateProvider, UpdateProvider or
the config file), is sealed at once, and leaves only as ``credential_hint``:
:func:`to_proto` is the one way a provider is answered, and it never sets
``credential``.
"""

from __future__ import annotations

import dataclasses
import re
import urllib.parse
from collections.abc import Callable, Mapping

from google.protobuf import duration_pb2, field_mask_pb2

from orchestra.common.v1 import errors_pb2
from orchestra.discovery.v1 import discovery_service_pb2 as pb
from services.common.config_file import ProviderEntry
from services.common.crypto import CredentialCipher, CredentialError, credential_hint
from services.common.errors import InvalidArgument
from services.discovery.catalog import combined_health
from services.discovery.health import ProbeStats
from services.discovery.records import (
    DEFAULT_CONNECT_TIMEOUT_MS,
    DEFAULT_READ_TIMEOUT_MS,
    SOURCE_API,
    SOURCE_CONFIG,
    ProviderRecord,
)
from services.providers.listing import Endpoint
from services.providers.types import ProviderType

_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,100}$")
_MAX_TEXT = 200
_MAX_CREDENTIAL = 4096
_MAX_HEADERS = 50
_MAX_TIMEOUT_MS = 600_000
# Headers the HTTP client computes itself; an operator value would break requests.
_RESERVED_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})

# UpdateProvider: mask paths that may change, and fields that never may.
UPDATABLE = frozenset(
    {
        "display_name",
        "type",
        "base_url",
        "credential",
        "headers",
        "organization",
        "connect_timeout",
        "read_timeout",
        "rate_limit",
        "rate_limit.requests_per_minute",
        "rate_limit.tokens_per_minute",
        "enabled",
    }
)
_OUTPUT_ONLY = frozenset({"provider_id", "credential_hint", "health", "create_time", "update_time"})


def _invalid(field: str, message: str) -> InvalidArgument:
    return InvalidArgument(errors_pb2.ERROR_REASON_INVALID_FIELD, message, field=field)


def validate_id(provider_id: str, field: str = "provider_id") -> str:
    """Checks a provider id: lower-case letters, digits and '-', at most 63.

    Raises:
        InvalidArgument: INVALID_FIELD naming ``field``.
    """
    if not provider_id:
        raise _invalid(field, f"{field} is required")
    if not _ID.fullmatch(provider_id):
        raise _invalid(
            field, f"{field} must be lower-case letters, digits and '-' (at most 63 characters)"
        )
    return provider_id


def _type(value: int) -> int:
    if value == pb.PROVIDER_TYPE_UNSPECIFIED or value not in pb.ProviderType.values():
        raise _invalid("provider.type", "provider.type must be a known PROVIDER_TYPE_*")
    return value


def _base_url(value: str) -> str:
    field = "provider.base_url"
    if not value:
        raise _invalid(field, "provider.base_url is required")
    parsed = urllib.parse.urlsplit(value)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise _invalid(field, "provider.base_url must be an http:// or https:// URL with a host")
    if parsed.username or parsed.password:
        # A secret in the URL would be shown back by every Get and List.
        raise _invalid(field, "provider.base_url must not carry credentials; use credential")
    if parsed.query or parsed.fragment:
        raise _invalid(field, "provider.base_url must not have a query or fragment")
    return value.rstrip("/")


def _text(value: str, field: str) -> str:
    if len(value) > _MAX_TEXT:
        raise _invalid(field, f"{field} must be at most {_MAX_TEXT} characters")
    return value


def _credential(value: str) -> str:
    if len(value) > _MAX_CREDENTIAL or any(c in value for c in "\r\n\0"):
        raise _invalid(
            "provider.credential",
            f"provider.credential must be one line of at most {_MAX_CREDENTIAL} characters",
        )
    return value


def _headers(headers: Mapping[str, str]) -> dict[str, str]:
    if len(headers) > _MAX_HEADERS:
        raise _invalid("provider.headers", f"at most {_MAX_HEADERS} headers")
    for name, value in headers.items():
        if not _HEADER_NAME.fullmatch(name) or name.lower() in _RESERVED_HEADERS:
            raise _invalid("provider.headers", f"{name!r} is not an allowed header name")
        if any(c in value for c in "\r\n\0"):
            raise _invalid("provider.headers", f"the value of header {name!r} is not one line")
    return dict(headers)


def _timeout_ms(duration: duration_pb2.Duration, field: str, default: int) -> int:
    if duration.seconds < 0 or duration.nanos < 0:
        raise _invalid(field, f"{field} must not be negative")
    millis = duration.ToMilliseconds()
    if millis > _MAX_TIMEOUT_MS:
        raise _invalid(field, f"{field} must be at most {_MAX_TIMEOUT_MS // 1000}s")
    return millis or default


def _rate(value: int, field: str) -> int:
    if value < 0:
        raise _invalid(field, f"{field} must not be negative")
    return value


def _seal(cipher: CredentialCipher, provider_id: str, credential: str) -> tuple[bytes | None, str]:
    if not credential:
        return None, ""
    return cipher.seal(provider_id, credential), credential_hint(credential)


def from_create(provider: pb.Provider, cipher: CredentialCipher) -> ProviderRecord:
    """A new provider from a CreateProviderRequest's ``provider``.

    Output-only fields (``credential_hint``, ``health``, times) are ignored.

    Raises:
        InvalidArgument: INVALID_FIELD naming the first bad field.
    """
    provider_id = validate_id(provider.provider_id, "provider.provider_id")
    sealed, hint = _seal(cipher, provider_id, _credential(provider.credential))
    return ProviderRecord(
        provider_id=provider_id,
        type=_type(provider.type),
        base_url=_base_url(provider.base_url),
        display_name=_text(provider.display_name, "provider.display_name"),
        credential_sealed=sealed,
        credential_hint=hint,
        headers=_headers(provider.headers),
        organization=_text(provider.organization, "provider.organization"),
        # Unset means enabled: a provider created by RPC is used unless it says not.
        enabled=provider.enabled if provider.HasField("enabled") else True,
        connect_timeout_ms=_timeout_ms(
            provider.connect_timeout, "provider.connect_timeout", DEFAULT_CONNECT_TIMEOUT_MS
        ),
        read_timeout_ms=_timeout_ms(
            provider.read_timeout, "provider.read_timeout", DEFAULT_READ_TIMEOUT_MS
        ),
        requests_per_minute=_rate(
            provider.rate_limit.requests_per_minute, "provider.rate_limit.requests_per_minute"
        ),
        tokens_per_minute=_rate(
            provider.rate_limit.tokens_per_minute, "provider.rate_limit.tokens_per_minute"
        ),
        source=SOURCE_API,
    )


def mask_paths(provider: pb.Provider, mask: field_mask_pb2.FieldMask) -> list[str]:
    """The paths an UpdateProvider changes.

    An empty mask means every field that is set in ``provider`` (other than
    its id and output-only fields), as AIP-134 describes.

    Raises:
        InvalidArgument: INVALID_FIELD on ``update_mask`` for an unknown,
            immutable or output-only path.
    """
    if not mask.paths:
        return [f.name for f, _ in provider.ListFields() if f.name in UPDATABLE]
    for path in mask.paths:
        if path in _OUTPUT_ONLY:
            raise _invalid("update_mask", f"{path} cannot be changed")
        if path not in UPDATABLE:
            raise _invalid("update_mask", f"unknown or unsupported path {path!r}")
    return list(dict.fromkeys(mask.paths))


def apply_update(
    existing: ProviderRecord,
    provider: pb.Provider,
    paths: list[str],
    cipher: CredentialCipher,
) -> ProviderRecord:
    """``existing`` with the fields at ``paths`` taken from ``provider``.

    Raises:
        InvalidArgument: INVALID_FIELD naming the first bad new value.
    """
    changes: dict[str, object] = {}
    for path in paths:
        if path == "display_name":
            changes["display_name"] = _text(provider.display_name, "provider.display_name")
        elif path == "type":
            changes["type"] = _type(provider.type)
        elif path == "base_url":
            changes["base_url"] = _base_url(provider.base_url)
        elif path == "credential":
            sealed, hint = _seal(cipher, existing.provider_id, _credential(provider.credential))
            changes["credential_sealed"], changes["credential_hint"] = sealed, hint
        elif path == "headers":
            changes["headers"] = _headers(provider.headers)
        elif path == "organization":
            changes["organization"] = _text(provider.organization, "provider.organization")
        elif path == "connect_timeout":
            changes["connect_timeout_ms"] = _timeout_ms(
                provider.connect_timeout, "provider.connect_timeout", DEFAULT_CONNECT_TIMEOUT_MS
            )
        elif path == "read_timeout":
            changes["read_timeout_ms"] = _timeout_ms(
                provider.read_timeout, "provider.read_timeout", DEFAULT_READ_TIMEOUT_MS
            )
        elif path == "enabled":
            changes["enabled"] = provider.enabled
        # "rate_limit" changes both limits; a sub-path changes one.
        if path in ("rate_limit", "rate_limit.requests_per_minute"):
            changes["requests_per_minute"] = _rate(
                provider.rate_limit.requests_per_minute, "provider.rate_limit.requests_per_minute"
            )
        if path in ("rate_limit", "rate_limit.tokens_per_minute"):
            changes["tokens_per_minute"] = _rate(
                provider.rate_limit.tokens_per_minute, "provider.rate_limit.tokens_per_minute"
            )
    return dataclasses.replace(existing, **changes)  # type: ignore[arg-type]


def from_config(entry: ProviderEntry, cipher: CredentialCipher) -> ProviderRecord:
    """The provider a config file entry declares (already validated by pydantic)."""
    sealed, hint = _seal(cipher, entry.id, entry.credential)
    return ProviderRecord(
        provider_id=entry.id,
        type=ProviderType.from_config(entry.type).proto,
        base_url=entry.base_url,
        display_name=entry.display_name,
        credential_sealed=sealed,
        credential_hint=hint,
        headers=dict(entry.headers),
        organization=entry.organization,
        local=entry.local,
        enabled=entry.enabled,
        connect_timeout_ms=round(entry.connect_timeout_seconds * 1000),
        read_timeout_ms=round(entry.read_timeout_seconds * 1000),
        source=SOURCE_CONFIG,
        declared_models=tuple(entry.custom.models) if entry.custom is not None else (),
    )


def same_credential(cipher: CredentialCipher) -> Callable[[ProviderRecord, ProviderRecord], bool]:
    """A predicate for :meth:`DiscoveryStore.apply_config` comparing clear credentials."""

    def same(existing: ProviderRecord, wanted: ProviderRecord) -> bool:
        if existing.credential_sealed is None or wanted.credential_sealed is None:
            return existing.credential_sealed is wanted.credential_sealed
        try:
            return cipher.open(existing.provider_id, existing.credential_sealed) == cipher.open(
                wanted.provider_id, wanted.credential_sealed
            )
        except CredentialError:
            return False  # an unreadable row is simply rewritten

    return same


def endpoint(record: ProviderRecord, cipher: CredentialCipher) -> Endpoint:
    """What listing needs, with the credential decrypted.

    Raises:
        CredentialError: The stored credential cannot be decrypted.
    """
    credential = (
        cipher.open(record.provider_id, record.credential_sealed)
        if record.credential_sealed is not None
        else ""
    )
    return Endpoint(
        type=record.type,
        base_url=record.base_url,
        credential=credential,
        headers=record.headers,
        organization=record.organization,
        connect_timeout=record.connect_timeout_ms / 1000,
        read_timeout=record.read_timeout_ms / 1000,
        local=record.local,
        declared_models=record.declared_models,
    )


def to_proto(record: ProviderRecord, stats: Mapping[str, ProbeStats] | None = None) -> pb.Provider:
    """The provider as RPCs answer it: credential redacted to its hint.

    Args:
        record: The provider.
        stats: Probe statistics by subject; its health combines the last
            listing with the provider's probes.
    """
    provider = pb.Provider(
        provider_id=record.provider_id,
        display_name=record.display_name,
        type=pb.ProviderType.ValueType(record.type),
        base_url=record.base_url,
        credential_hint=record.credential_hint,
        headers=dict(record.headers),
        organization=record.organization,
        enabled=record.enabled,
    )
    provider.connect_timeout.FromMilliseconds(record.connect_timeout_ms)
    provider.read_timeout.FromMilliseconds(record.read_timeout_ms)
    provider.rate_limit.requests_per_minute = record.requests_per_minute
    provider.rate_limit.tokens_per_minute = record.tokens_per_minute
    provider.health.CopyFrom(combined_health(record, stats or {}))
    if record.create_time is not None:
        provider.create_time.FromDatetime(record.create_time)
    if record.update_time is not None:
        provider.update_time.FromDatetime(record.update_time)
    return provider
